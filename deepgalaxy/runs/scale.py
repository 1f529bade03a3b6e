"""``deepgalaxy scale``: measured data-parallel scaling (the paper's Fig. 7) and a ring-allreduce projection.

For each worker count N a short Horovod training is measured (:mod:`deepgalaxy.runs.scale_worker`): warm-up steps
are excluded, throughput is images/s of the whole system. Speed-up and efficiency are normalised to the smallest
N measured, ``S(N) = T(N) / T(N0)``, ``E(N) = S(N) N0 / N`` (:func:`deepgalaxy.core.scaling.speedup_efficiency`).

Policies, recorded as MLflow params:

- threads: each of the N workers on this machine gets ``max(1, cores // N)`` intra-op threads (``--threads``
  overrides), so the workers never oversubscribe the cores. On one machine this means N workers *split* the
  cores: E(N) then measures process-level against thread-level parallelism plus communication, not a cluster.
- batch: ``local`` keeps the per-worker batch fixed (weak scaling, as the paper); ``global`` keeps the global
  batch fixed and gives each worker ``global / N``.

Projection (never a measurement, labelled as such everywhere): a :class:`~deepgalaxy.core.scaling.StepModel` with
the compute time per step measured at N0, the model's gradient size and a ring allreduce over a network given by
``--bandwidth`` (Gbit/s) and ``--latency`` (us) predicts efficiency at 8 .. 1024 workers. The same model with
alpha/beta *fitted* to the allreduce times measured here, and the compute time measured at each N under the same
core sharing, predicts the measured N > N0 points: that is the check of the model (table column ``model E``).

MLflow: a parent run (params, measured metrics ``throughput``/``speedup``/``efficiency`` and the projection's
``projected_*`` at ``step = N``, the figure, ``scaling.json``) with one child run per worker count.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from deepgalaxy.core.errors import DeepGalaxyError
from deepgalaxy.core.scaling import (
    PROJECTED_WORKERS,
    RingAllreduce,
    ScalingError,
    ScalingRow,
    StepModel,
    speedup_efficiency,
)
from deepgalaxy.core.workers import available_cores
from deepgalaxy.runs.launch import launch, launcher_for

BatchPolicy = Literal["local", "global"]
DEFAULT_EXPERIMENT = "deepgalaxy-scale"
DEFAULT_BANDWIDTH_GBIT = 100.0
DEFAULT_LATENCY_US = 5.0


@dataclass
class ScaleResult:
    """Measured rows, the projection, the model check, where the figure is and the MLflow parent run."""

    measured: list[ScalingRow]
    projected: list[ScalingRow]
    points: list[dict[str, Any]]
    check: list[dict[str, float]]
    fitted_network: RingAllreduce | None
    network: RingAllreduce
    plot_path: Path
    run_id: str
    tracking_uri: str
    params: dict[str, Any] = field(default_factory=dict)

    def efficiency(self, workers: int, projected: bool = False) -> float:
        rows = self.projected if projected else self.measured
        return next(r.efficiency for r in rows if r.workers == workers)

    def as_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "measured": [r.as_dict() for r in self.measured],
            "points": self.points,
            "model_check": self.check,
            "fitted_network": None if self.fitted_network is None else {
                "latency_s": self.fitted_network.alpha, "bandwidth_bytes_per_s": self.fitted_network.beta},
            "projection": {
                "label": "PROJECTION (ring-allreduce cost model, not measured)",
                "network": {"latency_s": self.network.alpha, "bandwidth_bytes_per_s": self.network.beta,
                            "description": self.network.describe()},
                "rows": [r.as_dict() for r in self.projected],
            },
            "plot": str(self.plot_path),
            "run_id": self.run_id,
        }


# --- settings ---------------------------------------------------------------------------------------------------


def parse_workers(text: str | Sequence[int]) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]`` (sorted, unique, each >= 1)."""
    items = [str(x) for x in text] if not isinstance(text, str) else [t for t in text.split(",") if t.strip()]
    try:
        values = sorted({int(t) for t in items})
    except ValueError:
        raise DeepGalaxyError(f"--workers {text!r}: expected a comma-separated list of counts, e.g. 1,2,4") from None
    if not values or values[0] < 1:
        raise DeepGalaxyError(f"--workers {text!r}: every worker count must be >= 1, e.g. 1,2,4")
    return values


