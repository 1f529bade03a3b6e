"""Structural similarity (SSIM) of images, and how well latent-space recommendations score under it.

The paper validates its recommendations by the SSIM between a query image and the images recommended for it
(mean 0.9 over all queries). :func:`evaluate_recommendations` reports that mean together with the two numbers
that make it interpretable: the same mean for random pairs (the floor) and for the k most SSIM-similar images of
a candidate pool (the ceiling any latent space could reach), plus how far apart in merger time (class) a query
and its neighbours are.

SSIM here is exactly :func:`skimage.metrics.structural_similarity` with its defaults (7x7 uniform window,
``K1=0.01``, ``K2=0.03``, sample covariance; per-channel mean for RGB), on images scaled to [0, 1] with
``data_range=1`` (uint8 images are divided by 255, which leaves SSIM unchanged). :func:`ssim_one_to_many`
computes the same numbers for one image against a stack at once (checked against scikit-image in the tests),
which is what makes the oracle affordable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, cast

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.ndimage import uniform_filter

from deepgalaxy.core.errors import ShapeError
from deepgalaxy.core.progress import progress_bar

WIN_SIZE = 7
K1, K2 = 0.01, 0.03
CHUNK_ELEMENTS = 1 << 22
"""Pixel values per block of candidate images processed at once (bounds memory: ~32 MB per float64 array)."""

ImageSource = NDArray[Any] | Callable[[NDArray[np.int64]], NDArray[Any]]
"""Images ``(N, H, W[, C])`` as an array (numpy, or anything indexable by an integer array) or a function that
returns the images of the given rows (for a dataset store: ``open_dataset(path).images``)."""


def to_unit(images: ArrayLike, name: str = "images") -> NDArray[np.float64]:
    """Images as float64 in [0, 1]: uint8 divided by 255, other integers refused, floats checked to lie in [0, 1]."""
    x = np.asarray(images)
    if x.dtype == np.uint8:
        return x.astype(np.float64) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise ShapeError(f"{name} must be uint8 (0..255) or float in [0, 1], got dtype {x.dtype}")
    x = x.astype(np.float64)
    if x.size and (float(np.nanmin(x)) < -1e-6 or float(np.nanmax(x)) > 1 + 1e-6):
        raise ShapeError(
            f"{name} are float with values in [{np.nanmin(x):.3g}, {np.nanmax(x):.3g}]; SSIM needs [0, 1] "
            "(divide by the maximum possible value, e.g. 255 for 8-bit data)"
        )
    return x


def _as_hwc(x: NDArray[np.float64], name: str) -> NDArray[np.float64]:
    """One image ``(H, W)``, ``(H, W, C)`` -> ``(H, W, C)``."""
    if x.ndim == 2:
        return x[:, :, None]
    if x.ndim == 3:
        return x
    raise ShapeError(f"{name} must be one image (H, W) or (H, W, C), got shape {x.shape}")


def ssim(a: ArrayLike, b: ArrayLike) -> float:
    """SSIM of two images of equal shape (grayscale ``(H, W)`` / ``(H, W, 1)`` or colour ``(H, W, C)``).

    Delegates to scikit-image with ``data_range=1`` on [0, 1] images (and ``channel_axis`` for colour).
    """
    from skimage import metrics

    structural_similarity = cast(Callable[..., float], metrics.structural_similarity)
    x = _as_hwc(to_unit(a, "first image"), "first image")
    y = _as_hwc(to_unit(b, "second image"), "second image")
    if x.shape != y.shape:
        raise ShapeError(f"SSIM needs images of equal shape, got {x.shape} and {y.shape}")
    _check_size(x.shape)
    if x.shape[2] == 1:
        return float(structural_similarity(x[:, :, 0], y[:, :, 0], data_range=1.0))
    return float(structural_similarity(x, y, data_range=1.0, channel_axis=2))


def _check_size(shape: tuple[int, ...]) -> None:
    if min(shape[:2]) < WIN_SIZE:
        raise ShapeError(f"SSIM needs images of at least {WIN_SIZE}x{WIN_SIZE} pixels, got {shape[0]}x{shape[1]}")


@dataclass
class _Stats:
    """Per-image local statistics that SSIM against any other image reuses."""

    images: NDArray[np.float64]  # (P, H, W, C)
    mean: NDArray[np.float64]  # local mean
    var: NDArray[np.float64]  # local variance (sample covariance normalisation)


_NP = WIN_SIZE * WIN_SIZE
_COV_NORM = _NP / (_NP - 1)


def _filter(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """7x7 uniform filter over H and W of a ``(P, H, W, C)`` stack, reflect padding as in scikit-image."""
    return np.asarray(uniform_filter(x, size=(1, WIN_SIZE, WIN_SIZE, 1), mode="reflect"), dtype=np.float64)


def _stats(images: NDArray[np.float64]) -> _Stats:
    mean = _filter(images)
    var = _COV_NORM * (_filter(images * images) - mean * mean)
    return _Stats(images, mean, var)


def _ssim_stats(q: _Stats, c: _Stats) -> NDArray[np.float64]:
    """SSIM of the single image in ``q`` against every image in ``c``: ``(P,)``."""
    c1, c2 = K1**2, K2**2
    cov = _COV_NORM * (_filter(q.images * c.images) - q.mean * c.mean)
    s = ((2 * q.mean * c.mean + c1) * (2 * cov + c2)) / ((q.mean**2 + c.mean**2 + c1) * (q.var + c.var + c2))
    pad = (WIN_SIZE - 1) // 2
    inner = s[:, pad : s.shape[1] - pad, pad : s.shape[2] - pad, :]
    # scikit-image: mean over the cropped pixels of each channel, then mean over channels
    return np.asarray(inner.mean(axis=(1, 2)).mean(axis=1), dtype=np.float64)


def _as_stack(images: ArrayLike, name: str) -> NDArray[np.float64]:
    x = to_unit(images, name)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ShapeError(f"{name} must be (N, H, W) or (N, H, W, C), got shape {x.shape}")
    _check_size(x.shape[1:])
    return x


def ssim_one_to_many(query: ArrayLike, candidates: ArrayLike, chunk: int = 32) -> NDArray[np.float64]:
    """SSIM of one image against each of ``candidates`` ``(P, H, W[, C])`` -> ``(P,)``, vectorised.

    Equal to calling :func:`ssim` P times (to ~1e-12), several times faster.
    """
    q = _as_stack(np.asarray(query)[None], "query image")
    raw = np.asarray(candidates)
    if raw.ndim == 3:
        raw = raw[..., None]
    if raw.shape[1:] != q.shape[1:]:
        raise ShapeError(f"query image {q.shape[1:]} and candidates {raw.shape[1:]} differ in shape")
    qs = _stats(q)
    # convert to float per chunk, so a large uint8 stack never exists as float64 all at once
    parts = [
        _ssim_stats(qs, _stats(_as_stack(raw[s : s + chunk], "candidate images"))) for s in range(0, len(raw), chunk)
    ]
    return np.concatenate(parts) if parts else np.empty(0)


def ssim_pairs(images: ImageSource, pairs: ArrayLike) -> NDArray[np.float64]:
    """SSIM of each row pair ``(i, j)`` of ``pairs`` ``(P, 2)`` in ``images``."""
    p = np.asarray(pairs, dtype=np.int64)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ShapeError(f"pairs must be (P, 2) row numbers, got shape {p.shape}")
    out = np.empty(len(p), dtype=np.float64)
    for i in np.unique(p[:, 0]):
        where = np.flatnonzero(p[:, 0] == i)
        out[where] = ssim_one_to_many(_load(images, np.array([i]))[0], _load(images, p[where, 1]))
    return out


def _load(images: ImageSource, rows: NDArray[np.int64]) -> NDArray[Any]:
    """Images of ``rows`` (any order, repeats allowed) from an array or a loader function."""
    if callable(images):
        return np.asarray(images(rows))
    unique, inverse = np.unique(rows, return_inverse=True)  # sorted unique rows suit Zarr-like arrays
    return np.asarray(images[unique])[inverse]


# --- evaluation of recommendations ----------------------------------------------------------------------------


@dataclass
class RecommendationReport:
    """Mean SSIM of recommendations against the random floor and the SSIM-oracle ceiling, and class distances.

    ``ssim_top_k``: mean over queries and their k recommendations. ``ssim_random``: the same for k random other
    images. ``ssim_oracle``: the mean of each query's k highest SSIM within a candidate pool of ``pool_size``
    images (all other images when the set is small, else a random sample: then it is a lower bound of the true
    ceiling; ``pool_size`` reports the candidates per query). ``class_diff_*``: mean absolute class difference
    between a query and its recommendations / random images; ``knn_class_mae``: mean absolute error of
    estimating a query's class (merger time) as the mean class of its recommendations.
    """

    k: int
    queries: int
    pool_size: int
    ssim_top_k: float
    ssim_random: float
    ssim_oracle: float
    class_diff_top_k: float | None = None
    class_diff_random: float | None = None
    knn_class_mae: float | None = None

    @property
    def relative(self) -> float:
        """Where the recommendations sit between random (0) and the oracle (1)."""
        span = self.ssim_oracle - self.ssim_random
        return float("nan") if span <= 0 else (self.ssim_top_k - self.ssim_random) / span

    def summary(self) -> dict[str, float | int | None]:
        """Scalars for logging (MLflow metrics / the benchmark table)."""
        return {**asdict(self), "relative": self.relative}


def evaluate_recommendations(
    images: ImageSource,
    query_rows: ArrayLike,
    recommended: ArrayLike,
    n_images: int | None = None,
    labels: ArrayLike | None = None,
    pool_size: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> RecommendationReport:
    """Score recommendations ``recommended`` ``(Q, k)`` (row numbers; ``-1`` = none) for ``query_rows`` ``(Q,)``.

    ``images`` holds all ``n_images`` images (default ``len(images)``); ``labels`` their classes. The random
    baseline draws k other images per query; the oracle searches a pool of ``pool_size`` other images per query
    (the same ``pool_size`` images for every query, sampled once with ``seed`` when the set is larger; the query
    itself is skipped). Costs about ``Q * (2k + pool_size)`` SSIMs.
    """
    queries = np.atleast_1d(np.asarray(query_rows, dtype=np.int64))
    rec = np.asarray(recommended, dtype=np.int64)
    if rec.ndim != 2 or rec.shape[0] != len(queries):
        raise ShapeError(f"recommendations must be (Q, k) with Q={len(queries)} queries, got shape {rec.shape}")
    k = rec.shape[1]
    if callable(images) and n_images is None:
        raise ShapeError("give n_images when images is a loader function")
    n = int(n_images if n_images is not None else len(images))  # type: ignore[arg-type]
    if n < 2 or k < 1:
        raise ShapeError(f"evaluation needs at least 2 images and k >= 1, got {n} images and k={k}")
    rng = np.random.default_rng(seed)
    pool = np.arange(n) if n <= pool_size else np.sort(rng.choice(n, size=pool_size, replace=False))
    lab = None if labels is None else np.asarray(labels, dtype=np.float64)
    query_images = _load(images, queries)  # kept in their stored dtype (uint8 stays small)
    chunk = max(1, CHUNK_ELEMENTS // int(np.prod(query_images.shape[1:])))

    top, rnd = np.full(len(queries), np.nan), np.full(len(queries), np.nan)
    diff_top, diff_rnd, mae = (np.full(len(queries), np.nan) for _ in range(3))
    bar = progress_bar(progress, len(queries) + len(pool), "SSIM: recommendations, random pairs, oracle pool")
    for i, qrow in enumerate(queries.tolist()):
        q = _stats(_as_stack(query_images[i : i + 1], "query image"))
        valid = rec[i][rec[i] >= 0]
        others = rng.choice(n - 1, size=k, replace=n - 1 < k)
        others = others + (others >= qrow)  # k random rows other than the query
        if len(valid):
            top[i] = _ssim_stats(q, _stats(_as_stack(_load(images, valid), "recommended images"))).mean()
        rnd[i] = _ssim_stats(q, _stats(_as_stack(_load(images, others), "random images"))).mean()
        if lab is not None:
            diff_rnd[i] = np.abs(lab[others] - lab[qrow]).mean()
            if len(valid):
                diff_top[i] = np.abs(lab[valid] - lab[qrow]).mean()
                mae[i] = abs(lab[valid].mean() - lab[qrow])
        bar.update(1)
    # Oracle: stream the pool in chunks (each chunk's statistics computed once), keep a running top-k per query.
    best = np.full((len(queries), k), -np.inf)
    for start in range(0, len(pool), chunk):
        rows = pool[start : start + chunk]
        c = _stats(_as_stack(_load(images, rows), "pool images"))
        for i, qrow in enumerate(queries.tolist()):
            scores = _ssim_stats(_stats(_as_stack(query_images[i : i + 1], "query image")), c)
            scores[rows == qrow] = -np.inf
            best[i] = np.sort(np.concatenate([best[i], scores]))[-k:]
        bar.update(len(rows))
    bar.close()
    oracle = np.where(np.isfinite(best), best, np.nan)
    return RecommendationReport(
        k=k, queries=len(queries), pool_size=int(min(len(pool), n - 1)),
        ssim_top_k=_nanmean(top), ssim_random=_nanmean(rnd), ssim_oracle=_nanmean(np.nanmean(oracle, axis=1)),
        class_diff_top_k=_nanmean(diff_top) if lab is not None else None,
        class_diff_random=_nanmean(diff_rnd) if lab is not None else None,
        knn_class_mae=_nanmean(mae) if lab is not None else None,
    )


def evaluate_index(
    index: Any,
    images: ImageSource,
    labels: ArrayLike | None = None,
    k: int = 6,
    n_queries: int = 200,
    pool_size: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> RecommendationReport:
    """Evaluate a :class:`~deepgalaxy.core.search.LatentIndex`'s top-k recommendations on sampled queries.

    ``images`` and ``labels`` are indexed by the index's rows. ``n_queries=None``-like values above the index
    size use every row as a query.
    """
    n = len(index)
    rng = np.random.default_rng(seed)
    rows = np.arange(n) if n_queries >= n else np.sort(rng.choice(n, size=n_queries, replace=False))
    rec, _ = index.recommend(rows, k)
    return evaluate_recommendations(images, rows, rec, n_images=n, labels=labels, pool_size=pool_size, seed=seed,
                                    progress=progress)




def _nanmean(values: NDArray[np.float64]) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


__all__ = [
    "ImageSource",
    "RecommendationReport",
    "evaluate_index",
    "evaluate_recommendations",
    "ssim",
    "ssim_one_to_many",
    "ssim_pairs",
    "to_unit",
]
