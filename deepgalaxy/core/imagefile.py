"""Read one observed image file (PNG, JPEG, FITS) as floats, refusing every bad input with a reason.

Nothing unreadable becomes a blank image: each problem raises :class:`ImageFileError` naming what is wrong, and the
callers (``data ingest``, ``predict``) list the file as skipped, or stop when nothing at all could be read. An upload
held in memory (``serve``) is read the same way by :func:`read_image_bytes`, its format told by its first bytes.

- Size: an image above ``max_pixels`` (:data:`DEFAULT_MAX_PIXELS`, ``--max-pixels``) is refused from its header,
  before any pixel is decoded (decompression bombs: a small PNG can declare gigapixels). Pillow's own bomb check
  (``PIL.Image.MAX_IMAGE_PIXELS``) stays on, its warning turned into the same refusal.
- FITS: the first HDU holding an image (2-D or more) is read, and a note says which one when the file has several
  HDUs; ``hdu`` (index or EXTNAME, ``--hdu``) picks another. A file without any image HDU is refused, listing
  its HDUs. Cubes give their first plane (noted). Rows are flipped (FITS rows run bottom-up).
- FITS blank pixels (NaN, inf: masked or unobserved parts of a mosaic) are replaced by the sky level (the
  sigma-clipped median of the finite pixels) and a note says how many; an image with more than
  :data:`MAX_BLANK_FRACTION` of them, or with no finite pixel, is refused.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from deepgalaxy.core.errors import DatasetError, DeepGalaxyError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz")
SUFFIXES = IMAGE_SUFFIXES + FITS_SUFFIXES
DEFAULT_MAX_PIXELS = 40_000_000
"""Largest image read (width x height): 40 megapixels, ~320 MB as float64 luminance while it is preprocessed."""
MAX_BLANK_FRACTION = 0.5
"""FITS images with more blank (NaN/inf) pixels than this fraction are refused instead of filled with sky."""

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


class ImageFileError(DeepGalaxyError, ValueError):
    """An image file that cannot be used: empty, of no format read here, too large, without an image, blank."""


class NotAnImageError(ImageFileError):
    """Bytes that start like none of the formats read here (:data:`SIGNATURES`): text, another format, nothing."""


class ImageTooLargeError(ImageFileError):
    """An image above the pixel limit, refused from its header before any pixel is decoded."""


@dataclass
class RawImage:
    """Pixels of one file as float64 ``(H, W)`` or ``(H, W, 3)``; ``linear``: values proportional to flux (FITS,
    not display-stretched); ``notes``: what was done that the user should know (HDU chosen, blank pixels filled)."""

    pixels: np.ndarray
    linear: bool
    notes: list[str] = field(default_factory=list)


def is_fits(path: Path) -> bool:
    return path.name.lower().endswith(FITS_SUFFIXES)


def check_content(path: Path) -> None:
    """Raise :class:`ImageFileError` for an empty file, or one that starts like none of the formats read here
    (a decoder would only blame a missing plugin). A file of another image format than its name says is left to
    the decoder, which reads it by content."""
    with path.open("rb") as fh:
        head = fh.read(16)
    fmt = next(f for suffix, (f, _) in SIGNATURES.items() if path.name.lower().endswith(suffix))
    if sniff_suffix(head, path.stat().st_size) is None:
        raise NotAnImageError(f"not a {fmt} image: {_starts(head)}, not the {fmt} signature")


def sniff_suffix(head: bytes, size: int) -> str | None:
    """The suffix of the format ``head`` (a file's first bytes) starts like, or None; an empty file is refused."""
    if size == 0:
        raise NotAnImageError("empty file (0 bytes)")
    return next((suffix for suffix, (_, magic) in SIGNATURES.items() if head.startswith(magic)), None)


def _starts(head: bytes) -> str:
    text = " (it looks like text)" if all(32 <= b < 127 or b in b"\t\r\n" for b in head[:16]) else ""
    return f"it starts with {head[:8]!r}{text}"


def find_images(directory: Path) -> list[Path]:
    """Image files under ``directory`` (recursive, sorted for a stable order); an empty result is an error that
    names the folder and the suffixes looked for."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name.lower().endswith(SUFFIXES))
    if not files:
        raise DatasetError(f"{directory}: no images found (looked for {', '.join(SUFFIXES)}, recursively); give a "
                           "folder holding image files")
    return files


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLargeError(f"{width} x {height} = {width * height:,} pixels, above the limit of {max_pixels:,} "
                             "(a decompression bomb or a mosaic too large to preprocess); raise --max-pixels "
                             "(max_pixels=) if you trust the file, or cut it down first")


def read_image_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, hdu: int | str | None = None) -> RawImage:
    """One PNG, JPEG or FITS file as a :class:`RawImage`; raise :class:`ImageFileError` naming the problem."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ImageFileError(f"{p}: no such image file")
    if not p.name.lower().endswith(SUFFIXES):
        raise ImageFileError(f"{p.name}: not an image file name deepgalaxy reads (use {', '.join(SUFFIXES)})")
    check_content(p)
    return _read_fits(p, max_pixels, hdu) if is_fits(p) else _read_picture(p, max_pixels)


def read_image_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, hdu: int | str | None = None) -> RawImage:
    """An uploaded image held in memory (PNG, JPEG or FITS, told apart by its first bytes, never by a name), read
    like :func:`read_image_file`: :class:`NotAnImageError` for bytes of no format read here, :class:`ImageTooLargeError`
    above ``max_pixels``, :class:`ImageFileError` for the rest."""
    suffix = sniff_suffix(data[:16], len(data))
    if suffix is None:
        names = ", ".join(sorted({f for f, _ in SIGNATURES.values()}))
        raise NotAnImageError(f"not an image deepgalaxy reads ({names}): {_starts(data)}")
    source = io.BytesIO(data)
    return _read_fits(source, max_pixels, hdu) if suffix in FITS_SUFFIXES else _read_picture(source, max_pixels)


