"""Training runs end to end: a real (tiny) dataset, the real torch plugin, a real SQLite MLflow store."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from deepgalaxy import registry
from deepgalaxy.core.errors import DatasetError, DeepGalaxyError, ShapeError, TrainingError
from deepgalaxy.runs.training import build_spec, parse_overrides, train
from tests.runs_support import CARD, TINY, cli, make_dataset, mlflow_runs, read_weights

train_module = importlib.import_module("deepgalaxy.runs.training")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "tiny.zarr")


# --- settings, without training ---------------------------------------------------------------------------------


def test_overrides_are_json_and_qualified() -> None:
    got = parse_overrides(["batch_size=8", "card.backbone.options.widths=[8,16]", "optimizer=adam",
                           "input_size=64", "data.validation_fraction=0.3"])
    assert got == {"train.batch_size": 8, "card.backbone.options.widths": [8, 16], "train.optimizer": "adam",
                   "card.input_size": 64, "data.validation_fraction": 0.3}


def test_unknown_or_invalid_setting(tmp_path: Path) -> None:
    with pytest.raises(DeepGalaxyError, match=r"no such setting.*train\.batch_size"):
        parse_overrides(["train.batchsize=8"])
    with pytest.raises(DeepGalaxyError, match="expected KEY=VALUE"):
        parse_overrides(["batch_size"])
    with pytest.raises(DeepGalaxyError, match=r"invalid training settings: train.batch_size"):
        build_spec(CARD, tmp_path, overrides=["train.batch_size=0"], tracking_uri="sqlite:///x.db")
    with pytest.raises(DeepGalaxyError, match="unknown model card 'full-simpel'"):
        build_spec("full-simpel", tmp_path, tracking_uri="sqlite:///x.db")


def test_spec_is_complete(tmp_path: Path) -> None:
    spec = build_spec(CARD, tmp_path / "d.zarr", epochs=3, workers=2, overrides=TINY, tracking_uri="sqlite:///x.db")
    assert spec.train.epochs == 3 and spec.workers == 2 and spec.card.input_size == 32
    assert spec.card.backbone.options["widths"] == [8, 16] and spec.train.batch_size == 4
    assert spec.data.path == str((tmp_path / "d.zarr").resolve())
    hosts = build_spec(CARD, tmp_path, hosts="a:2,b:3", tracking_uri="sqlite:///x.db")
    assert hosts.workers == 5


def test_bad_data_fails_before_launch(tmp_path: Path, data: Path) -> None:
    with pytest.raises(DatasetError, match="no such dataset store"):
        train(CARD, tmp_path / "missing.zarr", overrides=TINY, tracking_uri=f"sqlite:///{tmp_path}/m.db",
              run_dir=tmp_path / "run")
    with pytest.raises(ShapeError, match=r"expects \(64, 64, 1\)"):
        train(CARD, data, overrides=[*TINY, "card.input_size=64"], tracking_uri=f"sqlite:///{tmp_path}/m.db",
              run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_resume_without_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(train_module.RUNS_DIR_ENV, str(tmp_path / "runs"))
    with pytest.raises(DeepGalaxyError, match="no unfinished run of card 'full-simple'"):
        train(CARD, resume=True)


# --- real trainings -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_tracks_one_run_and_registers_a_version(tmp_path: Path, data: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = train(CARD, data, epochs=2, overrides=TINY, tracking_uri=uri, run_dir=tmp_path / "run",
                   progress=False)
    runs = mlflow_runs(uri)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == result.run_id and run.info.status == "FINISHED"
    # params: the whole card and train spec, flattened
    p = run.data.params
    assert p["card.name"] == CARD and p["card.backbone.options.widths"] == "[8, 16]" and p["train.batch_size"] == "4"
    assert p["train.optimizer"] == "adadelta" and p["framework"] == "torch" and p["workers"] == "1"
    # metrics per epoch, the same names for every framework
    import mlflow

    client = mlflow.MlflowClient(uri)
    for key in ("train/loss", "val/loss", "val/loss_classifier", "val/loss_kl", "val/accuracy",
                "val/within_k_accuracy", "train/accuracy", "perf/images_per_s", "perf/images_per_s_per_worker",
                "perf/epoch_time_s"):
        history = client.get_metric_history(result.run_id, key)
        assert [m.step for m in history] == [0, 1], key
        assert all(np.isfinite(m.value) for m in history), key
    assert any(k.startswith("system/") for k in run.data.metrics), "system metrics were not logged"
    t = run.data.tags
    assert t["framework"] == "torch" and t["backbone"] == "simple" and t["workers"] == "1"
    assert len(t["dataset_fingerprint"]) == 12 and t["ranks_in_sync"] == "true"
    figures = {a.path for a in client.list_artifacts(result.run_id, "figures")}
    assert figures == {"figures/curves.png", "figures/confusion_matrix.png", "figures/reconstructions.png"}
    # the model version
    assert result.model_name == CARD and result.model_version == 1
    (mv,) = client.search_model_versions(f"name = '{CARD}'")
    assert mv.run_id == result.run_id and mv.tags["framework"] == "torch" and "val/loss" in mv.tags
    assert "trained with torch on 1 worker" in mv.description
    # summary: best validation metrics, throughput, where things are
    text = result.summary()
    assert "best validation" in text and "images/s" in text and result.run_id in text and "v1" in text
    # registry.load gives back exactly the trained weights
    model = registry.load(CARD, tracking_uri=uri)
    trained = read_weights(result.run_dir)
    for key, value in model.get_weights().items():
        np.testing.assert_array_equal(value, trained[key], err_msg=key)
    images = np.random.default_rng(0).random((2, 32, 32, 1)).astype(np.float32)
    assert model.predict(images).probabilities.shape == (2, 71)


@pytest.mark.slow
def test_nan_loss_stops_with_epoch_and_step(tmp_path: Path, data: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(TrainingError, match=r"loss \w+ = (nan|inf).* at epoch 1, step \d+.*learning_rate"):
        train(CARD, data, epochs=1, overrides=[*TINY, "train.optimizer=sgd", "train.learning_rate=1e30"],
              tracking_uri=uri, run_dir=tmp_path / "run", progress=False)
    (run,) = mlflow_runs(uri)
    assert run.info.status == "FAILED" and "diverged" in run.data.tags["error"]
    import mlflow

    assert mlflow.MlflowClient(uri).search_registered_models() == []


@pytest.mark.slow
def test_two_trainings_finishing_together_each_get_a_version(tmp_path: Path, data: Path) -> None:
    """Two CLI trainings side by side on one store: two runs, two model versions, nothing lost."""
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["train", CARD, "--data", str(data), "--epochs", "1", "--no-progress", "--tracking-uri", uri,
            *[x for s in [*TINY, "train.max_steps_per_epoch=3"] for x in ("--set", s)]]
    procs = [subprocess.Popen([sys.executable, "-m", "deepgalaxy", *args, "--run-dir", str(tmp_path / f"r{i}")],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    results = [json.loads((tmp_path / f"r{i}" / "result.json").read_text()) for i in range(2)]
    assert sorted(r["model_version"] for r in results) == [1, 2]
    assert len({r["run_id"] for r in results}) == 2 and len(mlflow_runs(uri)) == 2


@pytest.mark.slow
def test_cli_train_prints_the_summary(tmp_path: Path, data: Path) -> None:
    out = cli("train", CARD, "--data", str(data), "--epochs", "1", "--no-register",
              *[x for s in [*TINY, "train.max_steps_per_epoch=2"] for x in ("--set", s)], cwd=tmp_path,
              env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'env.db'}"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "best validation" in out.stdout and "MLflow run" in out.stdout and "env.db" in out.stdout
    assert (tmp_path / "deepgalaxy-runs").is_dir() and not (tmp_path / "mlflow.db").exists()
    bad = cli("train", CARD, "--data", str(data), "--set", "train.batchsize=4", cwd=tmp_path)
    assert bad.returncode == 2 and "Did you mean train.batch_size" in bad.stderr


@pytest.mark.slow
def test_keep_best_registers_the_lowest_validation_loss_epoch(tmp_path: Path, data: Path) -> None:
    import mlflow
    from safetensors.numpy import load_file

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # a large Adadelta step makes validation loss jump around, so the best epoch is rarely the last one
    result = train(CARD, data, epochs=4, overrides=[*TINY, "train.keep=best", "train.augment=dihedral",
                                                    "train.learning_rate=8.0"],
                   tracking_uri=uri, run_dir=tmp_path / "run", progress=False)
    client = mlflow.MlflowClient(uri)
    val = [m.value for m in sorted(client.get_metric_history(result.run_id, "val/loss"), key=lambda m: m.step)]
    best = int(np.argmin(val))
    run = client.get_run(result.run_id)
    assert run.data.tags["selected_epoch"] == str(best + 1)
    registered = registry.load(CARD, tracking_uri=uri).get_weights()
    kept = load_file(str(result.run_dir / "best" / "weights.safetensors"))
    for key, value in registered.items():
        np.testing.assert_array_equal(value, kept[key], err_msg=key)
