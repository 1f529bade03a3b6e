"""Ingest real images: centre-crop to a square, resize with scikit-image, grayscale or RGB, unlabelled.

Files that cannot be read are listed (in the store attributes under ``skipped`` and by the CLI) and left out;
they are never turned into blank images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from deepgalaxy.core.errors import DatasetError
from deepgalaxy.core.overwrite import check_output, overwrite_advice, replace_store
from deepgalaxy.core.progress import progress_bar
from deepgalaxy.core.schema import (
    ATTRS_KEY,
    META_FIELDS,
    chunk_images_for,
    create_store,
    store_attrs,
    writing,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz")
GENERATOR = "deepgalaxy.ingest"
VERSION = 1


SIGNATURES: dict[str, tuple[str, bytes]] = {
    ".png": ("PNG", b"\x89PNG\r\n\x1a\n"),
    ".jpg": ("JPEG", b"\xff\xd8\xff"),
    ".jpeg": ("JPEG", b"\xff\xd8\xff"),
    ".fits.gz": ("gzip-compressed FITS", b"\x1f\x8b"),
    ".fits": ("FITS", b"SIMPLE  ="),
    ".fit": ("FITS", b"SIMPLE  ="),
    ".fts": ("FITS", b"SIMPLE  ="),
}
"""Suffix -> (format, the bytes every file of that format starts with)."""


class NotAnImageError(ValueError):
    """A file whose name says image but whose content is empty or of no image format read here."""


def _is_fits(path: Path) -> bool:
    return path.name.lower().endswith(FITS_SUFFIXES)


def check_content(path: Path) -> None:
    """Raise :class:`NotAnImageError` for an empty file, or one that starts like none of the formats read here
    (a decoder would only blame a missing plugin). A file of another image format than its name says is left to
    the decoder, which reads it by content."""
    if path.stat().st_size == 0:
        raise NotAnImageError("empty file (0 bytes)")
    with path.open("rb") as fh:
        head = fh.read(16)
    name = path.name.lower()
    fmt = next(f for suffix, (f, _) in SIGNATURES.items() if name.endswith(suffix))
    if any(head.startswith(magic) for _, magic in SIGNATURES.values()):
        return
    text = " (it looks like text)" if all(32 <= b < 127 or b in b"\t\r\n" for b in head) else ""
    raise NotAnImageError(f"not a {fmt} image: it starts with {head[:8]!r}, not the {fmt} signature{text}")


def find_images(directory: Path) -> list[Path]:
    """Image files under ``directory`` (recursive, sorted for a stable order)."""
    suffixes = IMAGE_SUFFIXES + FITS_SUFFIXES
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))


def _read_fits(path: Path) -> np.ndarray:
    try:
        from astropy.io import fits
    except ImportError as exc:  # pragma: no cover - astropy is in the dev environment
        raise ValueError("FITS needs astropy (pip install 'deepgalaxy[fits]')") from exc
    with fits.open(path, memmap=False) as hdul:
        data = next((h.data for h in hdul if getattr(h, "data", None) is not None and h.data.ndim >= 2), None)
    if data is None:
        raise ValueError("no 2-D image in any HDU")
    img: np.ndarray = np.asarray(data, dtype=np.float64)
    while img.ndim > 2:  # cubes: first plane
        img = img[0]
    img = np.nan_to_num(img, nan=0.0)
    lo, hi = np.percentile(img, [0.5, 99.9])
    if hi <= lo:
        raise ValueError("constant image")
    img = np.arcsinh(np.clip((img - lo) / (hi - lo), 0, None) * 10.0) / np.arcsinh(10.0)  # asinh stretch
    stretched: np.ndarray = np.clip(img, 0.0, 1.0)[::-1]  # FITS rows run bottom-up
    return stretched


def load_image(path: Path, size: int, channels: int) -> np.ndarray:
    """One file as uint8 ``(size, size, channels)``; raises on anything unreadable."""
    from skimage import io, transform
    from skimage.color import gray2rgb, rgb2gray, rgba2rgb
    from skimage.util import img_as_float

    check_content(path)
    img: np.ndarray = _read_fits(path) if _is_fits(path) else img_as_float(io.imread(path))  # type: ignore[no-untyped-call]
    if img.ndim == 3 and img.shape[-1] == 4:
        img = rgba2rgb(img)  # type: ignore[no-untyped-call]
    if img.ndim == 3 and img.shape[-1] == 2:  # gray + alpha
        img = img[..., 0]
    if img.ndim not in (2, 3) or min(img.shape[:2]) < 2:
        raise ValueError(f"unsupported image shape {img.shape}")
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    img = img[top : top + side, left : left + side]
    img = transform.resize(img, (size, size), anti_aliasing=side > size, preserve_range=True)  # type: ignore[no-untyped-call]
    if channels == 1:
        img = rgb2gray(img) if img.ndim == 3 else img
        img = img[..., None]
    else:
        img = gray2rgb(img) if img.ndim == 2 else img  # type: ignore[no-untyped-call]
    pixels: np.ndarray = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return pixels


def ingest(
    directory: str | Path,
    out: str | Path,
    size: int = 128,
    channels: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write every readable image under ``directory`` to the store ``out`` (labels -1, no simulation metadata)."""
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
    if not files:
        raise DatasetError(
            f"{directory}: no images found (looked for {', '.join(IMAGE_SUFFIXES + FITS_SUFFIXES)}, recursively)"
        )
    images: list[np.ndarray] = []
    sources: list[str] = []
    skipped: list[dict[str, str]] = []
    bar = progress_bar(progress, len(files), f"ingesting {directory.name}")
    try:
        for path in files:
            rel = str(path.relative_to(directory))
            try:
                images.append(load_image(path, size, channels))
                sources.append(rel)
            except NotAnImageError as exc:
                skipped.append({"file": rel, "error": str(exc)[:300]})
            except Exception as exc:  # any decoder error: list it, never write a blank image
                skipped.append({"file": rel, "error": f"{type(exc).__name__}: {exc}"[:300]})
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
    attrs = store_attrs(
        source="ingest", num_images=len(images), image_shape=shape, chunk_images=chunk,
        generator={"name": GENERATOR, "version": VERSION,
                   "params": {"directory": str(directory), "size": size, "channels": channels}},
        extra={"files": sources, "skipped": skipped, "crop": "centre square, then resized (scikit-image)"},
    )
    root = create_store(out, num_images=len(images), image_shape=shape, chunk_images=chunk, attrs=attrs)
    with writing():
        root["images"][:] = np.stack(images)
        root["labels"][:] = np.full(len(images), -1, dtype=np.int16)
        for name, (dtype, fill) in META_FIELDS.items():
            root[f"meta/{name}"][:] = np.full(len(images), fill, dtype=dtype)
    done: dict[str, Any] = dict(root.attrs[ATTRS_KEY])
    done["complete"] = True
    root.attrs[ATTRS_KEY] = done
    return out


class IngestSource:
    """DatasetSource ``ingest``: ``create(out, progress=True, directory=..., size=128, channels=1)``."""

    name = "ingest"

    def create(self, out: Path, progress: bool = True, **params: Any) -> Path:
        if "directory" not in params:
            raise DatasetError("the ingest source needs directory=FOLDER of images")
        return ingest(params.pop("directory"), out, progress=progress, **params)
