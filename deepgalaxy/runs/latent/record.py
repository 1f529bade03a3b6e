"""One finished MLflow run per latent command that logs (``latent cluster``, ``latent evaluate``), named after the model
version it measured."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deepgalaxy.core.location import StoreLocation
from deepgalaxy.core.search import LatentIndex
from deepgalaxy.runs.latent.index import SOURCE_FILE, index_path

DEFAULT_EXPERIMENT = "deepgalaxy-latent"


def log_run(kind: str, index: LatentIndex, data: str | os.PathLike[str], params: Mapping[str, Any],
            metrics: Mapping[str, float], tracking_uri: str | None, experiment: str,
            steps: Mapping[str, Sequence[float]] | None = None, artifacts: Sequence[Path] = ()) -> str:
    """One finished MLflow run of ``kind`` with the model's name, version and run id as params and tags."""
    import math

    import mlflow
    from mlflow.entities import Metric, RunTag

    from deepgalaxy.tracking import new_run, resolve_tracking_uri

    ref = index.model
    uri = resolve_tracking_uri(tracking_uri)
    tags = {"deepgalaxy.kind": kind, "model_name": ref.name, "model_version": ref.version,
            "mlflow.runName": f"{kind}-{ref.name}-v{ref.version}"}
    if ref.run_id:
        tags["model_run_id"] = ref.run_id
    all_params = {"model_name": ref.name, "model_version": ref.version, "model_run_id": ref.run_id or "-",
                  "data": StoreLocation(data).absolute(), "index_method": index.method,
                  "latent_dim": index.dim, **params}
    if index.recall:
        all_params["index_recall"] = f"{index.recall.get('recall', float('nan')):.4f}@{index.recall.get('k')}"
    rid = new_run(uri, experiment, tags, all_params)
    client = mlflow.MlflowClient(tracking_uri=uri)
    now = int(time.time() * 1000)
    ms = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None and math.isfinite(float(v))]
    for key, values in (steps or {}).items():
        ms += [Metric(key, float(v), now, i) for i, v in enumerate(values) if math.isfinite(float(v))]
    client.log_batch(rid, metrics=ms, tags=[RunTag("data_fingerprint", _fingerprint(index_path(data, ref)))])
    for path in artifacts:
        client.log_artifact(rid, str(path))
    client.set_terminated(rid, "FINISHED")
    return rid


def _fingerprint(index_dir: Path) -> str:
    try:
        return str(json.loads((index_dir / SOURCE_FILE).read_text()).get("dataset_fingerprint", "-"))
    except (OSError, json.JSONDecodeError):
        return "-"


__all__ = ["DEFAULT_EXPERIMENT", "log_run"]
