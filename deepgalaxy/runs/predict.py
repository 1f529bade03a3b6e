"""Predict merger stages for observed images (files, folders, stores or arrays) with a loaded model.

:func:`predict` preprocesses every image like ``data ingest`` does (:mod:`deepgalaxy.core.observation`; the rows of
a store are used as stored), runs the model in batches and returns one :class:`PredictionRecord` per image: the
most likely class and its probability, the expected class (probability-weighted mean) with a 68% interval (the
16th and 84th percentiles of the class distribution), the entropy of the distribution in nats (ln 71 = 4.26 for a
uniform one), and, given a latent index of simulated images, the k nearest of them (row, simulation, mass ratio,
class, distance in z). Files that cannot be read are listed in ``skipped``, never predicted as blank images.

A model whose card knows the Myr per class (``class_myr``: training on a simulated store fills it) gives the
predicted and expected class and the interval also in Myr since the simulation's start (:data:`CLASS_MYR_COLUMNS`).
A model with trained property heads gives every physical property its heads learnt, each with its 68% interval
(:mod:`deepgalaxy.core.property_prediction`; the CSV columns ``NAME``, ``NAME_low``, ``NAME_high`` in the units of
:data:`~deepgalaxy.core.properties.PROPERTIES`: Myr, kpc, degrees; the azimuth's ``low`` may be below 0 and its
``high`` above 360 when the interval crosses 0); untrained property heads are refused.

A model without a classifier head (``fcae``, ``vae``) has no classes to give: with property heads it gives those;
with a VAE and an index, the records carry the nearest simulated images; otherwise :func:`predict` refuses, naming
the cards that can.

:func:`predict_csv` is the catalogue-scale form (``deepgalaxy predict``): the same records, streamed batch by batch
(:class:`PredictJob` through :mod:`deepgalaxy.runs.stream`, in process or in worker processes) and appended to the
CSV as they come, with the progress beside it so that an interrupted run resumes (:mod:`deepgalaxy.runs.partial`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deepgalaxy.core.errors import DatasetError, DeepGalaxyError
from deepgalaxy.core.imagefile import DEFAULT_MAX_PIXELS, SUFFIXES, find_images
from deepgalaxy.core.location import is_url
from deepgalaxy.core.observation import PreprocessOptions, preprocess, read_observations
from deepgalaxy.core.overwrite import stored_attrs
from deepgalaxy.core.progress import progress_bar
from deepgalaxy.core.properties import PROPERTIES, needed_properties
from deepgalaxy.core.property_prediction import Estimate, trained_normalisation
from deepgalaxy.core.search import INDEX_FILE, LatentIndex, LatentIndexError
from deepgalaxy.runs.stream import Result, prefetched

if TYPE_CHECKING:
    from deepgalaxy.core.model import Model

INTERVAL = (0.16, 0.84)
"""The 68% interval of the class distribution: its 16th and 84th percentiles."""
COLUMNS = ("file", "row", "predicted_class", "probability", "expected_class", "class_low", "class_high", "entropy",
           "notes")
"""The CSV columns of every image; then :data:`CLASS_MYR_COLUMNS` (a model that knows its Myr per class), the
property columns (:func:`property_columns`, a model with property heads) and ``nn{i}_{field}`` for each neighbour
field and i = 1..k."""
CLASS_MYR_COLUMNS = ("predicted_class_myr", "expected_class_myr", "class_low_myr", "class_high_myr")
"""The class columns in Myr since the simulation's start (class * the card's ``class_myr``)."""
NEIGHBOUR_FIELDS = ("row", "simulation", "mass_ratio", "class", "distance")
SHEET_IMAGES = 60
"""Images kept for the sheet (the first ones): a sheet of more is no longer readable."""
PARTIAL_SUFFIX = ".partial"
"""``OUT.csv.partial``: the progress of a CSV being written (:func:`predict_csv`)."""
INDEX_DIR = "index"
"""The index saved in the partial folder for worker processes."""

Input = str | os.PathLike[str] | np.ndarray


@dataclass
class Neighbour:
    """A simulated image near the query in z: its index row, simulation, mass ratio, class, latent distance."""

    row: int
    simulation: int
    mass_ratio: float
    label: int
    distance: float


@dataclass
class PredictionRecord:
    """What the model says about one image (class fields None for a model without a head)."""

    file: str
    row: int | None = None
    predicted_class: int | None = None
    probability: float | None = None
    expected_class: float | None = None
    class_low: int | None = None
    class_high: int | None = None
    entropy: float | None = None
    notes: str = ""
    predicted_class_myr: float | None = None
    expected_class_myr: float | None = None
    class_low_myr: float | None = None
    class_high_myr: float | None = None
    properties: dict[str, Estimate] = field(default_factory=dict)
    """Physical properties (value, 68% interval) by name: those the model's property heads learnt."""
    neighbours: list[Neighbour] = field(default_factory=list)
    image: np.ndarray | None = field(default=None, repr=False)
    """The preprocessed image the model saw (the first :data:`SHEET_IMAGES` only)."""

    @property
    def name(self) -> str:
        return Path(self.file).name + ("" if self.row is None else f" #{self.row}")

    def as_row(self) -> dict[str, Any]:
        """A flat record for the CSV: :data:`COLUMNS`, the class in Myr, the properties, the neighbours' fields."""
        out: dict[str, Any] = {c: getattr(self, c) for c in COLUMNS}
        out.update({c: getattr(self, c) for c in CLASS_MYR_COLUMNS if getattr(self, c) is not None})
        for name, estimate in self.properties.items():
            out.update(zip(property_columns([name]), estimate, strict=True))
        for i, nb in enumerate(self.neighbours, 1):
            out.update({f"nn{i}_row": nb.row, f"nn{i}_simulation": nb.simulation, f"nn{i}_mass_ratio": nb.mass_ratio,
                        f"nn{i}_class": nb.label, f"nn{i}_distance": nb.distance})
        return out


