"""Read a deepgalaxy Zarr store: length, metadata, splits, Horovod shards and prefetched numpy batches.

``open_dataset(path)`` checks the store up front (format, schema version, arrays, chunk files, label range) and
raises :class:`~deepgalaxy.core.errors.DatasetError` naming the store, the array and the index range of whatever
is wrong. A :class:`Dataset` is the :class:`Subset` of all its images; every subset can be split, sharded and
batched again (``val.shard(rank, size)`` works like ``train.shard(rank, size)``).

Index conventions:

- ``Dataset.images(indices)`` takes *global* image indices (rows of the store).
- ``Subset.images(positions)`` takes *local* positions ``0..len(subset)-1`` into ``subset.indices``; on a
  ``Dataset`` local and global coincide. ``subset.indices`` holds the sorted global indices.

Batches are numpy arrays (``float32`` NHWC in ``[0, 1]``, ``int64`` labels); framework adapters live in the
framework plugins. Decoding runs in a background thread that works on whole chunks, so the training step does not
wait on decompression. A subset's decoded images are kept in memory while its first epoch streams, within
``cache_bytes`` (default 1 GiB per process), so from the second epoch on a shard that fits is served from RAM.
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import shlex
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from deepgalaxy.core.errors import DatasetError, ShapeError
from deepgalaxy.core.schema import ATTRS_KEY, FORMAT, META_FIELDS, SCHEMA_VERSION

METADATA_KEYS: tuple[str, ...] = (*META_FIELDS, "label")
DEFAULT_CACHE_BYTES = 1 << 30
_WINDOW_BYTES = 64 << 20


def _span(indices: np.ndarray) -> str:
    """'a..b (n images)' for error messages."""
    if len(indices) == 0:
        return "no images"
    return f"{int(indices.min())}..{int(indices.max())} ({len(indices)} images)"


class Subset:
    """A selection of images of one store; ``indices`` are sorted global indices.

    Subsets are cheap (an index array and a reference to the :class:`Dataset`); split, shard and batch them.
    """

    def __init__(self, dataset: Dataset, indices: np.ndarray, name: str = "subset") -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.name = name
        self._resident: np.ndarray | None = None  # decoded images of this subset, filled while streaming
        self._filled: np.ndarray | None = None  # which positions of _resident hold data
        self._complete = False

    # -- basic access ---------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} of {self.dataset.path}: {len(self)} images>"

    @property
    def labels(self) -> np.ndarray:
        """int16 labels of this selection, in ``indices`` order (-1 = unlabelled)."""
        return self.dataset._labels[self.indices]

    @property
    def metadata(self) -> dict[str, np.ndarray]:
        """Per-image metadata of this selection: ``sim_id, camera, mass_ratio, snapshot, time, label``."""
        return {k: v[self.indices] for k, v in self.dataset._meta.items()}

    def images(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """uint8 images ``(n, H, W, C)`` at *local* positions (``0..len(self)-1``) of this selection."""
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if pos.size and (pos.min() < -len(self) or pos.max() >= len(self)):
            raise DatasetError(
                f"{self.dataset.path}: array 'images': positions {int(pos.min())}..{int(pos.max())} are outside "
                f"{self.name} of {len(self)} images (Subset.images takes local positions 0..{len(self) - 1})"
            )
        return self.dataset._read_images(self.indices[pos], what=self.name)

    def class_counts(self) -> np.ndarray:
        """Images per class ``0..num_classes-1`` (unlabelled images are not counted)."""
        labels = self.labels
        return np.bincount(labels[labels >= 0], minlength=self.dataset.num_classes)

    def _require_nonempty(self, what: str) -> None:
        if len(self) == 0:
            raise DatasetError(
                f"{self.dataset.path}: array 'images': empty selection ({self.name} has no images) for {what}; "
                "use a larger dataset, a smaller validation fraction or fewer workers"
            )

    # -- splitting and sharding -------------------------------------------------------------------------------------

    def split(
        self, kind: Literal["simulation", "random"] = "simulation", validation_fraction: float = 0.2, seed: int = 0
    ) -> tuple[Subset, Subset]:
        """Split into (train, validation).

        ``simulation`` (default): whole simulations go to one side, so the same merger never appears in both;
        simulations are spread evenly over mass ratios. Images without a simulation (real images) are their own
        group. ``random``: the paper's random image split.
        """
        self._require_nonempty(f"split(kind={kind!r})")
        if not 0.0 < validation_fraction < 1.0:
            raise DatasetError(
                f"{self.dataset.path}: validation_fraction={validation_fraction} must be between 0 and 1 (exclusive)"
            )
        if kind not in ("simulation", "random"):
            raise DatasetError(f"{self.dataset.path}: unknown split kind {kind!r}; use 'simulation' or 'random'")
        rng = np.random.default_rng([_seed(seed), 0x5B117])
        if kind == "random":
            n_val = round(validation_fraction * len(self))
            val_mask = np.zeros(len(self), dtype=bool)
            val_mask[rng.permutation(len(self))[:n_val]] = True
        else:
            sim = self.dataset._meta["sim_id"][self.indices].astype(np.int64)
            groups = np.where(sim >= 0, sim, -(self.indices + 2))  # real images: one group each
            uniq, inverse = np.unique(groups, return_inverse=True)
            first = np.zeros(len(uniq), dtype=np.int64)
            first[inverse[::-1]] = np.arange(len(self))[::-1]
            ratio = np.nan_to_num(self.dataset._meta["mass_ratio"][self.indices][first], nan=-1.0)
            # order groups by mass ratio, shuffled within a ratio; take every k-th -> even over mass ratios
            order = np.lexsort((rng.random(len(uniq)), ratio))
            n_val = round(validation_fraction * len(uniq))
            step = len(uniq) / max(n_val, 1)
            picks = (rng.random() * step + step * np.arange(n_val)).astype(np.int64)
            val_groups = np.zeros(len(uniq), dtype=bool)
            val_groups[order[np.clip(picks, 0, len(uniq) - 1)]] = True
            val_mask = val_groups[inverse]
        train = Subset(self.dataset, self.indices[~val_mask], f"{self.name}.train[{kind}]")
        val = Subset(self.dataset, self.indices[val_mask], f"{self.name}.validation[{kind}]")
        for part in (train, val):
            if len(part) == 0:
                n_groups = len(uniq) if kind == "simulation" else len(self)
                raise DatasetError(
                    f"{self.dataset.path}: array 'images': empty selection: split(kind={kind!r}, "
                    f"validation_fraction={validation_fraction}) of {self.name} (indices {_span(self.indices)}) "
                    f"leaves {part.name} empty; {_split_remedy(n_groups, kind)}"
                )
        return train, val

    def shard(self, rank: int, size: int, seed: int = 0) -> Subset:
        """This rank's part of the selection for data-parallel training.

        Chunks are dealt in a seeded order (fixed for the run, independent of the epoch) and cut into ``size``
        equal contiguous runs, so a rank reads whole chunks except at most two at its ends. Every rank gets
        exactly ``len(self) // size`` images: the ``len(self) % size`` remainder is left out, since unequal step
        counts would hang Horovod's allreduce. Shards are disjoint and their union is the selection minus that
        remainder.
        """
        if size < 1 or not 0 <= rank < size:
            raise DatasetError(
                f"{self.dataset.path}: shard(rank={rank}, size={size}): need size >= 1 and 0 <= rank < size"
            )
        per_rank = len(self) // size
        if per_rank == 0:
            raise DatasetError(
                f"{self.dataset.path}: array 'images': empty selection: {self.name} (indices {_span(self.indices)}) "
                f"is too small to give each of {size} ranks an image; use fewer workers or more data"
            )
        groups = self.dataset._chunk_groups(self.indices)
        perm = np.random.default_rng([_seed(seed), 0x5AAD]).permutation(len(groups))
        ordered = np.concatenate([groups[g] for g in perm])
        mine = np.sort(ordered[rank * per_rank : (rank + 1) * per_rank])
        return Subset(self.dataset, mine, f"{self.name}.shard({rank}/{size})")

    # -- batching ---------------------------------------------------------------------------------------------------

    def num_batches(self, batch_size: int, drop_last: bool = True) -> int:
        """Batches per epoch: ``len // batch_size``, or rounded up when ``drop_last`` is false."""
        if batch_size < 1:
            raise DatasetError(f"{self.dataset.path}: batch_size={batch_size} must be at least 1")
        return len(self) // batch_size if drop_last else math.ceil(len(self) / batch_size)

    def epoch_order(self, epoch: int = 0, seed: int = 0, shuffle: bool = True) -> np.ndarray:
        """Global indices in the order one epoch visits them.

        Shuffled (the default): chunks in a random order, cut into windows of a few chunks (about 64 MiB), images
        shuffled within each window. A pure function of (indices, seed, epoch): identical in every process.
        """
        if not shuffle:
            return self.indices.copy()
        rng = np.random.default_rng([_seed(seed), _seed(epoch), 0xE90C])
        groups = self.dataset._chunk_groups(self.indices)
        window = self.dataset._window_chunks
        perm = rng.permutation(len(groups))
        parts = []
        for w in range(0, len(perm), window):
            members = np.concatenate([groups[g] for g in perm[w : w + window]])
            parts.append(members[rng.permutation(len(members))])
        return np.concatenate(parts) if parts else self.indices.copy()

    def batches(
        self,
        batch_size: int,
        epoch: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        start_batch: int = 0,
        prefetch: int = 2,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(images float32 (n, H, W, C) in [0, 1], labels int64 (n,))`` for one epoch.

        The order depends only on (this selection, ``seed``, ``epoch``), so it is identical across ranks and
        processes; ``start_batch=k`` skips the first k batches (resume mid-epoch). ``prefetch`` batches are
        prepared ahead in background threads.
        """
        self._require_nonempty("batches()")
        n_batches = self.num_batches(batch_size, drop_last)
        if n_batches == 0:
            raise DatasetError(
                f"{self.dataset.path}: array 'images': empty selection: {self.name} (indices {_span(self.indices)}) "
                f"has no full batch of {batch_size}; use a smaller batch size or drop_last=False"
            )
        if not 0 <= start_batch <= n_batches:
            raise DatasetError(
                f"{self.dataset.path}: start_batch={start_batch} is outside 0..{n_batches} for {self.name}"
            )
        order = self.epoch_order(epoch, seed, shuffle)[: n_batches * batch_size if drop_last else None]
        order = order[start_batch * batch_size :]
        if self._complete and self._resident is not None:
            return _resident_batches(self, order, batch_size, max(1, prefetch))
        self._reserve_resident()
        return _prefetched_batches(self, order, batch_size, max(1, prefetch))

    def _reserve_resident(self) -> None:
        """Keep this subset's decoded images in RAM (within the dataset's cache budget) from now on."""
        if self._resident is not None:
            return
        nbytes = len(self) * int(np.prod(self.dataset.image_shape))
        ds = self.dataset
        with ds._cache_lock:
            if nbytes > ds._cache_left:
                return
            ds._cache_left -= nbytes
        self._resident = np.empty((len(self), *ds.image_shape), dtype=np.uint8)
        self._filled = np.zeros(len(self), dtype=bool)

    def _keep(self, chunk: int, data: np.ndarray) -> None:
        """Copy this subset's rows of a decoded chunk into the resident array."""
        if self._resident is None or self._filled is None or self._complete:
            return
        start, stop = self.dataset._chunk_range(chunk)
        lo, hi = np.searchsorted(self.indices, [start, stop])
        if hi > lo and not self._filled[lo:hi].all():
            self._resident[lo:hi] = data[self.indices[lo:hi] - start]
            self._filled[lo:hi] = True
            self._complete = bool(self._filled.all())


