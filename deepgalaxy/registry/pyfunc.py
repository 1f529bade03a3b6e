"""The MLflow pyfunc flavour of a registered model, served by the installed deepgalaxy package.

A version's ``MLmodel`` names this module as the flavour's ``loader_module``, and its ``data`` directory holds
``card.json`` + ``weights.safetensors``. ``mlflow.pyfunc.load_model("models:/vae-b4@champion")`` imports this
module from the installed package and calls :func:`_load_pyfunc` on that directory: no code stored in the artifact
runs and nothing is unpickled (the artifact holds no Python file). This module imports neither MLflow nor a
framework, so MLflow can serve it wherever deepgalaxy is installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from deepgalaxy.core.errors import DeepGalaxyError
from deepgalaxy.core.model import Model

OPS = ("predict", "encode", "reconstruct", "decode")
"""What ``predict(images, params={"op": ...})`` can do."""


class PyfuncModel:
    """What ``mlflow.pyfunc.load_model`` wraps: ``predict(model_input, params={"op": ...})`` on a :class:`Model`.

    ``op`` is ``predict`` (class probabilities), ``encode`` (latent means), ``reconstruct`` (images) or ``decode``
    (latent vectors -> images); without it: class probabilities for cards with a head, else latent means for cards
    with a VAE, else reconstructions.
    """

    def __init__(self, model: Model) -> None:
        self.model = model

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        return run_op(self.model, model_input, params)


def run_op(model: Model, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
    """Run the op named by ``params["op"]`` (default: :func:`default_op`) on ``model_input``."""
    op = (params or {}).get("op") or default_op(model)
    x = np.asarray(model_input)
    if op == "predict":
        return model.predict(x).probabilities
    if op in OPS:
        return np.asarray(getattr(model, op)(x))
    raise DeepGalaxyError(f"unknown op {op!r}; use one of {', '.join(OPS)}")


def default_op(model: Model) -> str:
    """The op used without ``params["op"]``: what the card is for."""
    parts = model.card.parts
    return "predict" if "head" in parts else "encode" if "latent" in parts else "reconstruct"


def _load_pyfunc(data_path: str) -> PyfuncModel:
    """MLflow's entry point (``loader_module``): rebuild the model from the card and weights in ``data_path``."""
    from deepgalaxy.registry import load_directory

    return PyfuncModel(load_directory(Path(data_path)))
