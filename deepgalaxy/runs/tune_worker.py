"""One Optuna trial's training, on one rank: ``python -m deepgalaxy.runs.tune_worker RUN.json``.

The training is :class:`deepgalaxy.runs.worker.Worker`'s own epoch loop; this subclass adds what a trial needs:

- its MLflow run, created by ``deepgalaxy tune`` nested under the study's parent run (tag ``mlflow.parentRunId``)
  and named ``trial-<n>``, is reopened here instead of a new one;
- after each epoch rank 0 reports the validation loss to the Optuna storage (``trial.report``) and asks the
  pruner (``trial.should_prune``); the worker's ``on_epoch_end`` hook then stops every rank together.

Rank 0 reaches the trial through the storage (``optuna.load_study`` + the trial id from ``tune.json``), so the same
code serves a trial run in the ``deepgalaxy tune`` process (one worker) and one run under ``horovodrun``.
``trial.json`` (rank 0) says whether the trial was pruned and at which epoch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from deepgalaxy.core.errors import DeepGalaxyError
from deepgalaxy.runs.rundir import RUN_FILE
from deepgalaxy.runs.worker import Worker, _fail

TUNE_FILE = "tune.json"
TRIAL_FILE = "trial.json"


def make_pruner(spec: str) -> Any:
    """``median[:STARTUP[:WARMUP]]``, ``threshold:UPPER`` or ``none`` -> an Optuna pruner (the CLI's --pruner)."""
    import optuna

    kind, _, rest = spec.partition(":")
    args = [a for a in rest.split(":") if a] if rest else []
    try:
        if kind == "median":
            startup = int(args[0]) if args else 3
            warmup = int(args[1]) if len(args) > 1 else 1
            return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup)
        if kind == "threshold" and len(args) == 1:
            return optuna.pruners.ThresholdPruner(upper=float(args[0]))
        if kind == "none" and not args:
            return optuna.pruners.NopPruner()
    except ValueError:
        pass
    raise DeepGalaxyError(
        f"--pruner {spec!r}: use median[:STARTUP_TRIALS[:WARMUP_EPOCHS]] (default median:3:1), "
        "threshold:UPPER (prune when the validation loss exceeds UPPER) or none"
    )


class TuneWorker(Worker):
    """A training :class:`Worker` that is one Optuna trial (see the module docstring)."""

    def __init__(self, run_dir: Path, trial: Any = None, progress: bool = True, launcher: str | None = None) -> None:
        super().__init__(run_dir, progress=progress, launcher=launcher)
        self.tune: dict[str, Any] = json.loads((run_dir / TUNE_FILE).read_text())
        self._trial = trial
        self.pruned_epoch: int | None = None

    def trial(self) -> Any:
        """The Optuna trial (rank 0 only): the one handed in, else reopened from the storage by id."""
        if self._trial is None:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            t = self.tune
            study = optuna.load_study(study_name=t["study"], storage=t["storage"], pruner=make_pruner(t["pruner"]))
            self._trial = optuna.trial.Trial(study, int(t["trial_id"]))
        return self._trial

    def _start_tracking(self, state: dict[str, Any] | None) -> None:
        """Open the trial's MLflow run, which ``deepgalaxy tune`` created already nested under the study's parent
        (so an interruption at any moment leaves no orphan run), and log the spec as :class:`Worker` does."""
        from deepgalaxy.runs.rundir import MLFLOW_FILE
        from deepgalaxy.tracking import Tracker

        t = self.tune
        self.tracker = tracker = Tracker(self.spec)
        tracker.start(run_id=t["run_id"])
        (self.run_dir / MLFLOW_FILE).write_text(json.dumps({
            "run_id": tracker.run_id, "experiment_id": tracker.experiment_id, "tracking_uri": tracker.tracking_uri}))
        tracker.log_start(
            self.fingerprint(),
            extra_tags={"run_dir": str(self.run_dir), "mlflow.runName": f"trial-{t['trial_number']}"},
            extra_params={**self.data_params(), **{f"optuna.{k}": v for k, v in t["params"].items()}},
        )

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> bool:
        if not self.root:
            return False
        metric = self.tune["metric"]
        value = metrics.get(metric, metrics.get("train/loss"))
        if value is None:
            return False
        trial = self.trial()
        trial.report(float(value), epoch)
        if trial.should_prune():
            self.pruned_epoch = epoch
            print(f"trial {self.tune['trial_number']}: pruned after epoch {epoch + 1} ({metric}={value:.4g})",
                  file=sys.stderr, flush=True)
            return True
        return False

    def run(self) -> dict[str, Any] | None:
        result = super().run()
        if self.root:
            (self.run_dir / TRIAL_FILE).write_text(json.dumps({
                "pruned_epoch": self.pruned_epoch, "run_id": self.tracker.run_id if self.tracker else None,
            }))
        return result


def run_in_process(run_dir: Path, trial: Any, progress: bool = True, launcher: str | None = None) -> None:
    """Run a trial's rank inside this process (the whole trial for one worker; ``launcher`` started it otherwise);
    on failure leave ``error.json`` and end its MLflow run."""
    worker: TuneWorker | None = None
    try:
        worker = TuneWorker(run_dir, trial=trial, progress=progress, launcher=launcher)
        worker.run()
    except KeyboardInterrupt:
        _fail(worker, run_dir, "interrupted", "KILLED")
        raise
    except DeepGalaxyError as exc:
        _fail(worker, run_dir, f"{type(exc).__name__}: {exc}", "FAILED")
        raise
    except Exception as exc:
        _fail(worker, run_dir, f"{type(exc).__name__}: {exc}", "FAILED")
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepgalaxy.runs.tune_worker", description=__doc__.split("\n")[0])
    parser.add_argument("run_json", type=Path, help=f"{RUN_FILE} written by deepgalaxy tune (next to {TUNE_FILE})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--launcher", help="the launcher plugin that started this rank (default: by worker count)")
    args = parser.parse_args(argv)
    run_dir = args.run_json.resolve().parent
    try:
        run_in_process(run_dir, None, progress=not args.no_progress, launcher=args.launcher)
        return 0
    except KeyboardInterrupt:
        return 130
    except DeepGalaxyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
