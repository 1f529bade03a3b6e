"""Hook implementations of the PyTorch plugin: the ``torch`` framework and its backbones.

This module must stay cheap to import (the CLI loads every plugin): it never imports torch. Factories and the
framework are lazy ``"module:attr"`` strings resolved only when a model is built.
"""

from __future__ import annotations

from deepgalaxy.core.hookspecs import hookimpl
from deepgalaxy.core.interfaces import BackboneInfo, FrameworkInfo
from deepgalaxy.plugins.backbones import builtin_backbones


@hookimpl
def deepgalaxy_frameworks() -> list[FrameworkInfo]:
    return [
        FrameworkInfo(
            "torch",
            loader="deepgalaxy.plugins.torch.framework:TorchFramework",
            runtime="deepgalaxy.plugins.torch.runtime:TorchRuntime",
            bindings={"horovod": "horovod.torch"},
            requires=("torch",),
            description="PyTorch (plain torch backbones; bf16 autocast, channels_last, Horovod-ready)",
        )
    ]


@hookimpl
def deepgalaxy_backbones() -> list[BackboneInfo]:
    return builtin_backbones("torch", "deepgalaxy.plugins.torch.backbones")
