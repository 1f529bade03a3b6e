"""The brightness stretch every deepgalaxy image goes through: simulated renders and preprocessed observations.

One function, so a model trained on simulations sees observed images on the same brightness scale:
``asinh(flux / soft)``, divided by a high quantile of the stretched values (one scale per simulation, or per
observed image), clipped to [0, 1]. Linear below ``soft`` (faint tails keep their shape), logarithmic above it
(bright nuclei do not saturate).
"""

from __future__ import annotations

import numpy as np

TOP_QUANTILE = 0.9999
"""The stretched value mapped to full brightness: the brightest 0.01% of pixels saturate."""


def asinh_stretch(flux: np.ndarray, soft: float = 1.0, quantile: float = TOP_QUANTILE) -> np.ndarray:
    """``clip(asinh(flux / soft) / top, 0, 1)`` as float32, ``top`` the ``quantile`` of the stretched values
    over the whole array (1 when that is 0: an empty field stays black instead of dividing by zero)."""
    if soft <= 0:
        raise ValueError(f"the asinh softening must be positive, got {soft}")
    stretched = np.arcsinh(np.asarray(flux, dtype=np.float32) / np.float32(soft))
    top = float(np.quantile(stretched, quantile)) or 1.0
    out: np.ndarray = np.clip(stretched / top, 0.0, 1.0).astype(np.float32, copy=False)
    return out


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 0..255, rounded (what a store holds)."""
    pixels: np.ndarray = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return pixels
