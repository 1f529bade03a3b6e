"""Shared pieces of the training tests: a tiny simulated dataset and a tiny card (32 px, narrow widths)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

CARD = "full-simple"
TINY = [
    "card.input_size=32", "card.backbone.options.widths=[8,16]", "card.decoder_channels=[16,8]",
    "card.head_hidden=[16]", "train.batch_size=4", "train.learning_rate=1.0",
]
"""--set overrides that make full-simple tiny: 32 px, widths 8/16, batch 4 (12 steps per epoch on 48 images)."""


def make_dataset(path: Path) -> Path:
    """64 images of 32x32 (4 simulations x 2 cameras x 8 snapshots): 48 train / 16 validation."""
    from deepgalaxy.plugins.simulation.source import simulate

    if not (path / "zarr.json").is_file():
        simulate(path, progress=False, workers=1, sims=4, particles=500, size=32, cameras=2, snapshots=8, seed=3)
    return path


def make_observations(path: Path) -> Path:
    """An unlabelled store as a user makes one: 24 PNG photos (rendered with ``--observe`` from other simulations
    than :func:`make_dataset`'s, 48 px) ingested at 32 px."""
    from skimage import io

    from deepgalaxy.core.dataset import open_dataset
    from deepgalaxy.plugins.ingest.source import ingest
    from deepgalaxy.plugins.simulation.source import simulate

    if (path / "zarr.json").is_file():
        return path
    renders = simulate(path.parent / f"{path.stem}-renders.zarr", progress=False, workers=1, sims=3, particles=500,
                       size=48, cameras=2, snapshots=4, observe=True, seed=11)
    photos = path.parent / f"{path.stem}-photos"
    photos.mkdir(exist_ok=True)
    ds = open_dataset(renders)
    for i, image in enumerate(ds.images(np.arange(len(ds)))):
        io.imsave(photos / f"photo{i:02d}.png", image[..., 0], check_contrast=False)
    return ingest(photos, path, size=32, channels=1, progress=False)


def train_tiny(root: Path, steps: int = 4):  # type: ignore[no-untyped-def]
    """Version 1 of a tiny full-simple (1 epoch of ``steps`` steps on :func:`make_dataset`'s 64 images), trained
    into ``root`` (store ``tiny.zarr``, MLflow ``mlflow.db``, run ``run``); returns (result, store, tracking URI)."""
    from deepgalaxy.runs.training import train

    data = make_dataset(root / "tiny.zarr")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    result = train(CARD, data, epochs=1, overrides=[*TINY, f"train.max_steps_per_epoch={steps}"], tracking_uri=uri,
                   run_dir=root / "run", progress=False)
    assert result.model_version == 1
    return result, data, uri


def read_state(run_dir: Path) -> dict | None:
    """The run's newest checkpoint state as the worker wrote it, or None (none yet, or caught mid-swap)."""
    for name in ("checkpoint", "checkpoint.old"):
        try:
            return json.loads((run_dir / name / "state.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            continue
    return None


def read_weights(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "model" / "weights.safetensors"))


def assert_same_weights(a: dict[str, np.ndarray], b: dict[str, np.ndarray], rtol: float = 1e-4,
                        atol: float = 1e-5) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=atol, err_msg=key)


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600,
        **popen: object) -> subprocess.CompletedProcess[str]:
    """``deepgalaxy ARGS`` in a fresh interpreter, in ``cwd``."""
    return subprocess.run([sys.executable, "-m", "deepgalaxy", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200", **(env or {})}, timeout=timeout, **popen)


def mlflow_runs(tracking_uri: str, experiment: str = "deepgalaxy") -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])
