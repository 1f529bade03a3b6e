"""Physical properties of a merger image: their names and units, the scaling of the simulator's N-body units to
physical ones, and the regression targets property heads learn.

The simulator works in N-body units: G = 1, the primary's halo mass M200 = 1 and its NFW scale radius r_s = 1.
:class:`PhysicalUnits` scales them for a chosen primary (defaults M200 = 1e12 solar masses, r_s = 20 kpc):

- length unit = r_s (20 kpc);
- velocity unit = sqrt(G M200 / r_s) (463.7 km/s);
- time unit = r_s / velocity unit (42.17 Myr), with G = 4.3009e-6 kpc (km/s)^2 / Msun and 1 kpc/(km/s) = 977.79 Myr.

Per-image properties (:data:`PROPERTIES`, stored under ``properties/NAME`` of a schema-2 store):

- ``time_since_pericentre`` (Myr): the snapshot's time minus the time of first pericentre (negative before it);
- ``time_to_coalescence`` (Myr): the time of coalescence minus the snapshot's time (negative after it; NaN when the
  nuclei had not merged by the end of the simulation);
- ``mass_ratio``: secondary / primary mass (the paper's 0.25 ... 1.5);
- ``pericentre`` (kpc): the distance of first pericentre of the initial parabolic orbit;
- ``inclination`` (degrees, 0..180): the angle between the direction from the merger towards the observer and
  the orbital angular momentum: 0 sees the orbit face-on and turning anticlockwise, 90 edge-on, 180 face-on and
  clockwise;
- ``azimuth`` (degrees, 0..360): that direction's angle within the orbital plane, from the direction in which the
  secondary started (x of the orbital frame) towards the direction of its initial orbital motion (y).

A card's property heads learn :data:`TARGETS`: each needs some properties and gives one or more columns. The mass
ratio is learnt as log10 (ratios are symmetric in it), the viewing direction as the unit vector towards the observer
(towards the observer) in the orbital frame (three columns that do not wrap, unlike two angles).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

G_KPC_KMS2_PER_MSUN = 4.300917270e-6
"""Newton's G in kpc (km/s)^2 per solar mass."""
MYR_PER_KPC_PER_KMS = 977.7922216807891
"""1 kpc / (1 km/s) in Myr."""


@dataclass(frozen=True)
class PhysicalUnits:
    """The physical scale of the N-body units: the primary's halo mass (Msun) and NFW scale radius (kpc)."""

    halo_mass: float = 1e12
    scale_radius: float = 20.0

    def __post_init__(self) -> None:
        for name in ("halo_mass", "scale_radius"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} must be a positive number")

    @property
    def length_kpc(self) -> float:
        """One N-body length unit in kpc (the scale radius)."""
        return float(self.scale_radius)

    @property
    def velocity_kms(self) -> float:
        """One N-body velocity unit in km/s: sqrt(G M200 / r_s)."""
        return math.sqrt(G_KPC_KMS2_PER_MSUN * self.halo_mass / self.scale_radius)

    @property
    def time_myr(self) -> float:
        """One N-body time unit in Myr: r_s / sqrt(G M200 / r_s)."""
        return self.scale_radius / self.velocity_kms * MYR_PER_KPC_PER_KMS

    def attrs(self) -> dict[str, float]:
        """The record stored in a store's attributes (``units``)."""
        return {"halo_mass_msun": float(self.halo_mass), "scale_radius_kpc": float(self.scale_radius),
                "length_kpc": self.length_kpc, "velocity_kms": self.velocity_kms, "time_myr": self.time_myr}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, float] | None) -> PhysicalUnits:
        """The units a store records (the defaults for a store that records none: schema version 1)."""
        if not attrs:
            return cls()
        return cls(halo_mass=float(attrs["halo_mass_msun"]), scale_radius=float(attrs["scale_radius_kpc"]))


PROPERTIES: dict[str, str] = {
    "time_since_pericentre": "Myr",
    "time_to_coalescence": "Myr",
    "mass_ratio": "",
    "pericentre": "kpc",
    "inclination": "deg",
    "azimuth": "deg",
}
"""Per-image physical properties and their units."""


