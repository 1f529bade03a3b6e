"""Verify a store by decoding every chunk of every array (``deepgalaxy data verify``, the repair of a simulation).

:func:`~deepgalaxy.core.store.open_store` only checks that chunk files exist (decoding a large store takes
minutes); :func:`verify_store` reads them all, so zstd and the crc32c checksum see every byte, and names each
missing or corrupt chunk with its rows and the simulations it holds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from deepgalaxy.core.errors import DatasetError
from deepgalaxy.core.location import StoreLocation
from deepgalaxy.core.progress import progress_bar
from deepgalaxy.core.store import open_root, repair_advice, schema_arrays, sim_layout


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

    path: StoreLocation
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


def verify_store(path: str | os.PathLike[str] | StoreLocation, *, progress: bool = False) -> Verification:
    """Read every chunk of every array of a store and report those that are missing or fail to decode.

    ``open_dataset`` only checks that chunk files exist (decoding a large store takes minutes); this decodes all
    of them, so zstd and the crc32c checksum see every byte. In an interrupted simulated store, the chunks of
    simulations not written yet are not expected. Structural damage (a missing array, unreadable metadata)
    raises :class:`DatasetError` as ``open_dataset`` does.
    """
    p = StoreLocation.of(path)
    root, attrs = open_root(p)
    n = int(schema_arrays(root, p)["images"].shape[0])
    arrays = sorted((name, node) for name, node in root.members(max_depth=None) if hasattr(node, "shape"))
    layout = sim_layout(root, n)
    expect_all = bool(attrs.get("complete", False))
    total = sum(int(arr.nchunks) for _, arr in arrays)
    bar = progress_bar(progress, total, f"verifying {p.name}", unit="chunk")
    problems: list[ChunkProblem] = []
    try:
        for name, arr in arrays:
            every = list(np.ndindex(*arr.cdata_shape))
            there = p.files_exist([f"{arr.path}/{arr.metadata.encode_chunk_key(c)}" for c in every])
            for coords, exists in zip(every, there, strict=True):
                found = _verify_chunk(p, name, arr, coords, exists, layout, expect_all)
                if found is not None:
                    problems.append(found)
                bar.update(1)
    finally:
        bar.close()
    return Verification(p, dict(attrs), len(arrays), total, tuple(problems))


def _verify_chunk(
    p: StoreLocation, name: str, arr: Any, coords: tuple[int, ...], exists: bool,
    layout: tuple[int, set[int]] | None, expect_all: bool,
) -> ChunkProblem | None:
    """Check one chunk: its file exists (when expected) and decodes (a network fault raises, naming the URL)."""
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
    if not exists:
        expected = expect_all or (layout is not None and not layout[1].isdisjoint(sims))
        return ChunkProblem(name, key, (first, last), "missing", "", sims) if expected else None
    try:
        arr[sel]
    except Exception as exc:
        fault = p.fault(exc, f"{arr.path}/{key}")
        if fault is not None:
            raise fault from exc
        return ChunkProblem(name, key, (first, last), "corrupt", f"{type(exc).__name__}: {exc}"[:200], sims)
    return None
