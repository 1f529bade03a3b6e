"""Scaling on a real network path: two hosts made as network namespaces, the link limited by tbf, then a projection.

    sudo python benchmarks/multihost_scaling.py                       # 1 and 10 Gbit/s, classifier-b0 at 32 px
    sudo python benchmarks/multihost_scaling.py --rates 1gbit --steps 10 --b4-sizes 512

For each link rate, ``deepgalaxy scale --workers 1,2 --hosts a:1,b:1`` runs from the login namespace of
``tests/hosts.py`` (horovodrun over ssh, ``--network-interface dg0``), with every link shaped by a tbf qdisc and
Horovod's timeline on (``HOROVOD_TIMELINE``, written by rank 0). From its ``scaling.json`` and the timeline:

- **fit**: the ring-allreduce model's latency and bandwidth fitted to the allreduce times measured across the link at
  several message sizes (:meth:`deepgalaxy.core.scaling.RingAllreduce.fit`);
- **timeline** (per timed step of the N=2 training): the allreduce *messages* Horovod sent (its fusion cycles: the
  gradient tensors whose Gloo allreduces run as one), the time the background thread spent in allreduce ops, how much
  of that fell inside the backward pass (before the last gradient was enqueued) and after it, and the *exposed* time
  from the last enqueue to the end of the last allreduce (what the optimizer step waits for);
- **check**: the model's E(2) (compute time measured at N=2 + fitted allreduce of the gradient, less the overlap)
  against the measured E(2), with one message per 64 MB fusion buffer and with the message count measured in the
  timeline; the goal is within 10%. The terms are compared one by one with the timeline's;
- **overlap**: ``hidden = compute + allreduce(gradient) - step`` at N=2, ``overlap = hidden / compute`` clipped to
  [0, 1], explained by the timeline's split of the allreduce time into inside and after the backward pass.

**Compute** of the paper's setting, measured here: the compute-only step (forward, backward, update; torch plugin,
``--b4-card``, 8 images, ``--b4-threads`` threads, 1 warm-up + ``--b4-steps`` timed steps on an in-memory batch) at
each of ``--b4-sizes`` in a process of its own, after a check that its memory fits: the peak RSS of one step at
128 and 256 px, extrapolated linearly in the pixel count (the activations grow with it, the weights and optimizer
state do not), must stay under 80% of the memory available now. The card's head pools globally (``--b4-pool avg``)
so that its gradients are EfficientNet-B4's plus a small head, as in the projection (with ``flatten`` the dense
layer after the flattened feature map grows with the image: 47M parameters at 256 px).

**PROJECTION** (not measured): EfficientNet-B4 (17,548,616 trainable parameters without the top, fp32 gradients), 8
images per worker, a 100 Gbit/s ring with 5 us latency, the measured overlap: with this CPU's measured compute time,
the least compute time per step for E(512) >= 0.90 (:meth:`~deepgalaxy.core.scaling.StepModel.min_compute_s`), and
E(128/512/1024) for a few compute times that are *inputs* (a reader's GPU), not measurements.

The machine is shared and has 2 cores: both hosts' ranks run on them (``--threads 1``); compare ratios within one
run (two runs here differed by 25% in E(2)). Needs root, iproute2 (ip, tc) and openssh-server. Runtime: about
4 minutes here (1 minute per rate, 2 for the compute probes; 1024 px, skipped for memory here, would add 4x the
512 px probe). The timeline of each rate and its ``scaling.json`` are copied to ``--keep DIR`` when given.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deepgalaxy.core.scaling import RingAllreduce, StepModel  # noqa: E402
from deepgalaxy.runs.scale import analyse  # noqa: E402

B4_PARAMETERS = 17_548_616
"""EfficientNet-B4's trainable parameters without the top (FACTS.md; Keras and timm agree)."""
PAPER_E512 = 0.73
GOAL_E512 = 0.90
PROJECT = (128, 512, 1024)
INPUT_COMPUTE_S = (0.05, 0.1, 0.2, 0.4)
"""Compute times per step the projection table is evaluated at: inputs (a reader's GPU), not measurements."""
PROBE_SIZES = (128, 256)
MEMORY_MARGIN = 0.8
"""A compute probe runs only when its extrapolated peak RSS is below this fraction of the memory available."""
OWN_REDUCTIONS = "allreduce.deepgalaxy."
"""Timeline names of deepgalaxy's own reductions (barriers, maxima, allreduce probes): not gradients."""


# --- the two-host measurement ---------------------------------------------------------------------------------


