"""Read a deepgalaxy Zarr store: the public front of the store reader, the selections and the batch loader.

``open_dataset(path)`` checks the store up front (format, schema version, arrays, chunk files, label range) and
raises :class:`~deepgalaxy.core.errors.DatasetError` naming the store, the array and the index range of whatever
is wrong. A :class:`Dataset` is the :class:`Subset` of all its images; every subset can be split, sharded and
batched again (``val.shard(rank, size)`` works like ``train.shard(rank, size)``). ``images(positions)`` takes
local positions ``0..len(selection)-1`` on every selection; ``selection.indices`` holds the sorted store rows.

Where each part lives: :mod:`deepgalaxy.core.store` (opening, the checks, the reader of rows and chunks),
:mod:`deepgalaxy.core.store_verify` (decoding every chunk), :mod:`deepgalaxy.core.selection` (``Subset``,
``Dataset``: split, shard, images, metadata) and :mod:`deepgalaxy.core.loader` (epoch order, prefetched batches,
the in-memory copy of a selection's images within ``cache_bytes``, default 1 GiB per process).
"""

from __future__ import annotations

import os

from deepgalaxy.core.loader import DEFAULT_CACHE_BYTES, CacheBudget
from deepgalaxy.core.location import StoreLocation
from deepgalaxy.core.selection import Dataset, Subset
from deepgalaxy.core.store import METADATA_KEYS, StoreReader, open_store, repair_advice, resume_advice
from deepgalaxy.core.store_verify import ChunkProblem, Verification, verify_store


def open_dataset(
    path: str | os.PathLike[str] | StoreLocation, *, allow_incomplete: bool = False,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> Dataset:
    """Open and check a deepgalaxy store; raise :class:`DatasetError` naming store, array and index range.

    ``allow_incomplete`` opens a store whose writing was interrupted, restricted to its finished simulations
    (for ``deepgalaxy data info``); training refuses incomplete stores. ``cache_bytes`` bounds the decoded
    images kept in memory (0 disables the cache). Chunk files are checked to exist, not decoded: that is
    :func:`verify_store`'s job (it reads everything). ``path``: a folder, or a URL (``http://``, ``https://``,
    ``s3://``, ``file://``) of one, read through fsspec (:mod:`deepgalaxy.core.location`).
    """
    return Dataset(open_store(path, allow_incomplete=allow_incomplete), CacheBudget(cache_bytes))


__all__ = [
    "DEFAULT_CACHE_BYTES",
    "METADATA_KEYS",
    "ChunkProblem",
    "Dataset",
    "StoreReader",
    "Subset",
    "Verification",
    "open_dataset",
    "repair_advice",
    "resume_advice",
    "verify_store",
]
