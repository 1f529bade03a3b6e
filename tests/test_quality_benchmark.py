"""Smoke run of benchmarks/quality.py: a tiny simulated store, one epoch, real MLflow and real registry.

It checks that the table's numbers are consistent with each other and with what can be computed independently
(the split, the baselines' constant predictions, the training worker's own validation), not that the network wins.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("quality_benchmark", REPO / "benchmarks" / "quality.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module's annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_scores_and_vote() -> None:
    q = _module()
    s = q.Scores.of(np.array([0, 5, 60, 70]), np.array([0, 2, 56, 60]))
    assert (s.top1, s.within, s.mae) == (0.25, 0.5, (0 + 3 + 4 + 10) / 4)
    assert (s.top1_early, s.top1_late) == (0.5, 0.0)
    labels = np.array([[3, 1, 1, 2], [2, 2, 3, 3]])
    assert q.vote(labels, 1, 5).tolist() == [3, 2]
    assert q.vote(labels, 3, 5).tolist() == [1, 2]
    assert q.vote(labels, 4, 5).tolist() == [1, 2]  # 2:2 tie -> smallest class
    x = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1)
    assert np.allclose(q.downsample(x, 2)[0], np.array([2.5, 4.5, 10.5, 12.5]) / 255)


def test_smoke_run_is_consistent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    q = _module()
    out = tmp_path / "q.json"
    code = q.main(["--workdir", str(tmp_path), "--sims", "4", "--size", "16", "--particles", "300", "--cameras", "2",
                   "--snapshots", "8", "--epochs", "1", "--batch", "8", "--knn-size", "8", "--sim-workers", "1",
                   "--no-progress", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    rows = {r["method"].split(" ")[0]: r for r in res["rows"]}
    assert set(rows) == {"majority", "median", "kNN", "classifier-simple"}

    # the split, recomputed independently from the store
    from deepgalaxy.core.dataset import open_dataset

    ds = open_dataset(res["store"])
    train, val = ds.split("simulation", 0.2, 0)
    y_train, y_val = train.labels.astype(int), val.labels.astype(int)
    assert (res["train_images"], res["val_images"]) == (len(train), len(val)) == (48, 16)
    assert res["val_sims"] == sorted(set(val.metadata["sim_id"].tolist()))

    # majority baseline: share of the most common training class among the validation labels
    top = np.bincount(y_train).argmax()
    maj = rows["majority"]["scores"]
    assert maj["top1"] == pytest.approx(np.mean(y_val == top))
    assert maj["mae"] == pytest.approx(np.mean(np.abs(y_val - top)))
    med = int(np.median(y_train))
    assert rows["median"]["scores"]["mae"] == pytest.approx(np.mean(np.abs(y_val - med)))

    for r in res["rows"]:
        s = r["scores"]
        assert s["n"] == len(val)
        assert 0 <= s["top1"] <= s["within"] <= 1
        assert s["mae"] >= 0 and (s["mae"] == 0) == (s["top1"] == 1)
        # every printed row carries its own numbers
        assert f"{100 * s['top1']:.2f}%" in printed and f"{s['mae']:.2f}" in printed

    knn = rows["kNN"]
    assert knn["detail"]["k"] in q.K_GRID and knn["detail"]["pixels"] == 8

    net = rows["classifier-simple"]
    d = net["detail"]
    # the registered version, scored by the benchmark, agrees with the training worker's own last validation
    assert abs(net["scores"]["top1"] - d["worker_val_accuracy"]) <= 1 / len(val) + 1e-9
    assert Path(d["confusion_png"]).is_file() and d["confusion_png"] in printed
    assert d["model"] == "classifier-simple v1"

    # the numbers are in the training's MLflow run too
    from mlflow.tracking import MlflowClient

    run = MlflowClient(res["tracking_uri"]).get_run(d["run_id"])
    assert run.data.metrics["quality/top1"] == pytest.approx(net["scores"]["top1"])
    assert run.data.metrics["quality/majority_top1"] == pytest.approx(maj["top1"])
    assert ("beats the majority class" in printed) and ("beats kNN" in printed)
