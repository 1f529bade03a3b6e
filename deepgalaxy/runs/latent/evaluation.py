"""How good the latent recommendations are: their SSIM against random pairs and the SSIM oracle, and class errors
(``deepgalaxy latent evaluate``)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from deepgalaxy.core.search import LatentIndex, ModelRef
from deepgalaxy.runs.latent.clusters import load_clusters
from deepgalaxy.runs.latent.images import image_loader, open_store
from deepgalaxy.runs.latent.index import index_path, open_index
from deepgalaxy.runs.latent.record import DEFAULT_EXPERIMENT, log_run

if TYPE_CHECKING:
    from deepgalaxy.core.model import Model
    from deepgalaxy.core.ssim import RecommendationReport


@dataclass
class Evaluation:
    """How a model's top-k recommendations score under SSIM, with where it was logged.

    ``report`` compares like with like: recommendations, random pairs and the SSIM oracle all draw from the same
    ``candidates`` images (every image of the store, or a random pool of them plus the queries when the store is
    large, since the oracle costs one SSIM per query and candidate). ``full`` scores the recommendations a user
    gets from the whole index (mean SSIM, class difference, kNN class error); on a store evaluated in full both
    agree.
    """

    report: RecommendationReport
    full: dict[str, float]
    candidates: int
    rows: int
    model: ModelRef
    method: str
    seconds: float
    run_id: str | None = None
    latency_ms: float | None = None

    @property
    def pooled(self) -> bool:
        """Whether the oracle comparison ran on a pool smaller than the store."""
        return self.candidates < self.rows


def evaluate_search(model: Model, data: str | os.PathLike[str], k: int = 6, n_queries: int | None = 200,
                    pool_size: int | None = 1000, seed: int = 0, within_cluster: bool = False,
                    tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT, log: bool = True,
                    progress: bool = True) -> Evaluation:
    """Mean SSIM of the top-k recommendations vs random pairs (floor) and the SSIM oracle (ceiling), class errors.

    ``n_queries`` images are sampled as queries (``None``: every image). The oracle compares each query with every
    candidate; with ``pool_size`` smaller than the store (``None``: every image) the candidates are the queries
    plus a random pool, and the latent recommendations and random pairs are drawn from the same candidates, so
    the three numbers stay comparable. The recommendations from the whole index are scored as well
    (:attr:`Evaluation.full`). Logged to MLflow with the model name, version and run id.
    """
    from deepgalaxy.core.graph import cluster_recommendations
    from deepgalaxy.core.ssim import evaluate_recommendations, ssim_pairs

    ds = open_store(data, model)
    index = open_index(model, data)
    n = len(index)
    rng = np.random.default_rng(seed)
    rows = np.arange(n) if n_queries is None or n_queries >= n else np.sort(rng.choice(n, n_queries, replace=False))
    clusters = load_clusters(index_path(data, index.model)) if within_cluster else None
    labels = index.metadata.get("label")
    load = image_loader(ds)
    start = time.perf_counter()
    if clusters is not None:
        rec, _ = cluster_recommendations(index, clusters, rows, k)
    else:
        rec, _ = index.recommend(rows, k)
    latency_ms = (time.perf_counter() - start) * 1e3 / max(len(rows), 1)
    # the recommendations a user gets from the whole index
    valid = rec >= 0
    pairs = np.stack([np.repeat(rows, k)[valid.ravel()], rec[valid]], axis=1)
    full = {"ssim_top_k": float(ssim_pairs(load, pairs).mean())}
    if labels is not None:
        lab = labels.astype(np.float64)
        diff = np.where(valid, np.abs(lab[np.where(valid, rec, 0)] - lab[rows][:, None]), np.nan)
        estimate = np.array([lab[r[v]].mean() if v.any() else np.nan for r, v in zip(rec, valid, strict=True)])
        full["class_diff_top_k"] = float(np.nanmean(diff))
        full["knn_class_mae"] = float(np.nanmean(np.abs(estimate - lab[rows])))
    # like for like: recommendations, random pairs and the oracle over the same candidates
    if pool_size is None or pool_size >= n - 1:
        universe = np.arange(n)
        report = evaluate_recommendations(load, rows, rec, n_images=n, labels=labels, pool_size=n, seed=seed,
                                          progress=progress)
    else:
        universe = np.union1d(rng.choice(n, size=pool_size, replace=False), rows)
        pos = np.searchsorted(universe, rows)
        if clusters is not None:
            sub_rec, _ = cluster_recommendations(index.z[universe], clusters[universe], pos, k)
        else:
            sub = LatentIndex.build(index.z[universe], index.model, method="exact")
            sub_rec, _ = sub.recommend(pos, k)
        report = evaluate_recommendations(lambda r: load(universe[np.asarray(r)]), pos, sub_rec,
                                          n_images=len(universe), labels=None if labels is None else labels[universe],
                                          pool_size=len(universe), seed=seed, progress=progress)
    seconds = time.perf_counter() - start
    method = "cluster" if within_cluster else index.method
    result = Evaluation(report, full, len(universe), n, index.model, method, seconds, latency_ms=latency_ms)
    if log:
        params = {"k": k, "queries": report.queries, "candidates": len(universe), "seed": seed,
                  "recommendations": method, "rows": n}
        metrics = {key: float(v) for key, v in report.summary().items()
                   if v is not None and key not in ("k", "queries", "pool_size")}
        metrics.update({f"full_{key}": v for key, v in full.items()})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "evaluation.json"
            path.write_text(json.dumps({"model": index.model.as_dict(), "data": str(data), **params,
                                        "like_for_like": report.summary(), "full_index": full}, indent=2))
            result.run_id = log_run("evaluate-search", index, data, params,
                                    {**metrics, "search_ms_per_query": latency_ms, "seconds": seconds},
                                    tracking_uri, experiment, artifacts=[path])
    return result


__all__ = ["Evaluation", "evaluate_search"]
