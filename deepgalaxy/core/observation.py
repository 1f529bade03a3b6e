"""Preprocess an observed image so it looks like the simulator's renders: one function for ingest, predict, serve.

:func:`preprocess` takes the float pixels of one image (:class:`~deepgalaxy.core.imagefile.RawImage`) and returns
the uint8 image a model card takes, in this order:

1. **Sky**: the sigma-clipped median and standard deviation of the luminance (:func:`sky_level`: 3 sigma, MAD
   scale, a few rounds, so galaxies and stars do not bias it); subtracted from every channel.
2. **Segmentation** (scikit-image): the luminance, smoothed by a Gaussian of ``smooth`` pixels, above
   ``detect_sigmas`` sky sigmas, split into connected components. The *system* is the component with the largest
   area weighted by its closeness to the image centre, plus every component at least ``companion_area`` of its
   area whose centre lies within two system sizes (the companion of a pair need not touch it).
3. **Stars** (``mask_stars``, off by default): the other components smaller than ``companion_area`` of the main
   one (small compact sources: foreground stars, background galaxies) are set to the sky (0), grown by 2 pixels.
   A star on top of the system is part of the system and stays.
4. **Crop**: a square centred on the system's bounding box, its side the box's longer side plus ``margin`` on
   each side; parts beyond the image are sky (0). ``crop="centre"`` takes the central square instead.
5. **Stretch**: the simulator's asinh stretch (:func:`deepgalaxy.core.brightness.asinh_stretch`, the function the
   renderer uses) with a softening of ``soft_sigmas`` sky sigmas, normalised on the crop.
6. **Channels and size**: luminance for 1-channel cards (RGB kept for 3-channel ones, grey repeated), resized
   with anti-aliasing to the card's input size.

``PreprocessOptions(sky=False, crop="centre", stretch=False)`` (``--no-preprocess``) keeps only the centre square
and the resize; linear images (FITS) are always stretched, since their values have no display scale.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from deepgalaxy.core.brightness import asinh_stretch, to_uint8
from deepgalaxy.core.errors import DeepGalaxyError
from deepgalaxy.core.imagefile import DEFAULT_MAX_PIXELS, RawImage, read_image_file

LUMINANCE = (0.2125, 0.7154, 0.0721)
"""Rec. 709 luminance weights of R, G, B (scikit-image's ``rgb2gray``)."""
SIGMA_FLOOR = 1.0 / 255.0 / np.sqrt(12.0)
"""Smallest sky sigma, relative to the image's range: the quantisation noise of 8 bits (a clipped black sky of a
processed photo has none of its own)."""


class NoSourceError(DeepGalaxyError, ValueError):
    """An image with nothing above the sky: there is no system to centre on."""


@dataclass(frozen=True)
class PreprocessOptions:
    """How :func:`preprocess` treats an image (the defaults are what ``data ingest`` and ``predict`` use)."""

    sky: bool = True
    crop: Literal["system", "centre"] = "system"
    mask_stars: bool = False
    stretch: bool = True
    detect_sigmas: float = 3.0
    """Detection threshold in sky sigmas (on the smoothed luminance)."""
    smooth: float = 1.0
    """Gaussian smoothing (pixels, at 256 px: scaled with the image) before detection."""
    margin: float = 0.15
    """Margin around the system's box on each side, as a fraction of its longer side."""
    companion_area: float = 0.15
    """Components at least this fraction of the main one's area (and near it) belong to the system; smaller ones
    outside it count as stars (``mask_stars``)."""
    soft_sigmas: float = 30.0
    """asinh softening in sky sigmas: the simulator's survey-like images (``--observe``) had their sky noise at
    about 1/30 of its softening when this was written, so faint tails stay in the linear part alike."""


RAW = PreprocessOptions(sky=False, crop="centre", stretch=False)
"""``--no-preprocess``: the central square, resized (linear images still stretched)."""


@dataclass
class Preprocessed:
    """One preprocessed image and what was found: ``image`` uint8 ``(size, size, channels)``; ``sky`` and
    ``noise`` (luminance units of the input), ``box`` (top, left, side) of the crop in input pixels, ``stars``
    masked, ``notes`` from reading and preprocessing."""

    image: np.ndarray
    sky: float
    noise: float
    box: tuple[int, int, int]
    stars: int = 0
    notes: list[str] = field(default_factory=list)


def luminance(pixels: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` -> ``(H, W)`` Rec. 709 luminance; a 2-D image as it is."""
    if pixels.ndim == 2:
        return pixels
    lum: np.ndarray = pixels[..., :3] @ np.asarray(LUMINANCE)
    return lum


def sky_level(values: np.ndarray, sigmas: float = 3.0, rounds: int = 5) -> tuple[float, float]:
    """Sigma-clipped ``(median, sigma)`` of ``values`` (sigma from the median absolute deviation)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if not v.size:
        raise NoSourceError("no finite pixels to measure the sky on")
    med, sigma = float(np.median(v)), 0.0
    for _ in range(rounds):
        sigma = 1.4826 * float(np.median(np.abs(v - med)))
        kept = v[np.abs(v - med) <= sigmas * sigma] if sigma > 0 else v[v == med]
        if kept.size == v.size or not kept.size:
            break
        v = kept
        med = float(np.median(v))
    return med, sigma


def _components(lum: np.ndarray, threshold: float, smooth: float) -> tuple[np.ndarray, list[object]]:
    from scipy.ndimage import gaussian_filter
    from skimage.measure import label, regionprops

    scale = max(1.0, min(lum.shape) / 256.0)
    detected = gaussian_filter(lum, sigma=smooth * scale) > threshold
    labels = label(detected, connectivity=2)  # type: ignore[no-untyped-call]
    return labels, list(regionprops(labels))  # type: ignore[no-untyped-call]


def _system(regions: list[object], shape: tuple[int, int], options: PreprocessOptions) -> list[object]:
    """The main component (largest area weighted by closeness to the centre) and its companions."""
    h, w = shape
    centre = np.array([h / 2.0, w / 2.0])

    def centroid(r: object) -> np.ndarray:
        return np.asarray(r.centroid)  # type: ignore[attr-defined]

    def score(r: object) -> float:
        d = float(np.linalg.norm(centroid(r) - centre)) / (0.35 * min(h, w))
        return float(r.area) * float(np.exp(-0.5 * d * d))  # type: ignore[attr-defined]

    main = max(regions, key=score)
    top, left, bottom, right = main.bbox  # type: ignore[attr-defined]
    reach = 2.0 * max(bottom - top, right - left)
    return [r for r in regions if r is main or (
        r.area >= options.companion_area * main.area  # type: ignore[attr-defined]
        and np.linalg.norm(centroid(r) - centroid(main)) <= reach)]


def _square(pixels: np.ndarray, top: int, left: int, side: int, fill: float) -> np.ndarray:
    """The ``side`` x ``side`` window at (top, left), ``fill`` (the sky) where it leaves the image."""
    h, w = pixels.shape[:2]
    out = np.full((side, side, *pixels.shape[2:]), fill, dtype=pixels.dtype)
    t0, l0, t1, l1 = max(top, 0), max(left, 0), min(top + side, h), min(left + side, w)
    if t1 > t0 and l1 > l0:
        out[t0 - top : t1 - top, l0 - left : l1 - left] = pixels[t0:t1, l0:l1]
    return out


def preprocess(raw: RawImage | np.ndarray, size: int, channels: int,
               options: PreprocessOptions = PreprocessOptions()) -> Preprocessed:
    """One image (a :class:`RawImage`, or an array ``(H, W)`` / ``(H, W, 3)``: uint8, or floats) -> the card's
    ``(size, size, channels)`` uint8 image; :class:`NoSourceError` when nothing stands above the sky."""
    from scipy.ndimage import binary_dilation
    from skimage.transform import resize

    if not isinstance(raw, RawImage):
        arr = np.asarray(raw)
        raw = RawImage(arr / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64), linear=arr.dtype != np.uint8)
    pixels = raw.pixels.astype(np.float64)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] != 3) or min(pixels.shape[:2]) < 2:
        raise DeepGalaxyError(f"an image must be (H, W) or (H, W, 3), got shape {raw.pixels.shape}")
    if channels == 1:
        pixels = luminance(pixels)
    notes = list(raw.notes)
    lum = luminance(pixels)
    span = float(lum.max() - lum.min())
    if span <= 0:
        raise NoSourceError("a constant image: nothing to see")
    sky, noise = sky_level(lum)
    noise = max(noise, SIGMA_FLOOR * span)
    options = replace(options, stretch=True) if raw.linear and not options.stretch else options
    background = 0.0 if options.sky else sky  # the sky's value in ``pixels`` from here on
    if options.sky:
        pixels = pixels - (np.array([sky_level(pixels[..., c])[0] for c in range(3)]) if pixels.ndim == 3 else sky)
    h, w = lum.shape
    stars = 0
    if options.crop == "system" or options.mask_stars:
        labels, regions = _components(lum - sky, options.detect_sigmas * noise, options.smooth)
        if not regions:
            raise NoSourceError(f"nothing above the sky ({options.detect_sigmas:g} sigma): no system to centre on")
        system = _system(regions, (h, w), options)
        if options.mask_stars:
            largest = max(r.area for r in system)  # type: ignore[attr-defined]
            small = [r for r in regions if r not in system and r.area < options.companion_area * largest]  # type: ignore[attr-defined]
            if small:
                stars = len(small)
                mask = binary_dilation(np.isin(labels, [r.label for r in small]), iterations=2)  # type: ignore[attr-defined]
                pixels = np.where(mask[..., None] if pixels.ndim == 3 else mask, background, pixels)
    if options.crop == "system":
        boxes = np.array([r.bbox for r in system])  # type: ignore[attr-defined]
        top, left = int(boxes[:, 0].min()), int(boxes[:, 1].min())
        bottom, right = int(boxes[:, 2].max()), int(boxes[:, 3].max())
        side = max(8, round(max(bottom - top, right - left) * (1.0 + 2.0 * options.margin)))
        box = (round((top + bottom - side) / 2.0), round((left + right - side) / 2.0), side)
    else:
        side = min(h, w)
        box = ((h - side) // 2, (w - side) // 2, side)
    crop = _square(pixels, *box, fill=background)
    if options.stretch:
        out = asinh_stretch(np.maximum(crop - background, 0.0), soft=options.soft_sigmas * noise)
    else:
        out = np.clip(crop, 0.0, 1.0)
    if out.ndim == 2:
        out = out[..., None]
    if channels == 3 and out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    resized = resize(out, (size, size, channels), anti_aliasing=box[2] > size, preserve_range=True)  # type: ignore[no-untyped-call]
    return Preprocessed(to_uint8(resized), sky, noise, box, stars, notes)


def load_observation(path: str, size: int, channels: int, options: PreprocessOptions = PreprocessOptions(),
                     max_pixels: int = DEFAULT_MAX_PIXELS, hdu: int | str | None = None) -> Preprocessed:
    """Read an image file (:func:`~deepgalaxy.core.imagefile.read_image_file`) and :func:`preprocess` it."""
    return preprocess(read_image_file(path, max_pixels, hdu), size, channels, options)


def read_observations(paths: Iterable[Path], size: int, channels: int,
                      options: PreprocessOptions = PreprocessOptions(), max_pixels: int = DEFAULT_MAX_PIXELS,
                      hdu: int | str | None = None) -> Iterator[tuple[Path, Preprocessed | str]]:
    """Each file with its :class:`Preprocessed` image, or with why it cannot be used (the caller lists it as
    skipped: an unreadable file never becomes a blank image)."""
    for path in paths:
        try:
            yield path, load_observation(str(path), size, channels, options, max_pixels, hdu)
        except DeepGalaxyError as exc:
            yield path, str(exc)[:300]
        except Exception as exc:  # any decoder failure: listed, never a blank image
            yield path, f"{type(exc).__name__}: {exc}"[:300]


def draw_preprocessing(paths: Sequence[Path], out: str | Path, size: int, channels: int,
                       options: PreprocessOptions = PreprocessOptions(), max_pixels: int = DEFAULT_MAX_PIXELS,
                       hdu: int | str | None = None) -> Path:
    """A before/after figure (:func:`~deepgalaxy.core.figures.preprocess_figure`) of the readable ``paths``."""
    from deepgalaxy.core.figures import preprocess_figure

    befores, boxes, afters, names = [], [], [], []
    for path in paths:
        try:
            raw = read_image_file(path, max_pixels, hdu)
            done = preprocess(raw, size, channels, options)
        except DeepGalaxyError:
            continue
        befores.append(raw.pixels)
        boxes.append(done.box)
        afters.append(done.image)
        names.append(Path(path).name)
    if not befores:
        raise DeepGalaxyError(f"none of the {len(paths)} images could be preprocessed for the figure")
    return preprocess_figure(befores, boxes, afters, names, out)


__all__ = [
    "LUMINANCE",
    "RAW",
    "NoSourceError",
    "PreprocessOptions",
    "Preprocessed",
    "draw_preprocessing",
    "load_observation",
    "luminance",
    "preprocess",
    "read_observations",
    "sky_level",
]