def measure(rate: str, card: str, size: int, steps: int, tmp: Path) -> tuple[dict[str, Any], Path]:
    """``deepgalaxy scale --workers 1,2`` across two namespace hosts with links limited to ``rate``; the result and
    rank 0's Horovod timeline."""
    from tests.hosts import IFACE, SSH_PORT, network_hosts
    from tests.runs_support import make_dataset

    data = make_dataset(tmp / "tiny.zarr")
    timeline = tmp / f"timeline-{rate}.json"
    with network_hosts(2, tmp / f"hosts-{rate}", rate=rate) as hosts:
        argv = [sys.executable, "-m", "deepgalaxy", "scale", card, "--data", str(data), "--workers", "1,2",
                "--hosts", hosts.hosts_arg(), "--network-interface", IFACE, "--ssh-port", str(SSH_PORT),
                "--ssh-identity-file", str(hosts.key), "--threads", "1", "--steps", str(steps), "--warmup", "2",
                "--set", f"card.input_size={size}", "--set", "train.batch_size=4", "--no-progress",
                "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--run-dir", str(tmp / f"scale-{rate}"),
                "--plot", str(tmp / f"scaling-{rate}.png")]
        out = subprocess.run(hosts.in_login(argv), cwd=tmp, capture_output=True, text=True, timeout=900,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3",
                                  "HOROVOD_TIMELINE": str(timeline)})
    if out.returncode != 0:
        sys.exit(f"scale at {rate} failed:\n{out.stdout[-2000:]}{out.stderr[-4000:]}")
    result: dict[str, Any] = json.loads((tmp / f"scale-{rate}" / "scaling.json").read_text())
    return result, timeline


def overlap_of(point: dict[str, Any]) -> tuple[float, float, float]:
    """(overlap, hidden seconds, allreduce / compute) at a measured N=2 point."""
    compute, step = float(point["compute_s"]), float(point["step_s"])
    allreduce = next(s[2] for s in point["allreduce"] if int(s[1]) == int(point["gradient_bytes"]))
    hidden = compute + allreduce - step
    return min(1.0, max(0.0, hidden / compute)), hidden, allreduce / compute


# --- Horovod's timeline -----------------------------------------------------------------------------------------


def timeline_spans(path: Path) -> list[tuple[str, str, float, float]]:
    """``(tensor, phase, start_s, end_s)`` of every phase in a Horovod timeline (Chrome trace JSON, one "process"
    per tensor, B/E pairs nested per tensor); a file cut short by the end of the job is closed first."""
    text = path.read_text().rstrip().rstrip(",")
    events = json.loads(text if text.endswith("]") else text + "]")
    names: dict[int, str] = {}
    open_phases: dict[int, list[tuple[str, float]]] = defaultdict(list)
    spans = []
    for e in events:
        pid = e.get("pid")
        if e.get("ph") == "M" and e.get("name") == "process_name" and "name" in e.get("args", {}):
            names[pid] = e["args"]["name"]
        elif e.get("ph") == "B":
            open_phases[pid].append((e["name"], e["ts"] * 1e-6))
        elif e.get("ph") == "E" and open_phases[pid]:
            phase, start = open_phases[pid].pop()
            spans.append((names.get(pid, ""), phase, start, e["ts"] * 1e-6))
    return spans


