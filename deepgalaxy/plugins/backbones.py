"""The built-in backbone catalogue, described once for every framework plugin.

Each framework plugin provides the same backbone names with its own factories: a module exposing ``simple``,
``resnet18``, ``resnet34``, ``resnet50`` and ``efficientnet_b0`` .. ``efficientnet_b7``, each
``factory(spec, in_channels)``. Importing this module imports no framework.
"""

from __future__ import annotations

from deepgalaxy.core.interfaces import BackboneInfo
from deepgalaxy.core.specs import BackboneSpec

DEFAULT_SIMPLE_WIDTHS: tuple[int, ...] = (32, 64, 128, 256)


def simple_reduction(spec: BackboneSpec) -> int:
    """The ``simple`` conv stack halves the size once per width: reduction ``2 ** len(widths)``."""
    return 2 ** len(spec.options.get("widths", DEFAULT_SIMPLE_WIDTHS))


def builtin_backbones(framework: str, factories: str) -> list[BackboneInfo]:
    """The built-in backbones with ``framework``'s factories from module ``factories`` (lazy ``module:attr``)."""

    def f(name: str) -> dict[str, str]:
        return {framework: f"{factories}:{name}"}

    return [
        BackboneInfo("simple", f("simple"), f"configurable conv stack (options: widths, default "
                     f"{list(DEFAULT_SIMPLE_WIDTHS)})", reduction=simple_reduction),
        BackboneInfo("resnet18", f("resnet18"), "ResNet-18 (BasicBlock), torchvision layout"),
        BackboneInfo("resnet34", f("resnet34"), "ResNet-34 (BasicBlock), torchvision layout"),
        BackboneInfo("resnet50", f("resnet50"), "ResNet-50 (Bottleneck), torchvision layout"),
        *(
            BackboneInfo(f"efficientnet-b{i}", f(f"efficientnet_b{i}"),
                         f"EfficientNet-B{i} (keras.applications structure without top and input rescaling; "
                         "option drop_connect_rate, default 0.2)")
            for i in range(8)
        ),
    ]
