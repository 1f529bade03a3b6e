"""Where a command's MLflow runs go (the tracking URI) and how a user opens them (the MLflow UI command)."""

from __future__ import annotations

import os


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """The tracking URI a training uses: ``explicit``, else ``MLFLOW_TRACKING_URI``, else MLflow's default.

    MLflow's default resolves to an absolute ``sqlite:////.../mlflow.db`` of the working directory, so every rank
    and a later ``--resume`` write to the same store.
    """
    if explicit:
        return explicit
    import mlflow

    return str(mlflow.get_tracking_uri())


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
