"""The built-in backbone catalogue, described once for every framework plugin.

Each framework plugin provides the same backbone names with its own factories: a module exposing ``simple``,
``resnet18``, ``resnet34``, ``resnet50`` and ``efficientnet_b0`` .. ``efficientnet_b7``, each
``factory(spec, in_channels)``. Importing this module imports no framework. The ResNets and EfficientNets read
ImageNet weights published by Keras and timm (:mod:`deepgalaxy.plugins.pretrained`).
"""

from __future__ import annotations

import math

from deepgalaxy.core.backbone_options import DEFAULT_DROP_CONNECT_RATE
from deepgalaxy.core.interfaces import BackboneInfo
from deepgalaxy.core.specs import BackboneSpec

DEFAULT_SIMPLE_WIDTHS: tuple[int, ...] = (32, 64, 128, 256)
PRETRAINED = "deepgalaxy.plugins.pretrained:read"


def simple_reduction(spec: BackboneSpec) -> int:
    """The ``simple`` conv stack halves the size once per width: reduction ``2 ** len(widths)``."""
    return 1 << len(spec.options.get("widths", DEFAULT_SIMPLE_WIDTHS))


def builtin_backbones(framework: str, factories: str) -> list[BackboneInfo]:
    """The built-in backbones with ``framework``'s factories from module ``factories`` (lazy ``module:attr``)."""

    def f(name: str) -> dict[str, str]:
        return {framework: f"{factories}:{name}"}

    return [
        BackboneInfo("simple", f("simple"), f"configurable conv stack (options: widths, default "
                     f"{list(DEFAULT_SIMPLE_WIDTHS)})", reduction=simple_reduction),
        BackboneInfo("resnet18", f("resnet18"), "ResNet-18 (BasicBlock), torchvision layout", pretrained=PRETRAINED),
        BackboneInfo("resnet34", f("resnet34"), "ResNet-34 (BasicBlock), torchvision layout", pretrained=PRETRAINED),
        BackboneInfo("resnet50", f("resnet50"), "ResNet-50 (Bottleneck), torchvision layout", pretrained=PRETRAINED),
        *(
            BackboneInfo(f"efficientnet-b{i}", f(f"efficientnet_b{i}"),
                         f"EfficientNet-B{i} (keras.applications structure without top and input rescaling; "
                         f"option drop_connect_rate, default {DEFAULT_DROP_CONNECT_RATE})", pretrained=PRETRAINED)
            for i in range(8)
        ),
    ]


# --- EfficientNet compound scaling (keras.applications' rules, shared so both frameworks build the same net) ----

EFFICIENTNET_COEFFICIENTS: dict[int, tuple[float, float, int]] = {
    0: (1.0, 1.0, 224), 1: (1.0, 1.1, 240), 2: (1.1, 1.2, 260), 3: (1.2, 1.4, 300),
    4: (1.4, 1.8, 380), 5: (1.6, 2.2, 456), 6: (1.8, 2.6, 528), 7: (2.0, 3.1, 600),
}
"""EfficientNet-B0..B7 -> (width coefficient, depth coefficient, native resolution)."""

EFFICIENTNET_BLOCKS: tuple[tuple[int, int, int, int, int, int], ...] = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)
"""Keras' ``DEFAULT_BLOCKS_ARGS`` of B0: (kernel, repeats, filters_in, filters_out, expand_ratio, strides);
squeeze-and-excitation ratio 0.25 everywhere."""


def round_filters(filters: float, width: float, divisor: int = 8) -> int:
    """Scale a channel count by the width coefficient, rounded to a multiple of ``divisor`` (Keras' rule)."""
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    """Scale a stage's block count by the depth coefficient (rounded up, Keras' rule)."""
    return math.ceil(depth * repeats)
