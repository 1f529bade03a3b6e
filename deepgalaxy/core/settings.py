"""Settings a user gives as environment variables (``DEEPGALAXY_*``): one parser and one error wording for all."""

from __future__ import annotations

import math
import os

from deepgalaxy.core.errors import DeepGalaxyError


def seconds_from_env(name: str, default: float, *, zero: bool = False,
                     error: type[DeepGalaxyError] = DeepGalaxyError) -> float:
    """``$name`` as a number of seconds (> 0, or >= 0 when ``zero``), ``default`` when unset or empty; anything
    else raises ``error`` naming the variable and its value."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value >= 0 if zero else value > 0) or not value < math.inf:
        least = "0 or more" if zero else "above 0"
        raise error(f"{name}={raw!r}: not a number of seconds {least}; set e.g. {name}={max(default, 1):g}")
    return value