def _read_picture(path: Path | BinaryIO, max_pixels: int) -> RawImage:
    """PNG/JPEG through Pillow: the size is checked from the header, then decoded; display values (not linear)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                _check_size(im.width, im.height, max_pixels)
                mode = {"P": "RGBA", "PA": "RGBA", "1": "L", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB",
                        "HSV": "RGB"}.get(im.mode)
                im.load()
                data = np.asarray(im.convert(mode) if mode else im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"refused by Pillow's decompression-bomb check ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageFileError(f"cannot decode: {type(exc).__name__}: {exc}") from None
    if data.dtype.kind in "ui":
        scale = 255.0 if data.dtype == np.uint8 else (65535.0 if data.dtype == np.uint16 else float(data.max() or 1))
        img = data.astype(np.float64) / scale
    else:
        img = data.astype(np.float64)
    if img.ndim == 3 and img.shape[-1] in (2, 4):  # with alpha: composite on black (the sky)
        img = img[..., :-1] * img[..., -1:]
        img = img[..., 0] if img.shape[-1] == 1 else img
    if img.ndim not in (2, 3) or min(img.shape[:2]) < 2:
        raise ImageFileError(f"unsupported image shape {data.shape}")
    return RawImage(img, linear=False)


def _read_fits(path: Path | BinaryIO, max_pixels: int, hdu: int | str | None) -> RawImage:
    try:
        from astropy.io import fits
    except ImportError:  # pragma: no cover - astropy is in the dev environment
        raise ImageFileError("reading FITS needs astropy (pip install 'deepgalaxy[fits]')") from None
    notes: list[str] = []
    try:
        with fits.open(path, memmap=False, lazy_load_hdus=False) as hdul:
            described = [f"{i} {h.name or '(no name)'} {type(h).__name__}" for i, h in enumerate(hdul)]
            images = [i for i, h in enumerate(hdul)
                      if h.is_image and int(h.header.get("NAXIS", 0)) >= 2 and h.header.get("NAXIS1")]
            chosen = _choose_hdu(hdul, images, described, hdu)
            header = hdul[chosen].header
            dims = [int(header.get(f"NAXIS{k}", 0)) for k in range(1, int(header["NAXIS"]) + 1)]
            _check_size(dims[0], dims[1], max_pixels)
            if len(hdul) > 1:
                notes.append(f"HDU {chosen} ({hdul[chosen].name or 'no name'}) of {len(hdul)}"
                             f"{'' if hdu is not None else ', the first image HDU'}")
            data = np.asarray(hdul[chosen].data, dtype=np.float64)
    except ImageFileError:
        raise
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ImageFileError(f"cannot read FITS: {type(exc).__name__}: {exc}") from None
    if data.ndim > 2:
        notes.append(f"a cube {data.shape}: its first plane")
        data = data.reshape(-1, *data.shape[-2:])[0]
    blank = ~np.isfinite(data)
    if blank.all():
        raise ImageFileError("every pixel is blank (NaN or inf)")
    if blank.mean() > MAX_BLANK_FRACTION:
        raise ImageFileError(f"{blank.mean():.0%} of the pixels are blank (NaN or inf), more than "
                             f"{MAX_BLANK_FRACTION:.0%}: too little sky to fill them from")
    if blank.any():
        from deepgalaxy.core.observation import sky_level

        level, _ = sky_level(data[~blank])
        data = np.where(blank, level, data)
        notes.append(f"{int(blank.sum())} blank (NaN/inf) pixels set to the sky level")
    return RawImage(np.ascontiguousarray(data[::-1]), linear=True, notes=notes)


def _choose_hdu(hdul: object, images: list[int], described: list[str], hdu: int | str | None) -> int:
    """The index of the HDU to read: ``hdu`` (index or name) when given, else the first image HDU."""
    listing = "; ".join(described)
    if hdu is None:
        if not images:
            raise ImageFileError(f"no image HDU (HDUs: {listing}); a FITS file needs a 2-D image to be read")
        return images[0]
    names = [d.split(" ")[1].upper() for d in described]
    index = (hdu if isinstance(hdu, int) else int(hdu) if str(hdu).isdigit()
             else names.index(str(hdu).upper()) if str(hdu).upper() in names else -1)
    if index not in images:
        raise ImageFileError(f"HDU {hdu!r} is not an image HDU of this file (HDUs: {listing}; images: "
                             f"{', '.join(map(str, images)) or 'none'})")
    return index


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "FITS_SUFFIXES",
    "IMAGE_SUFFIXES",
    "MAX_BLANK_FRACTION",
    "SIGNATURES",
    "SUFFIXES",
    "ImageFileError",
    "ImageTooLargeError",
    "NotAnImageError",
    "RawImage",
    "check_content",
    "find_images",
    "is_fits",
    "read_image_bytes",
    "read_image_file",
    "sniff_suffix",
]
