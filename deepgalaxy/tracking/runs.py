"""MLflow runs: the one place they are created (:func:`new_run`, :func:`active_run`, :class:`Tracker`), with the
params and tags that make runs of every command comparable.

A tracking server may go away during a training: the :class:`Tracker` keeps the epoch metrics it could not send
(in memory and in ``pending_metrics.jsonl`` of the run directory) and sends them, with their original times, once
the server answers again; MLflow's HTTP retries are kept short (:data:`HTTP_DEFAULTS`) so an epoch is not held up
for minutes. At the end of a training :meth:`Tracker.require_server` waits a bounded time for it
(``DEEPGALAXY_TRACKING_WAIT`` seconds) and otherwise stops with the ``--resume`` command that finishes the run.

Metric names are the same for every framework and worker count (``train/loss``, ``val/accuracy``,
``perf/images_per_s`` ...), so runs line up side by side in the MLflow UI. Every run is created in a store that
:func:`~deepgalaxy.tracking.store.prepare_store` checked and prepared; a top-level run carries the git commit.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepgalaxy.core.errors import DeepGalaxyError
from deepgalaxy.core.settings import seconds_from_env
from deepgalaxy.core.specs import RunSpec, flatten
from deepgalaxy.tracking.store import prepare_store
from deepgalaxy.tracking.uris import resolve_tracking_uri

SYSTEM_METRICS_INTERVAL_S = 2.0
MAX_PARAM_CHARS = 6000
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
PENDING_FILE = "pending_metrics.jsonl"
"""Epoch metrics not yet accepted by the tracking server, one JSON object per line, in the run directory."""
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
"""MLflow's HTTP retries for a training's rank 0 unless the user set them: a few seconds, not MLflow's minutes."""
TRACKING_WAIT_ENV = "DEEPGALAXY_TRACKING_WAIT"
DEFAULT_TRACKING_WAIT_S = 300.0
"""How long the end of a training waits for a tracking server that went away (``DEEPGALAXY_TRACKING_WAIT``)."""
WAIT_POLL_S = 2.0
BATCH_METRICS = 1000
"""MLflow's limit of metrics per ``log_batch``."""


def git_commit(start: Path | None = None) -> str | None:
    """The git commit of the working directory (or of the deepgalaxy source tree), when there is one."""
    for where in (start or Path.cwd(), Path(__file__).resolve().parent):
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return None


def new_run(tracking_uri: str, experiment: str, tags: Mapping[str, str], params: Mapping[str, Any] | None = None,
            parent_run_id: str | None = None) -> str:
    """Create a run of ``experiment`` (client API, not the process's active run) and return its id.

    A top-level run prepares the store first and is tagged with the git commit; a child run (``parent_run_id``)
    is nested under its parent, which already did both. ``params`` are logged at once (each value at most
    :data:`MAX_PARAM_CHARS` characters), so even a run that is interrupted at once says what it was given.
    """
    import mlflow
    from mlflow.entities import Param

    all_tags = dict(tags)
    if parent_run_id is None:
        prepare_store(tracking_uri, experiment)
        commit = git_commit()
        if commit:
            all_tags["git_commit"] = commit
    else:
        all_tags[PARENT_TAG] = parent_run_id
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"prepare_store({tracking_uri!r}, {experiment!r}) creates the experiment"
    run_id = str(client.create_run(exp.experiment_id, tags=all_tags).info.run_id)
    if params:
        client.log_batch(run_id, params=[Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()])
    return run_id


@contextlib.contextmanager
def active_run(tracking_uri: str, experiment: str, name: str) -> Iterator[Any]:
    """A short run made the process's active run (for MLflow calls that log into the active run, such as
    ``mlflow.pyfunc.log_model``), ended when the block ends."""
    import mlflow

    prepare_store(tracking_uri, experiment)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=name) as run:
        yield run


def run_params(spec: RunSpec) -> dict[str, str]:
    """The whole run spec (card, data, train, framework, workers ...) flattened to MLflow params."""
    params: dict[str, str] = {}
    for key, value in flatten(spec).items():
        if key in ("tracking_uri", "checkpoint_dir"):
            continue
        text = "" if value is None else str(value)
        params[key] = text[:MAX_PARAM_CHARS]
    return params