@dataclass
class PredictionResult:
    """Every prediction, the files skipped (file, why), and the model that made them."""

    records: list[PredictionRecord]
    skipped: list[tuple[str, str]]
    model: str
    k: int = 0
    extra: tuple[str, ...] = ()
    """The columns between :data:`COLUMNS` and the neighbours': the class in Myr and the properties."""

    def columns(self) -> list[str]:
        return [*COLUMNS, *self.extra, *(f"nn{i}_{f}" for i in range(1, self.k + 1) for f in NEIGHBOUR_FIELDS)]

    def write_csv(self, path: str | os.PathLike[str]) -> Path:
        """The records as CSV (floats to 4 decimals; empty cells where a value does not apply)."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="") as fh:
            fh.write(csv_text(self.records, self.columns(), header=True))
        return out


def csv_text(records: Sequence[PredictionRecord], columns: Sequence[str], header: bool = False) -> str:
    """CSV rows of ``records`` under ``columns`` (floats to 4 decimals; empty cells where a value does not
    apply), after the header line when ``header``."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, restval="")
    if header:
        writer.writeheader()
    for record in records:
        writer.writerow({k: _cell(v) for k, v in record.as_row().items()})
    return text.getvalue()


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if not np.isfinite(value) else f"{value:.4f}".rstrip("0").rstrip(".")
    return value


def property_columns(names: Sequence[str]) -> list[str]:
    """The CSV columns of properties ``names``: each one's value, then its 68% interval (``_low``, ``_high``)."""
    return [f"{name}{end}" for name in names for end in ("", "_low", "_high")]


