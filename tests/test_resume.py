"""Crash safety: kill -9 a real training in the middle of an epoch, resume it, get the uninterrupted model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.runs_support import (
    CARD,
    TINY,
    assert_same_weights,
    cli,
    make_dataset,
    make_observations,
    mlflow_runs,
    read_state,
    read_weights,
)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

EPOCHS = 2
EVERY = 3  # checkpoint every 3 of the 12 steps of an epoch


def train_args(data: list[str], uri: str, run_dir: Path) -> list[str]:
    sets = [x for s in TINY for x in ("--set", s)]
    stores = [x for d in data for x in ("--data", d)]
    return ["train", CARD, *stores, "--epochs", str(EPOCHS), "--checkpoint-every", str(EVERY),
            "--no-progress", "--tracking-uri", uri, "--run-dir", str(run_dir), *sets]


@pytest.mark.parametrize("observations", [False, True], ids=["one-store", "with-observations"])
def test_kill_9_mid_epoch_then_resume_equals_uninterrupted(tmp_path: Path, observations: bool) -> None:
    """With observations, a second store gives a quarter of every batch and cycles through its images: the resumed
    run must draw exactly the batches of the uninterrupted one from both stores."""
    data = [str(make_dataset(tmp_path / "tiny.zarr"))]
    if observations:
        data.append(f"{make_observations(tmp_path / 'obs.zarr')}:0.25")

    # the training that gets killed: wait until it has checkpointed inside the second epoch, then SIGKILL the
    # whole process group (the CLI and its worker) without warning
    uri_b = f"sqlite:///{tmp_path / 'b.db'}"
    run_b = tmp_path / "run-b"
    proc = subprocess.Popen([sys.executable, "-m", "deepgalaxy", *train_args(data, uri_b, run_b)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 600
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        state = read_state(run_b)
        if state and state["epoch"] == 1 and state["next_batch"] >= EVERY:
            os.killpg(proc.pid, signal.SIGKILL)
            killed_at = state
            break
        time.sleep(0.02)
    out = proc.communicate(timeout=60)[0]
    assert killed_at is not None, f"training ended before it could be killed:\n{out[-3000:]}"
    assert proc.returncode == -signal.SIGKILL
    assert not (run_b / "result.json").exists()
    run_id = json.loads((run_b / "mlflow_run.json").read_text())["run_id"]
    (running,) = mlflow_runs(uri_b)
    assert running.info.run_id == run_id and running.info.status == "RUNNING"

    resumed = cli("train", "--resume", "--run-dir", str(run_b), "--no-progress", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr and "from epoch 2, step" in resumed.stderr

    # the uninterrupted training of the same seed
    uri_a = f"sqlite:///{tmp_path / 'a.db'}"
    run_a = tmp_path / "run-a"
    straight = cli(*train_args(data, uri_a, run_a), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]

    assert_same_weights(read_weights(run_b), read_weights(run_a))

    # one MLflow run, continued: both epochs' metrics, finished, and one model version from it
    import mlflow

    (run,) = mlflow_runs(uri_b)
    assert run.info.run_id == run_id and run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    client_b, client_a = mlflow.MlflowClient(uri_b), mlflow.MlflowClient(uri_a)
    (run_a_info,) = mlflow_runs(uri_a)
    for key in ("val/loss", "train/loss", "val/accuracy"):
        hist_b = {m.step: m.value for m in client_b.get_metric_history(run_id, key)}
        hist_a = {m.step: m.value for m in client_a.get_metric_history(run_a_info.info.run_id, key)}
        assert sorted(hist_b) == [0, 1], key
        np.testing.assert_allclose([hist_b[s] for s in (0, 1)], [hist_a[s] for s in (0, 1)], rtol=1e-4, err_msg=key)
    (mv,) = client_b.search_model_versions(f"name = '{CARD}'")
    assert mv.run_id == run_id and int(mv.version) == 1


def test_resume_of_a_finished_run_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    (run / "result.json").write_text("{}")
    out = cli("train", "--resume", "--run-dir", str(run), cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and "already finished" in out.stderr
