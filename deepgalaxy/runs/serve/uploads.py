"""Uploaded images, checked and preprocessed exactly as ``predict`` preprocesses a file, from memory.

Every refusal is a :class:`RequestError` with the HTTP status it maps to and a message that says what was wrong and
what to do: 413 for a body above the upload limit or an image above the pixel limit (decompression bombs are refused
from their header, before any pixel is decoded: :mod:`deepgalaxy.core.imagefile`), 415 for a declared content type
or bytes that are not PNG, JPEG or FITS, 422 for an image that cannot be decoded or holds nothing to centre on. The
bytes are never written anywhere and no part of a request names a path on the server.
"""

from __future__ import annotations

from dataclasses import dataclass

from deepgalaxy.core.errors import DeepGalaxyError
from deepgalaxy.core.imagefile import DEFAULT_MAX_PIXELS, ImageTooLargeError, NotAnImageError, read_image_bytes
from deepgalaxy.core.observation import Preprocessed, PreprocessOptions, preprocess

DEFAULT_MAX_UPLOAD_MB = 20.0
"""Largest request body the server reads, in MB (a 128 px image is ~20 kB as PNG; a 4k x 4k FITS ~64 MB)."""
MAX_FILES = 16
"""Most images in one /predict request."""
CONTENT_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/fits", "application/fits", "image/x-fits",
                 "application/octet-stream")
"""Declared content types accepted (or none declared); the bytes themselves must be PNG, JPEG or FITS."""


class RequestError(DeepGalaxyError):
    """A request the server refuses: ``status`` (4xx) and the message sent back as ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class UploadLimits:
    """What one request may bring: body bytes, pixels per image, images per request."""

    max_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 1e6)
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_files: int = MAX_FILES

    def body_too_large(self, size: int) -> RequestError:
        return RequestError(413, f"the request body ({size:,} bytes or more) is above the upload limit of "
                                 f"{self.max_bytes:,} bytes; send a smaller image (the server's --max-upload-mb "
                                 "sets the limit)")


def read_upload(filename: str, content_type: str | None, data: bytes, size: int, channels: int,
                options: PreprocessOptions, limits: UploadLimits) -> Preprocessed:
    """The upload ``filename`` (for messages only) as the uint8 ``(size, size, channels)`` image ``predict``
    would make of the same file; a :class:`RequestError` for anything unusable."""
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared and declared not in CONTENT_TYPES:
        raise RequestError(415, f"{filename}: content type {declared!r} is not an image deepgalaxy reads; upload a "
                                "PNG, JPEG or FITS image")
    if len(data) > limits.max_bytes:
        raise limits.body_too_large(len(data))
    try:
        return preprocess(read_image_bytes(data, limits.max_pixels), size, channels, options)
    except NotAnImageError as exc:
        raise RequestError(415, f"{filename}: {exc}; upload a PNG, JPEG or FITS image") from None
    except ImageTooLargeError as exc:
        raise RequestError(413, f"{filename}: {exc}") from None
    except DeepGalaxyError as exc:
        raise RequestError(422, f"{filename}: {exc}") from None
    except Exception as exc:  # any decoder failure is a bad upload, never a server error
        raise RequestError(422, f"{filename}: cannot read this image ({type(exc).__name__}: {exc})") from None


__all__ = ["CONTENT_TYPES", "DEFAULT_MAX_UPLOAD_MB", "MAX_FILES", "RequestError", "UploadLimits", "read_upload"]
