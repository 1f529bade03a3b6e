"""The MLflow store a command writes to: checked (server answers, SQLite file is MLflow's) and prepared (tables,
the experiment tagged with its kind) once, before any run is created in it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deepgalaxy.core.errors import DeepGalaxyError
from deepgalaxy.core.settings import seconds_from_env


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
    return seconds_from_env(TRACKING_TIMEOUT_ENV, DEFAULT_TRACKING_TIMEOUT_S)


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
        except sqlite3.Error:  # busy, or a journal another process is writing: not a verdict on whose file it is
            tables = set()
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
