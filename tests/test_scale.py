"""``deepgalaxy scale``: settings, the arithmetic of the analysis, and a real 1-vs-2-worker run under horovodrun.

The end-to-end test checks arithmetic, MLflow structure and the figure, never timings (the machine is shared).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from deepgalaxy.core.errors import DatasetError, DeepGalaxyError
from deepgalaxy.core.scaling import RingAllreduce
from deepgalaxy.runs.scale import analyse, batch_per_worker, parse_workers, scale
from deepgalaxy.runs.scale_worker import message_sizes
from tests.runs_support import cli, make_dataset

TINY = ["--set", "card.input_size=32", "--set", "card.backbone.options.widths=[8,16]", "--set",
        "card.head_hidden=[16]"]


def test_worker_list_and_batch_policy() -> None:
    assert parse_workers("4,1,2,2") == [1, 2, 4]
    assert parse_workers([2, 1]) == [1, 2]
    for bad in ("0,1", "one,two", ""):
        with pytest.raises(DeepGalaxyError, match="--workers"):
            parse_workers(bad)
    assert batch_per_worker("local", 16, 4) == 16
    assert batch_per_worker("global", 16, 4) == 4
    with pytest.raises(DeepGalaxyError, match=r"global batch 16 does not divide evenly over 3 workers.*48"):
        batch_per_worker("global", 16, 3)
    with pytest.raises(DeepGalaxyError, match="--batch-policy 'weak'"):
        batch_per_worker("weak", 16, 2)


def test_message_sizes_end_at_the_gradient_size() -> None:
    assert message_sizes(100_000) == [4096, 16384, 65536, 100_000]
    assert message_sizes(1000) == [4096]
    assert message_sizes(16384) == [4096, 16384]


def _point(n: int, ips: float, batch: int, compute_s: float, samples: list[list[float]]) -> dict[str, object]:
    return {"workers": n, "images_per_s": ips, "batch_per_worker": batch, "compute_s": compute_s,
            "step_s": n * batch / ips, "gradient_bytes": 8e6, "allreduce": samples}


def test_analysis_by_hand() -> None:
    """Speed-up/efficiency normalised to N0, the model check at N=2 and the projection, against hand arithmetic."""
    alpha, beta = 1e-4, 1e9  # the "machine" the allreduce samples come from
    samples = [[2.0, b, 2 * alpha + b / beta] for b in (1e5, 1e6, 8e6)]  # ring at N=2: 2(N-1)a + 2(N-1)/N B/b
    points = [_point(1, 100.0, 16, 0.16, []), _point(2, 150.0, 16, 0.2, samples), _point(4, 240.0, 16, 0.25, [])]
    net = RingAllreduce.from_network(100.0, 5.0)
    measured, projected, check, fitted = analyse(points, net, projected_workers=(8, 128))
    assert [(r.workers, r.speedup, r.efficiency) for r in measured] == [
        (1, 1.0, 1.0), (2, 1.5, 0.75), (4, 2.4, pytest.approx(0.6))]
    assert fitted is not None
    assert fitted.alpha == pytest.approx(alpha, rel=1e-6) and fitted.beta == pytest.approx(beta, rel=1e-6)
    # check at N=2: compute measured at 2 + fitted allreduce of 8 MB = 0.2 + 2e-4 + 8e-3
    step2 = 0.2 + 2 * alpha + 8e6 / beta
    (c2, c4) = check
    assert c2["workers"] == 2 and c2["predicted_step_s"] == pytest.approx(step2)
    assert c2["predicted_efficiency"] == pytest.approx((2 * 16 / step2) / 100.0 / 2)
    assert c4["predicted_efficiency"] == pytest.approx((4 * 16 / (0.25 + 6 * alpha + 1.5 * 8e6 / beta)) / 100 / 4)
    # projection: compute per step at N0 = 0.16 s, 100 Gbit/s = 12.5e9 B/s, 5 us, no overlap
    for row, n in zip(projected, (8, 128), strict=True):
        step = 0.16 + 2 * (n - 1) * 5e-6 + 2 * (n - 1) / n * 8e6 / 12.5e9
        assert row.projected and row.workers == n
        assert row.efficiency == pytest.approx(0.16 / step)
        assert row.images_per_s == pytest.approx(n * 16 / step)



def test_analysis_check_with_a_measured_message_count() -> None:
    """Messages counted in a Horovod timeline: the check's latency term pays the fitted alpha once per message."""
    alpha, beta = 1e-3, 1e9
    samples = [[2.0, b, 2 * alpha + b / beta] for b in (1e5, 1e6, 8e6)]
    points = [_point(1, 100.0, 16, 0.16, []), _point(2, 150.0, 16, 0.2, samples)]
    net = RingAllreduce.from_network(100.0, 5.0)
    _, projected, (default,), _ = analyse(points, net, projected_workers=(8,))
    _, projected_m, (counted,), _ = analyse(points, net, projected_workers=(8,), messages=10)
    assert default["predicted_step_s"] == pytest.approx(0.2 + 2 * alpha + 8e6 / beta)
    assert counted["predicted_step_s"] == pytest.approx(0.2 + 2 * 10 * alpha + 8e6 / beta)
    assert counted["predicted_efficiency"] == pytest.approx(2 * 16 / (0.2 + 0.02 + 8e-3) / 100 / 2)
    assert projected_m[0].efficiency == projected[0].efficiency  # the projection keeps its own network's messages

