"""One finished MLflow run per latent command that logs (``cluster``, ``evaluate-search``), named after the model
version it measured."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deepgalaxy.core.search import LatentIndex, ModelRef
from deepgalaxy.runs.latent.index import SOURCE_FILE, index_path

DEFAULT_EXPERIMENT = "deepgalaxy-latent"


def log_run(kind: str, index: LatentIndex, data: str | os.PathLike[str], params: Mapping[str, Any],
            metrics: Mapping[str, float], tracking_uri: str | None, experiment: str,
            steps: Mapping[str, Sequence[float]] | None = None, artifacts: Sequence[Path] = ()) -> str:
    """One finished MLflow run of ``kind`` with the model's name, version and run id as params and tags."""
    import math

    from mlflow.entities import Metric, Param, RunTag

    ref = index.model
    client, rid = _create_run(kind, ref, tracking_uri, experiment)
    now = int(time.time() * 1000)
    all_params = {"model_name": ref.name, "model_version": ref.version, "model_run_id": ref.run_id or "-",
                  "data": str(Path(data).expanduser().resolve()), "index_method": index.method,
                  "latent_dim": index.dim, **params}
    if index.recall:
        all_params["index_recall"] = f"{index.recall.get('recall', float('nan')):.4f}@{index.recall.get('k')}"
    ms = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None and math.isfinite(float(v))]
    for key, values in (steps or {}).items():
        ms += [Metric(key, float(v), now, i) for i, v in enumerate(values) if math.isfinite(float(v))]
    client.log_batch(rid, metrics=ms, params=[Param(k, str(v)) for k, v in all_params.items()],
                     tags=[RunTag("data_fingerprint", _fingerprint(index_path(data, ref)))])
    for path in artifacts:
        client.log_artifact(rid, str(path))
    client.set_terminated(rid, "FINISHED")
    return str(rid)


def _create_run(kind: str, ref: ModelRef, tracking_uri: str | None, experiment: str) -> tuple[Any, str]:
    """A new MLflow run of ``kind`` for model version ``ref`` in ``experiment``, with its tags: (client, run id).

    The one place the latent commands create a run (to be replaced by the tracking package's run creation)."""
    import mlflow

    from deepgalaxy.runs.tracking import git_commit, prepare_store, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    prepare_store(uri, experiment)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    tags = {"deepgalaxy.kind": kind, "model_name": ref.name, "model_version": ref.version,
            "mlflow.runName": f"{kind}-{ref.name}-v{ref.version}"}
    if ref.run_id:
        tags["model_run_id"] = ref.run_id
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    run = client.create_run(exp.experiment_id, tags=tags)
    return client, str(run.info.run_id)


def _fingerprint(index_dir: Path) -> str:
    try:
        return str(json.loads((index_dir / SOURCE_FILE).read_text()).get("dataset_fingerprint", "-"))
    except (OSError, json.JSONDecodeError):
        return "-"


__all__ = ["DEFAULT_EXPERIMENT", "log_run"]
