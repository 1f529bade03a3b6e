"""MLflow tracking of one training: exactly one run, written by rank 0.

Metric names are the same for every framework and worker count (``train/loss``, ``val/accuracy``,
``perf/images_per_s`` ...), so runs line up side by side in the MLflow UI. The tracking URI is MLflow's own
default (``sqlite:///mlflow.db`` in the working directory) unless ``MLFLOW_TRACKING_URI`` or an explicit URI says
otherwise. mlflow and matplotlib are imported here, never by ``deepgalaxy.core``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepgalaxy.core.errors import DeepGalaxyError
from deepgalaxy.core.specs import RunSpec, flatten

SYSTEM_METRICS_INTERVAL_S = 2.0
MAX_PARAM_CHARS = 6000


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """The tracking URI a training uses: ``explicit``, else ``MLFLOW_TRACKING_URI``, else MLflow's default.

    MLflow's default resolves to an absolute ``sqlite:////.../mlflow.db`` of the working directory, so every rank
    and a later ``--resume`` write to the same store.
    """
    if explicit:
        return explicit
    import mlflow

    return str(mlflow.get_tracking_uri())


def prepare_store(tracking_uri: str, experiment: str) -> None:
    """Check that the store can be used, then create its tables and the experiment once (under a file lock for
    SQLite), tagged as a model-development experiment.

    A new experiment in a SQLite store keeps its artifacts in ``mlruns/<experiment>`` next to the database file.
    Two trainings started at the same moment on a fresh SQLite file would otherwise both run MLflow's schema
    migrations (one fails), or both create the experiment. A server that does not answer, or a database file that
    is not MLflow's, is an error naming it (:func:`check_server`, :func:`check_sqlite`) before anything is written.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    check_server(tracking_uri)
    lock_path = artifacts = db = None
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        lock_path = db.with_name(db.name + ".lock")
        # artifacts next to the database (MLflow would use ./mlruns of whichever directory the process runs in)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
        artifacts = (db.resolve().parent / "mlruns" / safe).as_uri()
    with _file_lock(lock_path):
        if db is not None:
            check_sqlite(db)
        try:
            client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            _ensure_experiment(client, experiment, artifacts)
            client.search_registered_models(max_results=1)  # the registry's tables (same migrations, same file)
        except (MlflowException, SQLAlchemyError) as exc:
            first = str(exc).strip().split("\n")[0][:500]
            raise DeepGalaxyError(f"the MLflow store {tracking_uri} cannot be used: {first}") from None


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""MLflow 3's UI opens an experiment of this kind on its training runs (untagged ones open on GenAI traces)."""


def _ensure_experiment(client: Any, experiment: str, artifacts: str | None) -> None:
    """Create ``experiment`` tagged with its kind, or tag an existing one that has no kind yet."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        try:
            client.create_experiment(experiment, artifact_location=artifacts,
                                     tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            return
        except MlflowException as exc:
            if "already exists" not in str(exc).lower():
                raise
        exp = client.get_experiment_by_name(experiment)
    if exp is not None and exp.lifecycle_stage == "active" and EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


TRACKING_TIMEOUT_ENV = "DEEPGALAXY_TRACKING_TIMEOUT"
DEFAULT_TRACKING_TIMEOUT_S = 5.0
"""How long :func:`check_server` waits for a tracking server's answer (``DEEPGALAXY_TRACKING_TIMEOUT`` seconds)."""


