"""Physical properties with 68% intervals from the raw output of a model's property heads.

The heads give, per target column (:func:`deepgalaxy.core.properties.target_columns`), a normalised mean and a
log-variance: ``(N, 2K)``, the K means first (the inference op ``properties``). With the card's normalisation (each
column's training mean and standard deviation) a column's Gaussian in the target's units is

    mean = mu * std + train_mean,  sigma = exp(logvar / 2) * std * sigma_scale

(``sigma_scale``: the card's factor per column, fitted on the validation split after training; 1 when absent).

Per property of :data:`~deepgalaxy.core.properties.PROPERTIES` (in its units) :func:`property_prediction` gives a
point estimate and a 68% interval (low, high):

- ``time_since_pericentre``, ``time_to_coalescence``, ``pericentre``: mean, and mean -+ sigma (a Gaussian's 68.3%;
  the pericentre's low end may be negative when sigma is large: the Gaussian's, reported as it is);
- ``mass_ratio``: learnt as log10 q: 10**mean, and 10**(mean -+ sigma);
- ``inclination`` and ``azimuth`` (degrees): the angles of the mean vector of the three ``view_*`` columns; their
  intervals from :data:`SAMPLES` draws of the three Gaussians (each draw a direction: its length does not matter),
  between the :data:`PERCENTILES` of the drawn angles. The azimuth is circular: the percentiles are those of the
  drawn azimuths' differences from the point estimate wrapped into [-180, 180), added to it; so ``low <= value <=
  high`` as numbers, ``low`` may be below 0 and ``high`` above 360 (low -10 is 350 degrees: the interval crosses 0).
  :meth:`PropertyPrediction.covers` tests a true azimuth against such an interval. Every image uses the same
  standard-normal draws (seed :data:`SEED`), so a result is reproducible and does not depend on which images are
  predicted together. The drawn angles' interval need not contain the point estimate when the spread is wide (an
  inclination near 0 or 180 degrees: the drawn directions lie all on one side of the pole).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from deepgalaxy.core.errors import DeepGalaxyError
from deepgalaxy.core.properties import PROPERTIES, TARGETS, view_angles
from deepgalaxy.core.specs import PropertyHeads

SAMPLES = 512
"""Draws of the viewing direction per image for the angles' intervals."""
SEED = 0
"""Seed of the draws (the same for every image)."""
PERCENTILES = (15.865525393145708, 84.13447460685429)
"""The 68% interval of drawn angles: the percentiles of a Gaussian's mean -+ 1 sigma (as for the other properties)."""
CHUNK = 1024
"""Images whose draws are held in memory at once (1024 x 512 x 3 doubles: 12.6 MB)."""


class PropertiesNotTrainedError(DeepGalaxyError):
    """A model whose property heads have no normalisation: never trained, so they cannot give physical values."""


