"""The model behind a latent space: a registered VAE loaded for latent work, and the reference that names it.

An index records which model version produced its vectors (:func:`model_ref`); vectors of two versions live in
different spaces, so every refusal names the command that rebuilds the index (:func:`index_rebuild_command`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from deepgalaxy.core.errors import DeepGalaxyError
from deepgalaxy.core.search import ModelRef, rebuild_command

if TYPE_CHECKING:
    from deepgalaxy.core.model import Model


def load_model(name: str | Path, version: int | None = None, tracking_uri: str | None = None,
               framework: str | None = None, device: str = "auto", precision: str = "fp32") -> Model:
    """A registered model (``NAME``, ``NAME@ALIAS`` with optional ``version``) or a saved directory, with a VAE,
    placed on ``device`` in ``precision`` (``registry.load``)."""
    from deepgalaxy import registry

    model = registry.load(name, version=version, framework=framework, tracking_uri=tracking_uri, device=device,
                          precision=precision)
    if "latent" not in model.card.parts:
        raise DeepGalaxyError(
            f"model {str(name)!r} (card {model.card.name!r}, task {model.card.task!r}) has no VAE latent space; "
            "latent search needs a vae-* or full-* card"
        )
    return model


def model_ref(model: Model) -> ModelRef:
    """Which model produced a set of vectors: registered name/version/run, else the card and a weights hash."""
    src = model.source
    if src.get("name") and src.get("version") is not None:
        return ModelRef(str(src["name"]), str(src["version"]), None if not src.get("run_id") else str(src["run_id"]))
    digest = hashlib.sha256()
    for key, value in sorted(model.get_weights().items()):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return ModelRef(model.card.name, f"weights-{digest.hexdigest()[:12]}")


def index_rebuild_command(model: Model, ref: ModelRef, data: str | os.PathLike[str]) -> str:
    """The command that rebuilds ``model``'s index: by registered name, or by absolute path for a saved folder
    (a bare card name would load the registered model instead)."""
    folder = model.source.get("path")
    return rebuild_command(str(Path(folder).resolve()) if folder else ref.name, str(data))


__all__ = ["index_rebuild_command", "load_model", "model_ref"]
