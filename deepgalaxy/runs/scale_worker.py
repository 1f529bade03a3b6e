"""One rank of a scaling measurement: ``python -m deepgalaxy.runs.scale_worker CONFIG.json``.

Started by ``deepgalaxy scale`` (through the local launcher for one worker, ``horovodrun --gloo`` for more), it
measures on every rank, in this order:

1. **compute** (N > 1 only): steps of a plain, non-distributed trainer of its own model copy, all ranks at once,
   so the cores are shared exactly as in the real run but nothing is communicated. This is the ``T_compute`` of
   the ring-allreduce model at this N (on one machine, N workers split the cores, so it grows with N).
2. **training**: warm-up steps, then timed steps of the Horovod trainer (gradient allreduce included) fed from
   this rank's shard of the training split, i.e. the whole system: data pipeline, compute, communication.
   Throughput = N x batch x steps / (slowest rank's time), between two barriers.
3. **allreduce** (N > 1 only): the launcher's allreduce (``hvd.allreduce`` under Horovod) of float32 tensors of
   several sizes up to the model's gradient size (median of repeats, slowest rank), the data the cost model's
   ``alpha`` / ``beta`` are fitted to.

Rank 0 writes ``result.json`` next to the config (``error.json`` on failure). Threads: the config's ``threads``
caps the framework's intra-op pool (inter-op 1) through its runtime; the launcher also sets ``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from deepgalaxy.core.errors import DatasetError, DeepGalaxyError, TrainingError
from deepgalaxy.core.interfaces import Distributed
from deepgalaxy.core.specs import ModelSpec, TrainSpec
from deepgalaxy.core.workers import THREAD_ENV
from deepgalaxy.runs.rundir import ERROR_FILE, RESULT_FILE

MIN_ALLREDUCE_BYTES = 4096


def message_sizes(gradient_bytes: int, factor: int = 4) -> list[int]:
    """Allreduce message sizes: 4 KiB, x``factor`` ... below the gradient size, then the gradient size itself."""
    top = max(int(gradient_bytes), MIN_ALLREDUCE_BYTES)
    sizes, size = [], MIN_ALLREDUCE_BYTES
    while size < top:
        sizes.append(size)
        size *= factor
    sizes.append(top)
    return sizes


def endless_batches(shard: Any, batch: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches of this rank's shard, epoch after epoch (a short measurement may need more than one epoch)."""
    epoch = 0
    while True:
        batches = shard.batches(batch, epoch=epoch, seed=seed, shuffle=True, drop_last=True)
        yield from batches
        epoch += 1


