"""Hook implementations of the TensorFlow plugin: the ``tensorflow`` framework and its backbones.

This module must stay cheap to import (the CLI loads every plugin): it never imports tensorflow or keras.
Factories and the framework are lazy ``"module:attr"`` strings resolved only when a model is built.
"""

from __future__ import annotations

from deepgalaxy.core.hookspecs import hookimpl
from deepgalaxy.core.interfaces import BackboneInfo, FrameworkInfo
from deepgalaxy.core.specs import BackboneSpec

_FACTORIES = "deepgalaxy.plugins.tensorflow.backbones"
DEFAULT_SIMPLE_WIDTHS: tuple[int, ...] = (32, 64, 128, 256)


def simple_reduction(spec: BackboneSpec) -> int:
    """The ``simple`` conv stack halves the size once per width: reduction ``2 ** len(widths)``."""
    widths = spec.options.get("widths", DEFAULT_SIMPLE_WIDTHS)
    return 2 ** len(widths)


@hookimpl
def deepgalaxy_frameworks() -> list[FrameworkInfo]:
    return [
        FrameworkInfo(
            "tensorflow",
            loader="deepgalaxy.plugins.tensorflow.framework:TensorFlowFramework",
            requires=("tensorflow", "keras"),
            description="TensorFlow / Keras 3 (custom tf.function training step; Horovod via DistributedGradientTape)",
        )
    ]


@hookimpl
def deepgalaxy_backbones() -> list[BackboneInfo]:
    infos = [
        BackboneInfo(
            "simple",
            factories={"tensorflow": f"{_FACTORIES}:simple"},
            description="configurable conv stack (options: widths, default [32, 64, 128, 256])",
            reduction=simple_reduction,
        ),
        BackboneInfo("resnet18", {"tensorflow": f"{_FACTORIES}:resnet18"}, "ResNet-18 (BasicBlock), torchvision"),
        BackboneInfo("resnet34", {"tensorflow": f"{_FACTORIES}:resnet34"}, "ResNet-34 (BasicBlock), torchvision"),
        BackboneInfo("resnet50", {"tensorflow": f"{_FACTORIES}:resnet50"}, "ResNet-50 (Bottleneck), torchvision"),
    ]
    infos += [
        BackboneInfo(
            f"efficientnet-b{i}",
            {"tensorflow": f"{_FACTORIES}:efficientnet_b{i}"},
            f"EfficientNet-B{i} (keras.applications structure, without top and input rescaling; "
            "option drop_connect_rate, default 0.2)",
        )
        for i in range(8)
    ]
    return infos
