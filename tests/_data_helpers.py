"""Tiny simulated stores shared by the data tests (real simulator, real Zarr on disk)."""

from __future__ import annotations

import shutil
from pathlib import Path

TINY = dict(sims=4, particles=300, size=16, snapshots=8, cameras=2, dt=0.05, seed=7)
"""4 simulations x 2 cameras x 8 snapshots = 64 images of 16x16; chunks of 8 images; ~2 s."""


def tiny_store(path: Path, **overrides: object) -> Path:
    from deepgalaxy.plugins.simulation.source import simulate

    return simulate(path, progress=False, workers=1, **{**TINY, **overrides})


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
