"""Where the latent commands get images: rows of a dataset store, and image files given as queries."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from deepgalaxy.core.errors import DeepGalaxyError

if TYPE_CHECKING:
    from deepgalaxy.core.dataset import Dataset
    from deepgalaxy.core.model import Model


def open_store(data: str | os.PathLike[str], model: Model) -> Dataset:
    """Open the store ``data``; refuse images of another shape than ``model``'s card takes."""
    from deepgalaxy.core.dataset import open_dataset

    ds = open_dataset(data)
    ds.check_shape(model.card.input_shape, f"model {model.card.name!r}")
    return ds


def image_loader(ds: Dataset) -> Callable[[np.ndarray], np.ndarray]:
    """Images of index rows (rows are positions in ``ds.indices``)."""
    return lambda rows: ds.images(np.asarray(rows, dtype=np.int64))


def read_image(path: str | os.PathLike[str], size: int, channels: int) -> np.ndarray:
    """An image file as uint8 ``(size, size, channels)``: grey/colour converted, resized with anti-aliasing."""
    from skimage import color, io, transform, util

    p = Path(path).expanduser()
    if not p.is_file():
        raise DeepGalaxyError(f"query image {p} does not exist; give a PNG/JPEG path or --index-of ROW with --data")
    try:
        img = util.img_as_float(io.imread(str(p)))  # type: ignore[no-untyped-call]
    except Exception as exc:  # any decoder failure means a bad input file
        raise DeepGalaxyError(f"cannot read query image {p}: {type(exc).__name__}: {exc}") from None
    if img.ndim == 3 and img.shape[2] == 4:
        img = color.rgba2rgb(img)  # type: ignore[no-untyped-call]
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if channels == 1 and img.ndim == 3:
        img = color.rgb2gray(img)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] != channels:
        img = np.repeat(img[:, :, :1], channels, axis=2)
    if img.shape[:2] != (size, size):
        img = transform.resize(img, (size, size, channels), anti_aliasing=True)  # type: ignore[no-untyped-call]
    return np.asarray(np.clip(np.rint(img * 255.0), 0, 255), dtype=np.uint8)


__all__ = ["image_loader", "open_store", "read_image"]
