"""``train --init REF``: start a training from weights trained elsewhere, by name, listing what starts fresh.

REF is a registered model (``vae-b0@champion``, ``vae-b0``, ``models:/vae-b0/3``), a saved model folder
(``card.json`` + ``weights.safetensors``) or an ImageNet weights file of the card's backbone, read by the backbone
plugin's ``pretrained`` reader (Keras ``.h5`` / ``.weights.h5``, timm ``.safetensors``; see
:mod:`deepgalaxy.plugins.pretrained`). A pickle (``.pth``, ``.pt``, ``.bin`` ...) is refused: loading one can run
code. Weights arrive in the training framework's naming (converted by name from the other framework when needed);
each one whose name and shape the new model has is loaded, every other weight of the model keeps its fresh
initialisation and is listed (printed, the MLflow tags ``init.loaded`` / ``init.fresh`` and the artifact
``init.json``), as is what REF holds that the model has no place for. When less than
:data:`MIN_ENCODER_SHARE` of the encoder's weights load, REF is for another architecture: an error.

:func:`check_init` runs before the run starts (a bad REF is a one-line error at the CLI); it pins a registered REF
to its version (``models:/NAME/N``, the ``init`` the run records) so every rank loads the same weights.
:func:`start_from` runs on every rank of a new run (a resumed run's checkpoint holds its weights already).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepgalaxy.core.errors import WeightsMismatchError, first_few
from deepgalaxy.core.interfaces import PretrainedWeights, resolve
from deepgalaxy.core.model import Model, read_card
from deepgalaxy.core.specs import ModelSpec

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle", ".joblib")
FILE_SUFFIXES = (".h5", ".hdf5", ".safetensors")
MIN_ENCODER_SHARE = 0.5
"""Fewer of the encoder's weights than this share loading from REF means REF is for another architecture."""
ENCODER = "encoder."
INIT_ARTIFACT = "init.json"
MISFIT = "(shape "
"""Marks a fresh weight that REF holds with another shape: ``head.out.weight (shape (5, 16) in the source, ...)``."""
TO_SAFETENSORS = ("python -c \"import sys, torch, safetensors.torch as st; "
                  "st.save_file(torch.load(sys.argv[1], weights_only=True), sys.argv[2])\" IN.pth OUT.safetensors")
"""How to turn a torch state dict into safetensors (``weights_only``: torch's loader that runs no code)."""


@dataclass
class InitReport:
    """What ``--init`` did: the weights loaded, those that start fresh (with why), what REF held in vain."""

    init: str
    loaded: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for the terminal: counts, the fresh parts, the weights whose shapes did not fit."""
        lines = [f"init from {self.init}: loaded {len(self.loaded)} weights, "
                 f"{len(self.fresh)} start fresh, {len(self.unused)} in the source unused"]
        lines += [f"  {note}" for note in self.notes]
        misfits = [f for f in self.fresh if MISFIT in f]
        absent: dict[str, int] = {}
        for name in self.fresh:
            if MISFIT not in name:
                part = name.split(".", 1)[0]
                absent[part] = absent.get(part, 0) + 1
        if absent:
            lines.append("  fresh (not in the source): " + ", ".join(f"{p} ({n} tensors)" for p, n in absent.items()))
        if misfits:
            lines.append(f"  fresh (shapes do not fit): {first_few(misfits, 8)}")
        if self.unused:
            lines.append(f"  unused from the source: {first_few(self.unused, 8)}")
        return "\n".join(lines)


def _kind(ref: str) -> tuple[str, Path]:
    """``("file" | "folder" | "registered", path)``; a pickle, a missing path, an unknown file type: an error."""
    from deepgalaxy import registry

    path = Path(ref).expanduser()
    lower = ref.lower()
    if lower.endswith(PICKLE_SUFFIXES):
        raise WeightsMismatchError(
            f"--init {ref}: a pickle file ({path.suffix}), which deepgalaxy never loads (unpickling can run code); "
            f"convert the state dict to safetensors: {TO_SAFETENSORS}")
    if path.is_dir():
        return "folder", path.resolve()
    if path.is_file():
        if not lower.endswith(FILE_SUFFIXES):
            raise WeightsMismatchError(
                f"--init {ref}: deepgalaxy reads Keras .h5 / .weights.h5 and timm .safetensors weight files, not "
                f"{path.suffix or 'files without a suffix'}; or give a saved model folder or a registered model")
        return "file", path.resolve()
    if lower.endswith(FILE_SUFFIXES) or registry.is_path(ref):
        raise WeightsMismatchError(f"--init {ref}: no such file or folder ({path.resolve()})")
    return "registered", path


def check_init(ref: str, card: ModelSpec, tracking_uri: str | None) -> str:
    """The ``init`` a run records for ``ref``: a file or folder as an absolute path, a registered model pinned to a
    version. Raises, naming ``ref``, when it cannot start ``card``: a pickle, a missing file or model, a file or
    folder for another backbone."""
    from deepgalaxy import registry

    kind, path = _kind(ref)
    if kind == "file":
        _read_file(path, card)
    elif kind == "folder":
        theirs = read_card(path).backbone.name
        if theirs != card.backbone.name:
            raise WeightsMismatchError(
                f"--init {ref}: the saved model's backbone is {theirs}, card {card.name!r}'s {card.backbone.name}; "
                "give a model with the same backbone")
        return str(path)
    else:
        version = registry.find_version(ref, tracking_uri=tracking_uri)
        return f"{registry.MODELS_URI}{version.name}/{version.version}"
    return str(path)


def _read_file(path: Path, card: ModelSpec) -> PretrainedWeights:
    from deepgalaxy.core.plugins import get_plugin_manager

    reader = get_plugin_manager().backbone(card.backbone.name).pretrained
    if reader is None:
        raise WeightsMismatchError(
            f"--init {path}: backbone {card.backbone.name} reads no weight files of other libraries (its plugin "
            "declares no pretrained reader); give a saved model folder or a registered model")
    weights: PretrainedWeights = resolve(reader)(path, card.backbone, card.channels)
    return weights


def source_weights(init: str, model: Model, tracking_uri: str | None) -> PretrainedWeights:
    """The weights ``init`` names, in ``model``'s framework naming."""
    from deepgalaxy import registry

    kind, path = _kind(init)
    if kind == "file":
        found = _read_file(path, model.card)
        if found.framework != model.framework:
            found.weights = model.backend.convert_weights(found.weights, found.framework, model.card, None)
        return found
    source = registry.load(path if kind == "folder" else init, framework=model.framework, tracking_uri=tracking_uri)
    return PretrainedWeights(model.framework, source.get_weights(),
                             notes=[f"card {source.card.name!r} ({source.card.task}, {source.card.backbone.name})"])


