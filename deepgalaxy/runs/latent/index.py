"""Build a latent index of a store with a model version, and open it again refusing one that no longer matches.

An index lives beside its store, one directory per model version, so a store can be indexed by several versions::

    STORE.zarr.index/<model>-v<version>/   index.json z.npy ids.npy metadata.npz [hnsw.bin]   (LatentIndex)
                                           partial/        z written batch by batch while the build runs
                                           source.json     dataset fingerprint, card, encode timing
                                           clusters.npy    spectral cluster of every row (`latent cluster`)
                                           clusters.json   how they were made and how they score

Searching with a model version that has no index of its own, while an index of another version exists, is refused
with a message naming both versions and the rebuild command: vectors of two versions live in different spaces.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deepgalaxy.core.location import StoreLocation
from deepgalaxy.core.progress import progress_bar
from deepgalaxy.core.search import INDEX_FILE, LatentIndex, LatentIndexError, ModelRef, StaleIndexError
from deepgalaxy.runs import partial
from deepgalaxy.runs.latent.images import open_store
from deepgalaxy.runs.latent.model import index_rebuild_command, model_ref
from deepgalaxy.runs.stream import Result, stream

if TYPE_CHECKING:
    from deepgalaxy.core.dataset import Dataset
    from deepgalaxy.core.model import Model


INDEX_SUFFIX = ".index"
SOURCE_FILE = "source.json"
CLUSTERS_FILE = "clusters.npy"
CLUSTERS_INFO = "clusters.json"
PARTIAL_DIR = "partial"
"""``INDEX/partial``: the vectors of a build in progress, with their progress record."""
PARTIAL_VECTORS = "z.npy"
META_COLUMNS = ("label", "sim_id", "camera", "mass_ratio", "snapshot", "time")
"""Per-image metadata kept in the index (what search results show and clusters are scored against)."""


def index_root(data: str | os.PathLike[str] | StoreLocation) -> Path:
    """``STORE.zarr`` -> ``STORE.zarr.index``: the directory holding a store's latent indexes. A store read from a
    URL is not written to: its indexes live in the current folder (``./STORE.zarr.index``)."""
    where = StoreLocation.of(data)
    if where.local is None:
        return Path.cwd() / (where.name + INDEX_SUFFIX)
    p = where.local.resolve()
    return p.with_name(p.name + INDEX_SUFFIX)


def index_path(data: str | os.PathLike[str] | StoreLocation, ref: ModelRef) -> Path:
    """Where the index of model version ``ref`` over store ``data`` lives."""
    return index_root(data) / f"{ref.name}-v{ref.version}"


class EncodeJob:
    """Encoding every image of a store, batch by batch (a :class:`~deepgalaxy.runs.stream.Job`): the input side
    reads (decompresses) a batch of rows, the model side gives their latent means z."""

    def __init__(self, ds: Dataset, batch_size: int) -> None:
        self.ds, self.batch_size = ds, batch_size

    def units(self) -> int:
        return -(-len(self.ds) // self.batch_size)

    def rows(self, unit: int) -> slice:
        """The positions of ``unit`` in the store (and in z)."""
        return slice(unit * self.batch_size, min((unit + 1) * self.batch_size, len(self.ds)))

    def read(self, unit: int) -> np.ndarray:
        span = self.rows(unit)
        return self.ds.images(np.arange(span.start, span.stop))

    def run(self, model: Model, loaded: np.ndarray) -> Result:
        return {"z": model.encode(loaded, batch_size=self.batch_size)}

    def spec(self) -> dict[str, Any]:
        return {"data": str(self.ds.path), "batch_size": self.batch_size}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], model: Model) -> EncodeJob:
        """The job :meth:`spec` describes, in a worker process."""
        return cls(open_store(spec["data"], model), int(spec["batch_size"]))


def encode_dataset(model: Model, ds: Dataset, batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """Latent means z ``(N, latent_dim)`` of every image of ``ds``, batch by batch, the next batch read while the
    model encodes the current one."""
    job = EncodeJob(ds, batch_size)
    out = np.empty((len(ds), model.card.latent_dim), dtype=np.float32)
    bar = progress_bar(progress, len(ds), f"encoding {ds.path.name} with {model.card.name}")
    try:
        for unit, result in stream(model, job):
            out[job.rows(unit)] = result["z"]
            bar.update(len(result["z"]))
    finally:
        bar.close()
    return out


def encode_resumably(model: Model, ds: Dataset, folder: Path, batch_size: int = 64, progress: bool = True,
                     resume: bool = False, workers: int = 1) -> np.ndarray:
    """:func:`encode_dataset` writing z batch by batch to ``folder/z.npy`` with its progress
    (:mod:`deepgalaxy.runs.partial`), so that an interrupted build continues where it stopped: always when the
    partial z was made by the same model version, precision and store; with ``resume`` a partial z made from
    anything else is refused, naming what differs (without, it is started again). ``workers`` > 1: encoded in
    that many processes (:mod:`deepgalaxy.runs.stream`)."""
    ref = model_ref(model)
    identity = {"model": {**ref.as_dict(), "card": model.card.name, "framework": model.framework},
                "precision": model.precision, "store": str(ds.path.absolute()), "fingerprint": ds.fingerprint(),
                "rows": len(ds), "latent_dim": model.card.latent_dim, "batch_size": batch_size}
    vectors = folder / PARTIAL_VECTORS
    state: partial.Progress | None = None
    if partial.is_partial(folder) and vectors.is_file():
        try:
            state = partial.resume(folder, identity, f"the index being built at {folder.parent}",
                                   f"delete {folder} to start it again")
        except partial.ResumeError:
            if resume:
                raise
    elif resume:
        raise partial.ResumeError(f"{folder.parent}: no interrupted index build to resume (no {folder}); run without "
                                  "--resume")
    if state is None:
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        z = np.lib.format.open_memmap(vectors, mode="w+", dtype=np.float32, shape=(len(ds), model.card.latent_dim))
        state = partial.Progress(folder, identity)
        state.commit(0, 0)
    else:
        z = np.load(vectors, mmap_mode="r+")
    job = EncodeJob(ds, batch_size)
    bar = progress_bar(progress, len(ds), f"encoding {ds.path.name} with {model.card.name}",
                       initial=job.rows(state.units).start if state.units < job.units() else len(ds))
    try:
        for unit, result in stream(model, job, state.units, workers, folder):
            span = job.rows(unit)
            z[span] = result["z"]
            z.flush()
            state.commit(unit + 1, span.stop)
            bar.update(span.stop - span.start)
    finally:
        bar.close()
    return np.array(z)


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


def index_in_memory(model: Model, ds: Dataset, batch_size: int = 64, method: str = "auto",
                    progress: bool = True, z: np.ndarray | None = None) -> tuple[LatentIndex, float, float]:
    """A :class:`LatentIndex` of every image of ``ds`` (not saved), with the seconds spent encoding and building;
    ``z``: the images' latent means when already encoded."""
    start = time.perf_counter()
    z = encode_dataset(model, ds, batch_size, progress) if z is None else z
    encode_s = time.perf_counter() - start
    meta = ds.metadata
    start = time.perf_counter()
    index = LatentIndex.build(z, model_ref(model), ids=ds.indices,
                              metadata={k: meta[k] for k in META_COLUMNS if k in meta},
                              data=ds.path.absolute(), method=method, progress=progress)  # type: ignore[arg-type]
    return index, encode_s, time.perf_counter() - start