class ScaleWorker:
    """Measures one worker count on one rank (see the module docstring)."""

    def __init__(self, config: dict[str, Any]) -> None:
        from deepgalaxy.core.interfaces import resolve
        from deepgalaxy.core.plugins import get_plugin_manager
        from deepgalaxy.runs.launch import rank_collective

        self.config = config
        self.card = ModelSpec.model_validate(config["card"])
        self.train = TrainSpec.model_validate(config["train"])
        self.framework_name = str(config["framework"])
        self.threads = int(config["threads"])
        for var in THREAD_ENV[:3]:  # OpenMP, MKL, OpenBLAS of this process
            os.environ[var] = str(self.threads)
        runtime = get_plugin_manager().frameworks.get(self.framework_name).runtime
        if runtime is not None:
            resolve(runtime)().set_threads(self.threads)
        self.coll = rank_collective(config.get("launcher"), self.framework_name, int(config["workers"]), None)
        self.dist = self.coll.dist
        if self.dist.size != int(config["workers"]):
            raise TrainingError(
                f"this measuring worker is rank {self.dist.rank} of {self.dist.size} processes, but the measurement "
                f"is for {config['workers']} workers; start it through `deepgalaxy scale`"
            )
        self.root = self.dist.is_root

    def log(self, text: str) -> None:
        if self.root:
            print(f"[{self.dist.size} worker(s)] {text}", file=sys.stderr, flush=True)

    def barrier_time(self) -> float:
        self.coll.barrier()
        return time.perf_counter()

    def slowest(self, value: float) -> float:
        return float(self.coll.allreduce_max(np.array([value]))[0])

    def _timed_steps(self, trainer: Any, batches: Iterator[tuple[np.ndarray, np.ndarray]], warmup: int,
                     steps: int, what: str) -> float:
        """Seconds the slowest rank takes for ``steps`` steps after ``warmup`` untimed ones (barriers around)."""
        from deepgalaxy.core.progress import progress_bar

        for _ in range(warmup):
            trainer.train_step(*next(batches))
        bar = progress_bar(bool(self.root and self.config.get("progress", True)), steps,
                           f"{what}, {self.dist.size} worker(s)", unit="step", leave=False)
        t0 = self.barrier_time()
        for _ in range(steps):
            trainer.train_step(*next(batches))
            bar.update(1)
        t1 = time.perf_counter()
        self.coll.barrier()
        bar.close()
        return self.slowest(t1 - t0)

    def run(self) -> dict[str, Any] | None:
        from deepgalaxy import registry
        from deepgalaxy.core.dataset import open_dataset

        cfg = self.config
        batch, warmup, steps = int(cfg["batch_per_worker"]), int(cfg["warmup"]), int(cfg["steps"])
        ds = open_dataset(cfg["data"])
        ds.check_shape(self.card.input_shape, model=f"card {self.card.name!r}")
        train, _ = ds.split(cfg.get("split", "simulation"), float(cfg.get("validation_fraction", 0.2)),
                            int(cfg.get("seed", 0)))
        shard = train.shard(self.dist.rank, self.dist.size, seed=int(cfg.get("seed", 0)))
        if shard.num_batches(batch) < 1:
            raise DatasetError(
                f"{ds.path}: the training split ({len(train)} images) gives each of {self.dist.size} workers "
                f"{len(shard)} images, less than one batch of {batch}; use a smaller --batch or more data"
            )
        from deepgalaxy.runs.placement import placed
        from deepgalaxy.runs.property_targets import fitted_card, normalised, raw_targets

        table = raw_targets(self.card, [ds])[0]  # a card with property heads trains on its targets here too
        self.card = fitted_card(self.card, ds, train.indices, table)
        shard = shard.with_targets(normalised(self.card, table))
        framework = registry.get_framework(self.framework_name)
        seed = int(cfg.get("seed", 0))
        batches = endless_batches(shard, batch, seed)

        compute_s = None
        if self.dist.size > 1:
            self.log(f"compute only: {warmup} warm-up + {cfg['compute_steps']} timed steps, no communication")
            local = registry.create(self.card, framework=self.framework_name, seed=seed)
            local_spec = placed(local, self.train, self.dist.local_rank, warn=self.root)
            local_trainer = framework.trainer(local.native, self.card, local_spec, Distributed())
            compute_s = self._timed_steps(local_trainer, batches, warmup, int(cfg["compute_steps"]), "compute")
            compute_s /= int(cfg["compute_steps"])
            del local_trainer, local

        model = registry.create(self.card, framework=self.framework_name, seed=seed)
        params = model.num_parameters(trainable=True)
        gradient_bytes = 4 * params
        spec = placed(model, self.train, self.dist.local_rank, warn=self.root and self.dist.size == 1)
        trainer = framework.trainer(model.native, self.card, spec, self.dist)
        self.log(f"training: {warmup} warm-up + {steps} timed steps, batch {batch} per worker, "
                 f"{self.threads} thread(s) per worker")
        elapsed = self._timed_steps(trainer, batches, warmup, steps, "training")
        step_s = elapsed / steps
        if compute_s is None:
            compute_s = step_s  # one worker: the step is all compute (and input pipeline)
        images_per_s = self.dist.size * batch * steps / elapsed

        samples: list[list[float]] = []
        if self.dist.size > 1:
            samples = self.measure_allreduce(gradient_bytes, int(cfg.get("allreduce_repeats", 5)))
        if not self.root:
            return None
        return {
            "workers": self.dist.size, "threads_per_worker": self.threads, "batch_per_worker": batch,
            "global_batch": batch * self.dist.size, "warmup_steps": warmup, "timed_steps": steps,
            "elapsed_s": elapsed, "step_s": step_s, "compute_s": compute_s, "images_per_s": images_per_s,
            "parameters": params, "gradient_bytes": gradient_bytes, "allreduce": samples,
            "framework": self.framework_name, "card": self.card.name,
        }

    def measure_allreduce(self, gradient_bytes: int, repeats: int) -> list[list[float]]:
        """``[workers, bytes, seconds]`` per message size: median over ``repeats``, slowest rank."""
        sizes = message_sizes(gradient_bytes)
        self.log(f"allreduce: {len(sizes)} message sizes up to {gradient_bytes / 1e6:.3g} MB, {repeats} repeats each")
        out = []
        for size in sizes:
            reduce = self.coll.allreduce_probe(size)
            times = []
            for i in range(repeats + 2):
                self.coll.barrier()
                t0 = time.perf_counter()
                reduce(f"deepgalaxy.scale.{size}.{i}")
                if i >= 2:  # two warm-ups (buffer allocation, first-use negotiation)
                    times.append(time.perf_counter() - t0)
            out.append([float(self.dist.size), float(size), self.slowest(float(np.median(times)))])
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepgalaxy.runs.scale_worker", description=__doc__.split("\n")[0])
    parser.add_argument("config", type=Path, help="config.json written by deepgalaxy scale")
    args = parser.parse_args(argv)
    directory = args.config.resolve().parent
    rank = int(os.environ.get("HOROVOD_RANK", "0"))
    try:
        config = json.loads(args.config.read_text())
        result = ScaleWorker(config).run()
        if result is not None:
            (directory / RESULT_FILE).write_text(json.dumps(result, indent=2))
        return 0
    except Exception as exc:
        if rank == 0:
            detail = "" if isinstance(exc, DeepGalaxyError) else "\n" + traceback.format_exc()
            (directory / ERROR_FILE).write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}{detail}"}))
        print(f"error: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
