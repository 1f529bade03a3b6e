"""Survey-like observation of a rendered simulation, in linear flux before the brightness stretch.

:class:`Observation` names each effect with physical units: the galaxy's pose on the sky (sub-pixel shift, scale
and position-angle jitter, drawn by :func:`draw_poses` and applied to the star particles when they are projected),
cosmological surface-brightness dimming, foreground stars and background galaxies, the PSF, photon shot noise and
sky noise. Fluxes are given relative to the merger itself, so an observation means the same at any particle count
or image size: brightnesses in magnitudes relative to the merger's total light, noise relative to its central
surface brightness (the brightest pixel of the first snapshot, rendered without any of these effects). Each effect
draws from its own seeded stream, so images are deterministic for a seed and switching one effect on does not move
the stars or noise of another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.signal import fftconvolve

from deepgalaxy.core.errors import DatasetError

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
"""A Gaussian's FWHM in units of its sigma (2.3548)."""
PSF_PROFILES = ("gaussian", "moffat")
TRUJILLO_BETA = 4.765
"""Moffat beta of a seeing-limited PSF under Kolmogorov turbulence (Trujillo et al. 2001, MNRAS 328, 977)."""
EUCLIDEAN_SLOPE = 0.6
"""Number counts of sources spread uniformly in Euclidean space: dN/dm proportional to 10^(0.6 m)."""
MOFFAT_RADIUS = 4.0
"""The Moffat kernel reaches this many FWHM from its centre (beyond, under 1% of the flux even at beta 2.5)."""
SERSIC_INDEX = (1.0, 4.0)
"""Background galaxies' Sersic indices are drawn uniformly between a disk (1) and a de Vaucouleurs spheroid (4)."""
AXIS_RATIO = (0.2, 1.0)
"""Background galaxies' minor/major axis ratios are drawn uniformly in this range."""
OVERSAMPLE = 4
"""Sub-pixels per pixel side when a background galaxy is drawn (an effective radius can be under a pixel)."""
MAX_SOURCES = 10_000
"""Most foreground stars or background galaxies per image on average (a sparse field, not a crowded one)."""
MAX_SCALE_JITTER = 1.0
"""Apparent sizes vary at most by a factor 2 either way."""
_STREAMS = ("pose", "stars", "galaxies", "shot", "sky")
"""One random stream per effect, in this order after the simulation's seed."""


