"""Render simulated star positions as images: 14 cameras, a field centred between the nuclei, asinh brightness.

Optional observational degradation (PSF blur, background stars, sky noise) makes the images look more like survey
images; it is applied in linear flux before the brightness stretch, with its own seeded random stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from deepgalaxy.core.brightness import asinh_stretch, to_uint8


def camera_directions(n: int = 14) -> np.ndarray:
    """Unit view directions: 6 along the axes, then 8 along the cube diagonals (the first ``n`` of these 14)."""
    axes = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    diagonals = [(sx, sy, sz) for sx in (1, -1) for sy in (1, -1) for sz in (1, -1)]
    dirs = np.array(axes + diagonals, dtype=np.float64)[:n]
    if n < 1 or n > 14:
        raise ValueError(f"cameras must be between 1 and 14, got {n}")
    unit: np.ndarray = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    return unit


def projection_basis(direction: np.ndarray) -> np.ndarray:
    """(2, 3) matrix projecting 3-D positions onto the image plane of a camera looking along ``direction``."""
    n = direction / np.linalg.norm(direction)
    up = np.array([0.0, 0.0, 1.0]) if abs(n[2]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = np.cross(up, n)
    u /= np.linalg.norm(u)
    v = np.cross(n, u)
    return np.stack([u, v])


@dataclass(frozen=True)
class Observation:
    """Survey-like degradation: PSF sigma (pixels), background stars per image, sky noise (x faintest star)."""

    psf_sigma: float = 1.5
    stars: int = 8
    sky_noise: float = 0.6


def render_simulation(
    positions: np.ndarray,
    centres: np.ndarray,
    weights: np.ndarray,
    size: int,
    cameras: int,
    half_width: float,
    observation: Observation | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Images ``(snapshots, cameras, size, size)`` uint8 of one simulation, one brightness scale for all.

    ``positions`` (S, n, 3), ``centres`` (S, 2, 3). The field spans ``2 * half_width`` around the mid-point of the
    two nuclei. Brightness: asinh(I / b) with b the surface brightness of one primary star, normalised by the
    simulation's brightest 0.01% of pixels.
    """
    dirs = camera_directions(cameras)
    n_snap = positions.shape[0]
    flux = np.empty((n_snap, cameras, size, size), dtype=np.float32)
    scale = size / (2.0 * half_width)
    w = weights.astype(np.float64)
    unit = float(w.max())  # light of one primary star
    for s in range(n_snap):
        mid = 0.5 * (centres[s, 0] + centres[s, 1])
        rel = positions[s].astype(np.float64) - mid
        for c, direction in enumerate(dirs):
            xy = rel @ projection_basis(direction).T
            px = np.floor(xy[:, 0] * scale + size / 2).astype(np.int64)
            py = np.floor(size / 2 - xy[:, 1] * scale).astype(np.int64)  # image rows grow downwards
            ok = (px >= 0) & (px < size) & (py >= 0) & (py < size)
            img = np.bincount(py[ok] * size + px[ok], weights=w[ok], minlength=size * size).reshape(size, size)
            flux[s, c] = gaussian_filter(img / unit, sigma=1.0, mode="constant")
    if observation is not None:
        flux = _observe(flux, observation, rng or np.random.default_rng(0))
    # asinh softening of one star per pixel after the blur; one scale for the whole simulation
    return to_uint8(asinh_stretch(flux, soft=1.0))


def _observe(flux: np.ndarray, obs: Observation, rng: np.random.Generator) -> np.ndarray:
    """PSF blur, point-like background stars and Gaussian sky noise, in linear flux."""
    s, c, h, w = flux.shape
    out = flux.copy()
    for i in range(s):
        for j in range(c):
            img = out[i, j]
            if obs.stars:
                n = rng.poisson(obs.stars)
                ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
                img[ys, xs] += (rng.pareto(1.5, n) + 1.0) * 3.0
            if obs.psf_sigma > 0:
                img = gaussian_filter(img, sigma=obs.psf_sigma, mode="constant")
            if obs.sky_noise > 0:
                img = img + rng.normal(0.0, obs.sky_noise * 0.05, size=img.shape).astype(np.float32)
            out[i, j] = np.maximum(img, 0.0)
    return out
