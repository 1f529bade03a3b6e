"""Restricted N-body galaxy merger: two massive centres carry extended potentials; stars are test particles.

Units: G = 1, the primary's halo mass M200 = 1 and NFW scale radius r_s = 1. Each galaxy is an NFW halo
(concentration 10, r_s scaling with mass^(1/3)) plus a central Hernquist baryonic component, both attached to one
centre. The centres attract each other through these potentials and lose orbital energy to Chandrasekhar
dynamical friction (host density softened at the centre, drag capped per step: the textbook formula makes
near-equal masses stick or blow up). Stars are massless: an exponential disk (~80%) and a bulge (~20%) on
circular orbits in their host, then feeling both potentials. Kick-drift-kick leapfrog with a fixed step over a
fixed end time; snapshots are evenly spaced in time, so snapshot k is the timescale class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

CONCENTRATION = 10.0
BARYON_FRACTION = 0.15
BARYON_SCALE = 0.3  # Hernquist scale / r_s
DISK_SCALE = 0.35  # exponential disk scale length / r_s
DISK_EDGE = 5.0  # disk truncated at this many scale lengths
BULGE_SCALE = 0.12  # / r_s
SOFTENING = 0.05  # particle softening / r_s of the primary
MERGE_RADIUS = 0.08  # nuclei closer than this (primary r_s) have coalesced
START_SEPARATION = 8.0


def _mu(x: np.ndarray | float) -> np.ndarray | float:
    return np.log1p(x) - x / (1.0 + x)


@dataclass(frozen=True)
class Galaxy:
    """One galaxy's potential: NFW halo of mass ``mass`` plus a Hernquist baryonic core."""

    mass: float
    rs: float
    c: float = CONCENTRATION

    @property
    def halo_norm(self) -> float:
        return self.mass * (1.0 - BARYON_FRACTION) / float(_mu(self.c))

    @property
    def mb(self) -> float:
        return self.mass * BARYON_FRACTION

    @property
    def ab(self) -> float:
        return BARYON_SCALE * self.rs

    def enclosed(self, r: np.ndarray | float) -> np.ndarray | float:
        """Mass within radius r."""
        r = np.asarray(r)
        return self.halo_norm * _mu(r / self.rs) + self.mb * r**2 / (r + self.ab) ** 2

    def potential(self, r: float) -> float:
        x = r / self.rs
        return float(-self.halo_norm * math.log1p(x) / r - self.mb / (r + self.ab))

    def density(self, r: float) -> float:
        """Halo + baryon density (for dynamical friction)."""
        x = r / self.rs
        rho_h = self.halo_norm / (4 * math.pi * self.rs**3) / (x * (1 + x) ** 2)
        rho_b = self.mb * self.ab / (2 * math.pi * r * (r + self.ab) ** 3)
        return rho_h + rho_b

    def vcirc(self, r: np.ndarray | float) -> np.ndarray | float:
        return np.sqrt(self.enclosed(r) / np.asarray(r))


@dataclass(frozen=True)
class MergerParams:
    """One simulation's physical and numerical parameters."""

    mass_ratio: float = 1.0
    pericentre: float = 1.0  # first pericentre of the parabolic orbit, in the primary's r_s
    particles: int = 10_000  # stars per galaxy
    snapshots: int = 71
    t_end: float = 60.0
    dt: float = 0.02
    friction: float = 3.0  # Coulomb logarithm ln(Lambda)
    bulge_fraction: float = 0.2


