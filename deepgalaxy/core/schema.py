"""The deepgalaxy dataset store: a versioned Zarr v3 layout shared by every dataset source and the reader.

Layout (see the README section "Dataset store schema")::

    STORE.zarr/                       root group, attrs["deepgalaxy"] = store attributes (below)
      images      uint8 (N, H, W, C)  chunked along N only
      labels      int16 (N,)          timescale class 0..num_classes-1, -1 = unlabelled
      meta/sim_id     int32 (N,)      simulation id, -1 for real images
      meta/camera     int16 (N,)      camera index 0..13, -1 for real images
      meta/mass_ratio float32 (N,)    secondary/primary mass, NaN for real images
      meta/snapshot   int16 (N,)      snapshot index 0..S-1, -1 for real images
      meta/time       float32 (N,)    physical time of the snapshot (simulation units), NaN for real images
      sims/...        per-simulation arrays (simulated stores only; see ``SIM_ARRAYS``)
      properties/NAME float32 (N,)    per-image physical properties (NaN = unknown), their names listed in the
                                      attribute ``properties``: a simulated store's (schema 2: every name of
                                      ``core.properties.PROPERTIES``, in the physical units recorded in the
                                      attribute ``units``), or an ingest labels table's property columns

Schema version 2 added the simulated store's ``properties/*`` arrays and ``units`` attribute; a version-1 store
still opens, and the reader derives its properties from ``meta/*``, ``sims/*`` and ``camera_directions``
(:meth:`deepgalaxy.core.store.StoreReader.properties`).

Why these chunks and codecs (measured with ``python benchmarks/data.py --chunks`` on 2,000 simulated 128x128x1
images, shuffled float32 batches of 64 decoded chunk by chunk; the shared 2-core machine was loaded, so only the
large differences below are trusted):

- Chunks along N only, whole images: the loader always decodes whole chunks. 16-image chunks read 4-7x slower
  per image than 64 (zarr's fixed per-call overhead dominates small chunks); 64, 71 and 256 images were within
  the run-to-run noise. A simulated store therefore uses one camera's full time sequence per chunk (S = 71
  images = 1.1 MiB raw at 128 px): inside that flat optimum, every chunk belongs to a single simulation (a
  finished simulation is never rewritten on resume, and a split by simulation is chunk-aligned) and every chunk
  holds all timescale classes (good mixing in a shuffle window). Larger images fall back to chunks of at most
  4 MiB raw; real images use 64 per chunk, capped at 4 MiB.
- No Zarr sharding: FACTS.md measured sharded 1-image chunks at 3x the time of plain chunks for random reads.
- zstd level 1 + crc32c: levels 0 (= zstd's default 3), 1 and 3 gave the same size (4.7-4.8 MB for 2,000 images,
  ~6.8x smaller than raw) and the same read rate relative to the in-memory baseline timed beside it, but level 3
  took twice as long to write. crc32c turns a
  flipped or truncated chunk file into a read error instead of silently wrong pixels.
- ``write_empty_chunks``: a chunk equal to the fill value is written anyway, so a *missing* chunk file always
  means damage (zarr itself reads a missing chunk as fill values without complaint).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from deepgalaxy.core.specs import NUM_CLASSES

FORMAT = "deepgalaxy-dataset"
SCHEMA_VERSION = 2
"""Bump when the layout changes; the reader refuses stores newer than this (2: a simulated store's properties)."""

ATTRS_KEY = "deepgalaxy"
"""All deepgalaxy attributes live under this key of the root group's attributes."""

META_FIELDS: dict[str, tuple[str, Any]] = {
    "sim_id": ("int32", -1),
    "camera": ("int16", -1),
    "mass_ratio": ("float32", float("nan")),
    "snapshot": ("int16", -1),
    "time": ("float32", float("nan")),
}
"""Per-image metadata arrays under ``meta/``: name -> (dtype, value for real images)."""

SIM_ARRAYS: dict[str, str] = {
    "done": "bool",
    "mass_ratio": "float32",
    "pericentre": "float32",
    "t_pericentre": "float32",
    "t_coalescence": "float32",
    "seed": "int64",
}
"""Per-simulation 1-D arrays under ``sims/`` (plus ``sims/snapshot_times`` float32 (sims, S))."""

PROPERTIES_GROUP = "properties"
"""The group of per-image property arrays (simulated stores of schema 2; ``data ingest --labels`` with property
columns)."""

STORE_ENTRIES = frozenset({"zarr.json", "images", "labels", "meta", "sims", PROPERTIES_GROUP})
"""Everything a store holds at its top level (``--overwrite`` refuses a store that holds anything else)."""

MAX_CHUNK_BYTES = 4 << 20
DEFAULT_CHUNK_IMAGES = 64


def label_for_snapshot(snapshot: np.ndarray | int, num_snapshots: int, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Timescale class of snapshot k of n: ``round(k * (num_classes-1) / (n-1))``.

    With the paper's 71 snapshots this is the snapshot index itself; with fewer snapshots (tiny test runs) or more
    (finer time resolution, e.g. 141) the classes keep their physical meaning (0 = start, 70 = end of the simulated
    time): with more, neighbouring snapshots share a class, while the properties (``time_since_pericentre``, ...)
    come from each snapshot's own time.
    """
    k = np.asarray(snapshot, dtype=np.float64)
    if num_snapshots <= 1:
        return np.zeros(k.shape, dtype=np.int16)
    return np.rint(k * (num_classes - 1) / (num_snapshots - 1)).astype(np.int16)


def chunk_images_for(image_shape: tuple[int, int, int], preferred: int = DEFAULT_CHUNK_IMAGES) -> int:
    """Images per chunk: ``preferred``, reduced so one chunk stays under :data:`MAX_CHUNK_BYTES` raw."""
    per_image = int(np.prod(image_shape))
    return max(1, min(preferred, MAX_CHUNK_BYTES // max(per_image, 1)))


def _codecs() -> dict[str, Any]:
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return {"compressors": [ZstdCodec(level=1), Crc32cCodec()]}


def provenance() -> dict[str, Any]:
    """Who/what/when wrote a store: versions and the command line (no user names or host secrets)."""
    import zarr

    from deepgalaxy import __version__

    return {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "deepgalaxy": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "zarr": zarr.__version__,
        "platform": platform.platform(terse=True),
        "argv": [os.path.basename(sys.argv[0]), *sys.argv[1:]] if sys.argv else [],
    }


def store_attrs(
    *,
    source: str,
    num_images: int,
    image_shape: tuple[int, int, int],
    chunk_images: int,
    generator: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The attribute dictionary every store carries under ``attrs["deepgalaxy"]``."""
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "num_classes": NUM_CLASSES,
        "num_images": int(num_images),
        "image_shape": [int(s) for s in image_shape],
        "chunk_images": int(chunk_images),
        "source": source,
        "complete": False,
        "generator": dict(generator),
        "provenance": provenance(),
        **(dict(extra) if extra else {}),
    }


@contextlib.contextmanager
def writing() -> Iterator[None]:
    """Write chunks even when they equal the fill value (zarr skips those by default, and the reader treats a
    missing chunk file as damage). The setting is runtime-only, so every writer wraps its writes in this."""
    import zarr

    with zarr.config.set({"array.write_empty_chunks": True}):
        yield


def create_store(
    path: Path,
    *,
    num_images: int,
    image_shape: tuple[int, int, int],
    chunk_images: int,
    attrs: Mapping[str, Any],
    num_sims: int = 0,
    num_snapshots: int = 0,
    meta_chunk: int | None = None,
    properties: tuple[str, ...] = (),
) -> Any:
    """Create an empty store at ``path`` (nothing there, or an empty folder) with every array of the schema;
    return the zarr group. Replacing a store is :func:`deepgalaxy.core.overwrite.replace_store`'s job, after
    :func:`~deepgalaxy.core.overwrite.check_output`: this refuses anything else at ``path``.

    ``meta_chunk`` is the chunk length of the 1-D arrays (simulated stores: one simulation's images, so each
    finished simulation writes whole chunks). ``properties``: names of per-image float32 property arrays.
    """
    import zarr

    from deepgalaxy.core.overwrite import require_new  # overwrite imports this module's constants

    require_new(path)
    config: Any = {"write_empty_chunks": True}
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs[ATTRS_KEY] = dict(attrs)
    codecs = _codecs()
    root.create_array(
        "images", shape=(num_images, *image_shape), chunks=(chunk_images, *image_shape), dtype="uint8",
        fill_value=0, config=config, dimension_names=["image", "y", "x", "channel"], **codecs,
    )
    mchunk = max(1, min(meta_chunk or 65536, max(num_images, 1)))
    root.create_array(
        "labels", shape=(num_images,), chunks=(mchunk,), dtype="int16", fill_value=-1, config=config, **codecs
    )
    meta = root.create_group("meta")
    for name, (dtype, fill) in META_FIELDS.items():
        meta.create_array(
            name, shape=(num_images,), chunks=(mchunk,), dtype=dtype, fill_value=fill, config=config, **codecs
        )
    if properties:
        group = root.create_group(PROPERTIES_GROUP)
        for name in properties:
            group.create_array(name, shape=(num_images,), chunks=(mchunk,), dtype="float32", fill_value=float("nan"),
                               config=config, **codecs)
    if num_sims:
        sims = root.create_group("sims")
        for name, dtype in SIM_ARRAYS.items():
            sim_fill: Any = False if dtype == "bool" else (-1 if dtype.startswith("int") else float("nan"))
            sims.create_array(
                name, shape=(num_sims,), chunks=(1,), dtype=dtype, fill_value=sim_fill, config=config, **codecs
            )
        sims.create_array(
            "snapshot_times", shape=(num_sims, num_snapshots), chunks=(1, num_snapshots), dtype="float32",
            fill_value=float("nan"), config=config, **codecs,
        )
    return root
