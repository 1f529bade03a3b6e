"""The framework-neutral model object both framework plugins share.

``registry.create(...)`` and ``registry.load(...)`` return a :class:`Model`: the card, the framework's name
(``.framework``) and object (``.backend``), the native model (``.native``) and inference methods taking numpy
images. A saved model is a directory holding ``card.json`` and ``weights.safetensors`` (no pickle: loading never
runs code from the artifact).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError
from safetensors.numpy import load_file, save_file

from deepgalaxy.core.device import resolve_device, resolve_precision
from deepgalaxy.core.errors import ModelFileError, ShapeError, WeightsMismatchError, first_few
from deepgalaxy.core.interfaces import Framework, InferenceOp, Part, iter_batches
from deepgalaxy.core.property_prediction import PropertyPrediction, property_prediction, trained_normalisation
from deepgalaxy.core.search import LatentIndex, ModelRef, check_model
from deepgalaxy.core.specs import ModelSpec, describe_errors

CARD_FILE = "card.json"
WEIGHTS_FILE = "weights.safetensors"


@dataclass
class Prediction:
    """Class probabilities ``(N, num_classes)``, the most likely class and the probability-weighted class."""

    probabilities: np.ndarray
    top1: np.ndarray
    expected_class: np.ndarray


class Model:
    """A model built from a card in one framework, with numpy-in, numpy-out inference.

    ``framework`` is the framework's name (``"torch"``: what saved files, MLflow tags and the CLI show); ``backend``
    the :class:`~deepgalaxy.core.interfaces.Framework` object that builds, runs and trains ``native``
    (``model.backend.trainer(model.native, model.card, train, dist)``).
    """

    def __init__(self, card: ModelSpec, framework: Framework, native: Any, reduction: int = 32) -> None:
        self.card = card
        self.framework: str = framework.name
        self.backend: Framework = framework
        self.native = native
        self.reduction = reduction
        self.source: dict[str, Any] = {}
        """Where the weights came from (MLflow model name, version, run id) when loaded from the registry."""
        self.device = "cpu"
        """Where the model runs (``cpu`` or ``cuda:N``): set by :meth:`to`."""
        self.precision = "fp32"
        """The precision inference runs in unless a call names another (``fp32``, ``bf16``, ``fp16``)."""

    def __repr__(self) -> str:
        origin = f", version={self.source['version']}" if "version" in self.source else ""
        placed = f", device={self.device!r}" if self.device != "cpu" else ""
        return f"Model({self.card.name!r}, framework={self.framework!r}{origin}{placed})"

    # -- placement ----------------------------------------------------------------------------------------------

    def to(self, device: str = "auto", precision: str | None = None, local_rank: int = 0) -> Model:
        """Run on ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) in ``precision`` (``auto``, ``fp32``,
        ``bf16``, ``fp16``; None keeps the current one): resolved against the GPUs the framework sees and what the
        hardware does natively (:mod:`deepgalaxy.core.device`). Returns the model itself."""
        gpus = self.backend.accelerators()
        resolved = resolve_device(device, gpus, local_rank)
        chosen = resolve_precision(precision or self.precision, resolved, gpus, slowdown=self.backend.bf16_slowdown)
        self.native = self.backend.to_device(self.native, resolved)
        self.device, self.precision = resolved, chosen
        return self

    # -- structure ----------------------------------------------------------------------------------------------

    def num_parameters(self, part: Part | None = None, trainable: bool = True) -> int:
        """Parameters of the whole model or of one part (``encoder``, ``decoder``, ``head``, ``latent``)."""
        if part is not None and part not in self.card.parts:
            raise ValueError(
                f"card {self.card.name!r} (task {self.card.task}) has no {part!r}; its parts: {self.card.parts}"
            )
        return self.backend.num_parameters(self.native, part, trainable)

    # -- inference ----------------------------------------------------------------------------------------------

    def predict(self, images: np.ndarray, batch_size: int = 64, precision: str | None = None) -> Prediction:
        """Class probabilities for images ``(N, H, W, C)`` uint8 or float in [0, 1]."""
        self._require("head", "predict")
        logits = self._run("logits", self.as_input(images, exact_size=True), batch_size, precision)
        logits = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        classes = np.arange(probs.shape[1])
        return Prediction(probs, probs.argmax(axis=1), probs @ classes)

    def predict_properties(self, images: np.ndarray, batch_size: int = 64, precision: str | None = None
                           ) -> PropertyPrediction:
        """Physical properties of images (time since pericentre in Myr, mass ratio, ...: the card's
        ``properties.targets``), each with its 68% interval (:mod:`deepgalaxy.core.property_prediction`)."""
        self._require("properties", "predict_properties")
        heads = self.card.properties
        assert heads is not None  # _require saw the part
        trained_normalisation(heads, self.card.name)  # untrained heads are refused before they run
        raw = self._run("properties", self.as_input(images, exact_size=True), batch_size, precision)
        return property_prediction(raw, heads, self.card.name)

    def encode(self, images: np.ndarray, batch_size: int = 64, precision: str | None = None) -> np.ndarray:
        """Latent means z ``(N, latent_dim)`` of images."""
        self._require("latent", "encode")
        return self._run("encode", self.as_input(images, exact_size=True), batch_size, precision)

    def reconstruct(self, images: np.ndarray, batch_size: int = 64, precision: str | None = None) -> np.ndarray:
        """E then D: images back, ``(N, H, W, C)`` float32 in [0, 1]; any size the backbone's stride divides."""
        self._require("decoder", "reconstruct")
        return self._run("reconstruct", self.as_input(images, exact_size=False), batch_size, precision)

    def decode(self, z: np.ndarray, batch_size: int = 64, precision: str | None = None) -> np.ndarray:
        """Latent vectors ``(N, latent_dim)`` -> images through the VAE decoder and D."""
        self._require("latent", "decode")
        z = np.asarray(z, dtype=np.float32)
        if z.ndim != 2 or z.shape[1] != self.card.latent_dim:
            raise ShapeError(f"decode expects z of shape (N, {self.card.latent_dim}), got {z.shape}")
        check_finite(z, "latent vectors z", "row")
        return self._run("decode", z, batch_size, precision)

    def similar(self, images: np.ndarray, index: LatentIndex, k: int = 6, batch_size: int = 64,
                precision: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` indexed images nearest to each of ``images`` in z: ``(rows (N, k), distances (N, k))``.

        Rows index ``index.ids`` / ``index.metadata``. An index built with another registered version of this
        model is refused (:class:`~deepgalaxy.core.search.StaleIndexError`): its vectors live in another space.
        """
        if "name" in self.source and "version" in self.source:
            expected = ModelRef(str(self.source["name"]), str(self.source["version"]), self.source.get("run_id"))
            check_model(index.model, expected, "the index given to similar()", index.data)
        return index.search(self.encode(images, batch_size, precision), k)

    def _run(self, op: InferenceOp, x: np.ndarray, batch_size: int, precision: str | None) -> np.ndarray:
        if precision is None:
            precision = self.precision
        elif precision != self.precision:
            precision = resolve_precision(precision, self.device, self.backend.accelerators(),
                                          slowdown=self.backend.bf16_slowdown)
        if len(x) == 0:
            raise ShapeError(f"{op}: got an empty batch (0 images)")
        outs = [self.backend.infer(self.native, op, x[s], precision) for s in iter_batches(len(x), batch_size)]
        return np.concatenate(outs).astype(np.float32, copy=False)

    def _require(self, part: str, method: str) -> None:
        if part not in self.card.parts:
            raise ValueError(
                f"{method}() needs a {part}, but card {self.card.name!r} (task {self.card.task!r}) has only "
                f"{', '.join(self.card.parts)}; use a card whose task includes it"
            )

    def as_input(self, images: np.ndarray, exact_size: bool = True) -> np.ndarray:
        """Validate images against the card and convert them to NHWC float32 in [0, 1]."""
        return as_model_input(images, self.card, self.reduction, exact_size)

    # -- weights ------------------------------------------------------------------------------------------------

    def get_weights(self) -> dict[str, np.ndarray]:
        """All weights and buffers as numpy arrays, in this framework's naming."""
        return self.backend.get_weights(self.native)

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``card.json`` and ``weights.safetensors`` to ``directory`` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CARD_FILE).write_text(self.card.model_dump_json(indent=2))
        meta = {"framework": self.framework, "card": self.card.name, **{k: str(v) for k, v in (extra or {}).items()}}
        weights = {k: np.ascontiguousarray(v) for k, v in self.get_weights().items()}
        save_file(weights, str(directory / WEIGHTS_FILE), metadata=meta)
        return directory

    def load_weights(self, path: str | Path) -> None:
        """Load a ``weights.safetensors`` file saved by either framework into this model."""
        weights, source = read_weights(path)
        self.set_weights(weights, source, path)

    def set_weights(self, weights: dict[str, np.ndarray], source: str, where: str | Path) -> None:
        """Load weights read from ``where`` (:func:`read_weights`), saved by framework ``source``, into this model."""
        if source != self.framework:
            weights = self.backend.convert_weights(weights, source, self.card, self.native)
        try:
            self.backend.set_weights(self.native, weights)
        except WeightsMismatchError as exc:
            raise WeightsMismatchError(f"{where}: {exc} (card {self.card.name!r})") from None


def check_weights_fit(framework: str, shapes: Mapping[str, tuple[int, ...]], weights: Mapping[str, Any]) -> None:
    """Raise ``WeightsMismatchError`` naming the missing, unexpected and misshapen weights (five of each at most).

    ``shapes``: the model's own weight shapes by name; ``weights``: the arrays about to be loaded into it.
    """
    missing = sorted(set(shapes) - set(weights))
    unexpected = sorted(set(weights) - set(shapes))
    wrong = [f"{n} {tuple(np.shape(weights[n]))} != {shape}" for n, shape in shapes.items()
             if n in weights and tuple(np.shape(weights[n])) != shape]

    found = (("missing", missing), ("unexpected", unexpected), ("wrong shapes", wrong))
    problems = [f"{label} {len(items)} ({first_few(items)})" for label, items in found if items]
    if problems:
        raise WeightsMismatchError(f"weights do not fit the {framework} model built from the card: "
                                   f"{'; '.join(problems)}. Were they saved for another card or backbone options?")


def read_weights(path: str | Path) -> tuple[dict[str, np.ndarray], str]:
    """Read a safetensors weights file; return the arrays and the framework that saved them.

    A file that is not safetensors, or tensors holding NaN or infinite values, raise :class:`ModelFileError`
    naming the file (and the tensors): such weights would load silently and predict nonsense.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsMismatchError(f"no weights file at {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path} is not a valid safetensors file ({exc})") from None
    bad = [f"{name} ({'NaN' if np.isnan(w).any() else 'inf'})" for name, w in sorted(weights.items())
           if w.dtype.kind == "f" and not np.isfinite(w).all()]
    if bad:
        raise ModelFileError(f"{path}: {len(bad)} weight tensor(s) hold NaN or infinite values: {first_few(bad)}; "
                             "the training that saved them diverged (train again, e.g. with a lower learning rate)")
    return weights, meta.get("framework", "")


def read_card(directory: str | Path) -> ModelSpec:
    """The card stored in a saved model directory; a missing, unreadable or invalid card raises an error naming it."""
    directory = Path(directory)
    path = directory / CARD_FILE
    if not directory.is_dir():
        raise WeightsMismatchError(f"{directory}: no such saved model directory (give the folder holding {CARD_FILE} "
                                   f"and {WEIGHTS_FILE}, or a registered model as NAME)")
    if not path.is_file():
        raise WeightsMismatchError(f"{directory} is not a saved deepgalaxy model: {CARD_FILE} is missing")
    try:
        return ModelSpec.model_validate_json(path.read_bytes())
    except ValidationError as exc:  # also JSON syntax errors
        raise ModelFileError(f"{path} is not a valid model card: {describe_errors(exc)}") from None


def check_finite(x: np.ndarray, what: str, row: str) -> None:
    """Raise :class:`ShapeError` if ``x`` holds NaN or inf, naming how many values and which rows (images)."""
    finite = np.isfinite(x)
    if finite.all():
        return
    count = int(x.size - finite.sum())
    rows = [str(r) for r in np.flatnonzero(~finite.reshape(len(x), -1).all(axis=1))]
    plural = "s" if len(rows) > 1 else ""
    raise ShapeError(f"{what} hold {count} non-finite value{'s' if count > 1 else ''} (NaN or inf) in {row}{plural} "
                     f"{first_few(rows)}; a model cannot use them: clean or drop those {row}s first")


def as_model_input(images: Any, card: ModelSpec, reduction: int, exact_size: bool) -> np.ndarray:
    """Images ``(N, H, W, C)`` (or one ``(H, W, C)`` / ``(H, W)`` image) -> NHWC float32 in [0, 1].

    uint8 is divided by 255; floats must already lie in [0, 1]. The channel count must match the card; the size
    must equal the card's when ``exact_size`` (head, VAE) or be divisible by the backbone's reduction otherwise.
    """
    x = np.asarray(images)
    if x.ndim == 2:
        x = x[None, :, :, None]
    elif x.ndim == 3 and x.shape[-1] == card.channels and x.shape[-1] in (1, 3, 4) and x.shape[0] != 1:
        x = x[None]
    if x.ndim != 4:
        raise ShapeError(f"images must be (N, H, W, C) for card {card.name!r}, got shape {x.shape}")
    _n, h, w, c = x.shape
    if c != card.channels:
        raise ShapeError(
            f"images have {c} channels but card {card.name!r} expects {card.channels} "
            f"({'grayscale' if card.channels == 1 else 'RGB'}); convert them first"
        )
    if exact_size and (h, w) != (card.input_size, card.input_size):
        raise ShapeError(
            f"images are {h}x{w} but card {card.name!r} expects {card.input_size}x{card.input_size}; resize them"
        )
    if h % reduction or w % reduction:
        raise ShapeError(f"images are {h}x{w}; the backbone needs sides divisible by {reduction}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise ShapeError(f"images must be uint8 or float, got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    check_finite(x, "images", "image")
    if x.size and (float(x.min()) < -1e-3 or float(x.max()) > 1 + 1e-3):
        raise ShapeError(f"float images must lie in [0, 1]; got values in [{x.min():.3g}, {x.max():.3g}]")
    return x