@dataclass(frozen=True)
class Target:
    """A quantity property heads learn: the properties it is computed from and the columns it gives."""

    needs: tuple[str, ...]
    columns: tuple[str, ...]


TARGETS: dict[str, Target] = {
    "time_since_pericentre": Target(("time_since_pericentre",), ("time_since_pericentre",)),
    "time_to_coalescence": Target(("time_to_coalescence",), ("time_to_coalescence",)),
    "mass_ratio": Target(("mass_ratio",), ("log10_mass_ratio",)),
    "pericentre": Target(("pericentre",), ("pericentre",)),
    "viewing_direction": Target(("inclination", "azimuth"), ("view_x", "view_y", "view_z")),
}
"""Target name -> what it needs and gives (the order of a card's ``properties.targets`` is the order of columns)."""


def target_columns(targets: Sequence[str]) -> list[str]:
    """The output columns of property heads learning ``targets``."""
    return [column for name in targets for column in TARGETS[name].columns]


def needed_properties(targets: Sequence[str]) -> list[str]:
    """The per-image properties ``targets`` are computed from."""
    return list(dict.fromkeys(p for name in targets for p in TARGETS[name].needs))


def view_vector(inclination: np.ndarray, azimuth: np.ndarray) -> np.ndarray:
    """Unit vectors towards the observer ``(N, 3)`` in the orbital frame from inclination and azimuth in degrees."""
    i, a = np.deg2rad(np.asarray(inclination, np.float64)), np.deg2rad(np.asarray(azimuth, np.float64))
    return np.stack([np.sin(i) * np.cos(a), np.sin(i) * np.sin(a), np.cos(i)], axis=-1)


def view_angles(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inclination, azimuth) in degrees of vectors towards the observer ``(..., 3)`` (any length but zero)."""
    v = np.asarray(vectors, np.float64)
    norm = np.linalg.norm(v, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        inclination = np.rad2deg(np.arccos(np.clip(v[..., 2] / norm, -1.0, 1.0)))
    azimuth = np.mod(np.rad2deg(np.arctan2(v[..., 1], v[..., 0])), 360.0)
    return inclination, azimuth


def angle_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angles in degrees between vectors ``a`` and ``b`` ``(..., 3)`` (not necessarily unit)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    angle: np.ndarray = np.rad2deg(np.arccos(np.clip(cos, -1.0, 1.0)))
    return angle


def target_table(properties: Mapping[str, np.ndarray], targets: Sequence[str]) -> np.ndarray:
    """Raw target columns ``(N, K)`` float32 for ``targets`` from per-image ``properties`` (NaN = unknown)."""
    columns: list[np.ndarray] = []
    for name in targets:
        if name == "mass_ratio":
            q = np.asarray(properties["mass_ratio"], np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                columns.append(np.where(q > 0, np.log10(np.where(q > 0, q, 1.0)), np.nan))
        elif name == "viewing_direction":
            columns.extend(view_vector(properties["inclination"], properties["azimuth"]).T)
        else:
            columns.append(np.asarray(properties[name], np.float64))
    return np.stack(columns, axis=1).astype(np.float32)


def simulation_properties(
    times: np.ndarray, t_pericentre: float, t_coalescence: float, mass_ratio: float, pericentre: float,
    directions: np.ndarray, units: PhysicalUnits,
) -> dict[str, np.ndarray]:
    """Per-image properties of images with N-body ``times`` seen from ``directions`` ``(N, 3)`` (from the merger
    towards the observer, in the orbital frame: the orbit starts along x, moving towards y, angular momentum z)."""
    t = np.asarray(times, np.float64)
    inclination, azimuth = view_angles(directions)
    n = len(t)
    return {
        "time_since_pericentre": ((t - t_pericentre) * units.time_myr).astype(np.float32),
        "time_to_coalescence": ((t_coalescence - t) * units.time_myr).astype(np.float32),
        "mass_ratio": np.full(n, mass_ratio, np.float32),
        "pericentre": np.full(n, pericentre * units.length_kpc, np.float32),
        "inclination": inclination.astype(np.float32),
        "azimuth": azimuth.astype(np.float32),
    }