def class_summary(probabilities: np.ndarray, class_myr: float | None = None) -> dict[str, np.ndarray]:
    """Per row of class probabilities: top class and its probability, expected class, 68% interval, entropy; with
    ``class_myr`` (Myr per class) the top and expected class and the interval in Myr too (:data:`CLASS_MYR_COLUMNS`)."""
    p = np.asarray(probabilities, dtype=np.float64)
    cdf = np.cumsum(p, axis=1)
    last = p.shape[1] - 1
    low = np.minimum((cdf < INTERVAL[0] - 1e-12).sum(axis=1), last)
    high = np.minimum((cdf < INTERVAL[1] - 1e-12).sum(axis=1), last)
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)
    summary = {"predicted_class": p.argmax(axis=1), "probability": p.max(axis=1),
               "expected_class": p @ np.arange(p.shape[1]), "class_low": low, "class_high": high, "entropy": entropy}
    if class_myr is not None:
        for column in CLASS_MYR_COLUMNS:
            summary[column] = summary[column.removesuffix("_myr")] * class_myr
    return summary


# -- inputs -------------------------------------------------------------------------------------------------------


@dataclass
class _Source:
    """One input: image files (``files``), a store (``store``) or in-memory images (``arrays``, named)."""

    files: list[Path] = field(default_factory=list)
    store: str | None = None
    arrays: list[tuple[str, np.ndarray]] = field(default_factory=list)


def _sources(inputs: Sequence[Input]) -> list[_Source]:
    if not inputs:
        raise DeepGalaxyError("nothing to predict: give image files, folders of images or a store")
    out: list[_Source] = []
    for i, item in enumerate(inputs):
        if isinstance(item, np.ndarray):
            batch = item if item.ndim == 4 or (item.ndim == 3 and item.shape[-1] not in (1, 3)) else item[None]
            out.append(_Source(arrays=[(f"array {i}[{j}]", image) for j, image in enumerate(batch)]))
            continue
        if is_url(item):  # a store read over the network (image files are read from local paths)
            out.append(_Source(store=os.fspath(item)))
            continue
        p = Path(item).expanduser()
        if stored_attrs(p) is not None:
            out.append(_Source(store=str(p)))
        elif p.is_dir():
            out.append(_Source(files=find_images(p)))
        elif p.is_file():
            out.append(_Source(files=[p]))
        else:
            raise DatasetError(f"{p}: no such file or folder; give image files ({', '.join(SUFFIXES)}), folders of "
                               "them or a deepgalaxy store")
    return out


# -- the index of simulated images ------------------------------------------------------------------------------


def open_prediction_index(model: Model, where: str | os.PathLike[str], progress: bool = False) -> LatentIndex:
    """The latent index ``where`` names: an index folder (``deepgalaxy latent index --out``), or a store whose index
    by this model version lies beside it; a store without one is indexed in memory (nothing is written)."""
    from deepgalaxy.runs.latent import index_in_memory, model_ref, open_index, open_store

    if "latent" not in model.card.parts:
        raise DeepGalaxyError(f"--index needs a model with a VAE latent space; card {model.card.name!r} (task "
                              f"{model.card.task!r}) has none: use a vae-* or full-* card")
    store = os.fspath(where)
    if not is_url(store):  # a URL names a store served over the network (its index, if any, in the current folder)
        path = Path(store).expanduser()
        if (path / INDEX_FILE).is_file():
            return LatentIndex.load(path, expected_model_ref=model_ref(model))
        if stored_attrs(path) is None:
            raise DatasetError(f"--index {path}: neither a latent index (no {INDEX_FILE}) nor a deepgalaxy store; "
                               "give the simulated store, or an index built by `deepgalaxy latent index`")
        store = str(path)
    try:
        return open_index(model, store)
    except LatentIndexError:  # none yet (another version's index raises StaleIndexError instead)
        return index_in_memory(model, open_store(store, model), progress=progress)[0]


# -- predicting ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Unit:
    """One batch of the input: items ``start..stop-1`` of source ``source``."""

    source: int
    start: int
    stop: int


Item = tuple[tuple[str, int | None, str], np.ndarray]
"""((file, store row, notes), preprocessed uint8 image)."""
Loaded = tuple[list[Item], list[tuple[str, str]]]
"""A unit read: its images (with names), and its files that could not be read (file, why)."""


