"""``deepgalaxy demo``: simulate, train, register, load, predict — the README walk-through, shrunk for the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.runs_support import cli

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    out = cli("demo", "--sims", "3", "--size", "32", "--epochs", "1", cwd=tmp_path, timeout=900,
              env={"MLFLOW_TRACKING_URI": ""})
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    text = out.stdout
    for expected in ("1. simulate", "2. train full-simple", "3. load the registered model", "registered it as "
                     "full-simple v1", "predicted", "4. search", "nearest neighbours of image", "mlflow ui",
                     "registry.load('full-simple')"):
        assert expected in text, expected
    # MLflow's default store in the working directory, where `mlflow ui` finds it
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "deepgalaxy-demo" / "mergers-32px.zarr").is_dir()
    assert (tmp_path / "deepgalaxy-demo" / "mergers-32px.zarr.index" / "full-simple-v1").is_dir()
    from deepgalaxy import registry

    model = registry.load("full-simple", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert model.source["version"] == 1
    assert model.predict(np.zeros((2, 32, 32, 1), np.uint8)).probabilities.shape == (2, 71)
