"""Catalogue-scale inference: images/s of the real streaming paths against a plain framework loop, side by side.

    python benchmarks/catalogue.py                        # the paper-sized store: 36 sims x 14 cameras x 71 snapshots
    python benchmarks/catalogue.py --images 1000          # a quick look (1 simulation, 994 images)
    python benchmarks/catalogue.py --workers 1,2 --profile

Makes (or reuses, in --workdir) a simulated store at 128 px and two untrained models (classifier-b0, vae-simple:
random weights, which cost the same to run as trained ones), then measures, in one run:

- stream: ``predict_csv`` (classifier-b0: what ``deepgalaxy predict STORE --out CSV`` runs: store reads with
  prefetch, CSV rows written and flushed per batch with their progress record) and ``encode_resumably``
  (vae-simple: the encoding of ``deepgalaxy latent index``, vectors written per batch), with 1 or N workers;
- plain: the same images already in memory as a float32 array, through ``model.native`` in a bare torch loop
  (``inference_mode``, same batch size, same precision, same memory format);

and prints both, the ratio (goal >= 0.9) and the CPU. ``--profile`` splits one process's time per batch into
reading, the model, the class summary and the CSV formatting.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deepgalaxy.core.dataset import open_dataset  # noqa: E402
from deepgalaxy.core.hardware import cpu_info  # noqa: E402

PER_SIMULATION = 14 * 71
GOAL = 0.9
MODELS = {"classifier-b0": "predict", "vae-simple": "encode"}


def make_store(workdir: Path, images: int) -> Path:
    """A simulated store at 128 px of ``ceil(images / 994)`` simulations of 14 cameras x 71 snapshots (fewer
    snapshots below 994 images), reused when it is already there."""
    from deepgalaxy.plugins.simulation.source import simulate

    sims = max(1, math.ceil(images / PER_SIMULATION))
    snapshots = 71 if sims > 1 else max(2, math.ceil(images / 14))
    store = workdir / f"sims{sims}x{snapshots}.zarr"
    if not (store / "zarr.json").is_file():
        start = time.perf_counter()
        simulate(store, sims=sims, snapshots=snapshots, size=128, progress=True)
        print(f"simulated {sims} simulation(s) ({sims * 14 * snapshots} images at 128 px) in "
              f"{time.perf_counter() - start:.0f} s")
    return store


def make_model(workdir: Path, card: str, device: str, precision: str) -> Any:
    from deepgalaxy import registry

    folder = workdir / "models" / card
    if not (folder / "card.json").is_file():
        registry.create(card, seed=0, input_size=128).save(folder)
    return registry.load(folder, device=device, precision=precision)


def plain_loop(model: Any, images: np.ndarray, batch: int, op: str) -> float:
    """Images/s of a bare torch loop over ``images`` (float32 NHWC in memory) through ``model.native``."""
    import torch

    native = model.native.eval()
    fmt = torch.channels_last if model.backend.channels_last else torch.contiguous_format
    device = torch.device(model.device)
    cast = (torch.autocast(device.type, dtype=torch.bfloat16) if model.precision == "bf16" else
            torch.autocast(device.type, dtype=torch.float16) if model.precision == "fp16" else None)

    def run(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=fmt).to(device, non_blocking=True)
        m = native.encoder(t)
        out = native.part("head")(m) if op == "predict" else native.part("latent").encode(m)[0]
        return np.asarray(out.float().cpu().numpy())

    with torch.inference_mode():
        if cast is not None:
            cast.__enter__()
        try:
            run(images[:batch])  # warm-up
            start = time.perf_counter()
            for s in range(0, len(images), batch):
                run(images[s : s + batch])
            return len(images) / (time.perf_counter() - start)
        finally:
            if cast is not None:
                cast.__exit__(None, None, None)


def streamed(model: Any, store: Path, batch: int, op: str, workers: int, scratch: Path) -> float:
    """Images/s of the real streaming path (``predict_csv`` or ``encode_resumably``) over the whole store."""
    from deepgalaxy.runs.latent import encode_resumably, open_store
    from deepgalaxy.runs.predict import predict_csv

    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    n = len(open_dataset(store))
    start = time.perf_counter()
    if op == "predict":
        predict_csv(model, [store], scratch / "predictions.csv", batch_size=batch, workers=workers)
    else:
        encode_resumably(model, open_store(store, model), scratch / "partial", batch, progress=False, workers=workers)
    return n / (time.perf_counter() - start)


def profile(model: Any, store: Path, batch: int, units: int = 8) -> None:
    """Seconds per batch of each step of one process's predict path, run one after another (no overlap)."""
    from deepgalaxy.runs.predict import PredictJob, _sources, class_summary, csv_text

    job = PredictJob(model, _sources([store]), batch_size=batch)
    steps = {"read (zarr decompression)": 0.0, "model (uint8 -> float, forward, softmax)": 0.0,
             "class summary": 0.0, "CSV text": 0.0}
    names = list(steps)
    for unit in range(min(units, job.units())):
        t0 = time.perf_counter()
        batch_items, _ = job.read(unit)
        images = np.stack([image for _, image in batch_items])
        t1 = time.perf_counter()
        probabilities = model.predict(images, batch_size=batch).probabilities
        t2 = time.perf_counter()
        class_summary(probabilities)
        t3 = time.perf_counter()
        records = job.records(model, batch_items)  # the model again: not timed
        t4 = time.perf_counter()
        csv_text(records, job.columns)
        t5 = time.perf_counter()
        for name, seconds in zip(names, (t1 - t0, t2 - t1, t3 - t2, t5 - t4), strict=True):
            steps[name] += seconds
    done = min(units, job.units())
    print(f"  profile of classifier-b0 predict, {done} batches of {batch}, ms per batch:")
    for name, seconds in steps.items():
        print(f"    {name:44s} {1e3 * seconds / done:8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=36 * PER_SIMULATION, help="store size (rounded up to whole "
                    "simulations of 994 images)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep (and reuse) the store and models here")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", default="1", help="worker counts of the streaming path, e.g. 1,2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--profile", action="store_true", help="split the time of the predict path per step")
    args = ap.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="deepgalaxy-catalogue-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        store = make_store(workdir, args.images)
        ds = open_dataset(store)
        in_memory = ds.images(np.arange(len(ds))).astype(np.float32)
        in_memory *= np.float32(1.0 / 255.0)
        print(f"catalogue: {len(ds):,} images of {ds.image_shape} (simulated), batch {args.batch}, "
              f"{args.precision} on {args.device}; CPU: {cpu_info().describe()}")
        print("models: untrained classifier-b0 and vae-simple at 128 px (random weights: the same cost as trained)")
        for card, op in MODELS.items():
            model = make_model(workdir, card, args.device, args.precision)
            what = "predict (CSV)" if op == "predict" else "index encode (z)"
            before = plain_loop(model, in_memory, args.batch, op)
            rates = {w: streamed(model, store, args.batch, op, w, workdir / "out")
                     for w in (int(w) for w in args.workers.split(","))}
            after = plain_loop(model, in_memory, args.batch, op)  # before and after: the machine may drift
            plain = (before + after) / 2
            print(f"  {card:14s} plain torch loop, images in memory   {plain:8.1f} images/s (before {before:.1f}, "
                  f"after {after:.1f})")
            for workers, rate in rates.items():
                print(f"  {card:14s} {what:18s} {workers} worker(s) {rate:8.1f} images/s   ratio "
                      f"{rate / plain:.2f} (goal >= {GOAL})")
            if args.profile and op == "predict":
                profile(model, store, args.batch)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
