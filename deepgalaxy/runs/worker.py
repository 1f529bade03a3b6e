"""The per-rank entry of a training: ``python -m deepgalaxy.runs.worker RUN.json``.

One epoch loop for every framework: batches from this rank's shard of the training split, the framework's
``train_step``, a NaN/inf check, accuracy and within-k accuracy from ``StepResult.predicted``, validation each
epoch, metrics summed over ranks, images/s total and per worker, epoch time. Rank 0 owns the MLflow run,
checkpoints and, at the end, the model version.

Checkpoints (rank 0, after every epoch and every ``--checkpoint-every`` steps) hold the trainer's own checkpoint
(weights, optimizer, framework RNG) and ``state.json``: the data position (epoch, next batch), the metric sums of
the unfinished epoch, the history, the numpy RNG and the MLflow run id. They are written to a fresh directory and
swapped in with renames, so a ``kill -9`` at any moment leaves the previous checkpoint intact. A worker started
on a run directory that has a checkpoint resumes from it into the same MLflow run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepgalaxy.core.augment import augment
from deepgalaxy.core.contract import split_labels
from deepgalaxy.core.errors import DatasetError, DeepGalaxyError, TrainingError
from deepgalaxy.core.interfaces import LOSS_TERMS, StepResult
from deepgalaxy.core.lifetime import die_with_parent, watch_parent
from deepgalaxy.core.mixture import mixed_batches
from deepgalaxy.core.progress import progress_bar
from deepgalaxy.core.properties import TARGETS, angle_between, target_columns
from deepgalaxy.core.property_prediction import column_gaussians, trained_normalisation
from deepgalaxy.core.specs import PropertyHeads
from deepgalaxy.runs.init_weights import start_from
from deepgalaxy.runs.placement import placed, run_hardware_tags
from deepgalaxy.runs.rundir import (
    BEST_DIR,
    ERROR_FILE,
    MLFLOW_FILE,
    MODEL_DIR,
    RANKS_DIR,
    RESULT_FILE,
    WORKER_SLOT,
    RunLock,
    read_run_spec,
    read_state,
    write_checkpoint,
)

RECON_IMAGES = 8


# --- metric sums ----------------------------------------------------------------------------------------------


PROPERTY_COLUMNS = target_columns(list(TARGETS))
"""Every column property heads can learn (a card learns some of them)."""
SUM_SLOTS: tuple[str, ...] = (
    "images", "steps", *(f"loss_sum/{t}" for t in LOSS_TERMS), *(f"loss_count/{t}" for t in LOSS_TERMS),
    "correct", "within_k", "labelled", "recon_sum", "recon_count",
    *(f"{kind}/{c}" for c in PROPERTY_COLUMNS for kind in ("abs_error", "inside", "known")),
    "view_angle_sum", "view_angle_count",
)
"""The named slots of :class:`Sums`' vector, in order (checkpoints store the vector in this order)."""
SLOT = {name: i for i, name in enumerate(SUM_SLOTS)}
VIEW_COLUMNS = TARGETS["viewing_direction"].columns