def union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Overlapping intervals merged (the tensors of one fused message share one interval)."""
    out: list[list[float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def timeline_steps(path: Path, timed: int) -> list[dict[str, float]]:
    """Per timed training step (the last ``timed`` of the gradient allreduces): messages, allreduce time inside and
    after the backward pass, exposed time, backward duration (first to last gradient enqueued) and period."""
    by_phase: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for tensor, phase, start, end in timeline_spans(path):
        if tensor.startswith("allreduce.") and not tensor.startswith(OWN_REDUCTIONS):
            by_phase[phase][tensor].append((start, end))
    for spans in by_phase.values():
        for intervals in spans.values():
            intervals.sort()
    counts = {len(v) for phase in ("NEGOTIATE_ALLREDUCE", "ALLREDUCE", "GLOO_ALLREDUCE")
              for v in by_phase[phase].values()}
    if len(counts) != 1 or min(counts) < timed:
        raise SystemExit(f"{path}: every gradient tensor should have one allreduce per step and >= {timed} steps, "
                         f"got counts {sorted(counts)}")
    total = counts.pop()
    rows = []
    for k in range(total - timed, total):
        enqueued = [v[k][0] for v in by_phase["NEGOTIATE_ALLREDUCE"].values()]
        ops = union([v[k] for v in by_phase["ALLREDUCE"].values()])
        messages = union([v[k] for v in by_phase["GLOO_ALLREDUCE"].values()])
        first, last = min(enqueued), max(enqueued)
        busy = sum(b - a for a, b in ops)
        inside = sum(max(0.0, min(b, last) - a) for a, b in ops)
        rows.append({"first_enqueue": first, "messages": float(len(messages)), "allreduce_s": busy,
                     "inside_backward_s": inside, "after_backward_s": busy - inside, "backward_s": last - first,
                     "exposed_s": max(0.0, ops[-1][1] - last), "gloo_s": sum(b - a for a, b in messages)})
    for row, following in itertools.pairwise(rows):
        row["period_s"] = following["first_enqueue"] - row["first_enqueue"]
    return rows


def median(rows: list[dict[str, float]], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return float(statistics.median(values)) if values else float("nan")


def mean(rows: list[dict[str, float]], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return float(statistics.fmean(values)) if values else float("nan")


# --- compute of the paper's setting, on this CPU -----------------------------------------------------------------


def probe_compute(card_name: str, size: int, pool: str, batch: int, threads: int, steps: int) -> dict[str, Any]:
    """Compute-only steps of ``card_name`` at ``size`` px with ``pool`` as its head's pooling (torch plugin,
    in-memory batch): step times, peak RSS."""
    import numpy as np

    from deepgalaxy import registry
    from deepgalaxy.core.interfaces import Distributed
    from deepgalaxy.core.specs import TrainSpec
    from deepgalaxy.plugins.torch.runtime import TorchRuntime

    TorchRuntime().set_threads(threads)
    card = registry.card(card_name).model_copy(update={"input_size": size, "head_pool": pool})
    model = registry.create(card, framework="torch", seed=0)
    trainer = registry.get_framework("torch").trainer(model.native, card, TrainSpec(batch_size=batch), Distributed())
    rng = np.random.default_rng(0)
    x = rng.random((batch, size, size, card.channels), dtype=np.float32)
    y = rng.integers(0, card.num_classes, batch).astype(np.int64)
    times, cpu = [], []
    for _ in range(steps + 1):  # the first is the warm-up
        start, start_cpu = time.perf_counter(), time.process_time()
        trainer.train_step(x, y)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"card": card_name, "size": size, "batch": batch, "threads": threads, "warmup_s": times[0],
            "step_s": times[1:], "cpu_s": cpu[1:], "load_avg_1m": os.getloadavg()[0],
            "parameters": model.num_parameters(trainable=True),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def compute_in_process(args: argparse.Namespace, size: int, steps: int, tmp: Path) -> dict[str, Any]:
    """:func:`probe_compute` of ``args.b4_card`` at ``size`` px in a fresh process (its peak RSS is its own)."""
    card, threads = args.b4_card, args.b4_threads
    out = tmp / f"compute-{card}-{size}.json"
    cmd = [sys.executable, __file__, "--probe", json.dumps([card, size, args.b4_pool, 8, threads, steps]),
           "--probe-out", str(out)]
    # PASSIVE: on a shared machine OpenMP threads otherwise spin while preempted (benchmarks/train_throughput.py)
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
    if done.returncode != 0:
        sys.exit(f"compute probe {card} at {size} px failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo (the memory that other users leave now)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("/proc/meminfo has no MemAvailable")


def measure_compute(args: argparse.Namespace, tmp: Path) -> dict[int, dict[str, Any]]:
    """The compute probe at each requested size that fits in memory (checked from steps at 128 and 256 px first)."""
    print(f"\n== compute of {args.b4_card} (head_pool {args.b4_pool}) on this CPU (torch, batch 8, "
          f"{args.b4_threads} threads) ==")
    seen = [compute_in_process(args, size, 0, tmp) for size in PROBE_SIZES]
    print("memory check: one step peaked at " + ", ".join(
        f"{r['peak_rss_bytes'] / 2**30:.2f} GiB RSS at {r['size']} px" for r in seen))
    results = {}
    for size in args.b4_sizes:
        (p0, m0), (p1, m1) = ((r["size"] ** 2, r["peak_rss_bytes"]) for r in seen[-2:])
        need = m1 + (m1 - m0) / (p1 - p0) * (size**2 - p1)  # linear in the pixel count through the last two sizes
        free = available_bytes()
        if need > MEMORY_MARGIN * free:
            print(f"{size} px: SKIPPED, needs about {need / 2**30:.1f} GiB (peak RSS extrapolated from "
                  f"{seen[-2]['size']} and {seen[-1]['size']} px), {free / 2**30:.1f} GiB available now (limit "
                  f"{MEMORY_MARGIN:.0%} of it)")
            continue
        r = compute_in_process(args, size, args.b4_steps, tmp)
        results[size] = r
        seen.append(r)
        print(f"{size} px: compute-only step {statistics.median(r['step_s']):.2f} s (median of "
              f"{', '.join(f'{t:.2f}' for t in r['step_s'])}; warm-up {r['warmup_s']:.2f} s; CPU "
              f"{statistics.median(r['cpu_s']):.2f} s per step over {r['threads']} threads; load average "
              f"{r['load_avg_1m']:.1f}), peak RSS "
              f"{r['peak_rss_bytes'] / 2**30:.2f} GiB (estimated {need / 2**30:.1f}), "
              f"{r['parameters']:,} trainable parameters")
    return results


# --- report ------------------------------------------------------------------------------------------------------


def report_rate(rate: str, result: dict[str, Any], timeline: Path, steps: int) -> tuple[float, float, float]:
    """Print one link rate's fit, timeline, model check and overlap; return (overlap, hidden, allreduce/compute)."""
    points = {int(p["workers"]): p for p in result["points"]}
    one, two = points[1], points[2]
    overlap, hidden, most = overlap_of(two)
    fitted = RingAllreduce(result["fitted_network"]["latency_s"], result["fitted_network"]["bandwidth_bytes_per_s"])
    gradient = float(two["gradient_bytes"])
    allreduce = most * float(two["compute_s"])
    print(f"\n== link {rate} (tbf) ==")
    print(f"gradient {gradient / 1e6:.1f} MB; allreduce [bytes: ms] "
          + ", ".join(f"{int(s[1])}: {s[2] * 1e3:.2f}" for s in two["allreduce"]))
    print(f"fitted: {fitted.describe()}")
    print(f"N=1 step {one['step_s'] * 1e3:.1f} ms; N=2 step {two['step_s'] * 1e3:.1f} ms, compute only "
          f"{two['compute_s'] * 1e3:.1f} ms, allreduce of the gradient in one message {allreduce * 1e3:.1f} ms")
    rows = timeline_steps(timeline, steps)
    m = round(median(rows, "messages"))
    periods = ", ".join(f"{r['period_s'] * 1e3:.0f}" for r in rows if "period_s" in r)
    print(f"timeline (rank 0, {len(rows)} timed steps, medians): messages per step {m} (each step: "
          f"{', '.join(str(int(r['messages'])) for r in rows)}); allreduce ops {median(rows, 'allreduce_s') * 1e3:.1f}"
          f" ms per step, of which {median(rows, 'inside_backward_s') * 1e3:.1f} ms inside the backward pass and "
          f"{median(rows, 'after_backward_s') * 1e3:.1f} ms after it; backward (first to last gradient enqueued) "
          f"{median(rows, 'backward_s') * 1e3:.1f} ms; exposed (last enqueue to last allreduce done) "
          f"{median(rows, 'exposed_s') * 1e3:.1f} ms; step period {median(rows, 'period_s') * 1e3:.1f} ms (mean "
          f"{mean(rows, 'period_s') * 1e3:.1f}, each: {periods})")
    busy, inside = mean(rows, "allreduce_s"), mean(rows, "inside_backward_s")
    with_terms = float(two["compute_s"]) + busy - inside
    print(f"means per step [ms]: allreduce ops {busy * 1e3:.1f}, inside the backward pass {inside * 1e3:.1f}, after it "
          f"{mean(rows, 'after_backward_s') * 1e3:.1f}, exposed {mean(rows, 'exposed_s') * 1e3:.1f}; the model's step "
          f"with the timeline's terms (compute + allreduce ops - inside the backward) {with_terms * 1e3:.1f} vs "
          f"measured step {two['step_s'] * 1e3:.1f} (ratio {with_terms / two['step_s']:.3f})")
    model_ar = {label: fitted.time(2, gradient, n) for label, n in (("64 MB buffers", 1), ("timeline", m))}
    print(f"terms at N=2 [ms]: latency 2 m alpha = {2 * m * fitted.alpha * 1e3:.1f} (m={m}) or "
          f"{2 * fitted.alpha * 1e3:.1f} (m=1); bandwidth B/beta = {gradient / fitted.beta * 1e3:.1f}; model "
          f"allreduce {model_ar['timeline'] * 1e3:.1f} (m={m}) vs timeline allreduce ops "
          f"{median(rows, 'allreduce_s') * 1e3:.1f}; measured step - compute = "
          f"{(two['step_s'] - two['compute_s']) * 1e3:.1f} vs timeline exposed {median(rows, 'exposed_s') * 1e3:.1f}")
    print(f"overlap: hidden {hidden * 1e3:.1f} ms of compute, overlap {overlap:.2f} (allreduce/compute {most:.2f}: "
          f"the most that could show)")
    network = RingAllreduce.from_network(100.0, 5.0)
    for label, messages in (("m=1 per 64 MB", None), (f"m={m} from the timeline", m)):
        _, _, check, _ = analyse(result["points"], network, overlap, PROJECT, messages=messages)
        for c in check:
            ratio = c["predicted_efficiency"] / c["measured_efficiency"]
            print(f"E(2) measured {c['measured_efficiency']:.3f}, model ({label}, overlap {overlap:.2f}) "
                  f"{c['predicted_efficiency']:.3f}: ratio {ratio:.3f} "
                  f"({'within' if abs(ratio - 1) <= 0.10 else 'NOT within'} 10%)")
    return overlap, hidden, most


