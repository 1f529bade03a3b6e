"""The store reader: open a deepgalaxy Zarr store after checking it, and read its rows.

:func:`open_store` checks a store up front (format, schema version, arrays, chunk files, label range) and raises
:class:`~deepgalaxy.core.errors.DatasetError` naming the store, the array and the index range of whatever is wrong,
with the command that repairs it (:func:`repair_advice`, :func:`resume_advice`). The :class:`StoreReader` it returns
holds the store's attributes, all labels and metadata (small, read once), reads images by *global* row (the
rows of the store) a chunk at a time, and gives the per-image physical properties (:meth:`StoreReader.properties`:
the ``properties/*`` arrays, or derived from a version-1 simulated store's metadata). Selections of rows
(:mod:`deepgalaxy.core.selection`) and the batch loader (:mod:`deepgalaxy.core.loader`) read through it; decoding
every chunk is :mod:`deepgalaxy.core.store_verify`'s job.
"""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepgalaxy.core.errors import DatasetError
from deepgalaxy.core.location import StoreLocation
from deepgalaxy.core.properties import PROPERTIES, PhysicalUnits, simulation_properties
from deepgalaxy.core.schema import ATTRS_KEY, FORMAT, META_FIELDS, PROPERTIES_GROUP, SCHEMA_VERSION

METADATA_KEYS: tuple[str, ...] = (*META_FIELDS, "label")


def index_span(indices: np.ndarray) -> str:
    """'a..b (n images)' for error messages."""
    if len(indices) == 0:
        return "no images"
    return f"{int(indices.min())}..{int(indices.max())} ({len(indices)} images)"


