"""Render simulated star positions as images: 14 cameras, a field centred between the nuclei, asinh brightness.

An optional observation (:mod:`deepgalaxy.plugins.simulation.observe`: pose jitter, dimming, stars, background
galaxies, PSF, noise) makes the images look like survey images; it acts in linear flux before the brightness stretch.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from deepgalaxy.core.brightness import asinh_stretch, to_uint8
from deepgalaxy.plugins.simulation.observe import Observation, Poses, draw_poses, observe, streams


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


def render_simulation(
    positions: np.ndarray,
    centres: np.ndarray,
    weights: np.ndarray,
    size: int,
    cameras: int,
    half_width: float,
    observation: Observation | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Images ``(snapshots, cameras, size, size)`` uint8 of one simulation, one brightness scale for all.

    ``positions`` (S, n, 3), ``centres`` (S, 2, 3). The field spans ``2 * half_width`` around the mid-point of the
    two nuclei. Brightness: asinh(I / b) with b the surface brightness of one primary star, normalised by the
    simulation's brightest 0.01% of pixels (negative observed fluxes are black).
    """
    flux = observed_flux(positions, centres, weights, size, cameras, half_width, observation, seed)
    pixels: np.ndarray = to_uint8(asinh_stretch(flux, soft=1.0))  # soft: about one star per pixel after the blur
    return pixels


def observed_flux(
    positions: np.ndarray,
    centres: np.ndarray,
    weights: np.ndarray,
    size: int,
    cameras: int,
    half_width: float,
    observation: Observation | None = None,
    seed: int = 0,
) -> np.ndarray:
    """The linear flux of :func:`project`, observed through ``observation`` (its random streams from ``seed``)."""
    if observation is None:
        return project(positions, centres, weights, size, cameras, half_width)
    poses = draw_poses(observation, streams(seed)["pose"], (positions.shape[0], cameras))
    flux = project(positions, centres, weights, size, cameras, half_width, poses)
    # the merger's central surface brightness: the brightest pixel of its first snapshot, unobserved
    reference = float(project(positions[:1], centres[:1], weights, size, cameras, half_width).max())
    light = float(weights.sum() / weights.max())
    return observe(flux, observation, reference, light, seed)


def project(
    positions: np.ndarray,
    centres: np.ndarray,
    weights: np.ndarray,
    size: int,
    cameras: int,
    half_width: float,
    poses: Poses | None = None,
) -> np.ndarray:
    """Linear flux ``(snapshots, cameras, size, size)`` float32 in units of one primary star's light, each star
    particle smoothed by a Gaussian of sigma 1 px; ``poses`` shift, scale (at constant surface brightness) and
    rotate the merger about the field centre in each image."""
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
            light, dx, dy = w, 0.0, 0.0
            if poses is not None:
                cos, sin, zoom = np.cos(poses.angle[s, c]), np.sin(poses.angle[s, c]), poses.scale[s, c]
                xy = zoom * (xy @ np.array([[cos, sin], [-sin, cos]]))
                light, dx, dy = w * zoom**2, poses.dx[s, c], poses.dy[s, c]
            px = np.floor(xy[:, 0] * scale + size / 2 + dx).astype(np.int64)
            py = np.floor(size / 2 - xy[:, 1] * scale + dy).astype(np.int64)  # image rows grow downwards
            ok = (px >= 0) & (px < size) & (py >= 0) & (py < size)
            img = np.bincount(py[ok] * size + px[ok], weights=light[ok], minlength=size * size).reshape(size, size)
            flux[s, c] = gaussian_filter(img / unit, sigma=1.0, mode="constant")
    return flux