class PredictJob:
    """Predicting every image of some sources, cut into batches (a :class:`~deepgalaxy.runs.stream.Job`): the
    input side reads and preprocesses a batch, the model side predicts it and formats its CSV rows."""

    def __init__(self, model: Model, sources: list[_Source], *, index: LatentIndex | None = None, k: int = 5,
                 options: PreprocessOptions = PreprocessOptions(), batch_size: int = 64,
                 max_pixels: int = DEFAULT_MAX_PIXELS, hdu: int | str | None = None) -> None:
        from deepgalaxy.runs.latent import open_store

        has_head, heads = "head" in model.card.parts, model.card.properties
        if not has_head and heads is None and index is None:
            can = " or give an index of simulated images (--index) to find the nearest ones" if (
                "latent" in model.card.parts) else ""
            raise DeepGalaxyError(f"card {model.card.name!r} (task {model.card.task!r}) has no classifier head, so "
                                  f"it predicts no class: use a clf-* or full-* model{can}")
        self.class_myr = model.card.class_myr if has_head else None
        extra = list(CLASS_MYR_COLUMNS) if self.class_myr is not None else []
        if heads is not None:
            trained_normalisation(heads, model.card.name)  # refused before any image is read
            extra += property_columns(needed_properties(heads.targets))  # predicted: what the targets are made from
        if k < 1:
            raise DeepGalaxyError(f"k={k}: ask for at least 1 neighbour")
        self.has_head, self.has_properties, self.extra = has_head, heads is not None, tuple(extra)
        self.sources, self.index, self.k, self.options = sources, index, k, options
        self.batch_size, self.max_pixels, self.hdu = batch_size, max_pixels, hdu
        self.size, self.channels = model.card.input_size, model.card.channels
        self.stores = {i: open_store(s.store, model) for i, s in enumerate(sources) if s.store is not None}
        self.plan = [_Unit(i, start, min(start + batch_size, n)) for i, s in enumerate(sources)
                     for n in (self._length(i, s),) for start in range(0, n, batch_size)]
        self.columns = PredictionResult([], [], "", k if index is not None else 0, self.extra).columns()
        self.index_dir: Path | None = None
        """Where worker processes load ``index`` from (saved there for them)."""

    def _length(self, i: int, source: _Source) -> int:
        return len(source.files) + len(source.arrays) + (len(self.stores[i]) if i in self.stores else 0)

    @property
    def images(self) -> int:
        """Input items (images and files) in all."""
        return sum(u.stop - u.start for u in self.plan)

    # -- the Job protocol -----------------------------------------------------------------------------------------

    def units(self) -> int:
        return len(self.plan)

    def read(self, unit: int) -> Loaded:
        """Read and preprocess one batch (runs ahead of the model, in a background thread)."""
        u = self.plan[unit]
        source = self.sources[u.source]
        skipped: list[tuple[str, str]] = []
        if source.files:
            batch: list[Item] = []
            found = read_observations(source.files[u.start : u.stop], self.size, self.channels, self.options,
                                      self.max_pixels, self.hdu)
            for path, done in found:
                if isinstance(done, str):
                    skipped.append((str(path), done))
                else:
                    batch.append(((str(path), None, "; ".join(done.notes)), done.image))
            return batch, skipped
        if source.arrays:
            return [((name, None, ""), preprocess(image, self.size, self.channels, self.options).image)
                    for name, image in source.arrays[u.start : u.stop]], skipped
        ds = self.stores[u.source]
        positions = np.arange(u.start, u.stop)
        return [((str(source.store), int(ds.indices[p]), ""), image)
                for p, image in zip(positions, ds.images(positions), strict=True)], skipped

    def run(self, model: Model, loaded: Loaded) -> Result:
        """One batch predicted, as CSV text (``csv``), with its unreadable files (``skipped``: file, why)."""
        records = self.records(model, loaded[0])
        return {"csv": np.array(csv_text(records, self.columns)), "rows": np.array(len(records)),
                "skipped": np.array(loaded[1], dtype=str).reshape(-1, 2)}

    def spec(self) -> dict[str, Any]:
        if any(s.arrays for s in self.sources):
            raise DeepGalaxyError("in-memory arrays are predicted in this process: give files or stores to predict "
                                  "with several workers")
        return {"sources": [{"files": [str(f) for f in s.files], "store": s.store} for s in self.sources],
                "k": self.k, "options": asdict(self.options), "batch_size": self.batch_size,
                "max_pixels": self.max_pixels, "hdu": self.hdu,
                "index": None if self.index_dir is None else str(self.index_dir)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], model: Model) -> PredictJob:
        """The job :meth:`spec` describes, in a worker process (the index loaded from where it was saved)."""
        sources = [_Source(files=[Path(f) for f in s["files"]], store=s["store"]) for s in spec["sources"]]
        index = None if spec["index"] is None else LatentIndex.load(spec["index"])
        return cls(model, sources, index=index, k=spec["k"], options=PreprocessOptions(**spec["options"]),
                   batch_size=spec["batch_size"], max_pixels=spec["max_pixels"], hdu=spec["hdu"])

    # -- the model side -------------------------------------------------------------------------------------------

    def records(self, model: Model, batch: list[Item]) -> list[PredictionRecord]:
        """The predictions of one batch of preprocessed images (none for an empty one)."""
        if not batch:
            return []
        images = np.stack([image for _, image in batch])
        new = [PredictionRecord(file=name, row=row, notes=notes) for (name, row, notes), _ in batch]
        if self.has_head:
            summary = class_summary(model.predict(images, batch_size=self.batch_size).probabilities, self.class_myr)
            columns = {key: values.tolist() for key, values in summary.items()}
            for i, record in enumerate(new):
                for key, values in columns.items():
                    setattr(record, key, values[i])
        if self.has_properties:
            found = model.predict_properties(images, batch_size=self.batch_size)
            for i, record in enumerate(new):
                record.properties = found.row(i)
        if self.index is not None:
            index = self.index
            rows, dist = model.similar(images, index, min(self.k, len(index)), batch_size=self.batch_size)
            for record, r, d in zip(new, rows, dist, strict=True):
                record.neighbours = [_neighbour(index, int(a), float(b)) for a, b in zip(r, d, strict=True) if a >= 0]
        for record, (_, image) in zip(new, batch, strict=True):
            record.image = image
        return new

    def identity(self, model: Model) -> dict[str, Any]:
        """What a CSV of this job is made from (:mod:`deepgalaxy.runs.partial`): model version and weights,
        precision, inputs, options, index and columns."""
        from deepgalaxy.runs.latent import model_ref

        index = None if self.index is None else {"model": self.index.model.as_dict(), "data": str(self.index.data),
                                                 "vectors": len(self.index), "k": self.k}
        return {"model": {**model_ref(model).as_dict(), "card": model.card.name, "framework": model.framework},
                "precision": model.precision, "inputs": [self._describe(i, s) for i, s in enumerate(self.sources)],
                "preprocessing": {**asdict(self.options), "max_pixels": self.max_pixels, "hdu": self.hdu},
                "index": index, "columns": self.columns, "batch_size": self.batch_size}

    def _describe(self, i: int, source: _Source) -> dict[str, Any]:
        digest = hashlib.sha256()
        if i in self.stores:
            ds = self.stores[i]
            return {"store": str(ds.path.absolute()), "fingerprint": ds.fingerprint(), "rows": len(ds)}
        for name, image in source.arrays:
            digest.update(name.encode() + np.ascontiguousarray(image).tobytes())
        for path in source.files:
            stat = path.stat()
            digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        what = "files" if source.files else "arrays"
        return {what: len(source.files) + len(source.arrays), "digest": digest.hexdigest()[:16]}


