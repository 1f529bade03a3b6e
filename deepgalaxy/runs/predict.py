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
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deepgalaxy.core.errors import DatasetError, DeepGalaxyError
from deepgalaxy.core.imagefile import DEFAULT_MAX_PIXELS, SUFFIXES, find_images
from deepgalaxy.core.location import StoreLocation, is_url
from deepgalaxy.core.observation import PreprocessOptions, preprocess, read_observations
from deepgalaxy.core.overwrite import stored_attrs
from deepgalaxy.core.progress import progress_bar
from deepgalaxy.core.properties import PROPERTIES, needed_properties
from deepgalaxy.core.property_prediction import Estimate, trained_normalisation
from deepgalaxy.core.search import INDEX_FILE, LatentIndex, LatentIndexError

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
            writer = csv.DictWriter(fh, fieldnames=self.columns(), restval="")
            writer.writeheader()
            for record in self.records:
                writer.writerow({k: _cell(v) for k, v in record.as_row().items()})
        return out


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


def predict(model: Model, inputs: Sequence[Input], *, index: LatentIndex | None = None, k: int = 5,
            options: PreprocessOptions = PreprocessOptions(), batch_size: int = 64,
            max_pixels: int = DEFAULT_MAX_PIXELS, hdu: int | str | None = None,
            progress: bool = False) -> PredictionResult:
    """Predict every image of ``inputs`` (paths of files, folders or stores, or arrays ``(H, W[, C])`` /
    ``(N, H, W, C)`` of raw images, preprocessed like files) with ``model``; see the module docstring."""
    has_head, heads = "head" in model.card.parts, model.card.properties
    if not has_head and heads is None and index is None:
        can = " or give an index of simulated images (--index) to find the nearest ones" if (
            "latent" in model.card.parts) else ""
        raise DeepGalaxyError(f"card {model.card.name!r} (task {model.card.task!r}) has no classifier head, so it "
                              f"predicts no class: use a clf-* or full-* model{can}")
    class_myr = model.card.class_myr if has_head else None
    extra = list(CLASS_MYR_COLUMNS) if class_myr is not None else []
    if heads is not None:
        trained_normalisation(heads, model.card.name)  # refused before any image is read
        extra += property_columns(needed_properties(heads.targets))  # predicted: what the targets are made from
    if k < 1:
        raise DeepGalaxyError(f"k={k}: ask for at least 1 neighbour")
    sources = _sources(inputs)
    total = sum(len(s.files) + len(s.arrays) + (_store_len(s.store) if s.store else 0) for s in sources)
    records: list[PredictionRecord] = []
    skipped: list[tuple[str, str]] = []
    bar = progress_bar(progress, total, f"predicting with {model.card.name}")
    counted = 0
    try:
        for batch in _batches(model, sources, batch_size, options, max_pixels, hdu, skipped):
            images = np.stack([image for _, image in batch])
            new = [PredictionRecord(file=name, row=row, notes=notes) for (name, row, notes), _ in batch]
            if has_head:
                summary = class_summary(model.predict(images, batch_size=batch_size).probabilities, class_myr)
                for i, record in enumerate(new):
                    for key, values in summary.items():
                        setattr(record, key, values[i].item())
            if heads is not None:
                found = model.predict_properties(images, batch_size=batch_size)
                for i, record in enumerate(new):
                    record.properties = found.row(i)
            if index is not None:
                rows, dist = model.similar(images, index, min(k, len(index)), batch_size=batch_size)
                for record, r, d in zip(new, rows, dist, strict=True):
                    record.neighbours = [_neighbour(index, int(a), float(b)) for a, b in zip(r, d, strict=True)
                                         if a >= 0]
            for record, (_, image) in zip(new, batch, strict=True):
                if len(records) < SHEET_IMAGES:
                    record.image = image
                records.append(record)
            bar.update(len(batch) + len(skipped) - counted)
            counted = len(skipped)
    finally:
        bar.close()
    if not records:
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise DatasetError(f"none of the {len(skipped)} image file(s) could be read{first}")
    return PredictionResult(records, skipped, f"{model.card.name}{_version(model)}", k if index is not None else 0,
                            tuple(extra))