def fit(own: Mapping[str, np.ndarray], given: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], InitReport]:
    """``own`` with every weight of ``given`` that has its name and shape; the report lists the rest."""
    merged = dict(own)
    report = InitReport("")
    for name, value in own.items():
        theirs = given.get(name)
        if theirs is None:
            report.fresh.append(name)
        elif tuple(np.shape(theirs)) != tuple(value.shape):
            report.fresh.append(f"{name} {MISFIT}{tuple(np.shape(theirs))} in the source, {tuple(value.shape)} here)")
        else:
            merged[name] = np.asarray(theirs, dtype=value.dtype)
            report.loaded.append(name)
    report.unused = sorted(set(given) - set(own))
    return merged, report


def init_model(model: Model, init: str, tracking_uri: str | None = None) -> InitReport:
    """Load what fits of ``init`` into ``model`` (see the module docstring); the report says what."""
    found = source_weights(init, model, tracking_uri)
    own = model.get_weights()
    merged, report = fit(own, found.weights)
    report.init, report.notes = init, found.notes
    report.unused = sorted({*report.unused, *found.unused})
    encoder = [n for n in own if n.startswith(ENCODER)]
    loaded = sum(n.startswith(ENCODER) for n in report.loaded)
    if loaded < MIN_ENCODER_SHARE * len(encoder):
        misfits = [f for f in report.fresh if f.startswith(ENCODER)]
        raise WeightsMismatchError(
            f"--init {init}: only {loaded} of the {len(encoder)} encoder weights of card {model.card.name!r} "
            f"({model.card.backbone.name}) fit ({first_few(misfits, 3)}): it holds another architecture; give "
            "weights of the card's backbone")
    model.backend.set_weights(model.native, merged)
    return report


def start_from(init: str, model: Model, tracking_uri: str | None, tracker: Any = None) -> InitReport:
    """:func:`init_model` on a rank of a new run; rank 0 (``tracker`` given) prints the report and records it."""
    report = init_model(model, init, tracking_uri)
    if tracker is not None:
        print(report.summary(), file=sys.stderr, flush=True)
        tracker.mlflow.set_tags({"init": init, "init.loaded": str(len(report.loaded)),
                                 "init.fresh": str(len(report.fresh))})
        tracker.log_dict(asdict(report), INIT_ARTIFACT)
    return report


__all__ = ["InitReport", "check_init", "fit", "init_model", "start_from"]