@dataclass
class Sums:
    """Running sums of one epoch's metrics on one rank: a vector of :data:`SUM_SLOTS` so ranks can add them up.

    ``heads``: the fitted property heads of the card (their normalisation turns predictions into physical units).
    """

    within_k: int = 3
    heads: PropertyHeads | None = None
    v: np.ndarray = field(default_factory=lambda: np.zeros(len(SUM_SLOTS), dtype=np.float64))

    def like(self, v: np.ndarray) -> Sums:
        """Sums with the same settings holding the vector ``v``."""
        return Sums(self.within_k, self.heads, v)

    def __getitem__(self, slot: str) -> float:
        return float(self.v[SLOT[slot]])

    def _add(self, slot: str, value: float) -> None:
        self.v[SLOT[slot]] += value

    def add(self, res: StepResult, batch_labels: np.ndarray) -> None:
        labels, targets = split_labels(batch_labels)
        n = len(labels)
        self._add("images", n)
        self._add("steps", 1)
        weight = {"loss_classifier": int((labels >= 0).sum())}  # the classifier's mean is over labelled rows
        if targets is not None:
            weight["loss_properties"] = int(np.isfinite(targets).sum())  # its mean is over known targets
        for term in LOSS_TERMS:
            if term in res.losses:
                self._add(f"loss_sum/{term}", float(res.losses[term]) * weight.get(term, n))
                self._add(f"loss_count/{term}", weight.get(term, n))
        if res.predicted is not None:
            pred = np.asarray(res.predicted).reshape(-1).astype(np.int64)
            known = labels >= 0
            diff = np.abs(pred[known] - labels[known])
            self._add("correct", float((diff == 0).sum()))
            self._add("within_k", float((diff <= self.within_k).sum()))
            self._add("labelled", float(known.sum()))
        if res.recon_mse is not None:
            self._add("recon_sum", float(res.recon_mse) * n)
            self._add("recon_count", n)
        if res.properties is not None and targets is not None and self.heads is not None:
            self._add_properties(np.asarray(res.properties, np.float64), targets.astype(np.float64))

    def _add_properties(self, predicted: np.ndarray, targets: np.ndarray) -> None:
        """Errors in physical units, and whether the truth lies within one predicted sigma, per known target."""
        assert self.heads is not None
        columns = self.heads.columns
        value, sigma = column_gaussians(predicted, self.heads)
        mean, std = trained_normalisation(self.heads, "the model being trained").T
        truth = targets * std + mean
        for j, column in enumerate(columns):
            known = np.isfinite(truth[:, j])
            error = np.abs(value[known, j] - truth[known, j])
            self._add(f"abs_error/{column}", float(error.sum()))
            self._add(f"inside/{column}", float((error <= sigma[known, j]).sum()))
            self._add(f"known/{column}", float(known.sum()))
        if all(c in columns for c in VIEW_COLUMNS):
            where = [columns.index(c) for c in VIEW_COLUMNS]
            known = np.isfinite(truth[:, where]).all(axis=1)
            self._add("view_angle_sum", float(angle_between(value[known][:, where], truth[known][:, where]).sum()))
            self._add("view_angle_count", float(known.sum()))

    @property
    def images(self) -> int:
        return int(self["images"])

    def metrics(self, prefix: str) -> dict[str, float]:
        """Means: ``{prefix}/loss`` ..., ``{prefix}/accuracy``, ``{prefix}/within_k_accuracy``, ``.../recon_mse``;
        with property heads per column ``{prefix}/{column}_mae`` (physical units: Myr, kpc, dex) and
        ``{prefix}/{column}_coverage68`` (the fraction of true values within one predicted sigma), and
        ``{prefix}/viewing_angle_error`` (mean degrees between the predicted and true lines of sight)."""
        out: dict[str, float] = {}
        for term in LOSS_TERMS:
            if self[f"loss_count/{term}"] > 0:
                out[f"{prefix}/{term}"] = self[f"loss_sum/{term}"] / self[f"loss_count/{term}"]
        if self["labelled"] > 0:
            out[f"{prefix}/accuracy"] = self["correct"] / self["labelled"]
            out[f"{prefix}/within_k_accuracy"] = self["within_k"] / self["labelled"]
        if self["recon_count"] > 0:
            out[f"{prefix}/recon_mse"] = self["recon_sum"] / self["recon_count"]
        for column in PROPERTY_COLUMNS:
            if self[f"known/{column}"] > 0:
                out[f"{prefix}/{column}_mae"] = self[f"abs_error/{column}"] / self[f"known/{column}"]
                out[f"{prefix}/{column}_coverage68"] = self[f"inside/{column}"] / self[f"known/{column}"]
        if self["view_angle_count"] > 0:
            out[f"{prefix}/viewing_angle_error"] = self["view_angle_sum"] / self["view_angle_count"]
        return out


