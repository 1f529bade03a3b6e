"""Checking a backbone spec's options, once for every framework, so a typo in a card fails loudly.

Both frameworks' factories of the built-in backbones validate their options here: the same defaults, the same
error type (:class:`BackboneOptionError`) and the same messages in torch and TensorFlow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from deepgalaxy.core.errors import DeepGalaxyError
from deepgalaxy.core.specs import BackboneSpec

DEFAULT_DROP_CONNECT_RATE = 0.2
"""EfficientNet's drop-connect rate of the last block (the blocks before it scale it linearly from 0)."""


class BackboneOptionError(DeepGalaxyError, ValueError):
    """A backbone option that the backbone does not know, or whose value is invalid."""


def check_options(spec: BackboneSpec, allowed: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``allowed`` (the defaults) updated with ``spec.options``; unknown keys raise naming the backbone."""
    unknown = sorted(set(spec.options) - set(allowed))
    if unknown:
        known = ", ".join(sorted(allowed)) or "none"
        raise BackboneOptionError(
            f"backbone {spec.name!r} has no option(s) {', '.join(map(repr, unknown))}; its options are: {known}"
        )
    return {**allowed, **spec.options}


def check_in_channels(name: str, in_channels: int) -> int:
    """Input channels must be a positive int (1 for the grayscale simulations, 3 for RGB)."""
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise BackboneOptionError(f"backbone {name!r}: in_channels must be a positive integer, got {in_channels!r}")
    return in_channels


def simple_widths(spec: BackboneSpec, default: Sequence[int]) -> list[int]:
    """The ``simple`` conv stack's option ``widths`` (``default`` when absent): a non-empty list of positive ints."""
    widths = check_options(spec, {"widths": list(default)})["widths"]
    if (
        not isinstance(widths, (list, tuple))
        or not widths
        or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths)
    ):
        raise BackboneOptionError(
            f"backbone {spec.name!r}: option widths must be a non-empty list of positive integers, got {widths!r}"
        )
    return list(widths)


def drop_connect_rate(spec: BackboneSpec) -> float:
    """An EfficientNet's option ``drop_connect_rate`` (default :data:`DEFAULT_DROP_CONNECT_RATE`), in [0, 1)."""
    rate = check_options(spec, {"drop_connect_rate": DEFAULT_DROP_CONNECT_RATE})["drop_connect_rate"]
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0.0 <= rate < 1.0:
        raise BackboneOptionError(f"backbone {spec.name!r}: drop_connect_rate must be in [0, 1), got {rate!r}")
    return float(rate)
