"""Runs: train, scale and tune, launched through launcher plugins and tracked in MLflow.

``deepgalaxy.runs.train(card, data, ...)`` is the function (cheap to import: mlflow and the frameworks load only
inside it); the module that holds it is :mod:`deepgalaxy.runs.training`.
"""

from __future__ import annotations

from deepgalaxy.runs.training import TrainResult, train

__all__ = ["TrainResult", "train"]
