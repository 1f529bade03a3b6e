"""Ingest real images: read (:mod:`deepgalaxy.core.imagefile`), preprocess like the simulator's renders
(:mod:`deepgalaxy.core.observation`), write a store; unlabelled, or labelled from a table (:mod:`.table`).

Files that cannot be read are listed (in the store attributes under ``skipped`` and by the CLI) and left out;
they are never turned into blank images.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from deepgalaxy.core.errors import DatasetError
from deepgalaxy.core.imagefile import DEFAULT_MAX_PIXELS, find_images
from deepgalaxy.core.observation import RAW, PreprocessOptions, read_observations
from deepgalaxy.core.overwrite import check_output, overwrite_advice, replace_store
from deepgalaxy.core.progress import progress_bar
from deepgalaxy.core.schema import (
    ATTRS_KEY,
    META_FIELDS,
    PROPERTIES_GROUP,
    chunk_images_for,
    create_store,
    store_attrs,
    writing,
)
from deepgalaxy.plugins.ingest.table import read_table

GENERATOR = "deepgalaxy.ingest"
VERSION = 2
"""2: observations preprocessed (core.observation) by default, labels table."""


def ingest(
    directory: str | Path,
    out: str | Path,
    size: int = 128,
    channels: int = 1,
    progress: bool = True,
    overwrite: bool = False,
    labels: str | Path | None = None,
    preprocess: bool = True,
    mask_stars: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    hdu: int | str | None = None,
) -> Path:
    """Write every readable image under ``directory`` to the store ``out``.

    ``preprocess``: sky subtraction, centring and cropping on the system, the simulator's stretch
    (:func:`~deepgalaxy.core.observation.preprocess`); off, only the central square is kept. ``labels``: a CSV
    table of classes and properties per file (:mod:`.table`); without it every image is unlabelled (-1).
    """
    directory, out = Path(directory).expanduser(), Path(out).expanduser()
    if channels not in (1, 3):
        raise DatasetError(f"channels={channels}: use 1 (grayscale) or 3 (RGB)")
    if size < 8:
        raise DatasetError(f"size={size} must be at least 8 pixels")
    if not directory.is_dir():
        raise DatasetError(f"{directory}: not a folder of images")
    state = check_output(out, overwrite=overwrite, inputs=[directory])
    if state == "store" and not overwrite:
        raise DatasetError(f"{out}: already exists (a deepgalaxy store); {overwrite_advice(out)}")
    files = find_images(directory)
    names = [path.relative_to(directory).as_posix() for path in files]
    table = read_table(Path(labels), names) if labels is not None else None
    options = (PreprocessOptions(mask_stars=mask_stars) if preprocess
               else replace(RAW, mask_stars=mask_stars))
    images: list[np.ndarray] = []
    sources: list[str] = []
    notes: dict[str, list[str]] = {}
    skipped: list[dict[str, str]] = []
    bar = progress_bar(progress, len(files), f"ingesting {directory.name}")
    try:
        for (_, done), rel in zip(read_observations(files, size, channels, options, max_pixels, hdu), names,
                                  strict=True):
            if isinstance(done, str):
                skipped.append({"file": rel, "error": done})
            else:
                images.append(done.image)
                sources.append(rel)
                if done.notes:
                    notes[rel] = done.notes
            bar.update(1)
    finally:
        bar.close()
    if not images:
        raise DatasetError(
            f"{directory}: none of the {len(files)} image files could be read (first: {skipped[0]['file']}: "
            f"{skipped[0]['error']})"
        )
    if state == "store":  # --overwrite, checked above; replaced only now that the images have been read
        replace_store(out)
    shape = (size, size, channels)
    chunk = chunk_images_for(shape)
    properties = table.property_arrays(sources) if table is not None else {}
    attrs = store_attrs(
        source="ingest", num_images=len(images), image_shape=shape, chunk_images=chunk,
        generator={"name": GENERATOR, "version": VERSION,
                   "params": {"directory": str(directory), "size": size, "channels": channels,
                              "preprocess": preprocess, "mask_stars": mask_stars, "max_pixels": max_pixels,
                              "hdu": hdu, "labels": None if labels is None else str(labels)}},
        extra={"files": sources, "skipped": skipped, "notes": notes, "properties": sorted(properties),
               "preprocess": asdict(options)},
    )
    root = create_store(out, num_images=len(images), image_shape=shape, chunk_images=chunk, attrs=attrs,
                        properties=tuple(sorted(properties)))
    with writing():
        root["images"][:] = np.stack(images)
        root["labels"][:] = table.labels_for(sources) if table is not None else np.full(len(images), -1, np.int16)
        for name, (dtype, fill) in META_FIELDS.items():
            root[f"meta/{name}"][:] = np.full(len(images), fill, dtype=dtype)
        for name, values in properties.items():
            root[f"{PROPERTIES_GROUP}/{name}"][:] = values
    done_attrs: dict[str, Any] = dict(root.attrs[ATTRS_KEY])
    done_attrs["complete"] = True
    root.attrs[ATTRS_KEY] = done_attrs
    return out


class IngestSource:
    """DatasetSource ``ingest``: ``create(out, progress=True, directory=..., size=128, channels=1, labels=None,
    preprocess=True, mask_stars=False, max_pixels=..., hdu=None)``."""

    name = "ingest"

    def create(self, out: Path, progress: bool = True, **params: Any) -> Path:
        if "directory" not in params:
            raise DatasetError("the ingest source needs directory=FOLDER of images")
        return ingest(params.pop("directory"), out, progress=progress, **params)
