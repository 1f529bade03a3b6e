"""Hook implementations of the PyTorch plugin: the ``torch`` framework and its backbones.

This module must stay cheap to import (the CLI loads every plugin): it never imports torch. Factories and the
framework are lazy ``"module:attr"`` strings resolved only when a model is built.
"""

from __future__ import annotations

from deepgalaxy.core.hookspecs import hookimpl
from deepgalaxy.core.interfaces import BackboneInfo, FrameworkInfo
from deepgalaxy.core.specs import BackboneSpec

_FACTORIES = "deepgalaxy.plugins.torch.backbones"
DEFAULT_SIMPLE_WIDTHS: tuple[int, ...] = (32, 64, 128, 256)


def simple_reduction(spec: BackboneSpec) -> int:
    """The ``simple`` conv stack halves the size once per width: reduction ``2 ** len(widths)``."""
    widths = spec.options.get("widths", DEFAULT_SIMPLE_WIDTHS)
    return 2 ** len(widths)


@hookimpl
def deepgalaxy_frameworks() -> list[FrameworkInfo]:
    return [
        FrameworkInfo(
            "torch",
            loader="deepgalaxy.plugins.torch.framework:TorchFramework",
            requires=("torch",),
            description="PyTorch (plain torch backbones; bf16 autocast, channels_last, Horovod-ready)",
        )
    ]


@hookimpl
def deepgalaxy_backbones() -> list[BackboneInfo]:
    infos = [
        BackboneInfo(
            "simple",
            factories={"torch": f"{_FACTORIES}:simple"},
            description="configurable conv stack (options: widths, default [32, 64, 128, 256])",
            reduction=simple_reduction,
        ),
        BackboneInfo("resnet18", {"torch": f"{_FACTORIES}:resnet18"}, "ResNet-18 (BasicBlock), torchvision layout"),
        BackboneInfo("resnet34", {"torch": f"{_FACTORIES}:resnet34"}, "ResNet-34 (BasicBlock), torchvision layout"),
        BackboneInfo("resnet50", {"torch": f"{_FACTORIES}:resnet50"}, "ResNet-50 (Bottleneck), torchvision layout"),
    ]
    infos += [
        BackboneInfo(
            f"efficientnet-b{i}",
            {"torch": f"{_FACTORIES}:efficientnet_b{i}"},
            f"EfficientNet-B{i} (Keras applications structure, without top; option drop_connect_rate, default 0.2)",
        )
        for i in range(8)
    ]
    return infos
