"""Nearest-neighbour search over VAE latent vectors z: exact below a size threshold, HNSW above it.

Images are compared by the Euclidean distance of their latent means z (paper, section on the LatentModel); a query's
k nearest neighbours are its recommendations. :class:`LatentIndex` keeps the vectors together with the model
version that produced them, so an index built with another version is refused instead of silently returning
neighbours from an incompatible latent space.

Saved layout (no pickle anywhere; ``np.load(..., allow_pickle=False)``)::

    index.json      format, model reference, data store, method and parameters, measured recall
    z.npy           (N, D) float32 latent vectors, row r belongs to ids[r]
    ids.npy         (N,) int64 or unicode ids of the images
    metadata.npz    optional per-image columns (labels, camera, ...), each (N,)
    hnsw.bin        hnswlib's own index file (approximate indexes only)

Choice of the approximate library. Measured on this project's shared 2-core machine (heavily loaded by other
jobs, so absolute times are noisy; both libraries ran in the same script, one after the other), 32-d
standard-normal vectors (a hard case for graph indexes), 1000 single-vector queries on 1 thread, recall@10
against exact search, builds on 2 threads with M=16, ef_construction=100::

    n=10^5  hnswlib   build   6.4 s  ef=128 0.19 ms recall 0.933  ef=200 0.21 ms recall 0.969
            faiss HNSW build  5.4 s  ef=128 0.12 ms recall 0.926  ef=200 0.20 ms recall 0.963
            faiss IVFFlat (1264 lists, build 0.4 s)  nprobe=64 0.07 ms recall 0.692
    n=10^6  hnswlib   build  441 s   ef=300 0.96 ms recall 0.912  ef=400 1.23 ms recall 0.939
            faiss HNSW build  712 s  ef=300 1.35 ms recall 0.886  ef=400 1.66 ms recall 0.915
            faiss IVFFlat (4000 lists, build 22 s)   nprobe=128 1.43 ms recall 0.753  nprobe=256 3.22 ms recall 0.878

hnswlib is chosen: at 10^6 it reached higher recall at equal ``ef`` and was faster per query and to build; at
10^5 the two were within noise. It is also already a core dependency (faiss-cpu is a large optional wheel),
its index file is hnswlib's own binary (no pickle), and ``ef`` can change per search. IVF was far worse at
equal latency on this data. Exact search (numpy BLAS, batched, cached norms) is used up to
:data:`EXACT_THRESHOLD` vectors, where a query costs well under a millisecond and is always right.
``benchmarks/search.py`` repeats the measurement (``--faiss`` for the side-by-side comparison).
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from deepgalaxy.core.errors import DeepGalaxyError, ShapeError
from deepgalaxy.core.progress import progress_bar

FloatArray = NDArray[np.float32]
IntArray = NDArray[np.int64]
Method = Literal["auto", "exact", "hnsw"]

FORMAT = "deepgalaxy-latent-index"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
VECTORS_FILE = "z.npy"
IDS_FILE = "ids.npy"
METADATA_FILE = "metadata.npz"
HNSW_FILE = "hnsw.bin"

EXACT_THRESHOLD = 20_000
"""Vectors up to which :class:`LatentIndex` searches exactly by default (``method="auto"``).