def predict(model: Model, inputs: Sequence[Input], *, index: LatentIndex | None = None, k: int = 5,
            options: PreprocessOptions = PreprocessOptions(), batch_size: int = 64,
            max_pixels: int = DEFAULT_MAX_PIXELS, hdu: int | str | None = None,
            progress: bool = False) -> PredictionResult:
    """Predict every image of ``inputs`` (paths of files, folders or stores, or arrays ``(H, W[, C])`` /
    ``(N, H, W, C)`` of raw images, preprocessed like files) with ``model``, in memory; see the module docstring.
    :func:`predict_csv` writes the records as they come instead (catalogues, resumable)."""
    job = PredictJob(model, _sources(inputs), index=index, k=k, options=options, batch_size=batch_size,
                     max_pixels=max_pixels, hdu=hdu)
    records: list[PredictionRecord] = []
    skipped: list[tuple[str, str]] = []
    bar = progress_bar(progress, job.images, f"predicting with {model.card.name}")
    try:
        for unit, (batch, bad) in enumerate(prefetched(job.read, range(job.units()))):
            for record in job.records(model, batch):
                if len(records) >= SHEET_IMAGES:
                    record.image = None
                records.append(record)
            skipped += bad
            bar.update(job.plan[unit].stop - job.plan[unit].start)
    finally:
        bar.close()
    _require_some(len(records), skipped)
    return PredictionResult(records, skipped, model_name(model), job.k if index is not None else 0, job.extra)


