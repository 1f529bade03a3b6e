"""Domain-shift benchmark: how much of the accuracy lost on survey-like images do unlabelled target images and
domain adaptation win back?

    python benchmarks/domain_shift.py                  # 64 px, full-simple, four trainings (~25 min on 2 cores)
    python benchmarks/domain_shift.py --sims 4 --snapshots 12 --epochs 1 --max-steps 10   # a smoke run

Source: clean simulations with labels. Target: the same physics rendered with ``--observe`` (PSF, sky noise, shot
noise, stars, background galaxies, pose jitter) from *other* simulations (another seed). Both are split by
simulation as training splits them (``DataSpec`` defaults), and every figure is measured on the target's held-out
simulations. Target labels are never used in training except by the oracle: the target's training images enter
(b) and (c) through a copy of the store whose labels are -1 (what an ingested observation store holds).

- (a) source only;
- (b) source + unlabelled target images (half of every batch): they count in the reconstruction and latent losses;
- (c) (b) + domain adaptation (``card.domain_adaptation=mmd``);
- (d) oracle: source + the labelled target images.

Reported per row: top-1, accuracy within +-3 classes and the mean absolute class error, and how much of the gap
between (a) and (d) each row closes. Every training goes through ``deepgalaxy.runs.train`` (MLflow-tracked in
``WORKDIR/mlflow.db``); the models are read back from their run directories.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("quality_benchmark", HERE / "quality.py")
assert _spec is not None and _spec.loader is not None
quality = importlib.util.module_from_spec(_spec)
sys.modules["quality_benchmark"] = quality
_spec.loader.exec_module(quality)
Scores = quality.Scores

OBSERVE = {"observe": True, "psf": "moffat", "psf_fwhm": 4.0, "sky_noise": 3e-3, "peak_counts": 500.0,
           "stars": 8.0, "background_galaxies": 6.0, "shift": 0.5, "scale_jitter": 0.2, "pa_jitter": 180.0}
"""The target's observing conditions: a shallow, seeing-limited survey (see the README's observed simulations)."""

ROWS = {
    "a": ("source only", False, None),
    "b": ("+ unlabelled target", True, None),
    "c": ("+ unlabelled target + MMD", True, "mmd"),
    "d": ("oracle: + labelled target", "labelled", None),
}


def make_stores(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """Source (clean), target (observed, other simulations) and the target without its labels."""
    from deepgalaxy.plugins.simulation.source import simulate

    work = Path(args.workdir)
    common = {"sims": args.sims, "size": args.size, "particles": args.particles, "cameras": args.cameras,
              "snapshots": args.snapshots}
    tag = f"{args.sims}x{args.cameras}x{args.snapshots}-{args.size}px"
    source = simulate(work / f"source-{tag}.zarr", progress=not args.no_progress, seed=args.seed, **common)
    target = simulate(work / f"target-{tag}.zarr", progress=not args.no_progress, seed=args.seed + 1000,
                      **common, **OBSERVE)
    unlabelled = work / f"target-{tag}-unlabelled.zarr"
    if not unlabelled.exists():
        import zarr

        from deepgalaxy.core.schema import writing

        tmp = unlabelled.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(target, tmp)
        with writing():  # -1 is the fill value: write the chunks anyway
            labels = zarr.open_array(str(tmp / "labels"), mode="r+")
            labels[:] = -1  # the images and their simulations stay, so the split holds out the same simulations
        tmp.rename(unlabelled)
    return source, target, unlabelled


def held_out(target: Path) -> tuple[np.ndarray, np.ndarray]:
    """The target's held-out simulations as training splits them: images and their true classes."""
    from deepgalaxy.core.dataset import open_dataset
    from deepgalaxy.core.specs import DataSpec, StoreSpec

    spec = DataSpec(stores=[StoreSpec(path=str(target))])
    _, val = open_dataset(target).split(spec.split, spec.validation_fraction, spec.seed)
    return val.images(np.arange(len(val))), val.labels.astype(np.int64)