benchmarks/search.py on this 2-core machine: exact single queries took 0.16 ms median at 10^4 vectors but 20 ms
at 10^5 (the 13 MB of vectors leave the cache; machine under load), against 0.26 ms for HNSW at recall 0.97."""

EF_LADDER: tuple[int, ...] = (32, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
"""ef values tried, in order, when tuning an HNSW index to a target recall."""

class StaleIndexError(DeepGalaxyError):
    """A latent index built from another model (or model version) than the one in use."""


class LatentIndexError(DeepGalaxyError, ValueError):
    """A latent index directory that is missing, incomplete or corrupt, or bad input to build one."""


def rebuild_command(model: str, data: str | os.PathLike[str] | None) -> str:
    """The CLI command that rebuilds an index for ``model`` from the store ``data``.

    ``data`` must name the store from the user's working directory (as the user gave it, or absolute): the
    command is meant to be pasted there.
    """
    return f"deepgalaxy latent index {shlex.quote(model)} --data {shlex.quote(str(data)) if data else '<store>'}"


@dataclass(frozen=True)
class ModelRef:
    """Which registered model version produced the vectors: name, version and (when known) the MLflow run id."""

    name: str
    version: str
    run_id: str | None = None

    @classmethod
    def parse(cls, ref: ModelRef | Mapping[str, Any]) -> ModelRef:
        """A ModelRef from a mapping with ``name`` and ``version`` (``run_id`` optional)."""
        if isinstance(ref, ModelRef):
            return ref
        missing = [key for key in ("name", "version") if ref.get(key) in (None, "")]
        if missing:
            raise LatentIndexError(
                f"model reference {dict(ref)!r} lacks {', '.join(missing)}; give the registered model's name and "
                "version, e.g. {'name': 'vae-b4', 'version': '3', 'run_id': '...'}"
            )
        run_id = ref.get("run_id")
        return cls(str(ref["name"]), str(ref["version"]), None if run_id in (None, "") else str(run_id))

    def as_dict(self) -> dict[str, str | None]:
        return {"name": self.name, "version": self.version, "run_id": self.run_id}

    def __str__(self) -> str:
        run = f", run {self.run_id}" if self.run_id else ""
        return f"{self.name} version {self.version}{run}"


# --- exact search ---------------------------------------------------------------------------------------------


def as_vectors(x: ArrayLike, name: str, dim: int | None = None) -> FloatArray:
    """``x`` as a C-contiguous float32 ``(N, D)`` array (one vector ``(D,)`` becomes ``(1, D)``), checked finite."""
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ShapeError(f"{name} must be a 2-D array (N, latent_dim), got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ShapeError(f"{name} have {arr.shape[1]} dimensions but the index holds {dim}-dimensional vectors")
    if arr.size and not np.isfinite(arr).all():
        raise ShapeError(f"{name} contain NaN or infinite values; encode the images again or drop those rows")
    return np.ascontiguousarray(arr)


def exact_knn(
    queries: ArrayLike, base: ArrayLike, k: int, batch_elements: int = 1 << 25
) -> tuple[IntArray, FloatArray]:
    """Exact k nearest rows of ``base`` for each query: ``(indices (Q, k), Euclidean distances (Q, k))``, nearest first.

    Distances are computed as ``|q|^2 - 2 q.x + |x|^2`` with one BLAS matrix product per batch of queries
    (``batch_elements`` bounds the size of the ``(batch, N)`` distance block), the k smallest are picked with
    ``argpartition``, and the winners' distances are recomputed directly so the returned values carry no
    cancellation error. ``k`` larger than ``N`` returns ``N`` columns.
    """
    base_arr = as_vectors(base, "base vectors")
    q = as_vectors(queries, "queries", base_arr.shape[1])
    return _exact_knn(q, base_arr, np.einsum("ij,ij->i", base_arr, base_arr), k, batch_elements)


def _exact_knn(
    q: FloatArray, base_arr: FloatArray, base_sq: FloatArray, k: int, batch_elements: int = 1 << 25
) -> tuple[IntArray, FloatArray]:
    """:func:`exact_knn` on validated arrays with precomputed squared norms of the base (an index caches them)."""
    n = base_arr.shape[0]
    if k < 1:
        raise LatentIndexError(f"k must be at least 1, got {k}")
    kk = min(k, n)
    out_i = np.empty((q.shape[0], kk), dtype=np.int64)
    out_d = np.empty((q.shape[0], kk), dtype=np.float32)
    if n == 0 or q.shape[0] == 0:
        return out_i, out_d
    step = max(1, batch_elements // n)
    for start in range(0, q.shape[0], step):
        qb = q[start : start + step]
        d2 = qb @ base_arr.T
        d2 *= -2.0
        d2 += base_sq[None, :]
        d2 += np.einsum("ij,ij->i", qb, qb)[:, None]
        cand = np.argpartition(d2, kk - 1, axis=1)[:, :kk] if kk < n else np.broadcast_to(np.arange(n), d2.shape)
        diff = base_arr[cand] - qb[:, None, :]
        dist = np.sqrt(np.einsum("bkd,bkd->bk", diff, diff))
        order = np.argsort(dist, axis=1, kind="stable")
        out_i[start : start + len(qb)] = np.take_along_axis(cand, order, axis=1)
        out_d[start : start + len(qb)] = np.take_along_axis(dist, order, axis=1)
    return out_i, out_d


def recall_at_k(approx: ArrayLike, exact: ArrayLike, k: int | None = None) -> float:
    """Mean fraction of the exact top-k found in the approximate top-k (both ``(Q, >=k)`` index arrays)."""
    a = np.asarray(approx)
    e = np.asarray(exact)
    if a.ndim != 2 or e.ndim != 2 or a.shape[0] != e.shape[0]:
        raise ShapeError(f"recall needs two (Q, k) index arrays with equal Q, got {a.shape} and {e.shape}")
    k = k or e.shape[1]
    if a.shape[1] < k or e.shape[1] < k:
        raise ShapeError(f"recall@{k} needs at least {k} columns, got {a.shape[1]} and {e.shape[1]}")
    if a.shape[0] == 0:
        return float("nan")
    hits = sum(len(np.intersect1d(x[:k], y[:k])) for x, y in zip(a, e, strict=True))
    return float(int(hits) / (int(a.shape[0]) * int(k)))


def drop_rows(indices: IntArray, distances: FloatArray, rows: IntArray, k: int) -> tuple[IntArray, FloatArray]:
    """Remove each query's own row from its ``k + 1`` results (or the last result when it is absent), keep ``k``."""
    keep = indices != rows[:, None]
    # Rows where the query itself was not returned: drop the farthest instead, so every row keeps k results.
    missing = keep.all(axis=1)
    keep[missing, -1] = False
    width = min(k, indices.shape[1] - 1)
    return indices[keep].reshape(len(rows), -1)[:, :width], distances[keep].reshape(len(rows), -1)[:, :width]


