"""Queries of the latent index: recommendations for store rows and image files, with latent distance, SSIM and
metadata (``deepgalaxy latent search``)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deepgalaxy.core.errors import DeepGalaxyError
from deepgalaxy.core.search import LatentIndex, LatentIndexError, ModelRef, exact_knn
from deepgalaxy.runs.latent.clusters import load_clusters
from deepgalaxy.runs.latent.images import image_loader, open_store, read_image
from deepgalaxy.runs.latent.index import index_path, open_index

if TYPE_CHECKING:
    from deepgalaxy.core.model import Model


@dataclass
class Neighbour:
    """One recommendation: its row in the index, image id, latent distance, SSIM to the query and metadata."""

    row: int
    id: Any
    distance: float
    ssim: float
    meta: dict[str, Any] = field(default_factory=dict)
    image: np.ndarray | None = field(default=None, repr=False)


@dataclass
class QueryResult:
    """A query image (from a file or a row of the store) and its recommendations, nearest first."""

    name: str
    image: np.ndarray
    neighbours: list[Neighbour]
    row: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    cluster: int | None = None


@dataclass
class SearchResult:
    """Everything ``deepgalaxy latent search`` shows: per query its neighbours, and how they were found."""

    model: ModelRef
    data: str
    k: int
    method: str
    queries: list[QueryResult]
    seconds: float = 0.0

    def rows(self) -> list[dict[str, Any]]:
        """One flat record per (query, neighbour) for a table or JSON."""
        out = []
        for q in self.queries:
            for rank, nb in enumerate(q.neighbours, 1):
                out.append({"query": q.name, "rank": rank, "row": nb.row, "id": _plain(nb.id),
                            "distance": nb.distance, "ssim": nb.ssim, **{k: _plain(v) for k, v in nb.meta.items()}})
        return out


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def row_meta(index: LatentIndex, row: int) -> dict[str, Any]:
    """Row ``row``'s metadata columns (class, simulation, camera, mass ratio, ...) as plain Python values."""
    return {k: _plain(v[row]) for k, v in index.metadata.items()}


def search(model: Model, data: str | os.PathLike[str], *, rows: Sequence[int] = (),
           images: Sequence[str | os.PathLike[str]] = (), k: int = 6, within_cluster: bool = False,
           index: LatentIndex | None = None) -> SearchResult:
    """Recommendations for store rows (``rows``, themselves excluded) and image files (``images``).

    Each neighbour carries its latent distance, its SSIM to the query (scikit-image) and its metadata.
    ``within_cluster``: only members of the query's spectral cluster (from ``deepgalaxy latent cluster``), by distance.
    """
    from deepgalaxy.core.graph import cluster_recommendations
    from deepgalaxy.core.ssim import ssim_one_to_many

    if not rows and not images:
        raise DeepGalaxyError("give a query: an image file, or --index-of ROW (a row of the store)")
    ds = open_store(data, model)
    index = index if index is not None else open_index(model, data)
    clusters = load_clusters(index_path(data, index.model)) if within_cluster else None
    if clusters is not None and len(clusters) != len(index):
        raise LatentIndexError("saved clusters do not match the index; run `deepgalaxy latent cluster` again")
    load = image_loader(ds)
    start = time.perf_counter()
    results: list[QueryResult] = []
    if rows:
        r = np.asarray(rows, dtype=np.int64)
        if r.min() < 0 or r.max() >= len(index):
            raise DeepGalaxyError(f"--index-of {r.tolist()}: rows must lie in 0..{len(index) - 1} (the store's images)")
        if clusters is not None:
            idx, dist = cluster_recommendations(index, clusters, r, k)
        else:
            idx, dist = index.recommend(r, k)
        query_images = load(r)
        for i, row in enumerate(r.tolist()):
            results.append(QueryResult(f"row {row}", query_images[i], [], row, row_meta(index, row),
                                       None if clusters is None else int(clusters[row])))
            results[-1].neighbours = _neighbours(index, load, query_images[i], idx[i], dist[i], ssim_one_to_many)
    if images:
        size, channels = model.card.input_size, model.card.channels
        pics = np.stack([read_image(p, size, channels) for p in images])
        z = model.encode(pics)
        if clusters is not None:
            from deepgalaxy.core.graph import assign_clusters

            labels = assign_clusters(index, clusters, z)
            idx = np.full((len(z), k), -1, dtype=np.int64)
            dist = np.full((len(z), k), np.inf, dtype=np.float32)
            for i, label in enumerate(labels.tolist()):
                members = np.flatnonzero(clusters == label)
                mi, md = exact_knn(z[i : i + 1], index.z[members], min(k, len(members)))
                idx[i, : mi.shape[1]], dist[i, : md.shape[1]] = members[mi[0]], md[0]
        else:
            labels = None
            idx, dist = model.similar(pics, index, k)
        for i, p in enumerate(images):
            results.append(QueryResult(Path(p).name, pics[i], [], None, {},
                                       None if labels is None else int(labels[i])))
            results[-1].neighbours = _neighbours(index, load, pics[i], idx[i], dist[i], ssim_one_to_many)
    return SearchResult(index.model, str(data), k, "cluster" if within_cluster else index.method, results,
                        time.perf_counter() - start)


def _neighbours(index: LatentIndex, load: Callable[[np.ndarray], np.ndarray], query: np.ndarray, idx: np.ndarray,
                dist: np.ndarray, ssim_fn: Callable[[Any, Any], np.ndarray]) -> list[Neighbour]:
    valid = idx >= 0
    rows = idx[valid]
    if not len(rows):
        return []
    pics = load(rows)
    scores = ssim_fn(query, pics)
    return [Neighbour(int(row), _plain(index.ids[row]), float(d), float(s), row_meta(index, int(row)), pics[i])
            for i, (row, d, s) in enumerate(zip(rows.tolist(), dist[valid].tolist(), scores.tolist(), strict=True))]


__all__ = ["Neighbour", "QueryResult", "SearchResult", "row_meta", "search"]
