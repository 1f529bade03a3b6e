"""Inference benchmark: cold ``registry.load`` and predict / encode latency of vae-b4 and classifier-b4.

For each card (default ``classifier-b4`` -> predict, ``vae-b4`` -> encode) at ``--size`` px (default 512, the
paper's): registers an untrained version in a throw-away SQLite MLflow store, times a cold ``registry.load`` in a
fresh interpreter (imports included) and a warm one, then single-image and batched latency in fp32 and bf16,
measured interleaved in one run so that the ratios hold on a noisy machine. The paper quotes ~2 s per image in
FP32 for EfficientNet-B4; the target here is single-image fp32 predict under 1 s on 2 cores, bf16 faster.

    python benchmarks/inference.py                       # 512 px, both cards, torch
    python benchmarks/inference.py --size 128 --reps 3   # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from deepgalaxy.core.hardware import cpu_info

OPS = {"classifier-b4": "predict", "vae-b4": "encode"}
PAPER_FP32_S = 2.0


def cold_load_seconds(name: str, uri: str, framework: str) -> float:
    """``registry.load`` in a fresh interpreter, imports included (what a new process pays)."""
    code = ("import time; t = time.perf_counter(); from deepgalaxy import registry; "
            f"registry.load({name!r}, tracking_uri={uri!r}, framework={framework!r}); "
            "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def interleaved(calls: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds per call, the calls alternating rep by rep (each warmed up once) so noise hits all alike."""
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(reps):
        for key, fn in calls.items():
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def latency_calls(op: Callable[..., object], one: np.ndarray, many: np.ndarray) -> dict[str, Callable[[], object]]:
    return {
        f"{kind}_{p}": (lambda p=p, x=x: op(x, batch_size=len(x), precision=p))
        for p in ("fp32", "bf16") for kind, x in (("single", one), ("batch", many))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--framework", default="torch")
    parser.add_argument("--cards", nargs="+", default=list(OPS))
    args = parser.parse_args()

    from deepgalaxy import registry
    from deepgalaxy.core.specs import with_overrides
    from deepgalaxy.registry import store

    rows = []
    with tempfile.TemporaryDirectory(prefix="dg-bench-") as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        for name in args.cards:
            card = with_overrides(registry.card(name), {"input_size": args.size})
            registry.create(card, framework=args.framework, seed=0).save(Path(tmp) / name)
            store.register_directory(Path(tmp) / name, tracking_uri=uri)
            cold = cold_load_seconds(name, uri, args.framework)
            t = time.perf_counter()
            model = registry.load(name, tracking_uri=uri, framework=args.framework)
            warm = time.perf_counter() - t
            op = getattr(model, OPS.get(name, "predict"))
            rng = np.random.default_rng(0)
            one = rng.integers(0, 256, (1, args.size, args.size, card.channels), dtype=np.uint8)
            many = rng.integers(0, 256, (args.batch, args.size, args.size, card.channels), dtype=np.uint8)
            res = interleaved(latency_calls(op, one, many), args.reps)
            rows.append((name, OPS.get(name, "predict"), cold, warm, res))
            print(f"{name}: done", file=sys.stderr, flush=True)

    print(f"\ninference at {args.size} px, {args.framework}, batch {args.batch}, median of {args.reps} "
          f"(CPU: {cpu_info().describe()}; precision auto would choose "
          f"{'bf16' if cpu_info().native_bf16 else 'fp32'})")
    head = (f"{'card':<14} {'op':<8} {'cold load':>9} {'warm load':>9} {'1 img fp32':>10} {'1 img bf16':>10} "
            f"{'bf16/fp32':>9} {'batch fp32/img':>14} {'batch bf16/img':>14} {'paper 2 s / fp32':>16}")
    print(head)
    print("-" * len(head))
    for name, op, cold, warm, r in rows:
        b32, b16 = r["batch_fp32"] / args.batch, r["batch_bf16"] / args.batch
        print(f"{name:<14} {op:<8} {cold:>8.2f}s {warm:>8.2f}s {r['single_fp32']:>9.3f}s {r['single_bf16']:>9.3f}s "
              f"{r['single_bf16'] / r['single_fp32']:>9.2f} {b32:>13.3f}s {b16:>13.3f}s "
              f"{PAPER_FP32_S / r['single_fp32']:>15.1f}x")
    print("\nratios < 1 in bf16/fp32 mean bf16 is faster; 'paper 2 s / fp32' is the speed-up over the paper's "
          "~2 s per image (FP32, EfficientNet-B4). Target: single-image fp32 under 1 s on 2 cores.")


if __name__ == "__main__":
    main()
