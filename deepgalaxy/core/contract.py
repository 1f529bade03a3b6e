"""The framework contract: what every framework plugin shares, defined once and framework-free.

A framework plugin keeps only its framework's mechanics (layers, tensors, autodiff, the optimizer classes); the
names, numbers and checks that must agree between frameworks live here:

- the nets' output names (:data:`FEATURES` ... :data:`LOGVAR`) and the decoder's stage widths;
- the optimizer table (:data:`OPTIMIZERS`): the same hyper-parameters in every framework;
- batch validation (:func:`check_batch`): images ``(N, H, W, C)`` at the card's size, one label per image, in
  range when the card has a classifier head;
- Horovod start-up (:func:`start_horovod`): a clear error when Horovod lacks the framework, a rank check;
- the checkpoint layout (:data:`MODEL_FILE` ... :data:`STATE_FILE`), its state schema (:func:`checkpoint_state`)
  and the loading preamble (:func:`read_checkpoint_state`);
- the backbone a framework is handed to build (:class:`BackboneBuilder`): the plugin's factory and the reduction
  the plugin declares, checked when it builds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deepgalaxy.core.errors import FrameworkUnavailableError, ShapeError, TrainingError
from deepgalaxy.core.interfaces import Distributed
from deepgalaxy.core.specs import BackboneSpec, ModelSpec

# --- outputs of a net ------------------------------------------------------------------------------------------

FEATURES = "features"
"""The encoder's feature maps M."""
RECONSTRUCTION = "reconstruction"
"""D(M): the reconstructed images (tasks with a decoder)."""
LOGITS = "logits"
"""The head's class logits (tasks with a head)."""
LATENT_RECONSTRUCTION = "latent_reconstruction"
"""The VAE's reconstruction of M (tasks with a latent model)."""
MU = "mu"
"""The VAE's latent mean."""
LOGVAR = "logvar"
"""The VAE's latent log-variance."""
PROPERTY_MEAN = "property_mean"
"""The property heads' predicted means ``(N, K)`` of the normalised target columns (cards with ``properties``)."""
PROPERTY_LOGVAR = "property_logvar"
"""Their predicted log-variances ``(N, K)``, bounded to +-:data:`PROPERTY_LOGVAR_BOUND` by a scaled tanh."""
PROPERTY_LOGVAR_BOUND = 8.0
"""A log-variance of +-8 is a standard deviation from 0.018 to 55 training standard deviations: wide enough for
any honest uncertainty, and it keeps exp(-logvar) in the Gaussian likelihood from overflowing early in training."""


def decoder_widths(card: ModelSpec, reduction: int) -> list[int]:
    """Channels of D's x2 stages: one stage per factor 2 of ``reduction``, the card's last entries, padded by
    repeating the last entry when the card lists too few."""
    stages = round(math.log2(reduction))
    if 2**stages != reduction:
        raise ShapeError(f"card {card.name!r}: the decoder needs a power-of-two reduction, got {reduction}")
    chans = list(card.decoder_channels)
    chans += [chans[-1]] * max(stages - len(chans), 0)
    return chans[len(chans) - stages:]


# --- the backbone a framework builds ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneBuilder:
    """What a framework is handed to build ``card.backbone``: the plugin's factory ``factory(spec, in_channels)``
    for this framework, and the reduction the backbone plugin declares for the spec.

    Calling it builds the backbone and checks that it reduces by what its plugin declares (the decoder and the
    registry's input-size checks rely on it). The registry makes it; a framework never looks a backbone up.
    """

    framework: str
    factory: Callable[[BackboneSpec, int], Any]
    reduction: int

    def __call__(self, spec: BackboneSpec, in_channels: int) -> Any:
        backbone = self.factory(spec, in_channels)
        if int(backbone.reduction) != self.reduction:
            raise ShapeError(
                f"backbone {spec.name!r} ({self.framework}) reduces by {backbone.reduction}, but its plugin "
                f"declares {self.reduction}"
            )
        return backbone


