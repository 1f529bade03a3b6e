"""Training-time augmentation that respects the physics of the images.

A merger seen by a camera rotated about its line of sight, or mirrored, is still the same merger at the same
stage, so the eight symmetries of the square (rotations by 90 degrees and flips) leave every label valid.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Augment = Literal["none", "dihedral"]
AUGMENTS: tuple[str, ...] = ("none", "dihedral")


def dihedral(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply one of the 8 square symmetries, drawn per image, to a batch ``(N, H, W, C)`` with ``H == W``."""
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"dihedral augmentation needs square images (N, H, H, C), got {images.shape}")
    choice = rng.integers(0, 8, size=len(images))
    out = np.empty_like(images)
    for k in range(8):
        sel = choice == k
        if sel.any():
            block = np.rot90(images[sel], k % 4, axes=(1, 2))
            out[sel] = block[:, :, ::-1] if k >= 4 else block
    return out


def augment(images: np.ndarray, kind: str, seed: int, *key: int) -> np.ndarray:
    """Augment a batch with a generator keyed by ``(seed, *key)`` (e.g. epoch, step, rank), so a resumed run
    draws exactly what an uninterrupted one would have drawn."""
    if kind == "none":
        return images
    if kind == "dihedral":
        return dihedral(images, np.random.default_rng([seed, *key]))
    raise ValueError(f"unknown augmentation {kind!r}; use one of {', '.join(AUGMENTS)}")