@dataclass(frozen=True)
class Observation:
    """How a simulated merger is observed (the defaults of the effects that existed before are theirs).

    - ``psf``, ``psf_fwhm``, ``moffat_beta``: the point-spread function, ``"gaussian"`` or ``"moffat"``
      (I(r) ~ (1 + (r/alpha)^2)^-beta), of full width at half maximum ``psf_fwhm`` pixels (0: none). The default,
      3.53 px, is the Gaussian of sigma 1.5 px used before. The galaxy carries, in addition, the 1-px (sigma)
      smoothing of its star particles.
    - ``sky_noise``: Gaussian sky noise, 1 sigma per pixel as a fraction of the merger's central surface brightness
      I0 (a limiting surface brightness -2.5 log10(sky_noise) mag fainter than the centre per pixel; 1e-4 = 10 mag,
      the level used before at the default resolution; 0: none).
    - ``peak_counts``: photon counts in a pixel at I0: Poisson shot noise on the galaxy, stars and background
      galaxies (S/N sqrt(peak_counts) at the centre; 0: none).
    - ``stars``, ``star_mags``: foreground stars, Poisson-distributed with this mean per image (the field of view),
      point sources at pixel centres shaped by the PSF, magnitudes between ``star_mags`` = (bright, faint)
      relative to the merger's total light with Euclidean counts (dN/dm ~ 10^(0.6 m)).
    - ``background_galaxies``, ``background_mags``, ``background_radius``: background galaxies, the same way: Poisson
      mean per image, magnitudes (bright, faint) relative to the merger, elliptical Sersic profiles of effective
      radius uniform in ``background_radius`` pixels (index 1-4, axis ratio 0.2-1, any orientation), shaped by the PSF.
    - ``shift``: the merger's centre moves by up to this many pixels along each image axis (uniform; 0.5 = anywhere
      within a pixel).
    - ``scale_jitter``: its apparent size is multiplied by a factor drawn log-uniformly in [1/(1+j), 1+j], at
      constant surface brightness (as a change of distance in a nearby universe).
    - ``pa_jitter``: it is rotated about the field centre by an angle uniform in [-pa_jitter, pa_jitter] degrees
      (counter-clockwise as displayed; 180: any position angle).
    - ``redshift``: the merger's surface brightness is divided by (1+z)^4 (cosmological dimming; angular sizes are
      not changed: use ``scale_jitter`` for those). Stars, background galaxies and the sky are not dimmed.
    """

    psf: str = "gaussian"
    psf_fwhm: float = 1.5 * FWHM_PER_SIGMA
    moffat_beta: float = TRUJILLO_BETA
    sky_noise: float = 1e-4
    peak_counts: float = 0.0
    stars: float = 8.0
    star_mags: tuple[float, float] = (0.0, 9.0)
    background_galaxies: float = 0.0
    background_mags: tuple[float, float] = (2.0, 7.0)
    background_radius: tuple[float, float] = (0.5, 3.0)
    shift: float = 0.0
    scale_jitter: float = 0.0
    pa_jitter: float = 0.0
    redshift: float = 0.0

    def __post_init__(self) -> None:
        for name in ("star_mags", "background_mags", "background_radius"):
            value = getattr(self, name)
            if isinstance(value, list | tuple):  # stored in JSON as a list
                object.__setattr__(self, name, tuple(value))
        if problems := self.problems():
            raise DatasetError("invalid observation parameters: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong with these parameters, each naming the parameter, its option and the allowed values."""
        found = []
        if self.psf not in PSF_PROFILES:
            found.append(f"psf={self.psf!r} (--psf) must be one of {', '.join(PSF_PROFILES)}")
        for name, low, high, unit in (
            ("psf_fwhm", 0.0, math.inf, "pixels, 0 = no PSF"), ("sky_noise", 0.0, math.inf, "x central brightness"),
            ("peak_counts", 0.0, math.inf, "photons, 0 = no shot noise"), ("stars", 0.0, MAX_SOURCES, "per image"),
            ("background_galaxies", 0.0, MAX_SOURCES, "per image"), ("shift", 0.0, math.inf, "pixels"),
            ("scale_jitter", 0.0, MAX_SCALE_JITTER, "relative"), ("pa_jitter", 0.0, 180.0, "degrees"),
            ("redshift", 0.0, math.inf, "z"),
        ):
            value = getattr(self, name)
            if not (_finite(value) and low <= value <= high):
                bounds = f">= {low:g}" if high == math.inf else f"between {low:g} and {high:g}"
                found.append(f"{name}={value!r} ({option_name(name)}) must be a number {bounds} ({unit})")
        if not (_finite(self.moffat_beta) and self.moffat_beta > 1):
            found.append(f"moffat_beta={self.moffat_beta!r} (--moffat-beta) must be a number > 1")
        for name, positive in (("star_mags", False), ("background_mags", False), ("background_radius", True)):
            value = getattr(self, name)
            if not (isinstance(value, tuple) and len(value) == 2 and all(_finite(v) for v in value)
                    and value[0] <= value[1] and (not positive or value[0] > 0)):
                what = "LOW,HIGH pixels, 0 < LOW <= HIGH" if positive else "BRIGHT,FAINT magnitudes, BRIGHT <= FAINT"
                found.append(f"{name}={_fmt_pair(value)} ({option_name(name)}) must be {what}")
        return found

    def params(self) -> dict[str, Any]:
        """JSON-able parameters (the pairs as lists), as stored in a store's attributes."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


OBSERVATION_PARAMS = tuple(f.name for f in fields(Observation))
"""The names of the observation parameters (flat among a simulation's parameters)."""


def option_name(name: str) -> str:
    """The command-line option of a parameter: ``psf_fwhm`` -> ``--psf-fwhm``."""
    return "--" + name.replace("_", "-")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fmt_pair(value: Any) -> str:
    if not isinstance(value, tuple):
        return repr(value)
    return ",".join(f"{v:g}" if _finite(v) else repr(v) for v in value)


@dataclass(frozen=True)
class Poses:
    """Per image (snapshot, camera): shift (pixels, x right and y down), size factor, rotation (radians)."""

    dx: np.ndarray
    dy: np.ndarray
    scale: np.ndarray
    angle: np.ndarray


def streams(seed: int) -> dict[str, np.random.Generator]:
    """One generator per effect, from the simulation's seed."""
    return {name: np.random.default_rng([seed, 1, k]) for k, name in enumerate(_STREAMS)}


def draw_poses(obs: Observation, rng: np.random.Generator, shape: tuple[int, int]) -> Poses | None:
    """The merger's pose in each image, or None when the observation moves nothing."""
    if not (obs.shift or obs.scale_jitter or obs.pa_jitter):
        return None
    jitter = math.log1p(obs.scale_jitter)
    return Poses(
        dx=rng.uniform(-obs.shift, obs.shift, shape), dy=rng.uniform(-obs.shift, obs.shift, shape),
        scale=np.exp(rng.uniform(-jitter, jitter, shape)),
        angle=np.deg2rad(rng.uniform(-obs.pa_jitter, obs.pa_jitter, shape)),
    )


def observe(flux: np.ndarray, obs: Observation, reference: float, light: float, seed: int) -> np.ndarray:
    """``flux`` (snapshots, cameras, H, W) of a merger already projected in its poses, observed: dimmed, with
    foreground stars and background galaxies added, blurred by the PSF, with shot and sky noise (so, like a
    sky-subtracted survey image, with negative pixels where the sky is empty).

    ``reference`` is the merger's central surface brightness I0 and ``light`` its total light, in ``flux`` units.
    """
    rng = streams(seed)
    out = (flux / (1.0 + obs.redshift) ** 4).astype(np.float32)
    if obs.stars:
        _add_stars(out, obs, light, rng["stars"])
    if obs.background_galaxies:
        _add_galaxies(out, obs, light, rng["galaxies"])
    out = convolve_psf(out, obs)
    if obs.peak_counts:
        per_count = reference / obs.peak_counts
        out = (rng["shot"].poisson(np.maximum(out, 0.0) / per_count) * per_count).astype(np.float32)
    if obs.sky_noise:
        out += rng["sky"].normal(0.0, obs.sky_noise * reference, size=out.shape).astype(np.float32)
    return out


def convolve_psf(flux: np.ndarray, obs: Observation) -> np.ndarray:
    """Each image of ``flux`` (..., H, W) blurred by the PSF (zero flux beyond the edges)."""
    if not obs.psf_fwhm:
        return flux
    if obs.psf == "gaussian":
        sigma = obs.psf_fwhm / FWHM_PER_SIGMA
        blurred: np.ndarray = gaussian_filter(flux, sigma=(0,) * (flux.ndim - 2) + (sigma, sigma), mode="constant")
        return blurred
    kernel = moffat_kernel(obs.psf_fwhm, obs.moffat_beta, max(flux.shape[-2:]))
    shaped = kernel.reshape((1,) * (flux.ndim - 2) + kernel.shape)
    convolved: np.ndarray = fftconvolve(flux, shaped, mode="same", axes=(-2, -1)).astype(flux.dtype)
    return convolved


def moffat_kernel(fwhm: float, beta: float, size: int) -> np.ndarray:
    """A normalised Moffat PSF of FWHM ``fwhm`` pixels sampled at pixel centres, at most ``size`` pixels wide."""
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    radius = min(math.ceil(MOFFAT_RADIUS * fwhm), size)
    r = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = (1.0 + (r[:, None] ** 2 + r[None, :] ** 2) / alpha**2) ** -beta
    normalised: np.ndarray = kernel / kernel.sum()
    return normalised


def source_fluxes(rng: np.random.Generator, n: int, mags: tuple[float, float], light: float) -> np.ndarray:
    """``n`` fluxes with Euclidean counts between magnitudes ``mags`` = (bright, faint) relative to ``light``."""
    bright, faint = (10.0 ** (EUCLIDEAN_SLOPE * m) for m in mags)
    m = np.log10(bright + rng.uniform(0.0, 1.0, n) * (faint - bright)) / EUCLIDEAN_SLOPE
    fluxes: np.ndarray = light * 10.0 ** (-0.4 * m)
    return fluxes


def _add_stars(out: np.ndarray, obs: Observation, light: float, rng: np.random.Generator) -> None:
    """Point sources at pixel centres (the PSF shapes them), a Poisson number per image."""
    s, c, h, w = out.shape
    image = np.repeat(np.arange(s * c), rng.poisson(obs.stars, s * c))
    ys, xs = rng.integers(0, h, image.size), rng.integers(0, w, image.size)
    flux = source_fluxes(rng, image.size, obs.star_mags, light).astype(np.float32)
    np.add.at(out.reshape(s * c, h, w), (image, ys, xs), flux)


def _add_galaxies(out: np.ndarray, obs: Observation, light: float, rng: np.random.Generator) -> None:
    """Elliptical Sersic profiles at random sub-pixel positions, a Poisson number per image."""
    s, c, h, w = out.shape
    flat = out.reshape(s * c, h, w)
    image = np.repeat(np.arange(s * c), rng.poisson(obs.background_galaxies, s * c))
    n = image.size
    flux = source_fluxes(rng, n, obs.background_mags, light)
    x0, y0 = rng.uniform(0, w, n), rng.uniform(0, h, n)
    r_e = rng.uniform(*obs.background_radius, n)
    index = rng.uniform(*SERSIC_INDEX, n)
    ratio = rng.uniform(*AXIS_RATIO, n)
    angle = rng.uniform(0.0, math.pi, n)
    for k in range(n):
        stamp, top, left = sersic_stamp(x0[k], y0[k], r_e[k], index[k], ratio[k], angle[k])
        y1, y2 = max(top, 0), min(top + stamp.shape[0], h)
        x1, x2 = max(left, 0), min(left + stamp.shape[1], w)
        flat[image[k], y1:y2, x1:x2] += (flux[k] * stamp[y1 - top : y2 - top, x1 - left : x2 - left]).astype(np.float32)


def sersic_stamp(x0: float, y0: float, r_e: float, n: float, q: float, angle: float) -> tuple[np.ndarray, int, int]:
    """An elliptical Sersic profile of unit total flux centred at pixel coordinates (x0, y0) (pixel k spans
    [k, k+1)), integrated over sub-pixels out to 4 effective radii: (stamp, top row, left column)."""
    b = 2.0 * n - 1.0 / 3.0 + 4.0 / (405.0 * n)  # Ciotti & Bertin (1999)
    half = math.ceil(4.0 * r_e) + 1
    top, left = math.floor(y0) - half, math.floor(x0) - half
    side = 2 * half + 1
    sub = (np.arange(side * OVERSAMPLE) + 0.5) / OVERSAMPLE
    dy, dx = (top + sub)[:, None] - y0, (left + sub)[None, :] - x0
    major = dx * math.cos(angle) + dy * math.sin(angle)
    minor = -dx * math.sin(angle) + dy * math.cos(angle)
    r = np.sqrt(major**2 + (minor / q) ** 2)
    fine = np.exp(-b * (r / r_e) ** (1.0 / n))
    stamp = fine.reshape(side, OVERSAMPLE, side, OVERSAMPLE).sum(axis=(1, 3))
    return stamp / stamp.sum(), top, left