class StoreReader:
    """An opened, checked store: its attributes, labels and metadata of every row, and images read by global row.

    ``rows`` are the rows that can be read: all of them, or the finished simulations of an interrupted store
    opened with ``allow_incomplete``.
    """

    def __init__(
        self, path: StoreLocation, root: Any, attrs: dict[str, Any], labels: np.ndarray, meta: dict[str, np.ndarray],
        rows: np.ndarray,
    ) -> None:
        self.path = path
        self.attrs = attrs
        self.rows = rows
        self.labels = labels
        """int16 label of every row of the store (-1 = unlabelled)."""
        self.metadata = {**meta, "label": labels}
        """Per-row metadata of every row of the store (:data:`METADATA_KEYS`)."""
        self._root = root
        self._images = root["images"]
        self._properties: dict[str, np.ndarray] = {}
        self.num_classes = int(attrs["num_classes"])
        self.image_shape: tuple[int, int, int] = tuple(int(s) for s in self._images.shape[1:])  # type: ignore[assignment]
        self.num_rows = int(self._images.shape[0])
        self.chunk_len = int(self._images.chunks[0])
        """Images per chunk of the ``images`` array (the unit of reading and decoding)."""

    @property
    def units(self) -> PhysicalUnits | None:
        """The physical scale of a simulated store's N-body units (the defaults for schema version 1, which records
        none); None for a store of real images."""
        return PhysicalUnits.from_attrs(self.attrs.get("units")) if self._simulated() else None

    @property
    def property_names(self) -> list[str]:
        """The per-image properties this store gives: its ``properties/*`` arrays, or every name of
        :data:`~deepgalaxy.core.properties.PROPERTIES` for a simulated store of schema version 1."""
        stored = self._stored_properties()
        return stored or (list(PROPERTIES) if self._simulated() else [])

    def properties(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """float32 per-image properties ``names`` of every row of the store (NaN = unknown).

        From the ``properties/NAME`` arrays; a simulated store of schema version 1 has none, so they are derived
        from its metadata (``meta/time``, ``meta/camera``, ``meta/sim_id``, ``sims/*``, ``camera_directions``) as
        the simulator writes them. Raises :class:`DatasetError` naming the arrays the store lacks.
        """
        missing = [name for name in names if name not in self.property_names]
        if missing:
            raise DatasetError(f"{self.path}: no per-image properties {', '.join(missing)} (arrays "
                               f"{', '.join(f'{PROPERTIES_GROUP}/{n}' for n in missing)} are missing; the store gives "
                               f"{', '.join(self.property_names) or 'none'}); {property_advice(missing)}")
        for name in names:
            if name not in self._properties:
                self._properties.update(self._read_property(name) if self._stored_properties()
                                        else self._derived_properties())
        return {name: self._properties[name] for name in names}

    def _stored_properties(self) -> list[str]:
        try:
            group = self._root[PROPERTIES_GROUP]
        except KeyError:
            return []
        return sorted(name for name, node in group.members() if hasattr(node, "shape"))

    def _simulated(self) -> bool:
        """Whether this is a simulated store, whose properties follow from its metadata."""
        return self.attrs.get("source") == "simulation" and "camera_directions" in self.attrs

    def _read_property(self, name: str) -> dict[str, np.ndarray]:
        path = f"{PROPERTIES_GROUP}/{name}"
        arr = self._root[path]
        if arr.shape != (self.num_rows,):
            raise DatasetError(f"{self.path}: array {path!r} has shape {arr.shape}, expected ({self.num_rows},) "
                               "like 'images'; the store is inconsistent, re-create it")
        _check_chunks(self.path, path, arr, self.rows, self.attrs)
        return {name: _read_all(self.path, path, arr, self.attrs).astype(np.float32)}

    def _derived_properties(self) -> dict[str, np.ndarray]:
        """Every property of a simulated store of schema version 1, from its metadata (NaN for unfinished rows)."""
        t_peri, t_coal, ratio, peri = (
            _read_all(self.path, f"sims/{k}", _array(self._root, self.path, f"sims/{k}"), self.attrs)
            for k in ("t_pericentre", "t_coalescence", "mass_ratio", "pericentre")
        )
        directions = np.asarray(self.attrs["camera_directions"], np.float64)
        units = PhysicalUnits.from_attrs(self.attrs.get("units"))
        sim_id, camera, time = (self.metadata[k] for k in ("sim_id", "camera", "time"))
        out = {name: np.full(self.num_rows, np.nan, np.float32) for name in PROPERTIES}
        for s in np.unique(sim_id[self.rows][sim_id[self.rows] >= 0]).tolist():
            rows = self.rows[sim_id[self.rows] == s]
            values = simulation_properties(time[rows], float(t_peri[s]), float(t_coal[s]), float(ratio[s]),
                                           float(peri[s]), directions[camera[rows]], units)
            for name, v in values.items():
                out[name][rows] = v
        return out

    def chunk_groups(self, indices: np.ndarray) -> list[np.ndarray]:
        """Split sorted global indices into runs that share a chunk."""
        if len(indices) == 0:
            return []
        chunks = indices // self.chunk_len
        starts = np.flatnonzero(np.diff(chunks)) + 1
        return np.split(indices, starts)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        """First row of ``chunk`` and the row after its last."""
        start = chunk * self.chunk_len
        return start, min(start + self.chunk_len, self.num_rows)

    def read_chunk(self, chunk: int) -> np.ndarray:
        """Decoded uint8 images of one chunk."""
        start, stop = self.chunk_range(chunk)
        try:
            data = np.asarray(self._images[start:stop])
        except Exception as exc:
            key = self._images.metadata.encode_chunk_key((chunk, 0, 0, 0))
            raise self.path.fault(exc, f"images/{key}") or DatasetError(
                f"{self.path}: array 'images' chunk {key} (indices {start}..{stop - 1}) cannot be read: "
                f"{type(exc).__name__}: {exc}. The store is damaged: {repair_advice(self.path, self.attrs)}"
            ) from exc
        return data

    def read_rows(self, idx: np.ndarray, what: str) -> np.ndarray:
        """uint8 images ``(n, H, W, C)`` at global rows ``idx`` (``what`` names the reader in errors)."""
        if idx.size == 0:
            raise DatasetError(f"{self.path}: array 'images': empty selection: {what} was given no indices")
        if idx.min() < 0 or idx.max() >= self.num_rows:
            bad = idx[(idx < 0) | (idx >= self.num_rows)]
            raise DatasetError(
                f"{self.path}: array 'images': indices {index_span(bad)} are out of range 0..{self.num_rows - 1}"
            )
        out = np.empty((len(idx), *self.image_shape), dtype=np.uint8)
        chunks = idx // self.chunk_len
        for chunk in np.unique(chunks):
            where = np.flatnonzero(chunks == chunk)
            out[where] = self.read_chunk(int(chunk))[idx[where] - chunk * self.chunk_len]
        return out


# -- opening and checking ---------------------------------------------------------------------------------------------


def open_store(path: str | os.PathLike[str] | StoreLocation, *, allow_incomplete: bool = False) -> StoreReader:
    """Open and check a deepgalaxy store; raise :class:`DatasetError` naming store, array and index range.

    ``allow_incomplete`` opens a store whose writing was interrupted, restricted to its finished simulations
    (for ``deepgalaxy data info``); training refuses incomplete stores. Chunk files are checked to exist, not
    decoded: that is :func:`~deepgalaxy.core.store_verify.verify_store`'s job (it reads everything). ``path``: a
    folder or a URL (:class:`~deepgalaxy.core.location.StoreLocation`).
    """
    p = StoreLocation.of(path)
    root, attrs = open_root(p)
    arrays = schema_arrays(root, p)
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
            f"{p}: array 'labels': {bad.size} labels out of range -1..{num_classes - 1} at indices {index_span(bad)} "
            f"(first: labels[{int(bad[0])}] = {int(labels[bad[0]])}); the store is damaged or was written by "
            f"another tool; {repair_advice(p, attrs)}"
        )
    return StoreReader(p, root, attrs, labels, meta, rows)