class Estimate(NamedTuple):
    """One property of one image: the point estimate and its 68% interval."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class PropertyPrediction:
    """Physical properties of N images.

    ``values``, ``low``, ``high``: property name -> ``(N,)`` float64 arrays in the units of
    :data:`~deepgalaxy.core.properties.PROPERTIES` (only the properties the card's targets give, in their order).
    ``columns``: the heads' target columns; ``mean`` and ``sigma`` ``(N, K)``: each column's Gaussian in the
    target's units (log10 q for the mass ratio, unit-vector components for the viewing direction).
    """

    values: dict[str, np.ndarray]
    low: dict[str, np.ndarray]
    high: dict[str, np.ndarray]
    columns: tuple[str, ...]
    mean: np.ndarray
    sigma: np.ndarray

    @property
    def names(self) -> list[str]:
        """The properties predicted, in the card's order."""
        return list(self.values)

    def __len__(self) -> int:
        return len(self.mean)

    def row(self, i: int) -> dict[str, Estimate]:
        """Image ``i``'s properties."""
        return {name: Estimate(float(self.values[name][i]), float(self.low[name][i]), float(self.high[name][i]))
                for name in self.values}

    def records(self) -> list[dict[str, dict[str, float | str]]]:
        """Per image, each property's ``value``, ``low``, ``high`` and ``unit``: the JSON a service answers."""
        return [{name: {**estimate._asdict(), "unit": PROPERTIES[name]} for name, estimate in self.row(i).items()}
                for i in range(len(self))]

    def covers(self, name: str, truth: np.ndarray) -> np.ndarray:
        """Whether each image's 68% interval of property ``name`` holds the true values ``truth`` ``(N,)`` (an
        azimuth modulo 360: see the module docstring); NaN truths are not covered."""
        t, low, high = np.asarray(truth, np.float64), self.low[name], self.high[name]
        inside: np.ndarray = np.mod(t - low, 360.0) <= high - low if name == "azimuth" else (low <= t) & (t <= high)
        return inside


def trained_normalisation(heads: PropertyHeads | None, model: str) -> np.ndarray:
    """The heads' (mean, std) per column ``(K, 2)``; raises :class:`PropertiesNotTrainedError` naming ``model``
    when it has no property heads or they were never trained."""
    if heads is None:
        raise PropertiesNotTrainedError(f"model {model!r} has no property heads (its card sets no properties): use "
                                        "a model trained with card.properties to predict physical properties")
    if not heads.normalisation:
        raise PropertiesNotTrainedError(
            f"the property heads of model {model!r} were not trained (its card has no properties.normalisation, "
            "which training on a simulated store fills): train it first, or use a trained model")
    return np.asarray(heads.normalisation, np.float64)


def column_gaussians(raw: np.ndarray, heads: PropertyHeads, model: str = "the model"
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Each target column's Gaussian in its units, ``(mean, sigma)`` each ``(N, K)``, from the raw output
    ``(N, 2K)`` (normalised means, then log-variances) of ``heads``, the property heads of ``model`` (named in the
    error raised when they were never trained)."""
    scale = trained_normalisation(heads, model)
    columns = heads.columns
    out = np.asarray(raw, np.float64)
    if out.ndim != 2 or out.shape[1] != 2 * len(columns):
        raise ValueError(f"property heads' output of shape {out.shape}; expected (N, {2 * len(columns)}): a mean and "
                         f"a log-variance for each of {', '.join(columns)}")
    k = len(columns)
    mean = out[:, :k] * scale[:, 1] + scale[:, 0]
    sigma = np.exp(out[:, k:] / 2) * scale[:, 1] * (np.asarray(heads.sigma_scale) if heads.sigma_scale else 1.0)
    return mean, sigma


def property_prediction(raw: np.ndarray, heads: PropertyHeads, model: str = "the model") -> PropertyPrediction:
    """The physical properties from the raw output ``(N, 2K)`` (normalised means, then log-variances) of ``heads``,
    the property heads of ``model`` (named in the error raised when they were never trained)."""
    mean, sigma = column_gaussians(raw, heads, model)
    columns = tuple(heads.columns)
    values: dict[str, np.ndarray] = {}
    low: dict[str, np.ndarray] = {}
    high: dict[str, np.ndarray] = {}
    start = 0
    for target in heads.targets:
        width = len(TARGETS[target].columns)
        m, s = mean[:, start : start + width], sigma[:, start : start + width]
        start += width
        if target == "viewing_direction":
            for name, (value, lo, hi) in _view_direction(m, s).items():
                values[name], low[name], high[name] = value, lo, hi
        elif target == "mass_ratio":
            values[target], low[target], high[target] = 10 ** m[:, 0], 10 ** (m - s)[:, 0], 10 ** (m + s)[:, 0]
        else:
            values[target], low[target], high[target] = m[:, 0], (m - s)[:, 0], (m + s)[:, 0]
    return PropertyPrediction(values, low, high, columns, mean, sigma)


def _view_direction(mean: np.ndarray, sigma: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Inclination and azimuth (value, low, high) from the view vector's Gaussians ``(N, 3)`` each."""
    inclination, azimuth = view_angles(mean)
    draws = np.random.default_rng(SEED).standard_normal((SAMPLES, 3))
    inc_bounds, az_bounds = [], []
    for s in range(0, max(len(mean), 1), CHUNK):  # once for no image: empty bounds
        vectors = mean[s : s + CHUNK, None, :] + sigma[s : s + CHUNK, None, :] * draws  # (n, SAMPLES, 3)
        inc, az = view_angles(vectors)
        inc_bounds.append(np.percentile(inc, PERCENTILES, axis=1))
        wrapped = np.mod(az - azimuth[s : s + CHUNK, None] + 180.0, 360.0) - 180.0
        az_bounds.append(azimuth[s : s + CHUNK] + np.percentile(wrapped, PERCENTILES, axis=1))
    inc_low, inc_high = np.concatenate(inc_bounds, axis=1)
    az_low, az_high = np.concatenate(az_bounds, axis=1)
    return {"inclination": (inclination, inc_low, inc_high), "azimuth": (azimuth, az_low, az_high)}