def report_projection(overlap: float, compute: dict[int, dict[str, Any]]) -> None:
    network = RingAllreduce.from_network(100.0, 5.0)
    gradient = 4.0 * B4_PARAMETERS
    print(f"\n== PROJECTION (ring-allreduce model, not measured): EfficientNet-B4, 8 images per worker, "
          f"{network.describe()}, overlap {overlap:.2f} ==")

    def row(label: str, compute_s: float, ov: float = overlap) -> None:
        model = StepModel(compute_s, gradient, 8, network, ov)
        e = {r.workers: r.efficiency for r in model.project(PROJECT)}
        print(f"{label}: compute {compute_s:.3f} s/step, overlap {ov:.2f}: "
              + ", ".join(f"E({n}) {e[n]:.3f}" for n in PROJECT)
              + f"; E(512)/paper {PAPER_E512} = {e[512] / PAPER_E512:.2f}, "
              f"/goal {GOAL_E512} = {e[512] / GOAL_E512:.2f}")

    for size, r in compute.items():
        row(f"this CPU, measured, {size} px", float(statistics.median(r["step_s"])))
    for ov in sorted({0.0, overlap}):
        for m in (None, 10, 30):
            probe = StepModel(1.0, gradient, 8, network, ov, fused_messages=m)
            need = probe.min_compute_s(512, GOAL_E512)
            print(f"least compute per step for E(512) >= {GOAL_E512}, overlap {ov:.2f}, {probe.messages} message(s) "
                  f"per step{' (one per 64 MB)' if m is None else ' (fusion cycles)'}: {need * 1e3:.1f} ms (allreduce "
                  f"at 512 workers {probe.allreduce_s(512) * 1e3:.1f} ms), i.e. at most {8 / need:.0f} img/s per GPU")
    for ov in sorted({0.0, overlap}):
        for compute_s in INPUT_COMPUTE_S:
            row("input, not measured", compute_s, ov)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rates", default="1gbit,10gbit", help="tbf rates of the link, comma-separated")
    parser.add_argument("--card", default="classifier-b0", help="card of the measured points (16 MB of gradients)")
    parser.add_argument("--size", type=int, default=32, help="image size of the measured points")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per point")
    parser.add_argument("--b4-card", default="classifier-b4", help="card of the compute probe (EfficientNet-B4)")
    parser.add_argument("--b4-sizes", type=lambda t: [int(s) for s in t.split(",") if s], default=[512, 1024],
                        help="image sizes of the compute probe (empty: none)")
    parser.add_argument("--b4-pool", default="avg", choices=("avg", "flatten"), help="head pooling of the probe")
    parser.add_argument("--b4-threads", type=int, default=2, help="threads of the compute probe")
    parser.add_argument("--b4-steps", type=int, default=3, help="timed steps of the compute probe (after 1 warm-up)")
    parser.add_argument("--keep", type=Path, help="copy each rate's scaling.json and Horovod timeline here")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--probe-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        Path(args.probe_out).write_text(json.dumps(probe_compute(*json.loads(args.probe))))
        return 0

    overlaps: dict[str, tuple[float, float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rate in [r.strip() for r in args.rates.split(",") if r.strip()]:
            result, timeline = measure(rate, args.card, args.size, args.steps, Path(tmp))
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(timeline, args.keep / timeline.name)
                (args.keep / f"scaling-{rate}.json").write_text(json.dumps(result, indent=2))
            overlaps[rate] = report_rate(rate, result, timeline, args.steps)
        compute = measure_compute(args, Path(tmp)) if args.b4_sizes else {}
    # the overlap can only show where the allreduce is as long as the compute: the slowest such link measures it
    shown = [o[0] for o in overlaps.values() if o[2] >= 1]
    report_projection(min(shown) if shown else max(o[0] for o in overlaps.values()), compute)
    return 0


if __name__ == "__main__":
    sys.exit(main())