def _require_some(rows: int, skipped: Sequence[Sequence[str]]) -> None:
    if not rows:
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise DatasetError(f"none of the {len(skipped)} image file(s) could be read{first}")


@dataclass
class Catalogue:
    """What :func:`predict_csv` wrote: rows, files skipped, the model, the CSV, and the first images with their
    predictions (for the sheet; None unless asked)."""

    csv: Path
    rows: int
    skipped: list[tuple[str, str]]
    model: str
    extra: tuple[str, ...]
    resumed_at: int
    sheet: PredictionResult | None = None


def partial_folder(csv_path: Path) -> Path:
    """Where the progress of a CSV being written lives (:mod:`deepgalaxy.runs.partial`): ``OUT.csv.partial``."""
    return csv_path.with_name(csv_path.name + PARTIAL_SUFFIX)


def predict_csv(model: Model, inputs: Sequence[Input], out: str | os.PathLike[str], *,
                index: LatentIndex | None = None, k: int = 5, options: PreprocessOptions = PreprocessOptions(),
                batch_size: int = 64, max_pixels: int = DEFAULT_MAX_PIXELS, hdu: int | str | None = None,
                progress: bool = False, resume: bool = False, overwrite: bool = False, workers: int = 1,
                sheet: bool = False) -> Catalogue:
    """Predict every image of ``inputs`` (as :func:`predict`) and append the rows to the CSV ``out`` batch by batch,
    flushed, with the progress recorded beside it (``OUT.csv.partial``), so that a run killed at any point continues
    with ``resume``: the rows already written are kept and the rest appended (a run made from another model,
    precision, inputs or options is refused, naming what differs). ``workers`` > 1 predicts in that many
    processes (:mod:`deepgalaxy.runs.stream`); the rows stay in input order. Memory holds a few batches, never the
    catalogue. An existing ``out`` is replaced only with ``overwrite`` and when predict wrote it
    (:func:`check_outputs`)."""
    from deepgalaxy.runs import partial
    from deepgalaxy.runs.stream import stream

    job = PredictJob(model, _sources(inputs), index=index, k=k, options=options, batch_size=batch_size,
                     max_pixels=max_pixels, hdu=hdu)
    path, folder = Path(out), partial_folder(Path(out))
    check_outputs(path, None, overwrite, resume)
    identity = job.identity(model)
    if resume:
        state = partial.resume(folder, identity, str(path), "pass --overwrite (without --resume) to start again")
        _cut_back(path, state.length)
    else:
        if partial.is_partial(folder):  # an interrupted run's progress (check_outputs allowed replacing it)
            shutil.rmtree(folder)
        state = partial.Progress(folder, identity, kept={"rows": 0, "skipped": [], "images": 0})
        path.unlink(missing_ok=True)
        state.commit(0, 0)
    if workers > 1 and index is not None:  # the workers load it from there
        job.index_dir = folder / INDEX_DIR
        index.save(job.index_dir)
    resumed_at, shown = state.units, []
    bar = progress_bar(progress, job.images, f"predicting with {model.card.name}",
                       initial=int(state.kept["images"]))
    try:
        with path.open("ab") as fh:
            for unit, result in stream(model, job, state.units, workers, folder):
                if fh.tell() == 0 and int(result["rows"]):
                    fh.write(csv_text([], job.columns, header=True).encode())
                fh.write(str(result["csv"]).encode())
                fh.flush()
                state.kept["rows"] += int(result["rows"])
                state.kept["skipped"] += result["skipped"].tolist()
                state.kept["images"] += job.plan[unit].stop - job.plan[unit].start
                state.commit(unit + 1, fh.tell())
                bar.update(job.plan[unit].stop - job.plan[unit].start)
    finally:
        bar.close()
    skipped = [(str(f), str(why)) for f, why in state.kept["skipped"]]
    state.finish()
    if not state.kept["rows"]:
        path.unlink(missing_ok=True)
        _require_some(0, skipped)
    done = Catalogue(path, int(state.kept["rows"]), skipped, model_name(model), job.extra, resumed_at)
    if sheet:
        for batch, _ in (job.read(u) for u in range(job.units())):
            shown += job.records(model, batch)
            if len(shown) >= SHEET_IMAGES:
                break
        done.sheet = PredictionResult(shown[:SHEET_IMAGES], skipped, done.model, 0, job.extra)
    return done


