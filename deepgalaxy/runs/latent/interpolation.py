"""Walk the latent space between two images: decoded points on the line from z(A) to z(B), and a 2-D grid around it
(``deepgalaxy latent interpolate``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deepgalaxy.core.errors import DatasetError, DeepGalaxyError
from deepgalaxy.runs.latent.images import open_store, read_image

if TYPE_CHECKING:
    from deepgalaxy.core.model import Model


def query_images(model: Model, refs: Sequence[str],
                 data: str | os.PathLike[str] | None) -> tuple[np.ndarray, list[str]]:
    """Images for ``--from/--to`` values: a store row number (with ``data``) or an image file."""
    out, names = [], []
    ds = None
    for ref in refs:
        if str(ref).lstrip("-").isdigit() and not Path(ref).is_file():
            if data is None:
                raise DeepGalaxyError(f"{ref!r} looks like a row number: give --data STORE, or an image file path")
            ds = ds or open_store(data, model)
            row = int(ref)
            if not 0 <= row < len(ds):
                raise DatasetError(f"{data}: row {row} is out of range 0..{len(ds) - 1}")
            out.append(ds.images([row])[0])
            meta = {k: v[row] for k, v in ds.metadata.items()}
            names.append(f"row {row} (class {int(meta['label'])})" if "label" in meta else f"row {row}")
        else:
            out.append(read_image(ref, model.card.input_size, model.card.channels))
            names.append(Path(ref).name)
    return np.stack(out), names


@dataclass
class Interpolation:
    """Decoded images along the straight line from z(A) to z(B) (and, optionally, a 2-D grid)."""

    names: list[str]
    originals: np.ndarray  # (2, H, W, C) uint8: A and B
    z: np.ndarray  # (steps, D)
    images: np.ndarray  # (steps, H, W, C) float32 in [0, 1]
    t: np.ndarray  # (steps,)
    grid: np.ndarray | None = None  # (rows, cols, H, W, C)
    grid_axes: dict[str, Any] = field(default_factory=dict)


def interpolate(model: Model, a: np.ndarray, b: np.ndarray, steps: int = 8) -> Interpolation:
    """Decode ``steps`` evenly spaced points from z(A) to z(B) (the VAE means), endpoints included.

    The endpoints are exactly the VAE reconstructions of A and B: ``decode(encode(A))``, ``decode(encode(B))``.
    """
    if steps < 2:
        raise DeepGalaxyError(f"--steps {steps}: an interpolation needs at least 2 steps (the two endpoints)")
    za, zb = model.encode(np.stack([a, b]))
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)
    z = (1 - t)[:, None] * za[None] + t[:, None] * zb[None]
    z[0], z[-1] = za, zb
    return Interpolation([], np.stack([a, b]), z, model.decode(z), t)


def latent_grid(model: Model, interp: Interpolation, index_z: np.ndarray | None = None, rows: int = 5,
                span: float = 2.0) -> Interpolation:
    """Add a 2-D grid to ``interp``: across, the A -> B line; down, ``span`` standard deviations either way
    along the dataset's main direction of variation orthogonal to it (the leading principal component of
    ``index_z`` after projecting out B - A; without ``index_z``, the latent axis least aligned with B - A).
    The middle row (odd ``rows``) is the A -> B line itself."""
    za, zb = interp.z[0], interp.z[-1]
    u = zb - za
    norm = float(np.linalg.norm(u))
    if norm == 0:
        raise DeepGalaxyError("A and B have the same latent vector: pick two different images for a grid")
    u = u / norm
    if index_z is not None and len(index_z) > 2:
        centred = index_z - index_z.mean(axis=0)
        centred = centred - np.outer(centred @ u, u)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        v = vt[0]
        sigma = float(s[0] / np.sqrt(max(len(index_z) - 1, 1)))
        how = "the dataset's main direction of variation in z orthogonal to B - A, in its standard deviations"
    else:
        axis = int(np.argmin(np.abs(u)))
        v = np.zeros_like(u)
        v[axis] = 1.0
        v -= (v @ u) * u
        v /= np.linalg.norm(v)
        sigma = 1.0
        how = f"latent axis {axis} (orthogonal to B - A), unit prior scale"
    offsets = np.linspace(-span, span, rows, dtype=np.float32) * sigma
    z = interp.z[None, :, :] + offsets[:, None, None] * v[None, None, :].astype(np.float32)
    images = model.decode(z.reshape(-1, z.shape[-1])).reshape(rows, len(interp.t), *interp.images.shape[1:])
    interp.grid = images
    interp.grid_axes = {"across": "t from A to B", "down": how, "sigma": sigma,
                        "offsets_sigma": np.linspace(-span, span, rows).tolist()}
    return interp


__all__ = ["Interpolation", "interpolate", "latent_grid", "query_images"]