def open_root(p: StoreLocation) -> tuple[Any, dict[str, Any]]:
    """The store's root group and its deepgalaxy attributes, after the format and schema-version checks."""
    import zarr

    if not p.exists():
        raise DatasetError(f"{p}: no such dataset store; {store_advice(p)}")
    if not p.files_exist(["zarr.json"])[0]:
        where = "no zarr.json" if p.local is not None else "the server has no zarr.json there"
        raise DatasetError(f"{p}: not a deepgalaxy dataset (not a Zarr v3 store: {where}); {store_advice(p)}")
    try:
        root = zarr.open_group(p.zarr_store(), mode="r", zarr_format=3)
        all_attrs = dict(root.attrs)
    except Exception as exc:
        raise p.fault(exc, "zarr.json") or DatasetError(
            f"{p}: cannot open as a Zarr v3 group ({type(exc).__name__}: {exc}); {store_advice(p)}"
        ) from exc
    attrs = all_attrs.get(ATTRS_KEY)
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT:
        raise DatasetError(
            f"{p}: a Zarr store but not a deepgalaxy dataset (no {ATTRS_KEY!r} attributes with format {FORMAT!r}); "
            f"{store_advice(p)}"
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


def store_advice(p: StoreLocation) -> str:
    """What to do when ``p`` is not a store: create one there (a local path), or check the URL."""
    from deepgalaxy.core.overwrite import new_store_advice

    if p.local is not None:
        return new_store_advice(p.local)
    return ("check the URL: it names the store's folder, the one holding zarr.json (serve a store with any static "
            "file server, e.g. `python -m http.server` in the folder above it)")


def schema_arrays(root: Any, p: StoreLocation) -> dict[str, Any]:
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


def repair_advice(p: StoreLocation | Path, attrs: Mapping[str, Any]) -> str:
    """The command that repairs a damaged store, from what wrote it (the generator recorded in its attributes)."""
    if isinstance(p, StoreLocation) and p.url is not None:
        return (f"repair the store on the machine that serves it (there `deepgalaxy data verify STORE` lists the "
                f"damage and says how), then read {p} again")
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


def property_advice(names: Sequence[str]) -> str:
    """How to make a store that gives the per-image properties ``names``."""
    ingest = (f"ingest images with `deepgalaxy data ingest FOLDER OUT --labels TABLE`, a CSV TABLE with a column "
              f"{' and '.join(names)} (a number per image, empty = unknown)")
    if all(name in PROPERTIES for name in names):
        return f"simulate a store with `deepgalaxy data simulate OUT` (it records {', '.join(PROPERTIES)}), or {ingest}"
    return ingest


def resume_advice(p: StoreLocation | Path, attrs: Mapping[str, Any]) -> str:
    """How to finish an interrupted store."""
    if attrs.get("source") == "simulation" and not (isinstance(p, StoreLocation) and p.url is not None):
        return (
            f"resume it with `deepgalaxy data simulate {shlex.quote(str(p))}` (it continues with the store's own "
            "parameters)"
        )
    return repair_advice(p, attrs)


def _array(root: Any, p: StoreLocation, name: str) -> Any:
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


def sim_layout(root: Any, n: int) -> tuple[int, set[int]] | None:
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
    layout = sim_layout(root, n)
    if layout is None:
        return np.zeros(0, dtype=np.int64)
    per_sim, finished = layout
    sims = np.array(sorted(finished), dtype=np.int64)
    return (sims[:, None] * per_sim + np.arange(per_sim)[None, :]).reshape(-1).astype(np.int64)


def _check_chunks(p: StoreLocation, name: str, arr: Any, rows: np.ndarray, attrs: Mapping[str, Any]) -> None:
    """Every chunk covering ``rows`` must exist (on disk or on the server): zarr would silently read a missing one
    as fill values."""
    if len(rows) == 0:
        return
    length = int(arr.chunks[0])
    tail = (0,) * (len(arr.shape) - 1)
    chunks = np.unique(rows // length).tolist()
    found = p.files_exist([f"{arr.path}/{arr.metadata.encode_chunk_key((c, *tail))}" for c in chunks])
    missing = [c for c, there in zip(chunks, found, strict=True) if not there]
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


def _read_all(p: StoreLocation, name: str, arr: Any, attrs: Mapping[str, Any]) -> np.ndarray:
    """Read a 1-D array, naming the first undecodable chunk and its index range on failure."""
    try:
        return np.asarray(arr[:])
    except Exception as exc:
        fault = p.fault(exc, arr.path)
        if fault is not None:
            raise fault from exc
        length = int(arr.chunks[0])
        for chunk in range(math.ceil(arr.shape[0] / length)):
            start, stop = chunk * length, min((chunk + 1) * length, arr.shape[0])
            try:
                arr[start:stop]
            except Exception as exc:
                key = f"{arr.path}/{arr.metadata.encode_chunk_key((chunk,))}"
                raise p.fault(exc, key) or DatasetError(
                    f"{p}: array {name!r} chunk {arr.metadata.encode_chunk_key((chunk,))} "
                    f"(indices {start}..{stop - 1}) "
                    f"cannot be read: {type(exc).__name__}: {exc}. The store is damaged: {repair_advice(p, attrs)}"
                ) from exc
        raise


__all__ = ["METADATA_KEYS", "StoreReader", "open_store", "property_advice", "repair_advice", "resume_advice"]