def _cut_back(path: Path, length: int) -> None:
    """Cut the CSV back to the length recorded with the last batch (rows after it are written again)."""
    size = path.stat().st_size if path.is_file() else -1
    if size < length:
        raise DatasetError(f"{path}: shorter ({max(size, 0)} bytes) than when its progress was recorded ({length} "
                           "bytes): it was changed since; pass --overwrite (without --resume) to start again")
    with path.open("r+b") as fh:
        fh.truncate(length)


def model_name(model: Model) -> str:
    """The model as the CSV summary and the sheet name it: card name and registered version."""
    return f"{model.card.name}{_version(model)}"


def _version(model: Model) -> str:
    return f" v{model.source['version']}" if "version" in model.source else ""


def _neighbour(index: LatentIndex, row: int, distance: float) -> Neighbour:
    meta = index.metadata

    def get(name: str, default: float) -> float:
        return float(meta[name][row]) if name in meta else default

    return Neighbour(row, int(get("sim_id", -1)), get("mass_ratio", float("nan")), int(get("label", -1)), distance)


# -- outputs ------------------------------------------------------------------------------------------------------


def check_outputs(csv_path: Path | None, sheet: Path | None, overwrite: bool, resume: bool = False) -> None:
    """Refuse to write over an existing file, unless ``overwrite`` and it is one ``predict`` wrote: a CSV whose
    header is :data:`COLUMNS`, a PNG drawn by deepgalaxy (nothing is written or deleted before this passes). With
    ``resume`` the CSV must be the output of an interrupted predict (its progress in ``OUT.csv.partial``); without,
    such a CSV is only replaced with ``overwrite``."""
    from deepgalaxy.core.figures import drawn_here
    from deepgalaxy.runs.partial import is_partial

    if resume and overwrite:
        raise DatasetError("--resume continues the CSV, --overwrite starts it again: give one of them")
    if csv_path is not None:
        folder = partial_folder(csv_path)
        if (folder.exists() or folder.is_symlink()) and (folder.is_symlink() or not is_partial(folder)):
            raise DatasetError(f"{folder}: exists and is not the progress of a deepgalaxy predict, which predict "
                               f"would write there: choose another --out")
        if resume and not is_partial(folder):
            raise DatasetError(f"{csv_path}: no interrupted predict to resume (no {folder}); run without --resume")
        if not resume and not overwrite and is_partial(folder):
            raise DatasetError(f"{csv_path}: the output of an interrupted predict ({folder} holds its progress): "
                               "pass --resume to continue it, or --overwrite to start again")
    for path, ours in ((csv_path, _our_csv), (sheet, drawn_here)):
        if path is None or not (path.exists() or path.is_symlink()):
            continue
        if resume and path == csv_path:
            if path.is_symlink() or not path.is_file() or not ours(path):
                raise DatasetError(f"{path}: not a CSV deepgalaxy predict wrote, so it is not continued: choose "
                                   "another path")
            continue
        overwrite = overwrite or resume  # resuming redraws the sheet (only one deepgalaxy drew)
        if not overwrite:
            raise DatasetError(f"{path}: already exists; pass --overwrite to replace it (only a file deepgalaxy "
                               "predict wrote is replaced), or choose another path")
        if path.is_symlink() or not path.is_file() or not ours(path):
            raise DatasetError(f"{path}: exists and is not a file deepgalaxy predict wrote; --overwrite replaces only "
                               "those: choose another path")


