"""The MLflow pyfunc flavour of a registered model, served by the installed deepgalaxy package.

A version's ``MLmodel`` names this module as the flavour's ``loader_module``, and its ``data`` directory holds
``card.json`` + ``weights.safetensors``. ``mlflow.pyfunc.load_model("models:/vae-b4@champion")`` imports this
module from the installed package and calls :func:`_load_pyfunc` on that directory: no code stored in the artifact
runs and nothing is unpickled (the artifact holds no Python file). This module imports no framework, and MLflow only
when a request is refused, so ``mlflow models serve`` serves it wherever deepgalaxy is installed.

Over HTTP (``mlflow models serve``) the body is ``{"inputs": IMAGES, "params": {"op": OP}}``; JSON has no uint8,
so integer images are taken as 0..255 pixel values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from deepgalaxy.core.errors import DeepGalaxyError, ShapeError
from deepgalaxy.core.model import Model
from deepgalaxy.core.specs import ModelSpec

OPS = ("predict", "encode", "reconstruct", "decode", "properties")
"""What ``predict(images, params={"op": ...})`` can do."""

Output = np.ndarray | list[dict[str, dict[str, float | str]]]
"""An op's answer: an array, or (``properties``) per image each property's value, interval and unit."""


class PyfuncModel:
    """What ``mlflow.pyfunc.load_model`` wraps: ``predict(model_input, params={"op": ...})`` on a :class:`Model`.

    ``op`` is ``predict`` (class probabilities), ``encode`` (latent means), ``reconstruct`` (images), ``decode``
    (latent vectors -> images) or ``properties`` (physical properties, see :func:`run_op`); without it:
    :func:`default_op`. Bad input raises an ``MlflowException`` (INVALID_PARAMETER_VALUE) carrying deepgalaxy's
    message, so the scoring server answers 400 with that message instead of a generic one.
    """

    def __init__(self, model: Model) -> None:
        self.model = model

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Output:
        try:
            return run_op(self.model, model_input, params)
        except (DeepGalaxyError, ValueError) as exc:
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            raise MlflowException(f"{type(exc).__name__}: {exc}", error_code=INVALID_PARAMETER_VALUE) from exc


def run_op(model: Model, model_input: Any, params: dict[str, Any] | None = None) -> Output:
    """Run the op named by ``params["op"]`` (default: :func:`default_op`) on ``model_input``.

    ``properties`` answers the de-normalised physical values (not the heads' raw ``(N, 2K)``): per image, property
    name -> ``{"value", "low", "high", "unit"}`` (the 68% interval; :meth:`Model.predict_properties`).
    """
    op = (params or {}).get("op") or default_op(model.card)
    if op not in OPS:
        raise DeepGalaxyError(f"unknown op {op!r}; use one of {', '.join(OPS)}")
    x = np.asarray(model_input)
    if op == "decode":
        return model.decode(x)
    x = pixel_values(x)
    if op == "predict":
        return model.predict(x).probabilities
    if op == "properties":
        return model.predict_properties(x).records()
    return np.asarray(getattr(model, op)(x))


def pixel_values(x: np.ndarray) -> np.ndarray:
    """Integer images (as JSON and ``np.asarray`` of lists give them) as uint8, refusing values outside 0..255."""
    if not np.issubdtype(x.dtype, np.integer) or x.dtype == np.uint8:
        return x
    if x.size and (int(x.min()) < 0 or int(x.max()) > 255):
        raise ShapeError(f"integer images must hold pixel values in 0..255, got values in [{x.min()}, {x.max()}]; "
                         "send uint8 pixels or floats in [0, 1]")
    return x.astype(np.uint8)


def default_op(card: ModelSpec) -> str:
    """The op used without ``params["op"]``: what the card is for."""
    return "predict" if "head" in card.parts else "encode" if "latent" in card.parts else "reconstruct"


def _load_pyfunc(data_path: str) -> PyfuncModel:
    """MLflow's entry point (``loader_module``): rebuild the model from the card and weights in ``data_path``."""
    from deepgalaxy.registry import load_directory

    return PyfuncModel(load_directory(Path(data_path)))