def _split_remedy(groups: int, kind: str) -> str:
    """What makes a split of ``groups`` simulations (or images) non-empty on both sides: a validation fraction
    whose rounded share is between 1 and groups-1, named as the setting that takes it."""
    what = "simulations" if kind == "simulation" else "images"
    if groups < 2:
        return f"it has {groups} of the 2 or more {what} a split needs: make more {what}"
    low, high = math.ceil(100 / groups) / 100, math.floor(100 * (groups - 1) / groups) / 100
    fraction = min(max(low, 0.2), high) if low <= high else 0.5
    return (
        f"with {groups} {what}, use a validation fraction between {low:g} and {high:g}, e.g. {fraction:g} "
        f"(train, tune, scale: `--set data.validation_fraction={fraction:g}`; data info: `--validation-fraction "
        f"{fraction:g}`), or more {what}"
    )


def _seed(value: int) -> int:
    return int(value) % (1 << 63)


class Dataset(Subset):
    """An opened store: all its images, plus the store's attributes and reading machinery."""

    def __init__(
        self,
        path: Path,
        root: Any,
        attrs: dict[str, Any],
        labels: np.ndarray,
        meta: dict[str, np.ndarray],
        indices: np.ndarray,
        cache_bytes: int,
    ) -> None:
        super().__init__(self, indices, "dataset")
        self.path = path
        self.attrs = attrs
        self._root = root
        self._images = root["images"]
        self._labels = labels
        self._meta = {**meta, "label": labels}
        self.num_classes = int(attrs["num_classes"])
        self.image_shape: tuple[int, int, int] = tuple(int(s) for s in self._images.shape[1:])  # type: ignore[assignment]
        self.num_rows = int(self._images.shape[0])
        self.chunk_len = int(self._images.chunks[0])
        chunk_bytes = self.chunk_len * int(np.prod(self.image_shape))
        self._window_chunks = int(np.clip(_WINDOW_BYTES // max(chunk_bytes, 1), 2, 16))
        self._cache_left = cache_bytes
        self._cache_lock = threading.Lock()

    @property
    def labels(self) -> np.ndarray:
        return self._labels[self.indices]

    def images(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """uint8 images ``(n, H, W, C)`` at *global* indices (rows of the store)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return self._read_images(idx, what="images()")

    def fingerprint(self) -> str:
        """Short stable hash of the store's identity: schema, generator, shape, labels and metadata."""
        h = hashlib.sha256()
        ident = {k: self.attrs.get(k) for k in ("format", "schema_version", "num_classes", "image_shape", "source")}
        ident["generator"] = self.attrs.get("generator")
        h.update(json.dumps(ident, sort_keys=True, default=str).encode())
        h.update(self.indices.tobytes())
        for key in sorted(self._meta):
            h.update(key.encode())
            h.update(np.ascontiguousarray(self._meta[key][self.indices]).tobytes())
        return h.hexdigest()[:12]

    def check_shape(self, shape: Sequence[int], model: str = "the model") -> None:
        """Raise :class:`ShapeError` unless images are ``shape`` = (H, W, C), naming store, array and range."""
        want = tuple(int(s) for s in shape)
        if want != self.image_shape:
            raise ShapeError(
                f"{self.path}: array 'images' (indices 0..{self.num_rows - 1}) holds images of shape "
                f"{self.image_shape} (H, W, C) but {model} expects {want}; re-create the dataset at that size "
                f"(`deepgalaxy data simulate/ingest --size {want[0]}`) or use a card with input_size="
                f"{self.image_shape[0]}, channels={self.image_shape[2]}"
            )

    # -- reading ----------------------------------------------------------------------------------------------------

    def _chunk_groups(self, indices: np.ndarray) -> list[np.ndarray]:
        """Split sorted global indices into runs that share a chunk."""
        if len(indices) == 0:
            return []
        chunks = indices // self.chunk_len
        starts = np.flatnonzero(np.diff(chunks)) + 1
        return np.split(indices, starts)

    def _chunk_range(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_len
        return start, min(start + self.chunk_len, self.num_rows)

    def _read_chunk(self, chunk: int) -> np.ndarray:
        """Decoded uint8 images of one chunk (from the cache when there)."""
        start, stop = self._chunk_range(chunk)
        try:
            data = np.asarray(self._images[start:stop])
        except Exception as exc:
            key = self._images.metadata.encode_chunk_key((chunk, 0, 0, 0))
            raise DatasetError(
                f"{self.path}: array 'images' chunk {key} (indices {start}..{stop - 1}) cannot be read: "
                f"{type(exc).__name__}: {exc}. The store is damaged: {repair_advice(self.path, self.attrs)}"
            ) from exc
        return data

    def _read_images(self, idx: np.ndarray, what: str) -> np.ndarray:
        if idx.size == 0:
            raise DatasetError(f"{self.path}: array 'images': empty selection: {what} was given no indices")
        if idx.min() < 0 or idx.max() >= self.num_rows:
            bad = idx[(idx < 0) | (idx >= self.num_rows)]
            raise DatasetError(
                f"{self.path}: array 'images': indices {_span(bad)} are out of range 0..{self.num_rows - 1}"
            )
        out = np.empty((len(idx), *self.image_shape), dtype=np.uint8)
        chunks = idx // self.chunk_len
        for chunk in np.unique(chunks):
            where = np.flatnonzero(chunks == chunk)
            out[where] = self._read_chunk(int(chunk))[idx[where] - chunk * self.chunk_len]
        return out


def _resident_batches(
    subset: Subset, order: np.ndarray, batch_size: int, prefetch: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches from the subset's images already decoded in RAM (a background thread converts ahead)."""
    resident = subset._resident
    assert resident is not None
    pos = np.searchsorted(subset.indices, order)
    labels = subset.dataset._labels[order].astype(np.int64)

    def make(b: int) -> tuple[np.ndarray, np.ndarray]:
        sl = slice(b * batch_size, (b + 1) * batch_size)
        return _unit_float(resident[pos[sl]]), labels[sl]

    return _background(make, math.ceil(len(order) / batch_size), prefetch, subset.name)


def _unit_float(raw: np.ndarray) -> np.ndarray:
    """uint8 images as float32 in [0, 1] (one conversion, scaled in place)."""
    images = raw.astype(np.float32)
    images *= np.float32(1.0 / 255.0)
    return images


def _offer(out: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
    """Put ``item`` on ``out``, waiting while it is full; False if the consumer stopped first."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _background(
    make: Any, n: int, prefetch: int, name: str
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Run ``make(0..n-1)`` in a thread, ``prefetch`` items ahead of the consumer."""
    out: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def work() -> None:
        try:
            for b in range(n):
                if not _offer(out, make(b), stop):
                    return
            out.put(None)
        except BaseException as exc:
            out.put(exc)

    thread = threading.Thread(target=work, name=f"deepgalaxy-batch[{name}]", daemon=True)
    thread.start()
    try:
        yield from _consume(out)
    finally:
        stop.set()
        _drain(out)
        thread.join(timeout=5)


def _prefetched_batches(
    subset: Subset, order: np.ndarray, batch_size: int, prefetch: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Two background threads: one decodes chunks in order of first use, one gathers and converts batches."""
    ds, name = subset.dataset, subset.name
    n_batches = math.ceil(len(order) / batch_size)
    chunk_of = order // ds.chunk_len
    batch_of = np.arange(len(order)) // batch_size
    # chunks in order of first use, and the batch of each chunk's first and last use
    uniq, first_pos = np.unique(chunk_of, return_index=True)
    last_pos = len(chunk_of) - 1 - np.unique(chunk_of[::-1], return_index=True)[1]
    seq = np.argsort(first_pos, kind="stable")
    sequence = uniq[seq]
    first_b, last_b = batch_of[first_pos[seq]], batch_of[last_pos[seq]]
    # most chunks alive at once (+2 read ahead): the decoder never blocks the batch it is needed for
    alive = np.zeros(n_batches + 1, dtype=np.int64)
    np.add.at(alive, first_b, 1)
    np.add.at(alive, last_b + 1, -1)
    max_alive = int(np.cumsum(alive).max()) + 2
    last_use = dict(zip(sequence.tolist(), last_b.tolist(), strict=True))

    decoded: dict[int, np.ndarray] = {}
    cond = threading.Condition()
    stop = threading.Event()
    failure: list[BaseException] = []
    out: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
    labels_all = ds._labels

    def decoder() -> None:
        try:
            for chunk in sequence.tolist():
                with cond:
                    while len(decoded) >= max_alive and not stop.is_set():
                        cond.wait(0.1)
                if stop.is_set():
                    return
                data = ds._read_chunk(chunk)
                subset._keep(chunk, data)
                with cond:
                    decoded[chunk] = data
                    cond.notify_all()
        except BaseException as exc:
            with cond:
                failure.append(exc)
                cond.notify_all()

    def batcher() -> None:
        try:
            for b in range(n_batches):
                sel = order[b * batch_size : (b + 1) * batch_size]
                chunks = chunk_of[b * batch_size : (b + 1) * batch_size]
                need = np.unique(chunks).tolist()
                with cond:
                    while not failure and not stop.is_set() and any(c not in decoded for c in need):
                        cond.wait(0.1)
                    if failure:
                        raise failure[0]
                    if stop.is_set():
                        return
                    parts = {c: decoded[c] for c in need}
                raw = np.empty((len(sel), *ds.image_shape), dtype=np.uint8)
                for c in need:
                    where = np.flatnonzero(chunks == c)
                    raw[where] = parts[c][sel[where] - c * ds.chunk_len]
                item = (_unit_float(raw), labels_all[sel].astype(np.int64))
                with cond:
                    for c in need:
                        if last_use[c] == b:
                            decoded.pop(c, None)
                    cond.notify_all()
                if not _offer(out, item, stop):
                    return
            out.put(None)
        except BaseException as exc:
            out.put(exc)

    threads = [
        threading.Thread(target=decoder, name=f"deepgalaxy-decode[{name}]", daemon=True),
        threading.Thread(target=batcher, name=f"deepgalaxy-batch[{name}]", daemon=True),
    ]
    for t in threads:
        t.start()
    try:
        yield from _consume(out)
    finally:
        stop.set()
        with cond:
            cond.notify_all()
        _drain(out)  # unblock a batcher waiting on a full queue
        for t in threads:
            t.join(timeout=5)


def _consume(out: queue.Queue[Any]) -> Iterator[Any]:
    """Yield what a producer thread puts until its ``None`` sentinel; re-raise an exception it put instead."""
    while True:
        item = out.get()
        if item is None:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def _drain(out: queue.Queue[Any]) -> None:
    """Empty the queue, so a producer blocked in ``put`` gets to see the stop flag."""
    while True:
        try:
            out.get_nowait()
        except queue.Empty:
            return


# -- opening and checking ---------------------------------------------------------------------------------------------


def open_dataset(
    path: str | Path, *, allow_incomplete: bool = False, cache_bytes: int = DEFAULT_CACHE_BYTES
) -> Dataset:
    """Open and check a deepgalaxy store; raise :class:`DatasetError` naming store, array and index range.

    ``allow_incomplete`` opens a store whose writing was interrupted, restricted to its finished simulations
    (for ``deepgalaxy data info``); training refuses incomplete stores. ``cache_bytes`` bounds the decoded
    chunks kept in memory (0 disables the cache). Chunk files are checked to exist, not decoded: that is
    :func:`verify_store`'s job (it reads everything).
    """
    p = Path(path).expanduser()
    root, attrs = _open_root(p)
    arrays = _schema_arrays(root, p)
    n = int(arrays["images"].shape[0])
    rows = np.arange(n, dtype=np.int64)
    if not attrs.get("complete", False):
        done_rows = _finished_rows(root, n)
        if not allow_incomplete:
            raise DatasetError(
                f"{p}: incomplete store: writing was interrupted ({len(done_rows)} of {n} images written); "
                f"{resume_advice(p, attrs)}"
            )
        rows = done_rows
    for name, arr in arrays.items():
        _check_chunks(p, name, arr, rows, attrs)

    labels = _read_all(p, "labels", arrays["labels"], attrs)
    meta = {name: _read_all(p, f"meta/{name}", arrays[f"meta/{name}"], attrs) for name in META_FIELDS}
    num_classes = int(attrs.get("num_classes", 0))
    sel = labels[rows]
    bad = rows[(sel < -1) | (sel >= num_classes)]
    if bad.size:
        raise DatasetError(
            f"{p}: array 'labels': {bad.size} labels out of range -1..{num_classes - 1} at indices {_span(bad)} "
            f"(first: labels[{int(bad[0])}] = {int(labels[bad[0]])}); the store is damaged or was written by "
            f"another tool; {repair_advice(p, attrs)}"
        )
    return Dataset(p, root, attrs, labels, meta, rows, cache_bytes)


def _open_root(p: Path) -> tuple[Any, dict[str, Any]]:
    """The store's root group and its deepgalaxy attributes, after the format and schema-version checks."""
    import zarr

    from deepgalaxy.core.overwrite import new_store_advice

    if not p.exists():
        raise DatasetError(f"{p}: no such dataset store; {new_store_advice(p)}")
    if not (p / "zarr.json").is_file():
        raise DatasetError(f"{p}: not a deepgalaxy dataset (not a Zarr v3 store: no zarr.json); {new_store_advice(p)}")
    try:
        root = zarr.open_group(str(p), mode="r", zarr_format=3)
        all_attrs = dict(root.attrs)
    except Exception as exc:
        raise DatasetError(
            f"{p}: cannot open as a Zarr v3 group ({type(exc).__name__}: {exc}); {new_store_advice(p)}"
        ) from exc
    attrs = all_attrs.get(ATTRS_KEY)
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT:
        raise DatasetError(
            f"{p}: a Zarr store but not a deepgalaxy dataset (no {ATTRS_KEY!r} attributes with format {FORMAT!r}); "
            f"{new_store_advice(p)}"
        )
    version = attrs.get("schema_version")
    if not isinstance(version, int) or version < 1:
        raise DatasetError(
            f"{p}: invalid schema_version {version!r} in the store attributes; {repair_advice(p, attrs)}"
        )
    if version > SCHEMA_VERSION:
        raise DatasetError(
            f"{p}: written with dataset schema version {version}, newer than the version {SCHEMA_VERSION} this "
            "deepgalaxy reads; upgrade deepgalaxy (pip install -U deepgalaxy)"
        )
    return root, attrs


def _schema_arrays(root: Any, p: Path) -> dict[str, Any]:
    """The per-image arrays of the schema (images, labels, meta/*), checked to exist and to agree in length."""
    arrays = {"images": _array(root, p, "images"), "labels": _array(root, p, "labels")}
    for name in META_FIELDS:
        arrays[f"meta/{name}"] = _array(root, p, f"meta/{name}")
    n = int(arrays["images"].shape[0])
    for name, arr in arrays.items():
        if arr.shape[0] != n:
            raise DatasetError(
                f"{p}: array {name!r} has {arr.shape[0]} rows but 'images' has {n} (indices 0..{n - 1}); "
                "the store is inconsistent, re-create it"
            )
    if len(arrays["images"].shape) != 4 or arrays["images"].dtype != np.uint8:
        raise DatasetError(
            f"{p}: array 'images' is {arrays['images'].dtype} {arrays['images'].shape}, expected uint8 (N, H, W, C)"
        )
    return arrays


def repair_advice(p: Path, attrs: Mapping[str, Any]) -> str:
    """The command that repairs a damaged store, from what wrote it (the generator recorded in its attributes)."""
    store = shlex.quote(str(p))
    params = (attrs.get("generator") or {}).get("params") or {}
    if attrs.get("source") == "simulation":
        return (
            f"repair it with `deepgalaxy data simulate {store}`: it re-simulates exactly the damaged simulations "
            f"with the store's own parameters (`deepgalaxy data verify {store}` lists the damage)"
        )
    if attrs.get("source") == "ingest" and "directory" in params:
        folder = str(params["directory"])
        where = "" if Path(folder).is_absolute() else " (from the folder the store was ingested in)"
        return (
            f"re-create it from its images with `deepgalaxy data ingest {shlex.quote(folder)} {store} --size "
            f"{params.get('size')} --channels {params.get('channels')} --overwrite`{where}"
        )
    return "re-create it or restore it from a copy"


def resume_advice(p: Path, attrs: Mapping[str, Any]) -> str:
    """How to finish an interrupted store."""
    if attrs.get("source") == "simulation":
        return (
            f"resume it with `deepgalaxy data simulate {shlex.quote(str(p))}` (it continues with the store's own "
            "parameters)"
        )
    return repair_advice(p, attrs)


def _array(root: Any, p: Path, name: str) -> Any:
    try:
        arr = root[name]
    except KeyError:
        arr = None
    if arr is None or not hasattr(arr, "shape"):
        raise DatasetError(
            f"{p}: array {name!r} is missing (rows 0..N-1 of the schema); the store is incomplete or damaged, "
            "re-create it"
        )
    return arr


def _sim_layout(root: Any, n: int) -> tuple[int, set[int]] | None:
    """(rows per simulation, finished simulations) of a simulated store; None for other stores."""
    try:
        done_arr = root["sims/done"]
    except KeyError:
        return None
    try:
        done = np.asarray(done_arr[:], dtype=bool)
    except Exception:  # a damaged done flag: no simulation counts as finished
        done = np.zeros(done_arr.shape[0], dtype=bool)
    return n // max(len(done), 1), set(np.flatnonzero(done).tolist())


def _finished_rows(root: Any, n: int) -> np.ndarray:
    """Rows of finished simulations in an interrupted simulated store (none for other sources)."""
    layout = _sim_layout(root, n)
    if layout is None:
        return np.zeros(0, dtype=np.int64)
    per_sim, finished = layout
    sims = np.array(sorted(finished), dtype=np.int64)
    return (sims[:, None] * per_sim + np.arange(per_sim)[None, :]).reshape(-1).astype(np.int64)


def _check_chunks(p: Path, name: str, arr: Any, rows: np.ndarray, attrs: Mapping[str, Any]) -> None:
    """Every chunk covering ``rows`` must exist on disk: zarr would silently read a missing one as fill values."""
    if len(rows) == 0:
        return
    length = int(arr.chunks[0])
    tail = (0,) * (len(arr.shape) - 1)
    missing = []
    for chunk in np.unique(rows // length).tolist():
        key = arr.metadata.encode_chunk_key((chunk, *tail))
        if not (p / arr.path / key).is_file():
            missing.append(chunk)
    if missing:
        first = missing[0]
        def rng(c: int) -> str:
            return f"indices {c * length}..{min((c + 1) * length, arr.shape[0]) - 1}"

        listed = ", ".join(f"{arr.metadata.encode_chunk_key((c, *tail))} ({rng(c)})" for c in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DatasetError(
            f"{p}: array {name!r}: {len(missing)} chunk file(s) missing: {listed}{more} (first missing rows "
            f"{first * length}..{min((first + 1) * length, arr.shape[0]) - 1}); zarr would read them as blank "
            f"values. The store is damaged: {repair_advice(p, attrs)}"
        )


def _read_all(p: Path, name: str, arr: Any, attrs: Mapping[str, Any]) -> np.ndarray:
    """Read a 1-D array, naming the first undecodable chunk and its index range on failure."""
    try:
        return np.asarray(arr[:])
    except Exception:
        length = int(arr.chunks[0])
        for chunk in range(math.ceil(arr.shape[0] / length)):
            start, stop = chunk * length, min((chunk + 1) * length, arr.shape[0])
            try:
                arr[start:stop]
            except Exception as exc:
                raise DatasetError(
                    f"{p}: array {name!r} chunk {arr.metadata.encode_chunk_key((chunk,))} "
                    f"(indices {start}..{stop - 1}) "
                    f"cannot be read: {type(exc).__name__}: {exc}. The store is damaged: {repair_advice(p, attrs)}"
                ) from exc
        raise


# -- verifying every chunk -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkProblem:
    """One chunk file of a store that is missing or does not decode (zstd, crc32c checksum)."""

    array: str
    key: str
    rows: tuple[int, int]
    """First and last row of the chunk along the array's first axis (images, or simulations under ``sims/``)."""
    problem: str
    """``missing`` or ``corrupt``."""
    detail: str = ""
    sims: tuple[int, ...] = ()
    """The simulations whose data the chunk holds (simulated stores)."""

    def __str__(self) -> str:
        where = f" ({_sims_text(self.sims)})" if self.sims else ""
        detail = f" ({self.detail})" if self.detail else ""
        rows = f"rows {self.rows[0]}..{self.rows[1]}"
        return f"array {self.array!r} chunk {self.key} {rows}{where}: {self.problem}{detail}"


@dataclass(frozen=True)
class Verification:
    """What :func:`verify_store` found: the chunks it read and the damaged ones."""

    path: Path
    attrs: dict[str, Any]
    arrays: int
    chunks: int
    problems: tuple[ChunkProblem, ...]

    @property
    def damaged_sims(self) -> list[int]:
        """Simulations with a missing or corrupt chunk (re-simulating them repairs the store)."""
        return sorted({s for problem in self.problems for s in problem.sims})

    def error(self) -> DatasetError:
        """The error that names the damage and what to do."""
        arrays = sorted({p.array for p in self.problems})
        sims = f", holding {_sims_text(tuple(self.damaged_sims))}" if self.damaged_sims else ""
        return DatasetError(
            f"{self.path}: damaged: {len(self.problems)} of {self.chunks} chunks missing or corrupt in array(s) "
            f"{', '.join(arrays)}{sims}; {repair_advice(self.path, self.attrs)}"
        )


def _sims_text(sims: tuple[int, ...]) -> str:
    listed = ", ".join(str(s) for s in sims[:10]) + (f" and {len(sims) - 10} more" if len(sims) > 10 else "")
    return f"simulation{'s' if len(sims) > 1 else ''} {listed}"


def verify_store(path: str | Path, *, progress: bool = False) -> Verification:
    """Read every chunk of every array of a store and report those that are missing or fail to decode.

    ``open_dataset`` only checks that chunk files exist (decoding a large store takes minutes); this decodes all
    of them, so zstd and the crc32c checksum see every byte. In an interrupted simulated store, the chunks of
    simulations not written yet are not expected. Structural damage (a missing array, unreadable metadata)
    raises :class:`DatasetError` as ``open_dataset`` does.
    """
    from deepgalaxy.core.progress import progress_bar

    p = Path(path).expanduser()
    root, attrs = _open_root(p)
    n = int(_schema_arrays(root, p)["images"].shape[0])
    arrays = sorted((name, node) for name, node in root.members(max_depth=None) if hasattr(node, "shape"))
    layout = _sim_layout(root, n)
    expect_all = bool(attrs.get("complete", False))
    total = sum(int(arr.nchunks) for _, arr in arrays)
    bar = progress_bar(progress, total, f"verifying {p.name}", unit="chunk")
    problems: list[ChunkProblem] = []
    try:
        for name, arr in arrays:
            for coords in np.ndindex(*arr.cdata_shape):
                found = _verify_chunk(p, name, arr, coords, layout, expect_all)
                if found is not None:
                    problems.append(found)
                bar.update(1)
    finally:
        bar.close()
    return Verification(p, dict(attrs), len(arrays), total, tuple(problems))


def _verify_chunk(
    p: Path, name: str, arr: Any, coords: tuple[int, ...], layout: tuple[int, set[int]] | None, expect_all: bool
) -> ChunkProblem | None:
    """Check one chunk: its file exists (when expected) and decodes."""
    sel = tuple(
        slice(c * size, min((c + 1) * size, dim)) for c, size, dim in zip(coords, arr.chunks, arr.shape, strict=True)
    )
    first, last = sel[0].start, sel[0].stop - 1
    sims: tuple[int, ...] = ()
    if layout is not None:
        per_sim = max(layout[0], 1)
        sims = tuple(range(first, last + 1)) if name.startswith("sims/") else tuple(
            range(first // per_sim, last // per_sim + 1)
        )
    key = arr.metadata.encode_chunk_key(coords)
    if not (p / arr.path / key).is_file():
        expected = expect_all or (layout is not None and not layout[1].isdisjoint(sims))
        return ChunkProblem(name, key, (first, last), "missing", "", sims) if expected else None
    try:
        arr[sel]
    except Exception as exc:
        return ChunkProblem(name, key, (first, last), "corrupt", f"{type(exc).__name__}: {exc}"[:200], sims)
    return None


__all__ = ["METADATA_KEYS", "ChunkProblem", "Dataset", "Subset", "Verification", "open_dataset", "verify_store"]
