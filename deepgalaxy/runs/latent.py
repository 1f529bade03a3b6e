"""Latent-space workflows over a dataset store with a registered VAE: index, search, cluster, evaluate, interpolate.

The framework-free pieces live in :mod:`deepgalaxy.core` (``search``: :class:`LatentIndex`; ``graph``: kNN graph and
spectral clustering; ``ssim``: SSIM and the recommendation evaluation). This module joins them to a model loaded with
:func:`deepgalaxy.registry.load` and to a Zarr store, and logs results to MLflow.

An index lives beside its store, one directory per model version, so a store can be indexed by several versions::

    STORE.zarr.index/<model>-v<version>/   index.json z.npy ids.npy metadata.npz [hnsw.bin]   (LatentIndex)
                                           source.json     dataset fingerprint, card, encode timing
                                           clusters.npy    spectral cluster of every row (after `deepgalaxy cluster`)
                                           clusters.json   how they were made and how they score

Searching with a model version that has no index of its own, while an index of another version exists, is refused
with a message naming both versions and the rebuild command: vectors of two versions live in different spaces.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deepgalaxy.core.errors import DatasetError, DeepGalaxyError
from deepgalaxy.core.progress import progress_bar
from deepgalaxy.core.search import (
    INDEX_FILE,
    LatentIndex,
    LatentIndexError,
    ModelRef,
    StaleIndexError,
    exact_knn,
    rebuild_command,
)

if TYPE_CHECKING:
    from deepgalaxy.core.dataset import Dataset
    from deepgalaxy.core.graph import ClusterReport
    from deepgalaxy.core.model import Model
    from deepgalaxy.core.ssim import RecommendationReport

INDEX_SUFFIX = ".index"
SOURCE_FILE = "source.json"
CLUSTERS_FILE = "clusters.npy"
CLUSTERS_INFO = "clusters.json"
DEFAULT_EXPERIMENT = "deepgalaxy-latent"
META_COLUMNS = ("label", "sim_id", "camera", "mass_ratio", "snapshot", "time")
"""Per-image metadata kept in the index (what search results show and clusters are scored against)."""
SCORE_COLUMNS = ("label", "stage", "mass_ratio", "camera", "sim_id")
"""Known groupings a clustering is compared with: merger time class first (the paper's), coarse merger stage
(:data:`STAGES` equal spans of the classes), then mass ratio, camera and simulation."""
STAGES = 5
"""Coarse merger stages for scoring clusters: the time classes split into this many equal spans."""
CLUSTER_SAMPLE = 6000
"""Images a clustering uses by default (the rest join by nearest neighbours): on this project's 2-core machine
a 6,000-node graph clustered in ~20 s, all 35,784 images of a 36-simulation store in ~6 minutes."""


# --- the model and where its index lives -----------------------------------------------------------------------


def load_model(name: str | Path, version: int | None = None, tracking_uri: str | None = None,
               framework: str | None = None) -> Model:
    """A registered model (``NAME``, ``NAME@ALIAS`` with optional ``version``) or a saved directory, with a VAE."""
    from deepgalaxy import registry

    model = registry.load(name, version=version, framework=framework, tracking_uri=tracking_uri)
    if "latent" not in model.card.parts:
        raise DeepGalaxyError(
            f"model {str(name)!r} (card {model.card.name!r}, task {model.card.task!r}) has no VAE latent space; "
            "latent search needs a vae-* or full-* card"
        )
    return model


def model_ref(model: Model) -> ModelRef:
    """Which model produced a set of vectors: registered name/version/run, else the card and a weights hash."""
    src = model.source
    if src.get("name") and src.get("version") is not None:
        return ModelRef(str(src["name"]), str(src["version"]), None if not src.get("run_id") else str(src["run_id"]))
    digest = hashlib.sha256()
    for key, value in sorted(model.get_weights().items()):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return ModelRef(model.card.name, f"weights-{digest.hexdigest()[:12]}")


def _rebuild(model: Model, ref: ModelRef, data: str | os.PathLike[str]) -> str:
    """The command that rebuilds ``model``'s index: by registered name, or by absolute path for a saved folder
    (a bare card name would load the registered model instead)."""
    folder = model.source.get("path")
    return rebuild_command(str(Path(folder).resolve()) if folder else ref.name, str(data))


def index_root(data: str | os.PathLike[str]) -> Path:
    """``STORE.zarr`` -> ``STORE.zarr.index``: the directory holding a store's latent indexes."""
    p = Path(data).expanduser().resolve()
    return p.with_name(p.name + INDEX_SUFFIX)


def index_path(data: str | os.PathLike[str], ref: ModelRef) -> Path:
    """Where the index of model version ``ref`` over store ``data`` lives."""
    return index_root(data) / f"{ref.name}-v{ref.version}"


def open_store(data: str | os.PathLike[str], model: Model) -> Dataset:
    """Open the store ``data``; refuse images of another shape than ``model``'s card takes."""
    from deepgalaxy.core.dataset import open_dataset

    ds = open_dataset(Path(data))
    ds.check_shape(model.card.input_shape, f"model {model.card.name!r}")
    return ds


def image_loader(ds: Dataset) -> Callable[[np.ndarray], np.ndarray]:
    """Images of index rows (rows are positions in ``ds.indices``)."""
    return lambda rows: ds.images(ds.indices[np.asarray(rows, dtype=np.int64)])


# --- building and opening an index -----------------------------------------------------------------------------


def encode_dataset(model: Model, ds: Dataset, batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """Latent means z ``(N, latent_dim)`` of every image of ``ds``, read a few chunks at a time."""
    n = len(ds)
    step = max(batch_size, ds.chunk_len) * max(1, 512 // max(batch_size, ds.chunk_len))
    out = np.empty((n, model.card.latent_dim), dtype=np.float32)
    bar = progress_bar(progress, n, f"encoding {ds.path.name} with {model.card.name}")
    for start in range(0, n, step):
        rows = ds.indices[start : start + step]
        out[start : start + len(rows)] = model.encode(ds.images(rows), batch_size=batch_size)
        bar.update(len(rows))
    bar.close()
    return out


@dataclass
class BuiltIndex:
    """An index written by :func:`build_index`, where it is and how long encoding took."""

    index: LatentIndex
    path: Path
    encode_s: float
    build_s: float

    def summary(self) -> str:
        ix = self.index
        recall = f", recall@{ix.recall.get('k')} {ix.recall['recall']:.3f}" if ix.recall else ""
        return (f"indexed {len(ix):,} images of {ix.data} with {ix.model}: z {ix.dim}-d, {ix.method} search{recall}; "
                f"encoded in {self.encode_s:.1f} s ({len(ix) / max(self.encode_s, 1e-9):.0f} img/s), "
                f"index built in {self.build_s:.1f} s\nsaved to {self.path}")


def build_index(model: Model, data: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                batch_size: int = 64, method: str = "auto", progress: bool = True) -> BuiltIndex:
    """Encode every image of the store ``data`` with ``model`` and save a :class:`LatentIndex` beside the store.

    The index records the model name, version and run id, the store and its fingerprint, and per-image metadata
    (class, simulation, camera, mass ratio, snapshot, time). ``method``: ``auto`` (exact up to
    :data:`~deepgalaxy.core.search.EXACT_THRESHOLD` vectors, HNSW above, with its recall measured), ``exact``, ``hnsw``.
    """
    ds = open_store(data, model)
    ref = model_ref(model)
    start = time.perf_counter()
    z = encode_dataset(model, ds, batch_size, progress)
    encode_s = time.perf_counter() - start
    meta = ds.metadata
    start = time.perf_counter()
    index = LatentIndex.build(z, ref, ids=ds.indices, metadata={k: meta[k] for k in META_COLUMNS if k in meta},
                              data=str(ds.path.resolve()), method=method, progress=progress)  # type: ignore[arg-type]
    build_s = time.perf_counter() - start
    path = Path(out) if out is not None else index_path(ds.path, ref)
    index.save(path)
    for stale in (path / CLUSTERS_FILE, path / CLUSTERS_INFO):  # clusters of an earlier build no longer apply
        stale.unlink(missing_ok=True)
    source = {"dataset_fingerprint": ds.fingerprint(), "rows": len(ds), "image_shape": list(ds.image_shape),
              "card": model.card.model_dump(mode="json"), "framework": model.framework,
              "encode_s": encode_s, "build_s": build_s}
    (path / SOURCE_FILE).write_text(json.dumps(source, indent=2))
    return BuiltIndex(index, path, encode_s, build_s)


def open_index(model: Model, data: str | os.PathLike[str], path: str | os.PathLike[str] | None = None) -> LatentIndex:
    """The index of ``model``'s version over ``data``; refuse one built with another version or from another store.

    Without ``path`` the index is looked up beside the store. When this version has none but another version of
    the model does, :class:`StaleIndexError` names both versions and the command that rebuilds it.
    """
    ref = model_ref(model)
    target = Path(path) if path is not None else index_path(data, ref)
    if not (target / INDEX_FILE).is_file():
        if path is not None:
            raise LatentIndexError(
                f"{target} is not a latent index; build one with `{_rebuild(model, ref, data)}`"
            )
        others = sorted(index_root(data).glob(f"{ref.name}-v*/{INDEX_FILE}"), key=lambda p: p.stat().st_mtime)
        if not others:
            raise LatentIndexError(
                f"no latent index of {ref.name} version {ref.version} for {data}; build it with "
                f"`{_rebuild(model, ref, data)}`"
            )
        target = others[-1].parent  # loading it with the expected version raises StaleIndexError, naming both
    index = LatentIndex.load(target, expected_model_ref=ref, data=data)
    _check_store(index, target, data, model, ref)
    return index


def _check_store(index: LatentIndex, where: Path, data: str | os.PathLike[str], model: Model, ref: ModelRef) -> None:
    """Refuse an index whose store was rewritten since (other images or metadata under the same rows)."""
    from deepgalaxy.core.dataset import open_dataset

    info_path = where / SOURCE_FILE
    if not info_path.is_file():
        return
    info = json.loads(info_path.read_text())
    ds = open_dataset(Path(data))
    if info.get("dataset_fingerprint") not in (None, ds.fingerprint()) or len(ds) != len(index):
        raise StaleIndexError(
            f"latent index at {where} was built from another version of the store {data} (its images or metadata "
            f"changed: {info.get('rows')} rows then, {len(ds)} now). Rebuild it: "
            f"`{_rebuild(model, ref, data)}`"
        )


# --- queries ---------------------------------------------------------------------------------------------------


def read_image(path: str | os.PathLike[str], size: int, channels: int) -> np.ndarray:
    """An image file as uint8 ``(size, size, channels)``: grey/colour converted, resized with anti-aliasing."""
    from skimage import color, io, transform, util

    p = Path(path).expanduser()
    if not p.is_file():
        raise DeepGalaxyError(f"query image {p} does not exist; give a PNG/JPEG path or --index-of ROW with --data")
    try:
        img = util.img_as_float(io.imread(str(p)))  # type: ignore[no-untyped-call]
    except Exception as exc:  # any decoder failure means a bad input file
        raise DeepGalaxyError(f"cannot read query image {p}: {type(exc).__name__}: {exc}") from None
    if img.ndim == 3 and img.shape[2] == 4:
        img = color.rgba2rgb(img)  # type: ignore[no-untyped-call]
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if channels == 1 and img.ndim == 3:
        img = color.rgb2gray(img)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] != channels:
        img = np.repeat(img[:, :, :1], channels, axis=2)
    if img.shape[:2] != (size, size):
        img = transform.resize(img, (size, size, channels), anti_aliasing=True)  # type: ignore[no-untyped-call]
    return np.asarray(np.clip(np.rint(img * 255.0), 0, 255), dtype=np.uint8)


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
    """Everything ``deepgalaxy search`` shows: per query its neighbours, and how they were found."""

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


def _meta(index: LatentIndex, row: int) -> dict[str, Any]:
    return {k: _plain(v[row]) for k, v in index.metadata.items()}


def load_clusters(index_dir: Path) -> np.ndarray:
    """Cluster labels saved by :func:`cluster_dataset` beside the index (one per row)."""
    path = index_dir / CLUSTERS_FILE
    if not path.is_file():
        raise LatentIndexError(
            f"no spectral clusters saved for the index at {index_dir}; compute them first with "
            "`deepgalaxy cluster MODEL --data STORE`"
        )
    return np.asarray(np.load(path, allow_pickle=False), dtype=np.int64)


def search(model: Model, data: str | os.PathLike[str], *, rows: Sequence[int] = (),
           images: Sequence[str | os.PathLike[str]] = (), k: int = 6, within_cluster: bool = False,
           index: LatentIndex | None = None) -> SearchResult:
    """Recommendations for store rows (``rows``, themselves excluded) and image files (``images``).

    Each neighbour carries its latent distance, its SSIM to the query (scikit-image) and its metadata.
    ``within_cluster``: only members of the query's spectral cluster (from ``deepgalaxy cluster``), by distance.
    """
    from deepgalaxy.core.graph import cluster_recommendations
    from deepgalaxy.core.ssim import ssim_one_to_many

    if not rows and not images:
        raise DeepGalaxyError("give a query: an image file, or --index-of ROW (a row of the store)")
    ds = open_store(data, model)
    index = index if index is not None else open_index(model, data)
    clusters = load_clusters(index_path(data, index.model)) if within_cluster else None
    if clusters is not None and len(clusters) != len(index):
        raise LatentIndexError("saved clusters do not match the index; run `deepgalaxy cluster` again")
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
            results.append(QueryResult(f"row {row}", query_images[i], [], row, _meta(index, row),
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
    return [Neighbour(int(row), _plain(index.ids[row]), float(d), float(s), _meta(index, int(row)), pics[i])
            for i, (row, d, s) in enumerate(zip(rows.tolist(), dist[valid].tolist(), scores.tolist(), strict=True))]


# --- clusters --------------------------------------------------------------------------------------------------


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


# --- evaluation ------------------------------------------------------------------------------------------------


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


# --- interpolation ---------------------------------------------------------------------------------------------


def query_images(model: Model, refs: Sequence[str],
                 data: str | os.PathLike[str] | None) -> tuple[np.ndarray, list[str]]:
    """Images for ``--from/--to`` values: a store row number (with ``data``) or an image file."""
    out, names = [], []
    ds = None
    for ref in refs:
        if str(ref).lstrip("-").isdigit() and not Path(ref).is_file():
            if data is None:
                raise DeepGalaxyError(f"{ref!r} looks like a row number: give --data STORE, or an image file path")
            ds = ds or open_store(data, model)
            row = int(ref)
            if not 0 <= row < len(ds):
                raise DatasetError(f"{data}: row {row} is out of range 0..{len(ds) - 1}")
            out.append(ds.images(ds.indices[[row]])[0])
            meta = {k: v[row] for k, v in ds.metadata.items()}
            names.append(f"row {row} (class {int(meta['label'])})" if "label" in meta else f"row {row}")
        else:
            out.append(read_image(ref, model.card.input_size, model.card.channels))
            names.append(Path(ref).name)
    return np.stack(out), names


@dataclass
class Interpolation:
    """Decoded images along the straight line from z(A) to z(B) (and, optionally, a 2-D grid)."""

    names: list[str]
    originals: np.ndarray  # (2, H, W, C) uint8: A and B
    z: np.ndarray  # (steps, D)
    images: np.ndarray  # (steps, H, W, C) float32 in [0, 1]
    t: np.ndarray  # (steps,)
    grid: np.ndarray | None = None  # (rows, cols, H, W, C)
    grid_axes: dict[str, Any] = field(default_factory=dict)


def interpolate(model: Model, a: np.ndarray, b: np.ndarray, steps: int = 8) -> Interpolation:
    """Decode ``steps`` evenly spaced points from z(A) to z(B) (the VAE means), endpoints included.

    The endpoints are exactly the VAE reconstructions of A and B: ``decode(encode(A))``, ``decode(encode(B))``.
    """
    if steps < 2:
        raise DeepGalaxyError(f"--steps {steps}: an interpolation needs at least 2 steps (the two endpoints)")
    za, zb = model.encode(np.stack([a, b]))
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)
    z = (1 - t)[:, None] * za[None] + t[:, None] * zb[None]
    z[0], z[-1] = za, zb
    return Interpolation([], np.stack([a, b]), z, model.decode(z), t)


def latent_grid(model: Model, interp: Interpolation, index_z: np.ndarray | None = None, rows: int = 5,
                span: float = 2.0) -> Interpolation:
    """Add a 2-D grid to ``interp``: across, the A -> B line; down, ``span`` standard deviations either way
    along the dataset's main direction of variation orthogonal to it (the leading principal component of
    ``index_z`` after projecting out B - A; without ``index_z``, the latent axis least aligned with B - A).
    The middle row (odd ``rows``) is the A -> B line itself."""
    za, zb = interp.z[0], interp.z[-1]
    u = zb - za
    norm = float(np.linalg.norm(u))
    if norm == 0:
        raise DeepGalaxyError("A and B have the same latent vector: pick two different images for a grid")
    u = u / norm
    if index_z is not None and len(index_z) > 2:
        centred = index_z - index_z.mean(axis=0)
        centred = centred - np.outer(centred @ u, u)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        v = vt[0]
        sigma = float(s[0] / np.sqrt(max(len(index_z) - 1, 1)))
        how = "the dataset's main direction of variation in z orthogonal to B - A, in its standard deviations"
    else:
        axis = int(np.argmin(np.abs(u)))
        v = np.zeros_like(u)
        v[axis] = 1.0
        v -= (v @ u) * u
        v /= np.linalg.norm(v)
        sigma = 1.0
        how = f"latent axis {axis} (orthogonal to B - A), unit prior scale"
    offsets = np.linspace(-span, span, rows, dtype=np.float32) * sigma
    z = interp.z[None, :, :] + offsets[:, None, None] * v[None, None, :].astype(np.float32)
    images = model.decode(z.reshape(-1, z.shape[-1])).reshape(rows, len(interp.t), *interp.images.shape[1:])
    interp.grid = images
    interp.grid_axes = {"across": "t from A to B", "down": how, "sigma": sigma,
                        "offsets_sigma": np.linspace(-span, span, rows).tolist()}
    return interp


# --- MLflow ----------------------------------------------------------------------------------------------------


def log_run(kind: str, index: LatentIndex, data: str | os.PathLike[str], params: Mapping[str, Any],
            metrics: Mapping[str, float], tracking_uri: str | None, experiment: str,
            steps: Mapping[str, Sequence[float]] | None = None, artifacts: Sequence[Path] = ()) -> str:
    """One finished MLflow run of ``kind`` with the model's name, version and run id as params and tags."""
    import math

    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    from deepgalaxy.tracking import git_commit, prepare_store, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    prepare_store(uri, experiment)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    ref = index.model
    tags = {"deepgalaxy.kind": kind, "model_name": ref.name, "model_version": ref.version,
            "mlflow.runName": f"{kind}-{ref.name}-v{ref.version}"}
    if ref.run_id:
        tags["model_run_id"] = ref.run_id
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    run = client.create_run(exp.experiment_id, tags=tags)
    rid = run.info.run_id
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


def _fingerprint(index_dir: Path) -> str:
    try:
        return str(json.loads((index_dir / SOURCE_FILE).read_text()).get("dataset_fingerprint", "-"))
    except (OSError, json.JSONDecodeError):
        return "-"


# --- helpers ---------------------------------------------------------------------------------------------------




__all__ = [
    "BuiltIndex",
    "ClusterOutcome",
    "Evaluation",
    "Interpolation",
    "SearchResult",
    "build_index",
    "cluster_dataset",
    "cluster_index",
    "evaluate_search",
    "index_path",
    "interpolate",
    "latent_grid",
    "load_model",
    "model_ref",
    "open_index",
    "search",
]