def _our_csv(path: Path) -> bool:
    try:
        with path.open(newline="") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return tuple(header[: len(COLUMNS)]) == COLUMNS


def sheet_title(record: PredictionRecord) -> str:
    """A panel title: the image's name, its class with probability, the expected class and 68% interval, the time
    since pericentre with its 68% interval, and the nearest simulated image."""
    name = record.name if len(record.name) <= 24 else record.name[:11] + "…" + record.name[-12:]
    lines = [name]
    if record.predicted_class is not None:
        lines.append(f"class {record.predicted_class} (p {record.probability:.2f})")
        lines.append(f"E {record.expected_class:.1f} [{record.class_low}–{record.class_high}]")
    if "time_since_pericentre" in record.properties:
        t = record.properties["time_since_pericentre"]
        lines.append(f"t-peri {t.value:.0f} [{t.low:.0f}, {t.high:.0f}] {PROPERTIES['time_since_pericentre']}")
    if record.neighbours:
        nb = record.neighbours[0]
        q = f" q {nb.mass_ratio:.2g}" if np.isfinite(nb.mass_ratio) else ""
        lines.append(f"nearest: sim {nb.simulation}{q}, cl {nb.label}")
    return "\n".join(lines)


def write_sheet(result: PredictionResult, path: str | os.PathLike[str], total: int | None = None) -> Path:
    """Draw the images the model saw (the first :data:`SHEET_IMAGES`) with their predictions; ``total``: images
    predicted in all (default: the records of ``result``)."""
    from deepgalaxy.core.figures import prediction_sheet

    shown = [r for r in result.records if r.image is not None]
    total = len(result.records) if total is None else total
    title = (f"{result.model}: predicted class (probability), expected class E [68% interval]"
             + (", time since pericentre t-peri [68% interval]" if "time_since_pericentre" in result.extra else "")
             + (f"; first {len(shown)} of {total} images" if total > len(shown) else ""))
    return prediction_sheet([r.image for r in shown if r.image is not None], [sheet_title(r) for r in shown], path,
                            title)


__all__ = [
    "CLASS_MYR_COLUMNS",
    "COLUMNS",
    "INDEX_DIR",
    "INTERVAL",
    "NEIGHBOUR_FIELDS",
    "PARTIAL_SUFFIX",
    "SHEET_IMAGES",
    "Catalogue",
    "Neighbour",
    "PredictJob",
    "PredictionRecord",
    "PredictionResult",
    "check_outputs",
    "class_summary",
    "csv_text",
    "model_name",
    "open_prediction_index",
    "partial_folder",
    "predict",
    "predict_csv",
    "property_columns",
    "sheet_title",
    "write_sheet",
]