def run_tags(spec: RunSpec, dataset_fingerprint: str | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Tags to filter and group runs by: framework, card, backbone, workers, dataset fingerprint, git commit."""
    tags = {
        "framework": spec.framework,
        "card": spec.card.name,
        "task": spec.card.task,
        "backbone": spec.card.backbone.name,
        "workers": str(spec.workers),
        RUN_NAME_TAG: f"{spec.card.name}-{spec.framework}-w{spec.workers}",
    }
    if dataset_fingerprint:
        tags["dataset_fingerprint"] = dataset_fingerprint
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    tags.update(extra or {})
    return tags


class TrackingUnavailableError(DeepGalaxyError):
    """The tracking server did not come back within the wait at the end of a training."""


def tracking_wait_s() -> float:
    """``DEEPGALAXY_TRACKING_WAIT`` seconds (0: do not wait), else :data:`DEFAULT_TRACKING_WAIT_S`."""
    return seconds_from_env(TRACKING_WAIT_ENV, DEFAULT_TRACKING_WAIT_S, zero=True)


def is_outage(exc: BaseException) -> bool:
    """The server did not take the request (unreachable, timed out, 5xx): worth trying again later."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return int(exc.get_http_status_code()) >= 500  # type: ignore[no-untyped-call]
    return isinstance(exc, OSError)  # requests' exceptions are OSErrors


class Tracker:
    """Owns the MLflow run of one training on rank 0: start or reopen it, log, attach artifacts, end it."""

    def __init__(self, spec: RunSpec) -> None:
        import mlflow

        self.spec = spec
        self.mlflow = mlflow
        self.tracking_uri = resolve_tracking_uri(spec.tracking_uri)
        if self.tracking_uri.startswith(("http://", "https://")):
            for key, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)
        mlflow.set_tracking_uri(self.tracking_uri)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.pending_file = Path(spec.checkpoint_dir) / PENDING_FILE if spec.checkpoint_dir else None
        self.pending: list[dict[str, Any]] = self._read_pending()
        self.last_error: str | None = None

    def start(self, run_id: str | None = None, system_metrics: bool = True) -> str:
        """Start a new run, or reopen ``run_id`` (after ``--resume``) so everything lands in the same run."""
        mlflow = self.mlflow
        prepare_store(self.tracking_uri, self.spec.experiment)  # tagged even when no CLI prepared it
        experiment = mlflow.set_experiment(self.spec.experiment)
        self.experiment_id = experiment.experiment_id
        if system_metrics:
            try:
                mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
                mlflow.set_system_metrics_samples_before_logging(1)
            except Exception:  # older MLflow without these setters: keep its defaults
                pass
        run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment.experiment_id,
                               log_system_metrics=system_metrics)
        self.run_id = run.info.run_id
        self.flush()  # what an earlier attempt could not send
        return self.run_id

    def log_start(self, dataset_fingerprint: str | None, extra_tags: Mapping[str, str] | None = None,
                  extra_params: Mapping[str, Any] | None = None) -> None:
        """Params (the flattened spec) and tags; only once per run (MLflow params cannot change)."""
        params = run_params(self.spec)
        params.update({k: str(v) for k, v in (extra_params or {}).items()})
        self.mlflow.log_params(params)
        self.mlflow.set_tags(run_tags(self.spec, dataset_fingerprint, extra_tags))

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Metrics of one finished epoch at step ``epoch`` (0-based); kept for later if the server does not answer."""
        now = int(time.time() * 1000)
        entries = [{"key": k, "value": float(v), "timestamp": now, "step": int(epoch)}
                   for k, v in metrics.items() if v is not None and np.isfinite(v)]
        self.pending.extend(entries)
        if not self.flush() and self.pending_file is not None:  # on disk only while the server does not take them
            self.pending_file.write_text("".join(json.dumps(e) + "\n" for e in self.pending))

    def flush(self) -> bool:
        """Send the pending metrics; True when none are left. A server that does not take them (unreachable, 5xx)
        keeps them pending and prints one warning per outage; any other refusal is raised."""
        if not self.pending or self.run_id is None:
            return not self.pending
        from mlflow.entities import Metric

        client = self.mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        try:
            for i in range(0, len(self.pending), BATCH_METRICS):  # resent batches are harmless: MLflow dedups
                client.log_batch(self.run_id, metrics=[Metric(**e) for e in self.pending[i:i + BATCH_METRICS]])
        except Exception as exc:
            if not is_outage(exc):
                raise
            if self.last_error is None:
                where = f" in {self.pending_file}" if self.pending_file else ""
                print(f"warning: the MLflow store {self.tracking_uri} does not answer; training goes on, "
                      f"and its metrics are kept{where} and sent when it answers again", file=sys.stderr, flush=True)
            self.last_error = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            return False
        if self.last_error is not None:
            print(f"the MLflow store {self.tracking_uri} answers again: {len(self.pending)} kept metric "
                  "values sent", file=sys.stderr, flush=True)
        self.pending.clear()
        self.last_error = None
        if self.pending_file is not None:
            self.pending_file.unlink(missing_ok=True)
        return True

    def require_server(self, what: str) -> None:
        """Before ``what`` (the model, the version): wait up to :func:`tracking_wait_s` until the server takes the
        pending metrics; otherwise stop with the command that finishes the run once the server is back."""
        from deepgalaxy.tracking.store import check_server

        deadline = time.monotonic() + tracking_wait_s()
        while True:
            try:
                check_server(self.tracking_uri)
                if self.flush():
                    return
            except DeepGalaxyError as exc:
                self.last_error = str(exc)
            if time.monotonic() >= deadline:
                break
            time.sleep(min(WAIT_POLL_S, max(0.0, deadline - time.monotonic())))
        run_dir = self.spec.checkpoint_dir or "RUN_DIR"
        raise TrackingUnavailableError(
            f"the MLflow tracking server {self.tracking_uri} did not answer for {tracking_wait_s():g} s before "
            f"{what} ({self.last_error}); the trained weights (checkpoint) and the metrics not yet sent are kept in "
            f"{run_dir}. Once the server is back, finish the same MLflow run with: deepgalaxy train --resume "
            f"--run-dir {run_dir}  ({TRACKING_WAIT_ENV}=SECONDS waits longer)"
        )

    def _read_pending(self) -> list[dict[str, Any]]:
        if self.pending_file is None or not self.pending_file.is_file():
            return []
        entries = []
        for line in self.pending_file.read_text().splitlines():
            with contextlib.suppress(ValueError, TypeError, KeyError):  # a line cut short by a crash
                entry = json.loads(line)
                entries.append({k: entry[k] for k in ("key", "value", "timestamp", "step")})
        return entries

    def log_figures(self, history: Sequence[Mapping[str, float]], confusion: np.ndarray | None,
                    originals: np.ndarray | None, reconstructions: np.ndarray | None) -> None:
        """Curves (loss and accuracy per epoch, like the paper's Figs. 3-4), confusion matrix, reconstructions."""
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            from deepgalaxy.core.figures import plot_confusion, plot_curves, plot_reconstructions

            paths = [plot_curves(history, out / "curves.png")]
            if confusion is not None:
                paths.append(plot_confusion(confusion, out / "confusion_matrix.png"))
            if originals is not None and reconstructions is not None:
                paths.append(plot_reconstructions(originals, reconstructions, out / "reconstructions.png"))
            for path in paths:
                self.mlflow.log_artifact(str(path), artifact_path="figures")

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        """``data`` as the JSON artifact ``name``."""
        self.mlflow.log_dict(dict(data), name)

    def end(self, status: str = "FINISHED") -> None:
        """End the run with ``FINISHED``, ``FAILED`` or ``KILLED``."""
        if self.mlflow.active_run() is not None:
            self.mlflow.end_run(status=status)