def test_latency_bound_allreduce_checks_with_the_measured_time() -> None:
    """Flat allreduce times (no bandwidth to fit): the check uses the allreduce measured at the gradient size."""
    samples = [[2.0, b, 0.02] for b in (4096.0, 65536.0, 8e6)]
    points = [_point(1, 100.0, 16, 0.16, []), _point(2, 120.0, 16, 0.2, samples)]
    _, _, check, fitted = analyse(points, RingAllreduce.from_network(100.0, 5.0), projected_workers=(8,))
    assert fitted is None
    assert check[0]["predicted_step_s"] == pytest.approx(0.22) and check[0]["allreduce_from_fit"] == 0.0
    assert check[0]["predicted_efficiency"] == pytest.approx(2 * 16 / 0.22 / 100 / 2)


def test_bad_input_fails_before_launching(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such dataset store"):
        scale("classifier-simple", tmp_path / "missing.zarr", "1,2", tracking_uri=f"sqlite:///{tmp_path}/m.db")
    with pytest.raises(DeepGalaxyError, match="bandwidth must be > 0"):
        scale("classifier-simple", tmp_path / "missing.zarr", "1", bandwidth_gbit=0)


@pytest.mark.slow
def test_scale_one_and_two_workers_end_to_end(tmp_path: Path) -> None:
    """Real horovodrun for N=2, global batch 8 (8 then 4 per worker); table, scaling.json, MLflow and figure."""
    pytest.importorskip("horovod.torch")
    import mlflow

    data = make_dataset(tmp_path / "tiny.zarr")
    db = f"sqlite:///{tmp_path}/mlflow.db"
    plot = tmp_path / "out" / "fig7.png"
    proc = cli("scale", "classifier-simple", "--data", str(data), "--workers", "1,2", "--steps", "3", "--warmup", "1",
               "--batch", "8", "--batch-policy", "global", *TINY, "--tracking-uri", db, "--plot", str(plot),
               "--run-dir", str(tmp_path / "run"), "--bandwidth", "10", "--latency", "20", "--no-progress",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "efficiency" in proc.stdout.lower() or "effic." in proc.stdout
    assert "PROJECTION" in proc.stdout and "1024 proj." in proc.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    out = json.loads((tmp_path / "run" / "scaling.json").read_text())
    cores = len(os.sched_getaffinity(0))
    p1, p2 = out["points"]
    assert (p1["workers"], p1["batch_per_worker"], p1["threads_per_worker"]) == (1, 8, max(1, cores))
    assert (p2["workers"], p2["batch_per_worker"], p2["threads_per_worker"]) == (2, 4, max(1, cores // 2))
    assert p1["allreduce"] == [] and [int(s[1]) for s in p2["allreduce"]][-1] == p2["gradient_bytes"]
    assert p2["gradient_bytes"] == 4 * p2["parameters"] > 0
    m1, m2 = out["measured"]
    assert (m1["speedup"], m1["efficiency"]) == (1.0, 1.0)
    assert m2["speedup"] == pytest.approx(p2["images_per_s"] / p1["images_per_s"])
    assert m2["efficiency"] == pytest.approx(m2["speedup"] / 2)
    assert p2["images_per_s"] == pytest.approx(2 * 4 * 3 / p2["elapsed_s"])
    proj = {r["workers"]: r for r in out["projection"]["rows"]}
    assert sorted(proj) == [8, 16, 32, 64, 128, 256, 512, 1024]
    c, b = p1["compute_s"], p1["gradient_bytes"]
    step = c + 2 * 127 * 20e-6 + 2 * 127 / 128 * b / (10e9 / 8)
    assert proj[128]["efficiency"] == pytest.approx(c / step)
    assert len(out["model_check"]) == 1 and out["model_check"][0]["workers"] == 2

    client = mlflow.MlflowClient(db)
    exp = client.get_experiment_by_name("deepgalaxy-scale")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: r.info.run_name)
    assert len(parents) == 1 and [c.info.run_name for c in children] == ["w1", "w2"]
    parent = parents[0]
    assert all(ch.data.tags["mlflow.parentRunId"] == parent.info.run_id for ch in children)
    assert parent.data.params["batch_policy"] == "global" and parent.data.params["threads_per_worker"] == (
        f"1:{max(1, cores)},2:{max(1, cores // 2)}")
    for child, n in zip(children, (1, 2), strict=True):
        assert child.data.params["batch_per_worker"] == str(8 // n)
        for name in ("throughput", "speedup", "efficiency"):
            history = client.get_metric_history(child.info.run_id, name)
            assert [h.step for h in history] == [n]
    eff = client.get_metric_history(parent.info.run_id, "efficiency")
    assert sorted((h.step, h.value) for h in eff) == [(1, 1.0), (2, pytest.approx(m2["efficiency"]))]
    projected = client.get_metric_history(parent.info.run_id, "projected_efficiency")
    assert sorted(h.step for h in projected) == [8, 16, 32, 64, 128, 256, 512, 1024]
    assert "PROJECTION" in parent.data.tags["projection"]
    figures = [a.path for a in client.list_artifacts(parent.info.run_id, "figures")]
    assert figures == ["figures/fig7.png", "figures/scaling_measured.png"]
