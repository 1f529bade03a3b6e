"""Spectral clusters of a latent index: computed, scored against the known groupings, saved beside the index and
logged (``deepgalaxy latent cluster``; ``latent search --cluster`` reads them back)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from deepgalaxy.core.search import INDEX_FILE, LatentIndex, LatentIndexError, ModelRef
from deepgalaxy.runs.latent.index import CLUSTERS_FILE, CLUSTERS_INFO, index_path, open_index
from deepgalaxy.runs.latent.record import DEFAULT_EXPERIMENT, log_run

if TYPE_CHECKING:
    from deepgalaxy.core.graph import ClusterReport
    from deepgalaxy.core.model import Model


SCORE_COLUMNS = ("label", "stage", "mass_ratio", "camera", "sim_id")
"""Known groupings a clustering is compared with: merger time class first (the paper's), coarse merger stage
(:data:`STAGES` equal spans of the classes), then mass ratio, camera and simulation."""
STAGES = 5
"""Coarse merger stages for scoring clusters: the time classes split into this many equal spans."""
CLUSTER_SAMPLE = 6000
"""Images a clustering uses by default (the rest join by nearest neighbours): on this project's 2-core machine
a 6,000-node graph clustered in ~20 s, all 35,784 images of a 36-simulation store in ~6 minutes."""


def load_clusters(index_dir: Path) -> np.ndarray:
    """Cluster labels saved by :func:`cluster_dataset` beside the index (one per row)."""
    path = index_dir / CLUSTERS_FILE
    if not path.is_file():
        raise LatentIndexError(
            f"no spectral clusters saved for the index at {index_dir}; compute them first with "
            "`deepgalaxy latent cluster MODEL --data STORE`"
        )
    return np.asarray(np.load(path, allow_pickle=False), dtype=np.int64)


@dataclass
class ClusterOutcome:
    """A spectral clustering of the index, its scores against known groupings and where it was logged."""

    report: ClusterReport
    scores: dict[str, dict[str, float]]
    sizes: list[int]
    model: ModelRef
    sample: int
    seconds: float
    path: Path | None = None
    run_id: str | None = None

    def metrics(self) -> dict[str, float]:
        out = {k: float(v) for k, v in self.report.summary().items() if v is not None}
        for column, s in self.scores.items():
            out[f"ari_{column}"] = s["adjusted_rand"]
            out[f"purity_{column}"] = s["purity"]
        return out


def cluster_index(index: LatentIndex, n_clusters: int | None = None, k: int = 10, max_clusters: int = 71,
                  sample: int | None = None, seed: int = 0) -> tuple[ClusterReport, np.ndarray, int]:
    """Spectral clusters of every row of ``index``: ``(report on the clustered rows, labels of all rows, rows used)``.

    The kNN graph of ``k`` neighbours is built over all rows, or over a random ``sample`` of them when given
    (the rest then join the majority cluster of their 10 nearest sampled rows). Without ``n_clusters`` the
    largest gap among the ``max_clusters + 1`` smallest Laplacian eigenvalues picks it (at least 2).
    """
    from deepgalaxy.core.graph import (
        assign_clusters,
        cluster_latents,
        connected_components,
        eigengap_clusters,
        knn_graph,
        laplacian_spectrum,
    )

    n = len(index)
    rng = np.random.default_rng(seed)
    chosen = np.arange(n) if sample is None or sample >= n else np.sort(rng.choice(n, size=sample, replace=False))
    sub: np.ndarray | LatentIndex = index if len(chosen) == n else index.z[chosen]
    classes = index.metadata.get("label")
    cls = None if classes is None else classes[chosen]
    if n_clusters is None:
        w = knn_graph(sub, k)
        spectrum = laplacian_spectrum(w, max_clusters + 1)
        n_clusters = max(2, eigengap_clusters(spectrum, max_clusters), connected_components(w)[0])
    report = cluster_latents(sub, n_clusters, k=k, classes=cls, n_eigenvalues=max(30, n_clusters + 1), seed=seed)
    labels = np.empty(n, dtype=np.int64)
    labels[chosen] = report.labels
    if len(chosen) < n:
        rest = np.setdiff1d(np.arange(n), chosen)
        sampled = LatentIndex.build(index.z[chosen], index.model, method="exact")
        labels[rest] = assign_clusters(sampled, report.labels, index.z[rest], k=10)
    return report, labels, len(chosen)


def score_clusters(labels: np.ndarray, metadata: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Adjusted Rand index and purity of ``labels`` against each known grouping in ``metadata`` (labelled rows)."""
    from deepgalaxy.core.graph import adjusted_rand, purity

    columns = dict(metadata)
    if "label" in columns:
        lab = np.asarray(columns["label"], dtype=np.int64)
        num_classes = max(int(lab.max()) + 1, 71)
        columns["stage"] = np.where(lab >= 0, lab * STAGES // num_classes, -1)
    out = {}
    for column in SCORE_COLUMNS:
        if column not in columns:
            continue
        values = np.asarray(columns[column])
        known = np.isfinite(values) if values.dtype.kind == "f" else values >= 0
        if known.sum() < 2:
            continue
        _, codes = np.unique(values[known], return_inverse=True)  # floats (mass ratio) as discrete groups
        out[column] = {"adjusted_rand": adjusted_rand(codes, labels[known]), "purity": purity(codes, labels[known])}
    return out


def cluster_dataset(model: Model, data: str | os.PathLike[str], n_clusters: int | None = None, k: int = 10,
                    max_clusters: int = 71, sample: int | None = None, seed: int = 0, tracking_uri: str | None = None,
                    experiment: str = DEFAULT_EXPERIMENT, log: bool = True) -> ClusterOutcome:
    """Spectral clusters of the store's latent vectors, scored against the known classes, saved beside the index
    (for ``search --cluster``) and logged to MLflow (params, ARI/purity per grouping, the spectrum, sizes).

    ``sample``: images in the graph (``None``: up to :data:`CLUSTER_SAMPLE`; 0: all); the others join the
    majority cluster of their nearest sampled images."""
    index = open_index(model, data)
    if sample is None:
        sample = min(len(index), CLUSTER_SAMPLE)
    elif sample == 0:
        sample = len(index)
    start = time.perf_counter()
    report, labels, used = cluster_index(index, n_clusters, k, max_clusters, sample, seed)
    seconds = time.perf_counter() - start
    scores = score_clusters(labels, index.metadata)
    sizes = np.bincount(labels, minlength=report.n_clusters).tolist()
    out = ClusterOutcome(report, scores, sizes, index.model, used, seconds)
    path = index_path(data, index.model)
    if (path / INDEX_FILE).is_file():
        np.save(path / CLUSTERS_FILE, labels, allow_pickle=False)
        info = {"model": index.model.as_dict(), "k": k, "n_clusters": report.n_clusters, "sample": used,
                "seed": seed, "sizes": sizes, "scores": scores, "eigenvalues": report.eigenvalues.tolist(),
                "suggested_clusters": report.suggested_clusters, "components": report.components}
        (path / CLUSTERS_INFO).write_text(json.dumps(info, indent=2))
        out.path = path
    if log:
        params = {"k": k, "n_clusters": report.n_clusters, "requested_clusters": n_clusters or "eigengap",
                  "max_clusters": max_clusters, "sample": used, "rows": len(index), "seed": seed}
        steps = {"laplacian_eigenvalue": [float(v) for v in report.eigenvalues],
                 "cluster_size": [float(s) for s in sizes]}
        with tempfile.TemporaryDirectory() as tmp:
            spec = Path(tmp) / "spectrum.png"
            from deepgalaxy.core.figures import spectrum_figure

            spectrum_figure(report.eigenvalues, report.n_clusters, spec,
                            title=f"{index.model.name} v{index.model.version}: normalised Laplacian of the kNN graph")
            (Path(tmp) / "clusters.json").write_text(json.dumps(
                {"sizes": sizes, "scores": scores, "eigenvalues": report.eigenvalues.tolist()}, indent=2))
            out.run_id = log_run("cluster", index, data, params, {**out.metrics(), "seconds": seconds},
                                 tracking_uri, experiment, steps=steps,
                                 artifacts=[spec, Path(tmp) / "clusters.json"])
    return out


__all__ = [
    "CLUSTER_SAMPLE",
    "SCORE_COLUMNS",
    "STAGES",
    "ClusterOutcome",
    "cluster_dataset",
    "cluster_index",
    "load_clusters",
    "score_clusters",
]