def _version(model: Model) -> str:
    return f" v{model.source['version']}" if "version" in model.source else ""


def _store_len(store: str) -> int:
    attrs = stored_attrs(StoreLocation(store)) or {}
    return int(attrs.get("num_images", 0))


def _neighbour(index: LatentIndex, row: int, distance: float) -> Neighbour:
    meta = index.metadata

    def get(name: str, default: float) -> float:
        return float(meta[name][row]) if name in meta else default

    return Neighbour(row, int(get("sim_id", -1)), get("mass_ratio", float("nan")), int(get("label", -1)), distance)


Item = tuple[tuple[str, int | None, str], np.ndarray]
"""((file, store row, notes), preprocessed uint8 image)."""


def _batches(model: Model, sources: list[_Source], batch_size: int, options: PreprocessOptions, max_pixels: int,
             hdu: int | str | None, skipped: list[tuple[str, str]]) -> Iterator[list[Item]]:
    """Batches of preprocessed images over every source; unreadable files appended to ``skipped``."""
    from deepgalaxy.runs.latent import open_store

    size, channels = model.card.input_size, model.card.channels
    for source in sources:
        for start in range(0, len(source.files), batch_size):
            chunk = source.files[start : start + batch_size]
            batch: list[Item] = []
            for path, done in read_observations(chunk, size, channels, options, max_pixels, hdu):
                if isinstance(done, str):
                    skipped.append((str(path), done))
                else:
                    batch.append(((str(path), None, "; ".join(done.notes)), done.image))
            if batch:
                yield batch
        for start in range(0, len(source.arrays), batch_size):
            yield [((name, None, ""), preprocess(image, size, channels, options).image)
                   for name, image in source.arrays[start : start + batch_size]]
        if source.store is not None:
            ds = open_store(source.store, model)
            for start in range(0, len(ds), batch_size):
                positions = np.arange(start, min(start + batch_size, len(ds)))
                yield [((str(source.store), int(ds.indices[p]), ""), image)
                       for p, image in zip(positions, ds.images(positions), strict=True)]


# -- outputs ------------------------------------------------------------------------------------------------------


def check_outputs(csv_path: Path | None, sheet: Path | None, overwrite: bool) -> None:
    """Refuse to write over an existing file, unless ``overwrite`` and it is one ``predict`` wrote: a CSV whose
    header is :data:`COLUMNS`, a PNG drawn by deepgalaxy (nothing is written or deleted before this passes)."""
    from deepgalaxy.core.figures import drawn_here

    for path, ours in ((csv_path, _our_csv), (sheet, drawn_here)):
        if path is None or not (path.exists() or path.is_symlink()):
            continue
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


def write_sheet(result: PredictionResult, path: str | os.PathLike[str]) -> Path:
    """Draw the images the model saw (the first :data:`SHEET_IMAGES`) with their predictions."""
    from deepgalaxy.core.figures import prediction_sheet

    shown = [r for r in result.records if r.image is not None]
    more = len(result.records) - len(shown)
    title = (f"{result.model}: predicted class (probability), expected class E [68% interval]"
             + (", time since pericentre t-peri [68% interval]" if "time_since_pericentre" in result.extra else "")
             + (f"; first {len(shown)} of {len(result.records)} images" if more else ""))
    return prediction_sheet([r.image for r in shown if r.image is not None], [sheet_title(r) for r in shown], path,
                            title)


__all__ = [
    "CLASS_MYR_COLUMNS",
    "COLUMNS",
    "INTERVAL",
    "NEIGHBOUR_FIELDS",
    "SHEET_IMAGES",
    "Neighbour",
    "PredictionRecord",
    "PredictionResult",
    "check_outputs",
    "class_summary",
    "open_prediction_index",
    "predict",
    "property_columns",
    "sheet_title",
    "write_sheet",
]