# --- the index -----------------------------------------------------------------------------------------------


@dataclass
class LatentIndex:
    """Latent vectors of a dataset with their ids, metadata, source model version and a search structure.

    Build with :meth:`build`, query with :meth:`search` (arbitrary vectors) or :meth:`recommend` (rows of the
    index, excluding themselves), persist with :meth:`save` / :meth:`load`.
    """

    z: FloatArray
    ids: NDArray[Any]
    model: ModelRef
    method: Literal["exact", "hnsw"]
    metadata: dict[str, NDArray[Any]] = field(default_factory=dict)
    data: str | None = None
    params: dict[str, int] = field(default_factory=dict)
    recall: dict[str, float] = field(default_factory=dict)
    num_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    _hnsw: Any = field(default=None, repr=False)
    _sq_norms: FloatArray | None = field(default=None, repr=False)

    # -- building ----------------------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        z: ArrayLike,
        model_ref: ModelRef | Mapping[str, Any],
        ids: ArrayLike | None = None,
        metadata: Mapping[str, ArrayLike] | None = None,
        data: str | os.PathLike[str] | None = None,
        method: Method = "auto",
        exact_threshold: int = EXACT_THRESHOLD,
        m: int = 16,
        ef_construction: int = 100,
        ef_search: int | None = None,
        target_recall: float = 0.95,
        num_threads: int | None = None,
        seed: int = 0,
        progress: bool = False,
    ) -> LatentIndex:
        """Index latent vectors ``z`` ``(N, D)`` produced by the model ``model_ref``.

        ``ids`` name the images (default: row numbers); ``metadata`` holds per-image columns such as ``label``.
        ``data`` is the dataset store the vectors came from (used in the rebuild hint of a stale index).
        ``method="auto"`` searches exactly up to ``exact_threshold`` vectors and builds an HNSW graph above
        (``m``, ``ef_construction``). Without ``ef_search`` the HNSW search depth is tuned upwards along
        :data:`EF_LADDER` until recall@10 on 200 indexed vectors (against exact search) reaches
        ``target_recall``; the measured recall is stored with the index either way.
        """
        vectors = as_vectors(z, "latent vectors z")
        n = vectors.shape[0]
        if n == 0:
            raise LatentIndexError("cannot index an empty set of latent vectors; encode some images first")
        ref = ModelRef.parse(model_ref)
        id_arr = np.arange(n, dtype=np.int64) if ids is None else _column(ids, "ids", n)
        if ids is not None and len(np.unique(id_arr)) != n:
            raise LatentIndexError("ids must be unique: each names one image of the indexed set")
        meta = {str(k): _column(v, f"metadata column {k!r}", n) for k, v in (metadata or {}).items()}
        if method not in ("auto", "exact", "hnsw"):
            raise LatentIndexError(f"unknown search method {method!r}; use 'auto', 'exact' or 'hnsw'")
        use_hnsw = n > 1 and (method == "hnsw" or (method == "auto" and n > exact_threshold))
        chosen: Literal["exact", "hnsw"] = "hnsw" if use_hnsw else "exact"
        index = cls(
            z=vectors, ids=id_arr, model=ref, method=chosen, metadata=meta,
            data=None if data is None else str(data), num_threads=num_threads or os.cpu_count() or 1,
        )
        if chosen == "hnsw":
            index._build_hnsw(m, ef_construction, seed, progress)
            if ef_search is not None:
                index.set_ef(ef_search)
                index.recall = {"k": 10, "recall": index.measure_recall(k=min(10, n - 1), seed=seed)}
            else:
                index.tune_ef(target_recall, seed=seed)
        return index

    def _build_hnsw(self, m: int, ef_construction: int, seed: int, progress: bool) -> None:
        import hnswlib

        n, dim = self.z.shape
        graph = hnswlib.Index(space="l2", dim=dim)
        graph.init_index(max_elements=n, ef_construction=ef_construction, M=m, random_seed=seed)
        labels = np.arange(n, dtype=np.int64)
        chunk = max(10_000, n // 50)
        bar = progress_bar(progress, n, "building HNSW index", unit="vec")
        for start in range(0, n, chunk):
            graph.add_items(self.z[start : start + chunk], labels[start : start + chunk], num_threads=self.num_threads)
            bar.update(min(chunk, n - start))
        bar.close()
        self._hnsw = graph
        self.params = {"M": m, "ef_construction": ef_construction, "ef_search": 64}
        graph.set_ef(64)

    # -- properties --------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.z.shape[0])

    @property
    def dim(self) -> int:
        return int(self.z.shape[1])

    def set_ef(self, ef: int) -> None:
        """HNSW search depth (larger: higher recall, slower); no effect on an exact index."""
        if self._hnsw is not None:
            self.params["ef_search"] = int(ef)
            self._hnsw.set_ef(int(ef))

    # -- searching ---------------------------------------------------------------------------------------------

    def search(self, queries: ArrayLike, k: int = 10, exact: bool = False) -> tuple[IntArray, FloatArray]:
        """The k nearest indexed rows of each query vector: ``(rows (Q, k), Euclidean distances (Q, k))``.

        Rows index :attr:`z`, :attr:`ids` and :attr:`metadata`. ``exact=True`` bypasses the HNSW graph.
        """
        q = as_vectors(queries, "queries", self.dim)
        if not 1 <= k <= len(self):
            raise LatentIndexError(f"k={k} must lie between 1 and the number of indexed vectors ({len(self)})")
        if exact or self._hnsw is None:
            if self._sq_norms is None:
                self._sq_norms = np.einsum("ij,ij->i", self.z, self.z)
            return _exact_knn(q, self.z, self._sq_norms, k)
        ef = max(self.params.get("ef_search", 64), k)
        self._hnsw.set_ef(ef)
        try:
            labels, d2 = self._hnsw.knn_query(q, k=k, num_threads=self.num_threads)
        except RuntimeError as exc:  # hnswlib: fewer than k results reachable
            raise LatentIndexError(
                f"the HNSW index could not return {k} neighbours ({exc}); raise ef with set_ef() or search exactly"
            ) from None
        return labels.astype(np.int64), np.sqrt(np.maximum(d2, 0.0)).astype(np.float32)

    def recommend(self, rows: ArrayLike, k: int = 6, exact: bool = False) -> tuple[IntArray, FloatArray]:
        """Recommendations for indexed images: the k nearest *other* rows of each of ``rows``."""
        r = self._rows(rows)
        if not 1 <= k < len(self):
            raise LatentIndexError(f"k={k} recommendations need 1 <= k < {len(self)} (the number of indexed vectors)")
        idx, dist = self.search(self.z[r], k + 1, exact=exact)
        return drop_rows(idx, dist, r, k)

    def rows_of(self, ids: ArrayLike) -> IntArray:
        """Row numbers of the given image ids (an unknown id raises, naming it)."""
        wanted = np.atleast_1d(np.asarray(ids))
        order = np.argsort(self.ids, kind="stable")
        pos = np.searchsorted(self.ids[order], wanted)
        pos = np.clip(pos, 0, len(order) - 1)
        rows = order[pos]
        bad = self.ids[rows] != wanted
        if bad.any():
            raise LatentIndexError(f"ids not in the index: {wanted[bad][:5].tolist()}")
        return rows.astype(np.int64)

    def _rows(self, rows: ArrayLike) -> IntArray:
        r = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        if r.size and (r.min() < 0 or r.max() >= len(self)):
            raise LatentIndexError(f"row numbers must lie in [0, {len(self)}), got {r.min()}..{r.max()}")
        return r

    # -- recall ------------------------------------------------------------------------------------------------

    def measure_recall(self, k: int = 10, n_queries: int = 200, seed: int = 0) -> float:
        """recall@k of :meth:`recommend` against exact search, on ``n_queries`` indexed vectors (1.0 when exact)."""
        if self._hnsw is None:
            return 1.0
        rng = np.random.default_rng(seed)
        rows = rng.choice(len(self), size=min(n_queries, len(self)), replace=False)
        truth, _ = self.recommend(rows, k, exact=True)
        approx, _ = self.recommend(rows, k)
        return recall_at_k(approx, truth, k)

    def tune_ef(self, target: float = 0.95, k: int = 10, n_queries: int = 200, seed: int = 0) -> float:
        """Raise the HNSW search depth along :data:`EF_LADDER` until recall@k reaches ``target``; return it."""
        if self._hnsw is None:
            return 1.0
        k = min(k, len(self) - 1)
        rng = np.random.default_rng(seed)
        rows = rng.choice(len(self), size=min(n_queries, len(self)), replace=False)
        truth, _ = self.recommend(rows, k, exact=True)
        got = 0.0
        for ef in EF_LADDER:
            self.set_ef(max(ef, k + 1))
            got = recall_at_k(self.recommend(rows, k)[0], truth, k)
            if got >= target:
                break
        self.recall = {"k": k, "recall": got, "target": target, "queries": len(rows)}
        return got

    # -- persistence -------------------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the index to ``directory`` (created if needed): JSON, npy/npz and hnswlib's own file; no pickle."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / VECTORS_FILE, self.z, allow_pickle=False)
        np.save(out / IDS_FILE, self.ids, allow_pickle=False)
        if self.metadata:
            np.savez(out / METADATA_FILE, allow_pickle=False, **self.metadata)
        elif (out / METADATA_FILE).exists():
            (out / METADATA_FILE).unlink()
        if self._hnsw is not None:
            self._hnsw.save_index(str(out / HNSW_FILE))
        info = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.model.as_dict(),
            "data": self.data,
            "count": len(self),
            "dim": self.dim,
            "method": self.method,
            "params": self.params,
            "recall": self.recall,
            "metadata_columns": sorted(self.metadata),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (out / INDEX_FILE).write_text(json.dumps(info, indent=2))
        return out

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        expected_model_ref: ModelRef | Mapping[str, Any] | None = None,
        num_threads: int | None = None,
        data: str | os.PathLike[str] | None = None,
    ) -> LatentIndex:
        """Read an index saved by :meth:`save`.

        With ``expected_model_ref`` (the model whose encoder will embed new queries), an index built from another
        model, another version of it or another training run is refused with :class:`StaleIndexError`, naming
        both and the command that rebuilds it. ``data``: the store as the caller named it, for that command
        (default: the store recorded in the index).
        """
        src = Path(directory)
        info_path = src / INDEX_FILE
        if not info_path.is_file():
            raise LatentIndexError(
                f"{src} is not a latent index ({INDEX_FILE} is missing); build one with "
                f"`{rebuild_command('<model>', None)}`"
            )
        try:
            info = json.loads(info_path.read_text())
        except json.JSONDecodeError as exc:
            raise LatentIndexError(f"{info_path} is corrupt ({exc}); rebuild the index") from None
        if info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
            raise LatentIndexError(
                f"{info_path} has format {info.get('format')!r} version {info.get('format_version')!r}; this "
                f"deepgalaxy reads {FORMAT!r} version {FORMAT_VERSION}: rebuild the index"
            )
        built_with = ModelRef.parse(info["model"])
        recorded = info.get("data")
        if expected_model_ref is not None:
            check_model(built_with, ModelRef.parse(expected_model_ref), src, recorded if data is None else str(data))
        try:
            z = np.load(src / VECTORS_FILE, allow_pickle=False)
            ids = np.load(src / IDS_FILE, allow_pickle=False)
            metadata: dict[str, NDArray[Any]] = {}
            if info.get("metadata_columns"):
                with np.load(src / METADATA_FILE, allow_pickle=False) as npz:
                    metadata = {name: npz[name] for name in info["metadata_columns"]}
        except (OSError, ValueError, KeyError) as exc:
            raise LatentIndexError(f"latent index at {src} is incomplete or corrupt ({exc}); rebuild it") from None
        if z.shape != (info["count"], info["dim"]) or len(ids) != info["count"]:
            raise LatentIndexError(
                f"latent index at {src} is inconsistent: {INDEX_FILE} says {info['count']}x{info['dim']}, "
                f"{VECTORS_FILE} holds {z.shape}, {IDS_FILE} {len(ids)} ids; rebuild it"
            )
        index = cls(
            z=np.ascontiguousarray(z, dtype=np.float32), ids=ids, model=built_with, method=info["method"],
            metadata=metadata, data=recorded, params={k: int(v) for k, v in info.get("params", {}).items()},
            recall=info.get("recall", {}), num_threads=num_threads or os.cpu_count() or 1,
        )
        if index.method == "hnsw":
            import hnswlib

            if not (src / HNSW_FILE).is_file():
                raise LatentIndexError(f"latent index at {src} lacks {HNSW_FILE}; rebuild it")
            graph = hnswlib.Index(space="l2", dim=index.dim)
            graph.load_index(str(src / HNSW_FILE), max_elements=len(index))
            index._hnsw = graph
            index.set_ef(index.params.get("ef_search", 64))
        return index