def check_finite(res: StepResult, epoch: int, step: int, where: str = "training") -> None:
    """Raise :class:`TrainingError` naming the epoch and step when a loss is NaN or infinite."""
    for name, value in res.losses.items():
        if not math.isfinite(float(value)):
            raise TrainingError(
                f"{where} loss {name} = {value} at epoch {epoch + 1}, step {step + 1}: training diverged; "
                "lower train.learning_rate (--set train.learning_rate=...) or set train.grad_clip"
            )


STATISTIC_MARKERS = ("running_mean", "running_var", "num_batches_tracked", "moving_mean", "moving_variance")


def is_statistic(name: str) -> bool:
    """Batch-norm statistics (torch and Keras names): per-rank state that Horovod does not keep in sync."""
    return any(m in name for m in STATISTIC_MARKERS)


def weights_digest(weights: dict[str, np.ndarray]) -> str:
    """SHA-256 over every weight (sorted by name): equal digests mean bit-identical models."""
    h = hashlib.sha256()
    for key in sorted(weights):
        h.update(key.encode())
        h.update(np.ascontiguousarray(weights[key]).tobytes())
    return h.hexdigest()


# --- checkpoints ----------------------------------------------------------------------------------------------


def _rng_to_json() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
            "gauss": float(gauss)}


def _rng_from_json(d: dict[str, Any]) -> None:
    np.random.set_state((d["name"], np.asarray(d["keys"], dtype=np.uint32), d["pos"], d["has_gauss"], d["gauss"]))


# --- the loop -------------------------------------------------------------------------------------------------


