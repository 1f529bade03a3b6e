"""Selections of a store's images: split, shard and batch them, read their images and metadata.

A :class:`Subset` is a sorted array of global row indices and the :class:`~deepgalaxy.core.store.StoreReader`
it reads through (it holds the reader; nothing of the reader is private to it). A :class:`Dataset` is the
selection of every readable image of a store, plus the store's description; every selection can be split,
sharded and batched again (``val.shard(rank, size)`` works like ``train.shard(rank, size)``).

One index convention: ``images(positions)`` takes *local* positions ``0..len(selection)-1`` on every selection,
the Dataset included; ``selection.indices[positions]`` are the store rows they name. (On a complete store the
Dataset's positions and rows coincide; on an interrupted one opened with ``allow_incomplete`` they do not.)
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np

from deepgalaxy.core.errors import DatasetError, ShapeError
from deepgalaxy.core.loader import CacheBudget, ResidentImages, epoch_batches, epoch_order, seed_key
from deepgalaxy.core.location import StoreLocation
from deepgalaxy.core.store import StoreReader, index_span


class Subset:
    """A selection of images of one store; ``indices`` are sorted global indices.

    Subsets are cheap (an index array and a reference to the store reader); split, shard and batch them. The
    selections made from one opened store share its ``cache`` budget for images kept in memory.
    """

    def __init__(self, store: StoreReader, indices: np.ndarray, name: str, cache: CacheBudget) -> None:
        self.store = store
        self.indices = np.asarray(indices, dtype=np.int64)
        self.name = name
        self._cache = cache
        self._resident: ResidentImages | None = None  # decoded images of this selection, filled while streaming
        self.targets: np.ndarray | None = None
        """Property targets ``(rows of the store, K)`` its batches carry with the labels (:meth:`with_targets`)."""

    def _select(self, indices: np.ndarray, name: str) -> Subset:
        """A selection of the same store sharing its cache budget (and its property targets)."""
        selection = Subset(self.store, indices, name, self._cache)
        selection.targets = self.targets
        return selection

    def with_targets(self, targets: np.ndarray | None) -> Subset:
        """This selection with property targets ``(rows of the store, K)``: its batches' labels become records of
        class label and targets (:func:`deepgalaxy.core.contract.with_targets`). None: plain labels."""
        if targets is not None and len(targets) != self.store.num_rows:
            raise ShapeError(f"{self.path}: targets have {len(targets)} rows, the store {self.store.num_rows}")
        selection = self._select(self.indices, self.name)
        selection.targets = targets
        return selection

    # -- basic access ---------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} of {self.path}: {len(self)} images>"

    @property
    def path(self) -> StoreLocation:
        """Where the store is (its folder or URL)."""
        return self.store.path

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of every image of the store."""
        return self.store.image_shape

    @property
    def num_classes(self) -> int:
        """Classes of the store's labelling (labels ``0..num_classes-1``; -1 = unlabelled)."""
        return self.store.num_classes

    @property
    def labels(self) -> np.ndarray:
        """int16 labels of this selection, in ``indices`` order (-1 = unlabelled)."""
        return self.store.labels[self.indices]

    @property
    def metadata(self) -> dict[str, np.ndarray]:
        """Per-image metadata of this selection: ``sim_id, camera, mass_ratio, snapshot, time, label``."""
        return {k: v[self.indices] for k, v in self.store.metadata.items()}

    def properties(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """float32 physical properties ``names`` of this selection, in ``indices`` order (NaN = unknown); a store
        that cannot give one raises :class:`DatasetError` naming it (:meth:`StoreReader.properties`)."""
        return {k: v[self.indices] for k, v in self.store.properties(names).items()}

    def images(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """uint8 images ``(n, H, W, C)`` at *local* positions (``0..len(self)-1``) of this selection."""
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if pos.size and (pos.min() < -len(self) or pos.max() >= len(self)):
            raise DatasetError(
                f"{self.path}: array 'images': positions {int(pos.min())}..{int(pos.max())} are out of range for "
                f"{self.name} of {len(self)} images (images() takes local positions 0..{len(self) - 1})"
            )
        return self.store.read_rows(self.indices[pos], what=f"images() of {self.name}")

    def class_counts(self) -> np.ndarray:
        """Images per class ``0..num_classes-1`` (unlabelled images are not counted)."""
        labels = self.labels
        return np.bincount(labels[labels >= 0], minlength=self.num_classes)

    def check_shape(self, shape: Sequence[int], model: str = "the model") -> None:
        """Raise :class:`ShapeError` unless images are ``shape`` = (H, W, C), naming store, array and range."""
        want = tuple(int(s) for s in shape)
        if want != self.image_shape:
            raise ShapeError(
                f"{self.path}: array 'images' (indices 0..{self.store.num_rows - 1}) holds images of shape "
                f"{self.image_shape} (H, W, C) but {model} expects {want}; re-create the dataset at that size "
                f"(`deepgalaxy data simulate/ingest --size {want[0]}`) or use a card with input_size="
                f"{self.image_shape[0]}, channels={self.image_shape[2]}"
            )

    def _require_nonempty(self, what: str) -> None:
        if len(self) == 0:
            raise DatasetError(
                f"{self.path}: array 'images': empty selection ({self.name} has no images) for {what}; "
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
                f"{self.path}: validation_fraction={validation_fraction} must be between 0 and 1 (exclusive)"
            )
        if kind not in ("simulation", "random"):
            raise DatasetError(f"{self.path}: unknown split kind {kind!r}; use 'simulation' or 'random'")
        rng = np.random.default_rng([seed_key(seed), 0x5B117])
        if kind == "random":
            n_val = round(validation_fraction * len(self))
            val_mask = np.zeros(len(self), dtype=bool)
            val_mask[rng.permutation(len(self))[:n_val]] = True
        else:
            sim = self.store.metadata["sim_id"][self.indices].astype(np.int64)
            groups = np.where(sim >= 0, sim, -(self.indices + 2))  # real images: one group each
            uniq, inverse = np.unique(groups, return_inverse=True)
            first = np.zeros(len(uniq), dtype=np.int64)
            first[inverse[::-1]] = np.arange(len(self))[::-1]
            ratio = np.nan_to_num(self.store.metadata["mass_ratio"][self.indices][first], nan=-1.0)
            # order groups by mass ratio, shuffled within a ratio; take every k-th -> even over mass ratios
            order = np.lexsort((rng.random(len(uniq)), ratio))
            n_val = round(validation_fraction * len(uniq))
            step = len(uniq) / max(n_val, 1)
            picks = (rng.random() * step + step * np.arange(n_val)).astype(np.int64)
            val_groups = np.zeros(len(uniq), dtype=bool)
            val_groups[order[np.clip(picks, 0, len(uniq) - 1)]] = True
            val_mask = val_groups[inverse]
        train = self._select(self.indices[~val_mask], f"{self.name}.train[{kind}]")
        val = self._select(self.indices[val_mask], f"{self.name}.validation[{kind}]")
        for part in (train, val):
            if len(part) == 0:
                n_groups = len(uniq) if kind == "simulation" else len(self)
                raise DatasetError(
                    f"{self.path}: array 'images': empty selection: split(kind={kind!r}, "
                    f"validation_fraction={validation_fraction}) of {self.name} (indices {index_span(self.indices)}) "
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
                f"{self.path}: shard(rank={rank}, size={size}): need size >= 1 and 0 <= rank < size"
            )
        per_rank = len(self) // size
        if per_rank == 0:
            raise DatasetError(
                f"{self.path}: array 'images': empty selection: {self.name} (indices {index_span(self.indices)}) "
                f"is too small to give each of {size} ranks an image; use fewer workers or more data"
            )
        groups = self.store.chunk_groups(self.indices)
        perm = np.random.default_rng([seed_key(seed), 0x5AAD]).permutation(len(groups))
        ordered = np.concatenate([groups[g] for g in perm])
        mine = np.sort(ordered[rank * per_rank : (rank + 1) * per_rank])
        return self._select(mine, f"{self.name}.shard({rank}/{size})")

    # -- batching ---------------------------------------------------------------------------------------------------

    def num_batches(self, batch_size: int, drop_last: bool = True) -> int:
        """Batches per epoch: ``len // batch_size``, or rounded up when ``drop_last`` is false."""
        if batch_size < 1:
            raise DatasetError(f"{self.path}: batch_size={batch_size} must be at least 1")
        return len(self) // batch_size if drop_last else math.ceil(len(self) / batch_size)

    def epoch_order(self, epoch: int = 0, seed: int = 0, shuffle: bool = True) -> np.ndarray:
        """Global indices in the order one epoch visits them (:func:`~deepgalaxy.core.loader.epoch_order`)."""
        return epoch_order(self.store, self.indices, epoch, seed, shuffle)

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
        """Yield ``(images float32 (n, H, W, C) in [0, 1], labels int64 (n,))`` for one epoch (labels with property
        targets for a selection :meth:`with_targets`).

        The order depends only on (this selection, ``seed``, ``epoch``), so it is identical across ranks and
        processes; ``start_batch=k`` skips the first k batches (resume mid-epoch). While streaming from the store,
        ``prefetch`` batches are prepared ahead in background threads. The selection's decoded images are kept in
        memory while its first epoch streams (within the store's cache budget) and serve the later epochs, made in
        the caller's thread as they are asked for.
        """
        self._require_nonempty("batches()")
        n_batches = self.num_batches(batch_size, drop_last)
        if n_batches == 0:
            raise DatasetError(
                f"{self.path}: array 'images': empty selection: {self.name} (indices {index_span(self.indices)}) "
                f"has no full batch of {batch_size}; use a smaller batch size or drop_last=False"
            )
        if not 0 <= start_batch <= n_batches:
            raise DatasetError(
                f"{self.path}: start_batch={start_batch} is outside 0..{n_batches} for {self.name}"
            )
        order = self.epoch_order(epoch, seed, shuffle)[: n_batches * batch_size if drop_last else None]
        order = order[start_batch * batch_size :]
        if self._resident is None:
            self._resident = ResidentImages.reserve(self.store, self.indices, self._cache)
        return epoch_batches(self.store, order, batch_size, max(1, prefetch), self._resident, self.name, self.targets)


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



class Dataset(Subset):
    """An opened store as a selection: all its readable images, plus the store's attributes and identity."""

    def __init__(self, store: StoreReader, cache: CacheBudget) -> None:
        super().__init__(store, store.rows, "dataset", cache)

    @property
    def attrs(self) -> dict[str, Any]:
        """The store's deepgalaxy attributes (format, schema version, source, generator, provenance, ...)."""
        return self.store.attrs

    @property
    def num_rows(self) -> int:
        """Rows of the store (readable or not)."""
        return self.store.num_rows

    @property
    def chunk_len(self) -> int:
        """Images per chunk of the store's ``images`` array."""
        return self.store.chunk_len

    def fingerprint(self) -> str:
        """Short stable hash of the store's identity: schema, generator, shape, labels and metadata."""
        h = hashlib.sha256()
        ident = {k: self.attrs.get(k) for k in ("format", "schema_version", "num_classes", "image_shape", "source")}
        ident["generator"] = self.attrs.get("generator")
        h.update(json.dumps(ident, sort_keys=True, default=str).encode())
        h.update(self.indices.tobytes())
        metadata = self.store.metadata
        for key in sorted(metadata):
            h.update(key.encode())
            h.update(np.ascontiguousarray(metadata[key][self.indices]).tobytes())
        return h.hexdigest()[:12]


__all__ = ["Dataset", "Subset"]