def check_model(built_with: ModelRef, expected: ModelRef, where: str | os.PathLike[str], data: str | None) -> None:
    """Raise :class:`StaleIndexError` unless the index's model is ``expected`` (same name, version and run)."""
    hint = f"Rebuild it: `{rebuild_command(expected.name, data)}`"
    if built_with.name != expected.name:
        raise StaleIndexError(
            f"latent index at {where} was built with model {built_with.name!r}, not {expected.name!r}; its "
            f"vectors live in another latent space. {hint}"
        )
    if built_with.version != expected.version:
        raise StaleIndexError(
            f"latent index at {where} is stale: built with {built_with.name} version {built_with.version}, but the "
            f"model in use is version {expected.version}; vectors of different versions are not comparable. {hint}"
        )
    if built_with.run_id and expected.run_id and built_with.run_id != expected.run_id:
        raise StaleIndexError(
            f"latent index at {where} was built from run {built_with.run_id} of {built_with.name} version "
            f"{built_with.version}, but the model in use comes from run {expected.run_id}. {hint}"
        )


def _column(values: ArrayLike, name: str, n: int) -> NDArray[Any]:
    arr = np.asarray(values)
    if arr.dtype == object:
        arr = arr.astype(str)
    if arr.shape[:1] != (n,):
        raise LatentIndexError(f"{name} has {arr.shape[0] if arr.ndim else 0} entries but there are {n} vectors")
    if arr.dtype.kind not in "biufUS":
        raise LatentIndexError(f"{name} must hold numbers or strings, got dtype {arr.dtype}")
    return arr


__all__: Sequence[str] = [
    "EXACT_THRESHOLD",
    "LatentIndex",
    "LatentIndexError",
    "ModelRef",
    "StaleIndexError",
    "exact_knn",
    "rebuild_command",
    "recall_at_k",
]