def batch_per_worker(policy: str, batch: int, workers: int) -> int:
    """Per-worker batch under the policy: ``local`` keeps ``batch`` per worker, ``global`` divides it by N."""
    if policy == "local":
        return batch
    if policy != "global":
        raise DeepGalaxyError(f"--batch-policy {policy!r}: use 'local' (per-worker batch fixed) or 'global'")
    if batch % workers:
        raise DeepGalaxyError(
            f"--batch-policy global: the global batch {batch} does not divide evenly over {workers} workers; "
            f"use a global batch that every worker count divides (e.g. {batch * workers // math.gcd(batch, workers)})"
        )
    return batch // workers


# --- measuring ----------------------------------------------------------------------------------------------------


def measure(config: dict[str, Any], directory: Path, hosts: str | None, threads: int) -> dict[str, Any]:
    """Launch one measurement (N ranks) and return rank 0's result."""
    from deepgalaxy.core.workers import capped_thread_env
    from deepgalaxy.runs.rundir import RESULT_FILE

    workers = int(config["workers"])
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RESULT_FILE).unlink(missing_ok=True)
    launcher = launcher_for(None, workers, hosts)
    config = {**config, "launcher": launcher.name}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    env = {**capped_thread_env(threads), "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    argv = [sys.executable, "-m", "deepgalaxy.runs.scale_worker", str(directory / "config.json")]
    launch(launcher, argv, workers, hosts, env, directory,
           failed=f"measuring {workers} worker(s) failed: {{message}} (files in {{directory}})",
           no_result=f"measuring {workers} worker(s) exited with code {{code}} and no result (files in {{directory}})")
    result: dict[str, Any] = json.loads((directory / RESULT_FILE).read_text())
    return result


def best_round(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of several rounds at one N, with every round's throughput and load average attached."""
    best = dict(max(rounds, key=lambda p: float(p["images_per_s"])))
    best["rounds_images_per_s"] = [float(p["images_per_s"]) for p in rounds]
    best["rounds_load_avg_1m"] = [float(p.get("load_avg_1m", float("nan"))) for p in rounds]
    return best


def analyse(points: Sequence[Mapping[str, Any]], network: RingAllreduce, overlap: float = 0.0,
            projected_workers: Sequence[int] = PROJECTED_WORKERS, messages: int | None = None
            ) -> tuple[list[ScalingRow], list[ScalingRow], list[dict[str, float]], RingAllreduce | None]:
    """Measured rows, projected rows, the model check at measured N > N0 and the fitted network.

    Projection: compute time per step and batch of the smallest measured N, the model's gradient size, ``network``.
    Check: at each measured N > N0, step time = compute time measured at N + fitted ring allreduce of the gradients
    (the allreduce measured at the gradient size when the times do not grow with message size, so no bandwidth can
    be fitted); predicted efficiency = predicted throughput / measured throughput at N0 x N0 / N. ``messages``: the
    allreduce messages per step measured in a Horovod timeline, for the check's latency term (default: one per
    64 MB fusion buffer, :attr:`~deepgalaxy.core.scaling.StepModel.messages`).
    """
    measured = speedup_efficiency([(int(p["workers"]), float(p["images_per_s"])) for p in points])
    by_n = {int(p["workers"]): p for p in points}
    n0 = measured[0].workers
    base = by_n[n0]
    gradient_bytes = float(base["gradient_bytes"])
    samples = [tuple(s) for p in points for s in p.get("allreduce", [])]
    fitted: RingAllreduce | None = None
    if len({s[1] for s in samples}) >= 2:
        try:
            fitted = RingAllreduce.fit(samples)
        except ScalingError:
            fitted = None
    check: list[dict[str, float]] = []
    t0 = float(base["images_per_s"])
    for row in measured:
        p = by_n[row.workers]
        at_gradient = [s[2] for s in p.get("allreduce", []) if int(s[1]) == int(gradient_bytes)]
        if row.workers == n0 or (fitted is None and not at_gradient):
            continue
        compute = float(p["compute_s"])
        if fitted is not None:
            model = StepModel(compute, gradient_bytes, int(p["batch_per_worker"]), fitted, overlap,
                              fused_messages=messages)
            allreduce, predicted_step = model.allreduce_s(row.workers), model.step_s(row.workers)
        else:  # times did not grow with size (latency-bound, or noise): use the measured gradient allreduce
            allreduce = float(at_gradient[0])
            predicted_step = compute + max(0.0, allreduce - overlap * compute)
        predicted_eff = row.workers * int(p["batch_per_worker"]) / predicted_step / t0 * n0 / row.workers
        check.append({
            "workers": float(row.workers), "measured_efficiency": row.efficiency,
            "predicted_efficiency": predicted_eff, "error": predicted_eff - row.efficiency,
            "measured_step_s": float(p["step_s"]), "predicted_step_s": predicted_step, "compute_s": compute,
            "predicted_allreduce_s": allreduce, "allreduce_from_fit": 1.0 if fitted is not None else 0.0,
        })
    projection = StepModel(float(base["compute_s"]), gradient_bytes, int(base["batch_per_worker"]), network, overlap)
    projected = projection.project(sorted({*projected_workers}), n0=n0)
    return measured, projected, check, fitted


# --- the command --------------------------------------------------------------------------------------------------


def scale(card: Any, data: str | Path, workers: str | Sequence[int] = (1, 2), *, framework: str = "torch",
          steps: int = 20, warmup: int = 3, compute_steps: int | None = None, batch: int | None = None,
          batch_policy: BatchPolicy = "local", threads: int | None = None, hosts: str | None = None,
          overrides: Sequence[str] | Mapping[str, Any] | None = None, tracking_uri: str | None = None,
          experiment: str = DEFAULT_EXPERIMENT, plot: str | Path | None = None,
          bandwidth_gbit: float = DEFAULT_BANDWIDTH_GBIT, latency_us: float = DEFAULT_LATENCY_US,
          overlap: float = 0.0, project: Sequence[int] = PROJECTED_WORKERS, allreduce_repeats: int = 5,
          repeats: int = 1, run_dir: str | Path | None = None, progress: bool = True, device: str | None = None,
          precision: str | None = None) -> ScaleResult:
    """Measure throughput at each worker count, project beyond, log it all to MLflow and draw Fig. 7.

    Args:
        card: card name, :class:`~deepgalaxy.core.specs.ModelSpec` or ``card.json`` path.
        data: a deepgalaxy Zarr store (each worker reads its shard of the training split).
        workers: ``"1,2,4"`` or a list; speed-up and efficiency are relative to the smallest.
        steps / warmup: timed steps and excluded warm-up steps per measurement; ``compute_steps`` (default
            ``steps``) for the compute-only probe at N > 1.
        batch / batch_policy: per-worker batch (``local``) or global batch (``global``); default the card's
            ``train.batch_size``.
        threads: intra-op threads per worker (default ``max(1, cores // local workers)``).
        bandwidth_gbit / latency_us / overlap: the network (and compute/communication overlap) of the projection.
        plot: where to save the figure (default ``scaling-<card>-<framework>.png`` in the working directory).
        repeats: rounds over all worker counts, interleaved; each N keeps its fastest round (the one least
            disturbed by other load on a shared machine); every round's throughput is kept in the results.
        device / precision: where and how each worker trains (as for :func:`deepgalaxy.runs.train`; under
            Horovod each rank takes its local rank's GPU).
    """
    from deepgalaxy.runs.launch import check_framework
    from deepgalaxy.runs.placement import check_device
    from deepgalaxy.runs.training import build_spec, check_data

    counts = parse_workers(workers)
    if steps < 1 or warmup < 0 or repeats < 1:
        raise DeepGalaxyError(f"--steps and --repeats must be >= 1 and --warmup >= 0, got {steps}, {repeats} and "
                              f"{warmup}")
    network = RingAllreduce.from_network(bandwidth_gbit, latency_us)
    if not 0.0 <= overlap <= 1.0:
        raise DeepGalaxyError(f"--overlap is a fraction of the compute time in [0, 1], got {overlap}")
    if batch_policy not in ("local", "global"):
        raise DeepGalaxyError(f"--batch-policy {batch_policy!r}: use 'local' (per-worker batch fixed) or 'global'")
    spec = build_spec(card, data, framework=framework, workers=max(counts), overrides=overrides,
                      tracking_uri=tracking_uri, experiment=experiment, register=False, device=device,
                      precision=precision)
    check_framework(spec.framework)
    check_device(spec.model_copy(update={"hosts": hosts}))
    check_data(spec)
    batch = int(batch or spec.train.batch_size)
    per_worker = {n: batch_per_worker(batch_policy, batch, n) for n in counts}
    cores = available_cores()
    per_machine = {n: launcher_for(None, n, hosts).ranks_per_machine(n, hosts) for n in counts}
    thread_counts = {n: int(threads) if threads else max(1, cores // per_machine[n]) for n in counts}
    if any(t < 1 for t in thread_counts.values()):
        raise DeepGalaxyError(f"--threads must be >= 1, got {threads}")
    directory = Path(run_dir) if run_dir else _new_dir(spec.card.name)
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    params: dict[str, Any] = {
        "card": spec.card.name, "framework": spec.framework, "workers": ",".join(map(str, counts)),
        "batch_policy": batch_policy, "batch": batch, "warmup_steps": warmup, "timed_steps": steps,
        "compute_steps": compute_steps or steps, "repeats": repeats, "cores": cores, "hosts": hosts or "localhost",
        "threads_per_worker": ",".join(f"{n}:{thread_counts[n]}" for n in counts),
        "input_size": spec.card.input_size, "optimizer": spec.train.optimizer,
        "projection.bandwidth_gbit_s": bandwidth_gbit, "projection.latency_us": latency_us,
        "projection.overlap": overlap, "projection.workers": ",".join(map(str, sorted(set(project)))),
        "data": spec.data.path,
    }

    rounds: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
    for r in range(repeats):
        # interleave (1,2,4 then 4,2,1 ...) so slow drifts of the machine's load hit every N alike
        for n in counts if r % 2 == 0 else counts[::-1]:
            print(f"measuring {spec.card.name} ({spec.framework}) on {n} worker(s), round {r + 1}/{repeats}: batch "
                  f"{per_worker[n]} per worker, {thread_counts[n]} thread(s) each, {warmup} warm-up + {steps} timed "
                  "steps", file=sys.stderr, flush=True)
            config = {
                "card": spec.card.model_dump(mode="json"),
                "train": spec.train.model_copy(update={"batch_size": per_worker[n]}).model_dump(mode="json"),
                "framework": spec.framework, "data": spec.data.path, "split": spec.data.split,
                "validation_fraction": spec.data.validation_fraction, "seed": spec.train.seed,
                "workers": n, "batch_per_worker": per_worker[n], "warmup": warmup, "steps": steps,
                "compute_steps": compute_steps or steps, "threads": thread_counts[n],
                "allreduce_repeats": allreduce_repeats, "progress": progress,
            }
            point = measure(config, directory / f"w{n}-r{r + 1}", hosts, thread_counts[n])
            point["load_avg_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            rounds[n].append(point)
    points = [best_round(rounds[n]) for n in counts]

    measured, projected, check, fitted = analyse(points, network, overlap, project)
    plot_path = Path(plot) if plot else Path.cwd() / f"scaling-{spec.card.name}-{spec.framework}.png"
    per = "per worker" if batch_policy == "local" else "global"
    title = f"{spec.card.name} ({spec.framework}), batch {batch} {per}, {spec.card.input_size} px"
    from deepgalaxy.core.figures import scaling_figure

    scaling_figure(measured, projected, plot_path, title, f"PROJECTION ({network.describe()})")
    result = ScaleResult(measured, projected, points, check, fitted, network, plot_path.resolve(), "",
                         spec.tracking_uri or "", params)
    result.run_id = log_to_mlflow(result, spec.tracking_uri or "", experiment, title)
    (directory / "scaling.json").write_text(json.dumps(result.as_dict(), indent=2))
    return result


def _new_dir(card_name: str) -> Path:
    from deepgalaxy.runs.training import runs_root

    stamp = time.strftime("%Y%m%d-%H%M%S")
    return runs_root() / f"scale-{card_name}-{stamp}-{secrets.token_hex(2)}"


# --- MLflow -------------------------------------------------------------------------------------------------------


def log_to_mlflow(result: ScaleResult, tracking_uri: str, experiment: str, title: str) -> str:
    """A parent run (params, measured + projected metrics at step N, figures, JSON) and a child run per N."""
    import mlflow
    from mlflow.entities import Metric, RunTag

    from deepgalaxy.core.figures import scaling_figure
    from deepgalaxy.tracking import new_run

    p = result.params
    now = int(time.time() * 1000)
    tags = {"deepgalaxy.kind": "scale", "card": p["card"], "framework": p["framework"],
            "mlflow.runName": f"scale-{p['card']}-{p['framework']}-w{p['workers'].replace(',', '-')}"}
    pid = new_run(tracking_uri, experiment, tags, p)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    metrics = []
    for r in result.measured:
        metrics += [Metric("throughput", r.images_per_s, now, r.workers), Metric("speedup", r.speedup, now, r.workers),
                    Metric("efficiency", r.efficiency, now, r.workers)]
    for r in result.projected:
        metrics += [Metric("projected_throughput", r.images_per_s, now, r.workers),
                    Metric("projected_speedup", r.speedup, now, r.workers),
                    Metric("projected_efficiency", r.efficiency, now, r.workers)]
    for c in result.check:
        n = int(c["workers"])
        metrics += [Metric("model_check_predicted_efficiency", c["predicted_efficiency"], now, n),
                    Metric("model_check_error", c["error"], now, n)]
    if result.fitted_network is not None:
        metrics += [Metric("fitted_latency_us", result.fitted_network.alpha * 1e6, now, 0),
                    Metric("fitted_bandwidth_gbit_s", result.fitted_network.beta * 8 / 1e9, now, 0)]
    projection = RunTag("projection", f"PROJECTION (not measured): {result.network.describe()}")
    client.log_batch(pid, metrics=metrics, tags=[projection])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "scaling.json").write_text(json.dumps(result.as_dict(), indent=2))
        client.log_artifact(pid, str(out / "scaling.json"))
        client.log_artifact(pid, str(result.plot_path), artifact_path="figures")
        scaling_figure(result.measured, (), out / "scaling_measured.png", title)
        client.log_artifact(pid, str(out / "scaling_measured.png"), artifact_path="figures")
    by_n = {int(pt["workers"]): pt for pt in result.points}
    for r in result.measured:
        pt = by_n[r.workers]
        child_params = {"workers": r.workers, "threads_per_worker": pt["threads_per_worker"],
                        "batch_per_worker": pt["batch_per_worker"], "global_batch": pt["global_batch"],
                        "batch_policy": p["batch_policy"], "warmup_steps": pt["warmup_steps"],
                        "timed_steps": pt["timed_steps"], "parameters": pt["parameters"],
                        "gradient_bytes": pt["gradient_bytes"],
                        "rounds_images_per_s": ",".join(f"{x:.4g}" for x in pt.get("rounds_images_per_s", []))}
        cid = new_run(tracking_uri, experiment, {
            "mlflow.runName": f"w{r.workers}", "deepgalaxy.kind": "scale-point", "card": p["card"],
            "framework": p["framework"], "workers": str(r.workers)}, child_params, parent_run_id=pid)
        cm = [Metric("throughput", r.images_per_s, now, r.workers), Metric("speedup", r.speedup, now, r.workers),
              Metric("efficiency", r.efficiency, now, r.workers),
              Metric("throughput_per_worker", r.images_per_s / r.workers, now, r.workers),
              Metric("step_s", float(pt["step_s"]), now, r.workers),
              Metric("compute_s", float(pt["compute_s"]), now, r.workers),
              Metric("load_avg_1m", float(pt.get("load_avg_1m", float("nan"))), now, r.workers)]
        cm = [m for m in cm if math.isfinite(m.value)]
        for _, nbytes, seconds in pt.get("allreduce", []):
            cm.append(Metric("allreduce_s", float(seconds), now, int(nbytes)))
        client.log_batch(cid, metrics=cm)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "point.json"
            path.write_text(json.dumps(pt, indent=2))
            client.log_artifact(cid, str(path))
        client.set_terminated(cid, "FINISHED")
    client.set_terminated(pid, "FINISHED")
    return pid


__all__ = ["ScaleResult", "analyse", "batch_per_worker", "parse_workers", "scale"]
