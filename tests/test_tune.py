"""``deepgalaxy tune``: the search space, an interrupted and resumed study, and trials under Horovod.

Real Optuna (SQLite storage), real MLflow (SQLite), real training of a tiny card; the study is interrupted with
SIGKILL in the middle of a trial, the way a lost machine or a killed job would leave it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from deepgalaxy.core.errors import DeepGalaxyError
from deepgalaxy.runs.training import build_spec
from deepgalaxy.runs.tune import check_space, parse_space, suggest
from deepgalaxy.runs.tune_worker import make_pruner
from tests.runs_support import cli, make_dataset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

TINY = ["--set", "card.input_size=32", "--set", "card.backbone.options.widths=[8,16]", "--set",
        "card.head_hidden=[16]", "--set", "train.batch_size=4", "--set", "train.max_steps_per_epoch=4"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1"}


def test_space_and_pruner_settings(tmp_path: Path) -> None:
    assert parse_space("batch") == ("lr", "batch")
    assert parse_space("loss-weights,lr,optimizer") == ("lr", "optimizer", "loss-weights")
    with pytest.raises(DeepGalaxyError, match="--space momentum: unknown"):
        parse_space("lr,momentum")
    classifier = build_spec("classifier-simple", tmp_path, tracking_uri="sqlite:///x.db")
    with pytest.raises(DeepGalaxyError, match="has no VAE"):
        check_space(("lr", "latent"), classifier)
    with pytest.raises(DeepGalaxyError, match="single loss term"):
        check_space(("lr", "loss-weights"), classifier)
    check_space(("lr", "latent", "loss-weights"), build_spec("full-simple", tmp_path, tracking_uri="sqlite:///x.db"))
    assert type(make_pruner("median:0:2")).__name__ == "MedianPruner"
    assert type(make_pruner("threshold:2.5")).__name__ == "ThresholdPruner"
    for bad in ("median:x", "threshold", "hyperband"):
        with pytest.raises(DeepGalaxyError, match="--pruner"):
            make_pruner(bad)


def test_suggestions_are_overrides_around_the_paper() -> None:
    import optuna

    base = build_spec("full-simple", "/nowhere.zarr", tracking_uri="sqlite:///x.db")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        trial = study.ask()
        out = suggest(trial, ("lr", "batch", "latent", "loss-weights"), base)
        assert 1.0 <= out["train.learning_rate"] <= 64.0  # the paper's 8.0 (Adadelta) x/÷ 8
        assert out["train.batch_size"] in (8, 16, 32) and out["card.latent_dim"] in (16, 32)
        assert 1e-5 <= out["card.loss_weights.kl"] <= 0.1 and 0.1 <= out["card.loss_weights.classifier"] <= 10
        study.tell(trial, 0.0)
    trial = study.ask()
    out = suggest(trial, ("lr", "optimizer"), base)
    ref = {"adadelta": 8.0, "adam": 1e-3, "adamw": 1e-3, "sgd": 0.05, "rmsprop": 1e-3}[out["train.optimizer"]]
    assert out["train.learning_rate"] == pytest.approx(ref * trial.params["lr_factor"])


def _study(storage: str, name: str) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=storage)


def _runs(db: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(db)
    exp = client.get_experiment_by_name("deepgalaxy-tune")
    return client.search_runs([exp.experiment_id])


@pytest.mark.slow
def test_interrupted_study_resumes_to_five_trials(tmp_path: Path) -> None:
    """Kill `tune --trials 5` mid-trial after 3 finished trials; the same command finishes the study."""
    from optuna.trial import TrialState

    data = make_dataset(tmp_path / "tiny.zarr")
    db, storage = f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/optuna.db"
    args = ["tune", "classifier-simple", "--data", str(data), "--trials", "5", "--epochs", "2", *TINY,
            "--storage", storage, "--study", "s", "--pruner", "median:2:1", "--tracking-uri", db,
            "--run-dir", str(tmp_path / "trials"), "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "deepgalaxy", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **ONE_THREAD})
    finished = running = 0
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.3)
            try:
                trials = _study(storage, "s").get_trials(deepcopy=False)
            except Exception:  # the study or its tables do not exist yet
                continue
            finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
            # kill once the 4th trial's nested MLflow run exists: the resume must close it
            running = sum(t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs for t in trials)
            if finished >= 3 and running:
                break
    finally:
        proc.kill()
        output = proc.communicate()[0]
    assert finished == 3 and running == 1, output[-3000:]

    interrupted = _study(storage, "s").get_trials(deepcopy=False)
    assert len(interrupted) == 4 and interrupted[-1].state == TrialState.RUNNING

    again = cli(*args, cwd=tmp_path, env=ONE_THREAD)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "trial 3 was left running by an interrupted invocation: marked failed" in again.stderr
    trials = _study(storage, "s").get_trials(deepcopy=False)
    states = [t.state for t in trials]
    assert states[3] == TrialState.FAIL
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == 5 and len(trials) == 6
    assert all(1.0 <= t.params["learning_rate"] <= 64.0 for t in trials)
    assert len({t.params["learning_rate"] for t in trials}) == 6  # the resumed sampler did not replay proposals
    for t in trials:
        if t.state != TrialState.FAIL:
            assert set(t.intermediate_values) <= {0, 1} and t.intermediate_values

    runs = _runs(db)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, "the resumed study must reopen its parent run"
    parent = parents[0]
    children = {r.data.tags["optuna.trial"]: r for r in runs if r.data.tags.get("mlflow.parentRunId")}
    assert sorted(children) == [str(t.number) for t in trials]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children.values())
    assert children["3"].info.status == "KILLED" and children["3"].data.tags["optuna.state"].startswith("FAIL")
    for t in trials:
        child = children[str(t.number)]
        assert float(child.data.params["train.learning_rate"]) == pytest.approx(t.params["learning_rate"])
        if t.state != TrialState.FAIL:
            assert child.info.status == "FINISHED" and child.data.tags["optuna.state"] == t.state.name
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    best = min(completed, key=lambda t: t.value)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best.trial"] == str(best.number)
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    assert parent.data.metrics["best_learning_rate"] == pytest.approx(best.params["learning_rate"])

    import mlflow

    client = mlflow.MlflowClient(db)
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "figures")] == ["figures/param_importances.png"]
    best_json = json.loads(Path(client.download_artifacts(parent.info.run_id, "best.json", str(tmp_path))).read_text())
    assert best_json["trial"] == best.number and best_json["params"] == best.params

    # asking for what the study already holds runs nothing
    done = cli(*args, cwd=tmp_path, env=ONE_THREAD)
    assert done.returncode == 0 and "already has 5 finished trial(s)" in done.stderr
    assert len(_study(storage, "s").trials) == 6

    # another card under the same study name is refused, naming what differs
    other = cli(*[("classifier-r18" if a == "classifier-simple" else a) for a in args], cwd=tmp_path, env=ONE_THREAD)
    assert other.returncode == 2 and "card='classifier-simple'" in other.stderr and "--study" in other.stderr


@pytest.mark.slow
def test_trial_under_horovod_is_pruned_on_every_rank(tmp_path: Path) -> None:
    """--workers 2: rank 0 reports to the storage, the pruner stops both ranks after the first of 3 epochs."""
    pytest.importorskip("horovod.torch")
    from optuna.trial import TrialState

    data = make_dataset(tmp_path / "tiny.zarr")
    db, storage = f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/optuna.db"
    proc = cli("tune", "classifier-simple", "--data", str(data), "--trials", "1", "--epochs", "3", *TINY,
               "--workers", "2", "--storage", storage, "--study", "h", "--pruner", "threshold:0",
               "--tracking-uri", db, "--run-dir", str(tmp_path / "trials"), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (trial,) = _study(storage, "h").trials
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [0]
    run_dir = Path(trial.user_attrs["run_dir"])
    result = json.loads((run_dir / "result.json").read_text())
    assert result["epochs"] == 1 and result["workers"] == 2 and result["ranks_in_sync"] is True
    assert sorted(p.name for p in (run_dir / "ranks").iterdir()) == ["rank0.json", "rank1.json"]
    (child,) = [r for r in _runs(db) if r.data.tags.get("mlflow.parentRunId")]
    assert child.data.params["workers"] == "2" and child.data.tags["optuna.state"] == "PRUNED"
    assert child.info.run_id == trial.user_attrs["mlflow_run_id"]