class Worker:
    """One rank of one training."""

    def __init__(self, run_dir: Path, checkpoint_every: int = 0, progress: bool = True,
                 launcher: str | None = None) -> None:
        from deepgalaxy.runs.launch import rank_collective

        self.run_dir = run_dir
        self.spec = read_run_spec(run_dir)
        self.checkpoint_every = max(0, int(checkpoint_every))
        self.coll = rank_collective(launcher, self.spec.framework, self.spec.workers, self.spec.hosts)
        self.dist = self.coll.dist
        if self.dist.size != self.spec.workers:
            raise TrainingError(
                f"this worker is rank {self.dist.rank} of {self.dist.size} processes, but the run asks for "
                f"{self.spec.workers} workers; start it through `deepgalaxy train` (it runs horovodrun for you)"
            )
        self.root = self.dist.is_root
        self.progress = progress and self.root
        self.tracker: Any = None
        self.stopped_early = False

    # -- setup ----------------------------------------------------------------------------------------------------

    def _setup(self) -> None:
        from deepgalaxy import registry
        from deepgalaxy.core.mixture import StorePart, batch_rows
        from deepgalaxy.runs.property_targets import fitted_card, normalised, raw_targets
        from deepgalaxy.runs.training import open_stores

        spec = self.spec
        self.datasets = open_stores(spec)
        splits = [ds.split(spec.data.split, spec.data.validation_fraction, spec.data.seed) for ds in self.datasets]
        names = [s.name for s in spec.data.stores]
        bs = spec.train.batch_size
        rows = batch_rows([s.share for s in spec.data.stores], bs, names)
        rank, size, seed = self.dist.rank, self.dist.size, spec.data.seed
        self.parts = [StorePart(name, train.shard(rank, size, seed=seed), n)
                      for name, (train, _), n in zip(names, splits, rows, strict=True)]
        self.val_shards = {name: val.shard(rank, size, seed=seed) for name, (_, val) in zip(names, splits, strict=True)
                           if len(val) >= size}
        lead = self.parts[0]
        local_steps = lead.train.num_batches(lead.rows, drop_last=True)
        steps = -int(self.coll.allreduce_max(np.array([-local_steps]))[0])  # the smallest shard's step count
        if spec.train.max_steps_per_epoch:
            steps = min(steps, spec.train.max_steps_per_epoch)
        if steps < 1:
            train = splits[0][0]
            raise DatasetError(
                f"{train.path}: the training split ({len(train)} images) gives each of {size} workers "
                f"{len(lead.train)} images, less than one batch of {lead.rows}; use a smaller train.batch_size "
                "(--set train.batch_size=...), fewer workers or more data"
            )
        self.steps = steps
        tables = raw_targets(spec.card, self.datasets)
        self.card = fitted_card(spec.card, self.datasets[0], splits[0][0].indices, tables[0])
        """The card the model is built from: the run's, with the normalisation of its property targets."""
        self.parts = [StorePart(p.name, p.train.with_targets(normalised(self.card, t)), p.rows)
                      for p, t in zip(self.parts, tables, strict=True)]
        self.val_shards = {name: shard.with_targets(normalised(self.card, tables[names.index(name)]))
                           for name, shard in self.val_shards.items()}
        self.lead_val = splits[0][1].with_targets(normalised(self.card, tables[0]))
        """The lead store's whole validation split (rank 0 recalibrates the property heads' sigmas on it)."""
        self.framework = registry.get_framework(spec.framework)
        self.model = registry.create(self.card, framework=spec.framework, seed=spec.train.seed)
        self.train = placed(self.model, spec.train, self.dist.local_rank, warn=self.root)
        """The train spec with this rank's device and precision resolved (``cuda:1``, ``bf16``)."""
        self.trainer = self.framework.trainer(self.model.native, self.card, self.train, self.dist)

    def _sums(self) -> Sums:
        """Empty metric sums for this run."""
        return Sums(self.spec.train.within_k, self.card.properties)

    def fingerprint(self) -> str:
        """The training data's fingerprint: the stores' fingerprints, joined by ``+``."""
        return "+".join(ds.fingerprint() for ds in self.datasets)

    def data_params(self) -> dict[str, int]:
        """What the run records about its data: training images over every rank and store, steps per epoch."""
        return {"data.train_images": sum(len(p.train) for p in self.parts) * self.dist.size,
                "data.steps_per_epoch": self.steps}

    def _start_tracking(self, state: dict[str, Any] | None) -> None:
        from deepgalaxy.tracking import Tracker

        self.tracker = Tracker(self.spec)
        mlflow_file = self.run_dir / MLFLOW_FILE
        known = json.loads(mlflow_file.read_text())["run_id"] if mlflow_file.is_file() else None
        run_id = (state or {}).get("run_id") or known
        self.tracker.start(run_id=run_id)
        if run_id is None:
            t = self.tracker
            mlflow_file.write_text(json.dumps({"run_id": t.run_id, "experiment_id": t.experiment_id,
                                               "tracking_uri": t.tracking_uri}))
            self.tracker.log_start(
                self.fingerprint(),
                extra_tags={"run_dir": str(self.run_dir)},
                extra_params=self.data_params(),
            )
        else:
            self.tracker.mlflow.set_tag("resumed", "true")

    # -- main -----------------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any] | None:
        spec = self.spec
        self._setup()
        state = read_state(self.run_dir)
        if state is not None:
            self.trainer.load_checkpoint(Path(state["_dir"]) / "trainer")
            if state.get("numpy_rng"):
                _rng_from_json(state["numpy_rng"])
        else:
            np.random.seed(spec.train.seed % (2**32))
        if self.root:
            self._start_tracking(state)
            self.tracker.mlflow.set_tags(run_hardware_tags(self.model))  # again on resume: the hardware may differ
        if state is None and spec.init:
            start_from(spec.init, self.model, spec.tracking_uri, self.tracker if self.root else None)
        state = state or {"epoch": 0, "next_batch": 0, "history": [], "sums": None, "elapsed_s": 0.0}
        state["run_id"] = self.tracker.run_id if self.root else state.get("run_id")
        history: list[dict[str, float]] = state["history"]
        confusion = None
        for epoch in range(int(state["epoch"]), spec.train.epochs):
            start = int(state["next_batch"]) if epoch == int(state["epoch"]) else 0
            sums = self._sums()
            elapsed = 0.0
            if start > 0 and state.get("sums") is not None:
                elapsed = float(state.get("elapsed_s", 0.0))
                if self.root and len(state["sums"]) == len(SUM_SLOTS):  # saved sums are already summed over ranks
                    sums.v = np.asarray(state["sums"], dtype=np.float64)
            sums, elapsed = self._train_epoch(epoch, start, sums, elapsed, state)
            divergence = self._sync_weights()
            val_sums, confusion, val_time = self._validate(epoch)
            g_train = sums.like(self.coll.allreduce_sum(sums.v))
            g_val = {name: sums.like(self.coll.allreduce_sum(v.v)) for name, v in val_sums.items()}
            times = self.coll.allreduce_max(np.array([elapsed, val_time]))
            if confusion is not None:
                confusion = self.coll.allreduce_sum(confusion)
            total = sums.like(sum((v.v for v in g_val.values()), np.zeros(len(SUM_SLOTS))))
            metrics = {**g_train.metrics("train"), **total.metrics("val")}
            if len(spec.data.stores) > 1:  # per store, beside the totals
                for name, store_sums in g_val.items():
                    metrics.update(store_sums.metrics(f"val/{name}"))
            ips = g_train.images / max(times[0], 1e-9)
            metrics.update({"perf/images_per_s": ips, "perf/images_per_s_per_worker": ips / self.dist.size,
                            "perf/train_time_s": float(times[0]), "perf/epoch_time_s": float(times[0] + times[1])})
            if divergence is not None:
                metrics["dist/max_param_divergence"] = divergence
            history.append(metrics)
            if self.root:
                self.tracker.log_epoch(epoch, metrics)
                _print_epoch(epoch, spec.train.epochs, metrics)
                if spec.train.keep == "best" and best_epoch(history) == epoch:
                    self._save_best(epoch)
            state.update(epoch=epoch + 1, next_batch=0, sums=None, elapsed_s=0.0, history=history,
                         numpy_rng=_rng_to_json())
            if self.root:
                write_checkpoint(self.run_dir, self.trainer, state)
            if self._stop_after(epoch, metrics):
                break
        return self._finish(history, confusion)

    def _save_best(self, epoch: int) -> None:
        """Keep this epoch's weights as the best so far; written beside and then swapped in, so a crash at any
        moment leaves the previous best intact (a resumed run selects exactly what an uninterrupted one would)."""
        tmp = self.run_dir / f"{BEST_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save(tmp, extra={"epoch": epoch})
        shutil.rmtree(self.run_dir / BEST_DIR, ignore_errors=True)
        tmp.rename(self.run_dir / BEST_DIR)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Hook for subclasses (``deepgalaxy tune`` reports to Optuna here): called on every rank after each epoch
        with its metrics (identical on all ranks); returning True on any rank stops every rank after this epoch."""
        return False

    def _stop_after(self, epoch: int, metrics: dict[str, float]) -> bool:
        stop = self.on_epoch_end(epoch, metrics)
        if self.dist.size > 1:  # one rank stopping alone would hang the others' allreduce
            stop = bool(self.coll.allreduce_max(np.array([1.0 if stop else 0.0]))[0] > 0)
        self.stopped_early = stop and epoch + 1 < self.spec.train.epochs
        return stop

    def _train_epoch(self, epoch: int, start: int, sums: Sums, elapsed: float,
                     state: dict[str, Any]) -> tuple[Sums, float]:
        spec = self.spec
        bar = progress_bar(self.progress, self.steps, f"epoch {epoch + 1}/{spec.train.epochs}", unit="step",
                           initial=start, leave=False)
        t0 = time.perf_counter()
        if start < self.steps:
            batches = mixed_batches(self.parts, epoch, self.steps, spec.train.seed, start_batch=start)
            for step, (x, y) in enumerate(batches, start=start):
                x = augment(x, spec.train.augment, spec.train.seed, epoch, step, self.dist.rank)
                res = self.trainer.train_step(x, y)
                check_finite(res, epoch, step)
                sums.add(res, y)
                bar.update(1)
                bar.set_postfix(loss=f"{res.losses.get('loss', float('nan')):.4g}", refresh=False)
                done = step + 1
                if self.checkpoint_every and done % self.checkpoint_every == 0 and done < self.steps:
                    now = elapsed + time.perf_counter() - t0
                    g = self.coll.allreduce_sum(sums.v)
                    g_elapsed = float(self.coll.allreduce_max(np.array([now]))[0])
                    if self.root:
                        state.update(epoch=epoch, next_batch=done, sums=g.tolist(), elapsed_s=g_elapsed,
                                     numpy_rng=_rng_to_json())
                        write_checkpoint(self.run_dir, self.trainer, state)
            if hasattr(batches, "close"):
                batches.close()
        bar.close()
        return sums, elapsed + time.perf_counter() - t0

    def _sync_weights(self) -> float | None:
        """Average every weight over the ranks; return how far trainable parameters had drifted apart.

        Horovod averages gradients, so parameters stay identical and only per-rank statistics (batch-norm running
        mean/variance) differ; averaging makes every rank hold the same model, with statistics over all shards.
        The returned divergence of the parameters (not the statistics) must be 0: anything else is a bug.
        """
        if self.dist.size == 1:
            return None
        weights = self.model.get_weights()
        names = sorted(weights)
        flat = np.concatenate([np.asarray(weights[k], dtype=np.float64).ravel() for k in names])
        mean = self.coll.allreduce_sum(flat) / self.dist.size
        synced: dict[str, np.ndarray] = {}
        divergence, offset = 0.0, 0
        for k in names:
            w = np.asarray(weights[k])
            part = mean[offset:offset + w.size].reshape(w.shape)
            if not is_statistic(k) and w.size:
                divergence = max(divergence, float(np.abs(part - w.astype(np.float64)).max()))
            synced[k] = (np.rint(part) if np.issubdtype(w.dtype, np.integer) else part).astype(w.dtype)
            offset += w.size
        self.framework.set_weights(self.model.native, synced)
        return float(self.coll.allreduce_max(np.array([divergence]))[0])

    def _validate(self, epoch: int) -> tuple[dict[str, Sums], np.ndarray | None, float]:
        """Every store's validation sums on this rank (stores in order), the confusion matrix over all, the time."""
        spec = self.spec
        has_head = "head" in spec.card.parts
        confusion = np.zeros((spec.card.num_classes, spec.card.num_classes)) if has_head else None
        every: dict[str, Sums] = {}
        t0 = time.perf_counter()
        for part in self.parts:
            sums = every[part.name] = self._sums()
            shard = self.val_shards.get(part.name)
            if shard is None:
                continue
            for step, (x, y) in enumerate(shard.batches(spec.train.batch_size, epoch=0, shuffle=False,
                                                         drop_last=False)):
                res = self.trainer.eval_step(x, y)
                check_finite(res, epoch, step, where="validation")
                sums.add(res, y)
                y, _ = split_labels(y)
                if confusion is not None and res.predicted is not None:
                    known = y >= 0
                    pred = np.clip(np.asarray(res.predicted).reshape(-1)[known], 0, spec.card.num_classes - 1)
                    np.add.at(confusion, (y[known], pred), 1)
        return every, confusion, time.perf_counter() - t0

    # -- the end --------------------------------------------------------------------------------------------------

    def _finish(self, history: list[dict[str, float]], confusion: np.ndarray | None) -> dict[str, Any] | None:
        spec = self.spec
        digest = weights_digest(self.model.get_weights())
        (self.run_dir / RANKS_DIR).mkdir(exist_ok=True)
        (self.run_dir / RANKS_DIR / f"rank{self.dist.rank}.json").write_text(
            json.dumps({"rank": self.dist.rank, "size": self.dist.size, "weights_sha256": digest}))
        # every rank must hold the same weights; compare digests through a sum of their first bytes
        probe = np.array([int(digest[:12], 16)], dtype=np.float64)
        in_sync = bool(self.coll.allreduce_max(probe)[0] == -self.coll.allreduce_max(-probe)[0])
        if not self.root:
            return None
        tracker = self.tracker
        tracker.require_server("logging the model")  # a server that went away: wait for it, or stop resumable
        model_dir = self.run_dir / MODEL_DIR
        selected = len(history) - 1
        if spec.train.keep == "best" and (self.run_dir / BEST_DIR).is_dir():
            from deepgalaxy.core.model import WEIGHTS_FILE

            self.model.load_weights(self.run_dir / BEST_DIR / WEIGHTS_FILE)
            selected = best_epoch(history)
        tracker.mlflow.set_tag("selected_epoch", str(selected + 1))
        self._recalibrate()
        self.model.save(model_dir, extra={"run_id": tracker.run_id, "epoch": selected})
        originals = recon = None
        lead_val = self.val_shards.get(self.parts[0].name)  # reconstructions are shown from the lead store
        if "decoder" in spec.card.parts and lead_val is not None:
            originals = lead_val.images(np.arange(min(RECON_IMAGES, len(lead_val))))
            recon = self.model.reconstruct(originals)
            originals = originals.astype(np.float32) / 255.0
        tracker.log_figures(history, confusion, originals, recon)
        best = best_metrics(history)
        summary = {
            "card": spec.card.name, "framework": spec.framework, "workers": spec.workers, "epochs": len(history),
            "best": best, "final": history[-1] if history else {}, "images_per_s": _mean_perf(history),
            "weights_sha256": digest, "ranks_in_sync": in_sync,
        }
        tracker.log_dict(summary, "summary.json")
        tracker.mlflow.set_tag("ranks_in_sync", str(in_sync).lower())
        version = None
        if spec.register_model:
            from deepgalaxy.registry.store import log_pyfunc_model, register_version

            uri = log_pyfunc_model(model_dir)
            tags = {"framework": spec.framework, "task": spec.card.task, "backbone": spec.card.backbone.name,
                    "workers": spec.workers, "epochs": len(history), "dataset_fingerprint": self.fingerprint(),
                    **{k: f"{v:.6g}" for k, v in best.items()}}
            description = (f"{spec.card.description or spec.card.name}; trained with {spec.framework} on "
                           f"{spec.workers} worker(s) for {len(history)} epoch(s) on "
                           f"{' + '.join(s.path for s in spec.data.stores)} "
                           f"(run {tracker.run_id}). " + ", ".join(f"{k}={v:.4g}" for k, v in best.items()))
            version = register_version(uri, spec.card.name, tracker.run_id, tags, description, tracker.tracking_uri)
            tracker.mlflow.set_tag("model_version", str(version))
        result = {**summary, "run_id": tracker.run_id, "experiment_id": tracker.experiment_id,
                  "tracking_uri": tracker.tracking_uri, "model_name": spec.card.name if version else None,
                  "model_version": version, "model_dir": str(model_dir), "run_dir": str(self.run_dir)}
        (self.run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2))
        tracker.end("FINISHED")
        return result


    def _recalibrate(self) -> None:
        """Fit the property heads' sigma factors on the lead store's validation split into the saved card."""
        from deepgalaxy.runs.property_targets import recalibrated

        card = self.model.card
        if card.properties is None or len(self.lead_val) == 0:
            return
        predicted, targets = [], []
        for x, y in self.lead_val.batches(256, shuffle=False, drop_last=False):
            predicted.append(self.model.backend.infer(self.model.native, "properties", x))
            targets.append(y["targets"])
        self.model.card = recalibrated(card, np.concatenate(predicted), np.concatenate(targets))
        assert self.model.card.properties is not None
        scales = self.model.card.properties.sigma_scale
        self.tracker.mlflow.log_metrics({f"calibration/{column}_sigma_scale": value
                                  for column, value in zip(self.model.card.properties.columns, scales, strict=True)})


