"""Framework-free core: specs, interfaces, plugin hooks and manager, datasets, similarity and scaling maths.

Importing this package never imports torch or tensorflow.
"""

from deepgalaxy.core.errors import (
    DatasetError,
    DeepGalaxyError,
    FrameworkUnavailableError,
    ModelNotFoundError,
    PluginError,
    ShapeError,
    TrainingError,
    UnknownNameError,
    WeightsConversionError,
    WeightsMismatchError,
)
from deepgalaxy.core.hookspecs import hookimpl
from deepgalaxy.core.interfaces import (
    BackboneInfo,
    DatasetSourceInfo,
    Distributed,
    FrameworkInfo,
    LauncherInfo,
    StepResult,
)
from deepgalaxy.core.plugins import get_plugin_manager, reset_plugin_manager
from deepgalaxy.core.specs import BackboneSpec, DataSpec, LossWeights, ModelSpec, RunSpec, TrainSpec

__all__ = [
    "BackboneInfo",
    "BackboneSpec",
    "DataSpec",
    "DatasetError",
    "DatasetSourceInfo",
    "DeepGalaxyError",
    "Distributed",
    "FrameworkInfo",
    "FrameworkUnavailableError",
    "LauncherInfo",
    "LossWeights",
    "ModelNotFoundError",
    "ModelSpec",
    "PluginError",
    "RunSpec",
    "ShapeError",
    "StepResult",
    "TrainSpec",
    "TrainingError",
    "UnknownNameError",
    "WeightsConversionError",
    "WeightsMismatchError",
    "get_plugin_manager",
    "hookimpl",
    "reset_plugin_manager",
]
