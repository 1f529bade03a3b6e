"""The property targets of a training: each store's target columns, their normalisation, the fitted card.

A card with property heads learns :mod:`deepgalaxy.core.properties`' targets, normalised by the mean and standard
deviation of each column over the lead store's training split. The card the model is built from carries that
normalisation (and ``class_myr``, the lead store's Myr per timescale class), so the saved model predicts in physical
units wherever it is loaded. The lead store must give every property the targets need; the other stores give what
they have (an unlabelled observation store gives none: its rows count in every loss but these).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from deepgalaxy.core.errors import DatasetError
from deepgalaxy.core.properties import PhysicalUnits, needed_properties, target_table
from deepgalaxy.core.specs import ModelSpec


def raw_targets(card: ModelSpec, stores: Sequence[Any]) -> list[np.ndarray | None]:
    """Each store's target columns ``(rows of the store, K)`` in physical units (NaN = unknown); None for every
    store when the card has no property heads. Raises :class:`DatasetError` naming the card, the store and the
    arrays it lacks when the lead store (or a labelled one) cannot give a property the card's targets need."""
    if card.properties is None:
        return [None] * len(stores)
    names = needed_properties(card.properties.targets)
    tables: list[np.ndarray | None] = []
    for i, ds in enumerate(stores):
        try:
            found = ds.store.properties(names)
        except DatasetError as exc:
            if i == 0 or (ds.labels >= 0).any():
                raise DatasetError(f"card {card.name!r} learns {', '.join(card.properties.targets)}: {exc}") from None
            found = {name: np.full(ds.store.num_rows, np.nan, np.float32) for name in names}
        tables.append(target_table(found, card.properties.targets))
    return tables


def fitted_card(card: ModelSpec, lead: Any, train_rows: np.ndarray, table: np.ndarray | None) -> ModelSpec:
    """``card`` with its property heads' normalisation over ``train_rows`` of the lead store's ``table`` and the
    lead store's Myr per class (unchanged where they do not apply)."""
    update: dict[str, Any] = {}
    myr = class_myr(lead.attrs)
    if myr is not None:
        update["class_myr"] = myr
    if card.properties is not None and table is not None:
        columns = table[train_rows]
        pairs = []
        for name, values in zip(card.properties.columns, columns.T, strict=True):
            known = values[np.isfinite(values)]
            if known.size == 0:
                raise DatasetError(f"{lead.path}: no training image has a known {name} (all NaN); card {card.name!r} "
                                   "cannot learn it: drop it from card.properties.targets")
            std = float(known.std())
            pairs.append((float(known.mean()), std if std > 1e-6 else 1.0))  # one value only: nothing to scale
        update["properties"] = card.properties.model_copy(update={"normalisation": tuple(pairs)})
    return card.model_copy(update=update) if update else card


def normalised(card: ModelSpec, table: np.ndarray | None) -> np.ndarray | None:
    """A store's target columns normalised by the fitted ``card``'s normalisation."""
    if table is None or card.properties is None:
        return None
    mean, std = np.asarray(card.properties.normalisation, np.float32).T
    result: np.ndarray = ((table - mean) / std).astype(np.float32)
    return result


def class_myr(attrs: dict[str, Any]) -> float | None:
    """Myr per timescale class of a simulated store (its simulated time span over the classes); None otherwise."""
    params = (attrs.get("generator") or {}).get("params") or {}
    num_classes = int(attrs.get("num_classes", 0))
    if attrs.get("source") != "simulation" or "t_end" not in params or num_classes < 2:
        return None
    return float(params["t_end"]) / (num_classes - 1) * PhysicalUnits.from_attrs(attrs.get("units")).time_myr


ONE_SIGMA = 0.6826894921370859
"""The probability mass of a Gaussian within one standard deviation of its mean."""


def recalibrated(card: ModelSpec, predicted: np.ndarray, targets: np.ndarray) -> ModelSpec:
    """``card`` with the factors on its predicted sigmas that put 68.3% of the known ``targets`` (normalised,
    ``(N, K)``) within one scaled sigma of the ``predicted`` means (``(N, 2K)``: means, then log-variances)."""
    if card.properties is None:
        return card
    mean, logvar = np.split(np.asarray(predicted, np.float64), 2, axis=1)
    z = np.abs(targets - mean) / np.exp(0.5 * logvar)
    scale = tuple(float(np.quantile(col[np.isfinite(col)], ONE_SIGMA)) if np.isfinite(col).any() else 1.0
                  for col in z.T)
    return card.model_copy(update={"properties": card.properties.model_copy(update={"sigma_scale": scale})})