def train_row(key: str, stores: tuple[Path, Path, Path], args: argparse.Namespace, uri: str) -> dict[str, Any]:
    from deepgalaxy.runs.training import train

    source, target, unlabelled = stores
    _, with_target, adaptation = ROWS[key]
    data: list[str] = [str(source)]
    if with_target:
        data.append(f"{target if with_target == 'labelled' else unlabelled}:{args.share}")
    overrides = {"card.input_size": args.size, "train.batch_size": args.batch, "train.optimizer": "adam",
                 "train.learning_rate": args.lr, "train.augment": "dihedral", "train.keep": "last",
                 "train.max_steps_per_epoch": args.max_steps, "card.backbone.options.widths": json.loads(args.widths),
                 "card.domain_adaptation": adaptation or "none", "card.loss_weights.domain": args.domain_weight}
    run_dir = Path(args.workdir).resolve() / "runs" / f"{key}-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    result = train(args.card, data, epochs=args.epochs, overrides=overrides, tracking_uri=uri, register=False,
                   run_dir=run_dir, progress=not args.no_progress)
    return {"run_dir": str(run_dir), "run_id": result.run_id, "train_s": round(time.perf_counter() - t0, 1),
            "data": data, "final": result.final}


def score(run_dir: str, images: np.ndarray, labels: np.ndarray) -> Scores:
    from deepgalaxy import registry

    model = registry.load(Path(run_dir) / "model")
    return Scores.of(model.predict(images, batch_size=256).top1, labels)


def gap_closed(row: Scores, a: Scores, d: Scores) -> dict[str, float]:
    """The fraction of the (a) -> (d) gap a row closes, per metric (1 = as good as the oracle)."""
    out = {}
    for metric in ("top1", "within", "mae"):
        gap = getattr(d, metric) - getattr(a, metric)
        out[metric] = (getattr(row, metric) - getattr(a, metric)) / gap if gap else float("nan")
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    quality.set_threads(args.threads)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{Path(args.workdir).resolve() / 'mlflow.db'}"
    stores = make_stores(args)
    images, labels = held_out(stores[1])
    rows: dict[str, Any] = {}
    for key in args.rows:
        trained = train_row(key, stores, args, uri)
        trained["scores"] = score(trained["run_dir"], images, labels)
        rows[key] = trained
        print(f"({key}) {ROWS[key][0]}: {trained['scores']}", file=sys.stderr, flush=True)
    if "a" in rows and "d" in rows:
        for row in rows.values():
            row["gap_closed"] = gap_closed(row["scores"], rows["a"]["scores"], rows["d"]["scores"])
    return {"settings": vars(args), "observe": OBSERVE, "held_out_images": len(labels), "rows": rows}


def report(res: dict[str, Any]) -> str:
    lines = [f"target held-out simulations: {res['held_out_images']} images; within = +-3 classes",
             f"{'row':<34} {'top-1':>7} {'within':>7} {'MAE':>6}   gap closed (top-1, within, MAE)  train s"]
    for key, row in res["rows"].items():
        s = row["scores"]
        gap = row.get("gap_closed")
        closed = ", ".join(f"{v:+.2f}" for v in gap.values()) if gap else "-"
        lines.append(f"({key}) {ROWS[key][0]:<30} {s.top1:7.3f} {s.within:7.3f} {s.mae:6.2f}   {closed:<32} "
                     f"{row['train_s']:7.0f}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="out/domain_shift")
    p.add_argument("--card", default="full-simple")
    p.add_argument("--sims", type=int, default=16, help="simulations per domain (the paper's 5 mass ratios cycle)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--particles", type=int, default=3000)
    p.add_argument("--cameras", type=int, default=6)
    p.add_argument("--snapshots", type=int, default=71)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--widths", default="[16,32,64]", help="the simple backbone's widths")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--share", type=float, default=0.5, help="the target's share of every batch in (b), (c), (d)")
    p.add_argument("--domain-weight", type=float, default=1.0, help="card.loss_weights.domain for (c)")
    p.add_argument("--rows", default="abcd", help="which rows to train (default all four)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    res = run(args)
    print(report(res))
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=lambda o: o.__dict__))
    return 0


if __name__ == "__main__":
    sys.exit(main())