# --- optimizers ------------------------------------------------------------------------------------------------

OPTIMIZERS: Mapping[str, Mapping[str, float]] = {
    "adadelta": {"rho": 0.95, "eps": 1e-7},
    "adam": {"eps": 1e-8},
    "adamw": {"eps": 1e-8, "weight_decay": 0.01},
    "sgd": {"momentum": 0.9},
    "rmsprop": {"rho": 0.99, "eps": 1e-8},
}
"""Hyper-parameters besides the learning rate, the same in every framework: Adadelta as Keras' defaults (the
paper trained with Keras), Adam / AdamW / RMSprop as torch's defaults, SGD with momentum 0.9. ``rho`` is RMSprop's
decay (torch calls it ``alpha``), ``eps`` the denominator's epsilon (Keras: ``epsilon``)."""


def optimizer_settings(name: str) -> Mapping[str, float]:
    """The hyper-parameters of optimizer ``name`` from :data:`OPTIMIZERS`."""
    if name not in OPTIMIZERS:
        *others, last = OPTIMIZERS
        raise ValueError(f"unknown optimizer {name!r}; use {', '.join(others)} or {last}")
    return OPTIMIZERS[name]


# --- batches ---------------------------------------------------------------------------------------------------


def with_targets(labels: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Class labels ``(N,)`` and property targets ``(N, K)`` as one record per image (fields ``label`` and
    ``targets``): what a batch's labels are for a card with property heads. NaN targets are unknown."""
    labels, targets = np.asarray(labels), np.asarray(targets, np.float32)
    records = np.empty(len(labels), dtype=[("label", np.int64), ("targets", np.float32, (targets.shape[1],))])
    records["label"], records["targets"] = labels, targets
    return records


def split_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(class labels int64 ``(N,)``, property targets float32 ``(N, K)`` or None) of a batch's labels."""
    labels = np.asarray(labels)
    if labels.dtype.names:
        return labels["label"].astype(np.int64), labels["targets"].astype(np.float32)
    return labels.astype(np.int64, copy=False), None


def check_batch(card: ModelSpec, images: np.ndarray, labels: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A training batch as float32 images in [0, 1] (uint8 is scaled by 1/255), int64 labels and the property
    targets (:func:`with_targets`; None for a card without property heads), after checking that the images are
    ``(N, H, W, C)`` at the card's size (any size for ``fcae``), one label per image, in range when the card has a
    head (-1: an unlabelled image, which counts in every loss term but the classifier's), and one row of targets
    per image with a column per property column of the card."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != card.channels:
        raise ShapeError(
            f"a training batch must be (N, H, W, {card.channels}) float32 for card {card.name!r}, got {images.shape}"
        )
    images = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32, copy=False)
    labels, targets = split_labels(labels)
    if card.task != "fcae" and images.shape[1:3] != (card.input_size, card.input_size):
        raise ShapeError(f"card {card.name!r} trains on {card.input_size} px images, got {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ShapeError(f"labels must be ({images.shape[0]},), one per image, got {labels.shape}")
    if "head" in card.parts and labels.size and (labels.min() < -1 or labels.max() >= card.num_classes):
        raise ShapeError(
            f"labels must lie in [0, {card.num_classes}) or be -1 (unlabelled) for card {card.name!r}, got "
            f"[{labels.min()}, {labels.max()}]"
        )
    if card.properties is None:
        return images, labels, None
    columns = card.properties.columns
    if targets is None or targets.shape != (images.shape[0], len(columns)):
        got = "none" if targets is None else f"shape {targets.shape}"
        raise ShapeError(
            f"card {card.name!r} has property heads: a batch needs targets ({images.shape[0]}, {len(columns)}) for "
            f"{', '.join(columns)} (labels made with deepgalaxy.core.contract.with_targets), got {got}"
        )
    return images, labels, targets


# --- Horovod ---------------------------------------------------------------------------------------------------


def start_horovod(import_horovod: Callable[[], Any], framework: str, build_flag: str, dist: Distributed) -> Any:
    """Horovod's module for ``framework`` (``import_horovod()``), initialised and checked to run ``dist``'s rank.

    ``build_flag`` names Horovod's build switch for the framework (``PYTORCH``, ``TENSORFLOW``) in the remedy.
    """
    try:
        hvd = import_horovod()
    except ImportError as exc:
        raise FrameworkUnavailableError(
            f"data-parallel training with {framework} needs Horovod built with {framework} support ({exc}); "
            f"install it (HOROVOD_WITH_{build_flag}=1 pip install horovod) or train with one worker"
        ) from None
    if not hvd.is_initialized():
        hvd.init()
    if hvd.size() != dist.size or hvd.rank() != dist.rank:
        raise TrainingError(
            f"Horovod runs rank {hvd.rank()} of {hvd.size()} but the run expects rank {dist.rank} of {dist.size}; "
            f"start the workers with horovodrun -np {dist.size}"
        )
    return hvd


# --- checkpoints -----------------------------------------------------------------------------------------------

MODEL_FILE = "model.safetensors"
"""The weights, in the framework's naming (``Framework.get_weights``)."""
OPTIMIZER_FILE = "optimizer.safetensors"
"""The optimizer's state tensors."""
RNG_FILE = "rng.safetensors"
"""The framework's random-number generator states."""
STATE_FILE = "trainer.json"
"""The state schema of :func:`checkpoint_state`."""


def weights_metadata(framework: str, card: ModelSpec) -> dict[str, str]:
    """The safetensors metadata of a checkpoint's :data:`MODEL_FILE`."""
    return {"framework": framework, "card": card.name}


def checkpoint_state(framework: str, card: ModelSpec, step: int, optimizer: str, **details: Any) -> dict[str, Any]:
    """The :data:`STATE_FILE` record: framework, card, step count and optimizer name, then the framework's own
    ``details`` (JSON values: what its optimizer needs to restore, e.g. parameter names or variable paths)."""
    return {"framework": framework, "card": card.name, "step": step, "optimizer": optimizer, **details}


def write_checkpoint_state(directory: Path, state: Mapping[str, Any]) -> None:
    """Write :data:`STATE_FILE` (last, after the tensors: its presence marks a complete checkpoint)."""
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2))


def read_checkpoint_state(directory: Path, framework: str, optimizer: str, dist: Distributed,
                          distributed: bool) -> dict[str, Any] | None:
    """The checked :data:`STATE_FILE` of checkpoint ``directory``, or ``None`` on a non-root rank of a distributed
    run that cannot see the files (it takes rank 0's state by broadcast).

    Raises ``TrainingError`` naming the directory when there is no checkpoint, or when it was written by another
    framework or with another optimizer than this run's.
    """
    if not (directory / STATE_FILE).is_file():
        if dist.is_root or not distributed:
            raise TrainingError(f"no {framework} checkpoint in {directory} ({STATE_FILE} is missing)")
        return None
    state: dict[str, Any] = json.loads((directory / STATE_FILE).read_text())
    if state.get("framework") != framework:
        raise TrainingError(
            f"checkpoint {directory} was written by framework {state.get('framework')!r}; resume it with that "
            "framework (trained weights, not checkpoints, convert between frameworks)"
        )
    if state.get("optimizer") != optimizer:
        raise TrainingError(
            f"checkpoint {directory} was written with optimizer {state.get('optimizer')!r} but this run uses "
            f"{optimizer!r}; resume with the same optimizer or start a new run"
        )
    return state


def check_same_model(directory: Path, card: ModelSpec, saved: Sequence[str], own: Sequence[str]) -> None:
    """Raise ``TrainingError`` when the checkpoint's parameter or variable names ``saved`` are not this model's."""
    if list(saved) != list(own):
        raise TrainingError(f"checkpoint {directory} holds a different model's optimizer state than card {card.name!r}")