def tracking_timeout_s() -> float:
    """The wait for a tracking server, in seconds: ``DEEPGALAXY_TRACKING_TIMEOUT`` or 5."""
    text = os.environ.get(TRACKING_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TRACKING_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise DeepGalaxyError(f"{TRACKING_TIMEOUT_ENV}={text!r}: give a number of seconds above 0, e.g. 10")
    return value


def check_server(tracking_uri: str) -> None:
    """For an ``http(s)://`` store: GET ``<uri>/health``, waiting at most :func:`tracking_timeout_s`; any HTTP
    answer will do. Without it MLflow retries an unreachable server for minutes before it says anything."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    timeout = tracking_timeout_s()
    try:
        with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout):
            return
    except urllib.error.HTTPError:  # it answered (a proxy may not know /health): reachable
        return
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DeepGalaxyError(
            f"the MLflow tracking server {tracking_uri} cannot be reached ({reason}; deepgalaxy waits at most "
            f"{timeout:g} s, {TRACKING_TIMEOUT_ENV}=SECONDS changes that): start it (mlflow server --port ...), "
            "correct --tracking-uri / MLFLOW_TRACKING_URI, or use a local store (--tracking-uri sqlite:///mlflow.db)"
        ) from None


SQLITE_HEADER = b"SQLite format 3\x00"
MLFLOW_TABLE = "experiments"


def check_sqlite(db: Path) -> None:
    """Refuse a database file that is not MLflow's (not SQLite at all, or another program's tables) before MLflow
    migrates it: it is left exactly as it is, and the error says what to do."""
    if not db.is_file() or db.stat().st_size == 0:
        return
    import sqlite3

    why = None
    with open(db, "rb") as handle:
        header = handle.read(len(SQLITE_HEADER))
    if header != SQLITE_HEADER:
        why = "it is not an SQLite database"
    else:
        try:
            with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as con:
                tables = {row[0] for row in con.execute("select name from sqlite_master where type = 'table'")}
        except sqlite3.Error as exc:
            tables, why = set(), f"SQLite cannot read it: {exc}"
        if tables and MLFLOW_TABLE not in tables:
            why = f"an SQLite database of another program (tables {', '.join(sorted(tables)[:5])})"
    if why:
        raise DeepGalaxyError(
            f"{db.resolve()} is not an MLflow store ({why}); deepgalaxy leaves it as it is. Move it away, or point "
            f"--tracking-uri (or MLFLOW_TRACKING_URI) at another store, e.g. "
            f"sqlite:///{db.resolve().parent / 'deepgalaxy-mlflow.db'}"
        )


@contextlib.contextmanager
def _file_lock(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    import fcntl

    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
        "mlflow.runName": f"{spec.card.name}-{spec.framework}-w{spec.workers}",
    }
    if dataset_fingerprint:
        tags["dataset_fingerprint"] = dataset_fingerprint
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    tags.update(extra or {})
    return tags


class Tracker:
    """Owns the MLflow run of one training on rank 0: start or reopen it, log, attach artifacts, end it."""

    def __init__(self, spec: RunSpec) -> None:
        import mlflow

        self.spec = spec
        self.mlflow = mlflow
        self.tracking_uri = resolve_tracking_uri(spec.tracking_uri)
        mlflow.set_tracking_uri(self.tracking_uri)
        self.run_id: str | None = None
        self.experiment_id: str | None = None

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
        return self.run_id

    def log_start(self, dataset_fingerprint: str | None, extra_tags: Mapping[str, str] | None = None,
                  extra_params: Mapping[str, Any] | None = None) -> None:
        """Params (the flattened spec) and tags; only once per run (MLflow params cannot change)."""
        params = run_params(self.spec)
        params.update({k: str(v) for k, v in (extra_params or {}).items()})
        self.mlflow.log_params(params)
        self.mlflow.set_tags(run_tags(self.spec, dataset_fingerprint, extra_tags))

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Metrics of one finished epoch at step ``epoch`` (0-based)."""
        clean = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
        self.mlflow.log_metrics(clean, step=epoch)

    def log_figures(self, history: Sequence[Mapping[str, float]], confusion: np.ndarray | None,
                    originals: np.ndarray | None, reconstructions: np.ndarray | None) -> None:
        """Curves (loss and accuracy per epoch, like the paper's Figs. 3-4), confusion matrix, reconstructions."""
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            paths = [plot_curves(history, out / "curves.png")]
            if confusion is not None:
                paths.append(plot_confusion(confusion, out / "confusion_matrix.png"))
            if originals is not None and reconstructions is not None:
                paths.append(plot_reconstructions(originals, reconstructions, out / "reconstructions.png"))
            for path in paths:
                self.mlflow.log_artifact(str(path), artifact_path="figures")

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        self.mlflow.log_dict(dict(data), name)

    def end(self, status: str = "FINISHED") -> None:
        """End the run with ``FINISHED``, ``FAILED`` or ``KILLED``."""
        if self.mlflow.active_run() is not None:
            self.mlflow.end_run(status=status)


# --- figures -------------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: Sequence[Mapping[str, float]], path: Path) -> Path:
    """Training and validation loss (left) and accuracy (right) against epoch."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = np.arange(1, len(history) + 1)
    has_acc = any("val/accuracy" in h for h in history)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5, 4), squeeze=False)
    ax = axes[0][0]
    for key, label in (("train/loss", "training"), ("val/loss", "validation")):
        ys = [h.get(key, np.nan) for h in history]
        ax.plot(epochs, ys, marker="o", label=label)
    ax.set(xlabel="epoch", ylabel="loss", title="loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    if has_acc:
        ax = axes[0][1]
        for key, label in (("train/accuracy", "training"), ("val/accuracy", "validation"),
                           ("val/within_k_accuracy", "validation, within k")):
            ys = [h.get(key, np.nan) for h in history]
            ax.plot(epochs, ys, marker="o", label=label)
        ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(confusion: np.ndarray, path: Path) -> Path:
    """Row-normalised confusion matrix (true class down, predicted class across)."""
    plt = _pyplot()
    cm = np.asarray(confusion, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set(xlabel="predicted class", ylabel="true class", title="validation confusion matrix")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_reconstructions(originals: np.ndarray, reconstructions: np.ndarray, path: Path) -> Path:
    """Validation images (top row) and their reconstructions (bottom row)."""
    plt = _pyplot()
    n = min(len(originals), 8)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4), squeeze=False)
    for i in range(n):
        for row, images in enumerate((originals, reconstructions)):
            img = np.clip(np.asarray(images[i], dtype=np.float32), 0, 1)
            ax = axes[row][i]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img[..., :3], cmap="gray" if img.shape[-1] == 1 else None)
            ax.axis("off")
    axes[0][0].set_title("input", fontsize=8, loc="left")
    axes[1][0].set_title("reconstruction", fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def ui_hint(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on the store ``tracking_uri`` points at, runnable from the user's shell:
    this environment's ``mlflow`` by its full path when it is not the one on PATH, and the store as an absolute
    ``--backend-store-uri`` (``mlflow ui`` alone opens whatever store its working directory has)."""
    import shlex

    from deepgalaxy.core.shell import script_command

    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    store = tracking_uri
    if store.startswith("sqlite:///") and not os.path.isabs(store[len("sqlite:///"):]):
        store = f"sqlite:///{os.path.abspath(store[len('sqlite:///'):])}"
    elif "://" not in store and not store.startswith("file:"):
        store = os.path.abspath(store)
    return f"{script_command('mlflow')} ui --backend-store-uri {shlex.quote(store)}   (then open http://127.0.0.1:5000)"