def build_index(model: Model, data: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                batch_size: int = 64, method: str = "auto", progress: bool = True, resume: bool = False,
                workers: int = 1) -> BuiltIndex:
    """Encode every image of the store ``data`` with ``model`` and save a :class:`LatentIndex` beside the store.

    The vectors are written batch by batch into ``OUT/partial`` first, so an interrupted build continues where it
    stopped (:func:`encode_resumably`: ``resume``, ``workers``); the partial folder goes once the index is saved.

    The index records the model name, version and run id, the store and its fingerprint, and per-image metadata
    (class, simulation, camera, mass ratio, snapshot, time). ``method``: ``auto`` (exact up to
    :data:`~deepgalaxy.core.search.EXACT_THRESHOLD` vectors, HNSW above, with its recall measured), ``exact``, ``hnsw``.
    """
    ds = open_store(data, model)
    ref = model_ref(model)
    path = Path(out) if out is not None else index_path(ds.path, ref)
    start = time.perf_counter()
    z = encode_resumably(model, ds, path / PARTIAL_DIR, batch_size, progress, resume, workers)
    encode_s = time.perf_counter() - start
    index, _, build_s = index_in_memory(model, ds, batch_size, method, progress, z)
    index.save(path)
    shutil.rmtree(path / PARTIAL_DIR)
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
                f"{target} is not a latent index; build one with `{index_rebuild_command(model, ref, data)}`"
            )
        others = sorted(index_root(data).glob(f"{ref.name}-v*/{INDEX_FILE}"), key=lambda p: p.stat().st_mtime)
        if not others:
            raise LatentIndexError(
                f"no latent index of {ref.name} version {ref.version} for {data}; build it with "
                f"`{index_rebuild_command(model, ref, data)}`"
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
    ds = open_dataset(data)
    if info.get("dataset_fingerprint") not in (None, ds.fingerprint()) or len(ds) != len(index):
        raise StaleIndexError(
            f"latent index at {where} was built from another version of the store {data} (its images or metadata "
            f"changed: {info.get('rows')} rows then, {len(ds)} now). Rebuild it: "
            f"`{index_rebuild_command(model, ref, data)}`"
        )


__all__ = [
    "CLUSTERS_FILE",
    "CLUSTERS_INFO",
    "INDEX_SUFFIX",
    "META_COLUMNS",
    "PARTIAL_DIR",
    "SOURCE_FILE",
    "BuiltIndex",
    "EncodeJob",
    "build_index",
    "encode_dataset",
    "encode_resumably",
    "index_in_memory",
    "index_path",
    "index_root",
    "open_index",
]
