"""Checking a backbone spec's options, so a typo in a card fails loudly instead of being ignored."""

from __future__ import annotations

from typing import Any

from deepgalaxy.core.errors import DeepGalaxyError
from deepgalaxy.core.specs import BackboneSpec


class BackboneOptionError(DeepGalaxyError, ValueError):
    """A backbone option that the backbone does not know, or whose value is invalid."""


def check_options(spec: BackboneSpec, allowed: dict[str, Any]) -> dict[str, Any]:
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
    if not isinstance(in_channels, int) or in_channels < 1:
        raise BackboneOptionError(f"backbone {name!r}: in_channels must be a positive integer, got {in_channels!r}")
    return in_channels
