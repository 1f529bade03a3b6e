"""Hook implementations of the TensorFlow plugin: the ``tensorflow`` framework and its backbones.

This module must stay cheap to import (the CLI loads every plugin): it never imports tensorflow or keras.
Factories and the framework are lazy ``"module:attr"`` strings resolved only when a model is built.
"""

from __future__ import annotations

from deepgalaxy.core.hookspecs import hookimpl
from deepgalaxy.core.interfaces import BackboneInfo, FrameworkInfo
from deepgalaxy.plugins.backbones import builtin_backbones


@hookimpl
def deepgalaxy_frameworks() -> list[FrameworkInfo]:
    return [
        FrameworkInfo(
            "tensorflow",
            loader="deepgalaxy.plugins.tensorflow.framework:TensorFlowFramework",
            runtime="deepgalaxy.plugins.tensorflow.runtime:TensorFlowRuntime",
            bindings={"horovod": "horovod.tensorflow"},
            requires=("tensorflow", "keras"),
            description="TensorFlow / Keras 3 (custom tf.function training step; Horovod via DistributedGradientTape)",
        )
    ]


@hookimpl
def deepgalaxy_backbones() -> list[BackboneInfo]:
    return builtin_backbones("tensorflow", "deepgalaxy.plugins.tensorflow.backbones")