def best_epoch(history: list[dict[str, float]]) -> int:
    """The epoch (0-based) with the lowest validation loss; the last one when there is no validation loss."""
    losses = [h.get("val/loss", math.inf) for h in history]
    return int(np.argmin(losses)) if any(math.isfinite(v) for v in losses) else len(history) - 1


def best_metrics(history: list[dict[str, float]]) -> dict[str, float]:
    """Best validation numbers over the epochs: lowest losses, highest accuracies."""
    best: dict[str, float] = {}
    for h in history:
        for key, value in h.items():
            if not key.startswith("val/"):
                continue
            higher = key.endswith("accuracy")
            if key not in best or (value > best[key] if higher else value < best[key]):
                best[key] = value
    return best


def _mean_perf(history: list[dict[str, float]]) -> float:
    vals = [h["perf/images_per_s"] for h in history if "perf/images_per_s" in h]
    later = vals[1:] or vals  # the first epoch includes warm-up
    return float(np.mean(later)) if later else 0.0


def _print_epoch(epoch: int, epochs: int, metrics: dict[str, float]) -> None:
    keys = ("train/loss", "val/loss", "val/accuracy", "val/within_k_accuracy", "val/recon_mse",
            "perf/images_per_s", "perf/epoch_time_s")
    parts = [f"{k.split('/', 1)[1] if k.startswith('perf/') else k}={metrics[k]:.4g}" for k in keys if k in metrics]
    print(f"epoch {epoch + 1}/{epochs}: " + "  ".join(parts), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepgalaxy.runs.worker", description=__doc__.split("\n")[0])
    parser.add_argument("run_json", type=Path, help="run.json written by deepgalaxy train (its directory is the run)")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (0: per epoch)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--launcher", help="the launcher plugin that started this rank (default: by worker count)")
    args = parser.parse_args(argv)
    run_dir = args.run_json.resolve().parent
    die_with_parent()  # a worker never trains on alone: it ends with the process that started it
    watch_parent()
    try:  # held until this process ends; a run busy elsewhere is not this run's failure (no error.json)
        RunLock(run_dir, WORKER_SLOT + int(os.environ.get("HOROVOD_RANK", "0"))).acquire()
    except DeepGalaxyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    worker: Worker | None = None
    try:
        worker = Worker(run_dir, args.checkpoint_every, progress=not args.no_progress, launcher=args.launcher)
        worker.run()
        return 0
    except KeyboardInterrupt:
        _fail(worker, run_dir, "interrupted", "KILLED")
        return 130
    except DeepGalaxyError as exc:
        _fail(worker, run_dir, f"{type(exc).__name__}: {exc}", "FAILED")
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except Exception as exc:
        _fail(worker, run_dir, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}", "FAILED")
        raise


def _fail(worker: Worker | None, run_dir: Path, message: str, status: str) -> None:
    rank = worker.dist.rank if worker is not None else int(os.environ.get("HOROVOD_RANK", "0"))
    if rank == 0:
        (run_dir / ERROR_FILE).write_text(json.dumps({"error": message, "status": status}))
        if worker is not None and worker.tracker is not None:
            try:
                worker.tracker.mlflow.set_tag("error", message[:5000])
                worker.tracker.end(status)
            except Exception:  # the store itself may be what failed
                pass


if __name__ == "__main__":
    sys.exit(main())