@dataclass
class MergerResult:
    """Star positions per snapshot and the orbit's key times."""

    positions: np.ndarray  # (snapshots, n_stars, 3) float32
    centres: np.ndarray  # (snapshots, 2, 3) float64
    weights: np.ndarray  # (n_stars,) float32 light per star
    galaxy: np.ndarray  # (n_stars,) int8: 0 primary, 1 secondary
    times: np.ndarray  # (snapshots,) float64
    t_pericentre: float
    t_coalescence: float  # NaN if the nuclei did not merge by t_end
    spins: list[np.ndarray] = field(default_factory=list)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation matrix (QR of a Gaussian matrix with the sign fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def _sample_disk_galaxy(
    gal: Galaxy, n: int, bulge_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions, velocities (relative to the centre) and the spin axis of a disk + bulge in ``gal``'s potential."""
    n_bulge = round(n * bulge_fraction)
    n_disk = n - n_bulge
    rd = DISK_SCALE * gal.rs
    # exponential disk surface density: R ~ Gamma(2, rd), truncated
    radius = rng.gamma(2.0, rd, size=n_disk * 2)
    radius = radius[radius < DISK_EDGE * rd][:n_disk]
    while len(radius) < n_disk:  # pragma: no cover - truncation removes ~4%, doubling always suffices
        extra = rng.gamma(2.0, rd, size=n_disk)
        radius = np.concatenate([radius, extra[extra < DISK_EDGE * rd]])[:n_disk]
    phi = rng.uniform(0, 2 * np.pi, n_disk)
    z = rng.normal(0, 0.05 * rd, n_disk)
    pos_d = np.stack([radius * np.cos(phi), radius * np.sin(phi), z], axis=1)
    v = gal.vcirc(np.maximum(radius, 1e-3))
    vel_d = np.stack([-v * np.sin(phi), v * np.cos(phi), np.zeros(n_disk)], axis=1)
    # bulge: Hernquist radii (inverse CDF), circular orbits in random planes
    a = BULGE_SCALE * gal.rs
    u = rng.uniform(0.0, 0.9, n_bulge)
    rb = a * np.sqrt(u) / (1 - np.sqrt(u))
    rb = np.minimum(rb, 2.5 * rd)
    dirs = rng.normal(size=(n_bulge, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    pos_b = dirs * rb[:, None]
    tang = np.cross(dirs, rng.normal(size=(n_bulge, 3)))
    tang /= np.linalg.norm(tang, axis=1, keepdims=True)
    vel_b = tang * np.asarray(gal.vcirc(np.maximum(rb, 1e-3)))[:, None]
    rot = _random_rotation(rng)
    pos = np.concatenate([pos_d, pos_b]) @ rot.T
    vel = np.concatenate([vel_d, vel_b]) @ rot.T
    return pos, vel, rot[:, 2]


def _accel_stars(x: np.ndarray, centres: np.ndarray, gals: tuple[Galaxy, Galaxy]) -> np.ndarray:
    """Acceleration of test particles in both potentials (Plummer-softened); float32, few temporaries."""
    acc = np.zeros_like(x)
    eps2 = np.float32(SOFTENING**2)
    for k, gal in enumerate(gals):
        d = x - centres[k].astype(x.dtype)
        r2 = np.einsum("ij,ij->i", d, d)
        r = np.sqrt(r2)
        xr = r * np.float32(1.0 / gal.rs)
        m = np.log1p(xr)
        m -= xr / (1 + xr)
        m *= np.float32(gal.halo_norm)
        t = r / (r + np.float32(gal.ab))
        t *= t
        t *= np.float32(gal.mb)
        m += t
        r2 += eps2
        m /= r2 * np.sqrt(r2)
        d *= m[:, None]
        acc -= d
    return acc


def _centre_forces(c: np.ndarray, v: np.ndarray, gals: tuple[Galaxy, Galaxy], friction: float, dt: float) -> np.ndarray:
    """Accelerations of the two centres: mutual attraction plus capped Chandrasekhar friction."""
    g1, g2 = gals
    rel = c[1] - c[0]
    d = max(float(np.linalg.norm(rel)), 1e-6)
    ds = math.sqrt(d * d + SOFTENING**2)
    rhat = rel / d
    acc = np.zeros((2, 3))
    acc[0] = float(g2.enclosed(d)) / ds**2 * rhat
    acc[1] = -float(g1.enclosed(d)) / ds**2 * rhat
    vrel = v[1] - v[0]
    speed = float(np.linalg.norm(vrel))
    if friction > 0 and speed > 1e-8:
        soft = math.sqrt(d * d + (0.3 * g1.rs) ** 2)  # density softened at the centre
        drag = 0.0
        for host, sat_mass in ((g1, g2.mass), (g2, g1.mass)):
            x = speed / float(host.vcirc(soft))
            f = math.erf(x) - 2 * x / math.sqrt(math.pi) * math.exp(-x * x)
            drag += 4 * math.pi * friction * sat_mass * host.density(soft) * f / speed**2
        drag = min(drag, 0.05 * speed / dt)  # cap: at most 5% of the relative speed per step
        a_rel = -drag * vrel / speed
        mtot = g1.mass + g2.mass
        acc[1] += a_rel * g1.mass / mtot
        acc[0] -= a_rel * g2.mass / mtot
    return acc


def parabolic_orbit(gals: tuple[Galaxy, Galaxy], pericentre: float, separation: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre positions and velocities (COM frame) of a zero-energy orbit in the extended potentials.

    A point-mass parabolic speed would leave the pair unbound in extended haloes, so the energy uses the
    potentials themselves: v(r)^2 = -2 (Phi_1(r) + Phi_2(r)), angular momentum from the pericentre.
    """
    g1, g2 = gals

    def vesc(r: float) -> float:
        return math.sqrt(-2.0 * (g1.potential(r) + g2.potential(r)))

    lz = pericentre * vesc(pericentre)
    v0 = vesc(separation)
    vt = lz / separation
    vr = -math.sqrt(max(v0 * v0 - vt * vt, 0.0))
    rel_x = np.array([separation, 0.0, 0.0])
    rel_v = np.array([vr, vt, 0.0])
    f1 = g2.mass / (g1.mass + g2.mass)
    f2 = g1.mass / (g1.mass + g2.mass)
    return np.stack([-f1 * rel_x, f2 * rel_x]), np.stack([-f1 * rel_v, f2 * rel_v])


def simulate_merger(params: MergerParams, rng: np.random.Generator) -> MergerResult:
    """Integrate one merger and return star positions at ``params.snapshots`` evenly spaced times."""
    q = params.mass_ratio
    gals = (Galaxy(1.0, 1.0), Galaxy(q, q ** (1.0 / 3.0)))
    centres, cvel = parabolic_orbit(gals, params.pericentre, START_SEPARATION)
    pos_list, vel_list, light, which, spins = [], [], [], [], []
    for k, gal in enumerate(gals):
        p, v, spin = _sample_disk_galaxy(gal, params.particles, params.bulge_fraction, rng)
        pos_list.append(p + centres[k])
        vel_list.append(v + cvel[k])
        light.append(np.full(params.particles, gal.mass / params.particles, dtype=np.float32))
        which.append(np.full(params.particles, k, dtype=np.int8))
        spins.append(spin)
    x = np.concatenate(pos_list).astype(np.float32)
    v = np.concatenate(vel_list).astype(np.float32)

    n_snap = params.snapshots
    snap_dt = params.t_end / max(n_snap - 1, 1)
    sub = max(1, math.ceil(snap_dt / params.dt))
    dt = snap_dt / sub
    times = np.arange(n_snap) * snap_dt
    positions = np.empty((n_snap, len(x), 3), dtype=np.float32)
    centre_track = np.empty((n_snap, 2, 3))
    positions[0], centre_track[0] = x, centres

    merged = False
    t_peri = t_coal = math.nan
    d_prev2 = d_prev = math.inf
    t = 0.0
    a = _accel_stars(x, centres, gals)
    ac = _centre_forces(centres, cvel, gals, params.friction, dt)
    for s in range(1, n_snap):
        for _ in range(sub):
            v += np.float32(0.5 * dt) * a
            cvel += 0.5 * dt * ac
            x += np.float32(dt) * v
            centres += dt * cvel
            t += dt
            if merged:
                centres[0] = centres[1]
                cvel[0] = cvel[1]
            d = float(np.linalg.norm(centres[1] - centres[0]))
            if not merged:
                if math.isnan(t_peri) and d_prev < d and d_prev < d_prev2:
                    t_peri = t - dt
                if (d < MERGE_RADIUS * gals[0].rs and not math.isnan(t_peri)) or d < 0.5 * MERGE_RADIUS:
                    merged = True
                    t_coal = t
                    if math.isnan(t_peri):
                        t_peri = t
                    m1, m2 = gals[0].mass, gals[1].mass
                    com = (m1 * centres[0] + m2 * centres[1]) / (m1 + m2)
                    vcom = (m1 * cvel[0] + m2 * cvel[1]) / (m1 + m2)
                    centres[:] = com
                    cvel[:] = vcom
                d_prev2, d_prev = d_prev, d
            a = _accel_stars(x, centres, gals)
            ac = np.zeros((2, 3)) if merged else _centre_forces(centres, cvel, gals, params.friction, dt)
            v += np.float32(0.5 * dt) * a
            cvel += 0.5 * dt * ac
        positions[s], centre_track[s] = x, centres
    return MergerResult(
        positions=positions,
        centres=centre_track,
        weights=np.concatenate(light),
        galaxy=np.concatenate(which),
        times=times,
        t_pericentre=t_peri,
        t_coalescence=t_coal,
        spins=spins,
    )
