"""Specs: the typed, validated descriptions of models, data, training and runs.

A :class:`ModelSpec` is a *model card*: everything needed to rebuild a model in any framework. Cards are
stored as ``card.json`` next to the weights, so a trained model can always be rebuilt without running code
from the artifact.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deepgalaxy.core.errors import first_few
from deepgalaxy.core.properties import TARGETS, target_columns

NUM_CLASSES = 71
"""The paper's 71 merger timescale classes (0 = far apart ... 70 = settled remnant)."""

Task = Literal["classifier", "fcae", "vae", "full"]
TASKS: tuple[str, ...] = ("classifier", "fcae", "vae", "full")
TASK_PARTS: dict[str, tuple[str, ...]] = {
    "classifier": ("encoder", "head"),
    "fcae": ("encoder", "decoder"),
    "vae": ("encoder", "decoder", "latent"),
    "full": ("encoder", "decoder", "head", "latent"),
}
"""The parts each task builds; a task with a ``head`` trains on labels."""

BACKBONE_ALIASES: dict[str, str] = {
    "simple": "simple",
    "r18": "resnet18",
    "r34": "resnet34",
    "r50": "resnet50",
    **{f"b{i}": f"efficientnet-b{i}" for i in range(8)},
}
"""Short names used in card names (``vae-b4``) mapped to backbone names (``efficientnet-b4``)."""


_SpecT = TypeVar("_SpecT", bound=BaseModel)


class _Spec(BaseModel):
    """Strict, immutable specs; every number must be finite: ``inf``/``nan`` (as numbers or strings) cannot train
    and JSON has no way to store them (``run.json`` would hold ``null``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


def _non_finite(value: Any, where: str) -> str | None:
    """The dotted place of the first non-finite float inside ``value`` (nested lists and dicts), else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list | tuple) else ()
    for key, item in items:
        found = _non_finite(item, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


class BackboneSpec(_Spec):
    """Which backbone an encoder uses, and its options.

    ``name`` must be a backbone some plugin provides; the registry checks that (``core.specs`` cannot know the
    installed plugins). ``options`` are backbone-specific keyword arguments, e.g. ``{"widths": [32, 64]}`` for
    the ``simple`` conv stack, ``{"drop_connect_rate": 0.2}`` for EfficientNets.
    """

    name: str = Field(description="backbone name, e.g. 'simple', 'resnet18', 'efficientnet-b4'")
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("options")
    @classmethod
    def _options_are_finite(cls, v: dict[str, Any]) -> dict[str, Any]:
        where = _non_finite(v, "")
        if where is not None:
            raise ValueError(f"option {where} is not a finite number; give a finite value")
        return v


class LossWeights(_Spec):
    """Weights of the loss terms when parts are trained jointly; 0 freezes that term out."""

    classifier: float = Field(1.0, ge=0)
    reconstruction: float = Field(1.0, ge=0)
    latent: float = Field(1.0, ge=0, description="VAE reconstruction of the feature maps M'")
    kl: float = Field(1e-3, ge=0, description="KL divergence of the VAE posterior from N(0, I)")
    domain: float = Field(1.0, ge=0, description="domain adaptation (card.domain_adaptation): MMD between the "
                          "feature maps of labelled and unlabelled images")
    properties: float = Field(1.0, ge=0, description="property heads (card.properties): Gaussian negative "
                              "log-likelihood of the normalised physical properties")


class PropertyHeads(_Spec):
    """Property heads over M: per target column a mean and a log-variance, trained with the Gaussian negative
    log-likelihood (:mod:`deepgalaxy.core.properties` lists the targets and their columns).

    ``normalisation`` holds each column's (mean, standard deviation) over the training split; training fills it
    (the saved model's card carries it, so a prediction is returned in physical units). Empty: not yet trained.
    ``sigma_scale`` holds each column's factor on the predicted standard deviations, fitted after training on the
    validation split so that 68.3% of its true values lie within one scaled sigma (variance recalibration: a network
    trained to its training data is overconfident on new simulations). Empty: factors of 1.
    """

    targets: tuple[str, ...] = tuple(TARGETS)
    hidden: tuple[int, ...] = (256,)
    beta: float = Field(0.5, ge=0, le=1, description="each value's likelihood weighted by its predicted variance**beta "
                        "(beta-NLL, Seitzer et al. 2022): 0 is the plain Gaussian NLL, 0.5 keeps hard examples' means "
                        "learning")
    normalisation: tuple[tuple[float, float], ...] = ()
    sigma_scale: tuple[float, ...] = ()

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [t for t in v if t not in TARGETS]
        if unknown or not v or len(set(v)) != len(v):
            raise ValueError(f"targets {list(v)} must be distinct names from {', '.join(TARGETS)}"
                             + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        return v

    @model_validator(mode="after")
    def _one_scale_per_column(self) -> PropertyHeads:
        if self.normalisation and len(self.normalisation) != len(self.columns):
            raise ValueError(f"normalisation has {len(self.normalisation)} (mean, std) pairs for "
                             f"{len(self.columns)} columns ({', '.join(self.columns)})")
        if any(std <= 0 for _, std in self.normalisation):
            raise ValueError("normalisation standard deviations must be positive")
        if self.sigma_scale and (len(self.sigma_scale) != len(self.columns) or min(self.sigma_scale) <= 0):
            raise ValueError(f"sigma_scale needs one positive factor per column ({', '.join(self.columns)}), "
                             f"got {list(self.sigma_scale)}")
        return self

    @property
    def columns(self) -> list[str]:
        """The heads' output columns (a target may give several: the viewing direction gives three)."""
        return target_columns(self.targets)


class ModelSpec(_Spec):
    """A model card: task, backbone and shapes.

    Tasks (the parts built and the loss terms trained):

    - ``classifier``: encoder E + head, cross-entropy over ``num_classes``.
    - ``fcae``: E + decoder D, image reconstruction error.
    - ``vae``: E + D + LatentModel over the flattened feature maps; reconstruction + latent reconstruction + KL.
    - ``full``: all parts with a shared E; every loss term, weighted by ``loss_weights``.
    """

    name: str
    task: Task
    backbone: BackboneSpec
    latent_dim: Literal[16, 32] = 32
    num_classes: int = Field(NUM_CLASSES, ge=2)
    input_size: int = Field(128, ge=16, description="square input side in pixels")
    channels: int = Field(1, ge=1, le=4, description="1 = grayscale (simulations), 3 = RGB")
    head_pool: Literal["flatten", "avg"] = "flatten"
    head_hidden: tuple[int, ...] = (256,)
    latent_channels: int = Field(16, ge=1, description="channels M is reduced to before the VAE flattens it")
    decoder_channels: tuple[int, ...] = Field(
        (256, 128, 64, 32, 16),
        description="channels of D's upsampling stages, one x2 stage per factor 2 of the backbone's reduction; "
        "with fewer stages than entries the last entries are used",
    )
    loss_weights: LossWeights = LossWeights()
    domain_adaptation: Literal["none", "mmd"] = Field(
        "none", description="'mmd': align the feature maps M of labelled (simulated) and unlabelled (observed) images "
        "in every batch with a multi-kernel Gaussian MMD (train on several stores: --data sims.zarr --data obs.zarr)",
    )
    properties: PropertyHeads | None = Field(
        None, description="property heads next to the task's parts: physical properties (time since pericentre, "
        "mass ratio, ...) with a predicted uncertainty each",
    )
    class_myr: float | None = Field(
        None, gt=0, description="Myr per timescale class (the simulated time between two classes in physical units); "
        "training on a simulated store fills it, so predictions give the class in Myr too",
    )
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, v: str) -> str:
        if not v or any(c.isspace() or c in "/@:" for c in v):
            raise ValueError(f"card name {v!r} must be non-empty without spaces, '/', '@' or ':'")
        return v

    @property
    def parts(self) -> tuple[str, ...]:
        """The parts this card builds: a subset of ``encoder, decoder, head, latent, properties``."""
        return TASK_PARTS[self.task] + (("properties",) if self.properties is not None else ())

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image at the card's size."""
        return (self.input_size, self.input_size, self.channels)


Optimizer = Literal["adadelta", "adam", "adamw", "sgd", "rmsprop"]
OPTIMIZERS: tuple[str, ...] = ("adadelta", "adam", "adamw", "sgd", "rmsprop")


class TrainSpec(_Spec):
    """How to train: the paper's defaults are Adadelta with learning rate 8.0."""

    optimizer: Optimizer = "adadelta"
    learning_rate: float = Field(8.0, gt=0)
    batch_size: int = Field(16, ge=1, description="images per worker per step")
    epochs: int = Field(12, ge=1)
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "fp32", description="fp32; bf16 or fp16 mixed precision (fp16: GPU only, with a loss scaler); auto: bf16 where "
        "the device does it natively, else fp32")
    device: str = Field("auto", description="auto (the local rank's GPU when one is visible, else the CPU), cpu, cuda "
                        "or cuda:N")
    grad_clip: float | None = Field(None, gt=0, description="clip the global gradient norm to this value")
    scale_lr_with_workers: bool = True
    within_k: int = Field(3, ge=0, description="accuracy counts |predicted - true| <= within_k as right too")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap steps per epoch (smoke runs)")
    keep: Literal["last", "best"] = Field(
        "last", description="register the last epoch's weights, or those of the epoch with the lowest val/loss"
    )
    augment: Literal["none", "dihedral"] = Field(
        "none", description="'dihedral': a random rotation by k*90 degrees and/or flip per training image"
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        from deepgalaxy.core.device import parse_device

        return parse_device(v)

    def effective_lr(self, workers: int) -> float:
        """Learning rate after linear scaling with the number of data-parallel workers."""
        return self.learning_rate * (workers if self.scale_lr_with_workers else 1)


class StoreSpec(_Spec):
    """One store of a training and its share of every batch."""

    path: str
    share: float | None = Field(None, gt=0, le=1, description="fraction of every batch drawn from this store; "
                                "unset: the rest of the batch, divided equally among the stores without a share")

    @classmethod
    def from_argument(cls, text: str) -> StoreSpec:
        """``PATH`` or ``PATH:SHARE`` (``obs.zarr:0.5``), as ``--data`` takes it. A URL's port is not a share."""
        path, sep, share = text.rpartition(":")
        if not sep or not path or "/" in share or re.search(r"^[a-z][a-z0-9+.-]*://[^/]*$", path):
            return cls(path=text)
        try:
            value = float(share)
        except ValueError:
            value = math.nan
        if not 0 < value <= 1:
            raise ValueError(f"--data {text!r}: the share {share!r} is not a fraction of the batch in (0, 1]; "
                             f"write e.g. {path}:0.5")
        return cls(path=path, share=value)

    @property
    def name(self) -> str:
        """The store's short name in metrics (``val/<name>/...``): its folder name without ``.zarr``."""
        base = self.path.rstrip("/").rsplit("/", 1)[-1]
        return base[: -len(".zarr")] if base.endswith(".zarr") and len(base) > 5 else base


class DataSpec(_Spec):
    """Which stores to read, how to mix them in a batch and how to split each of them.

    The first store leads: an epoch is one pass over its training split; the others cycle through theirs. Each
    store is split on its own (``simulation``: whole simulations to one side; images without a simulation, such as
    ingested observations, are spread at random), so validation is measured per store too.
    """

    stores: list[StoreSpec] = Field(min_length=1)
    split: Literal["simulation", "random"] = "simulation"
    validation_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _one_path(cls, data: Any) -> Any:
        """``{"path": P}`` (one store; the run.json of earlier versions) is ``{"stores": [{"path": P}]}``."""
        if isinstance(data, dict) and "path" in data:
            if data.get("stores"):
                raise ValueError("give either data.path (one store) or data.stores, not both")
            data = {**{k: v for k, v in data.items() if k != "path"}, "stores": [{"path": data["path"]}]}
        return data

    @model_validator(mode="after")
    def _check_stores(self) -> DataSpec:
        shares = [s.share for s in self.stores if s.share is not None]
        if sum(shares) > 1 + 1e-9 or (len(shares) == len(self.stores) and abs(sum(shares) - 1) > 1e-6):
            raise ValueError(f"the stores' shares {', '.join(f'{v:g}' for v in shares)} must add up to 1 when every "
                             "store has one, and to less than 1 otherwise")
        names = [s.name for s in self.stores]
        if len(set(names)) != len(names):
            raise ValueError(f"two stores are both called {next(n for n in names if names.count(n) > 1)!r} "
                             "(metrics are named by the store's folder); rename one")
        return self

    @property
    def path(self) -> str:
        """The lead store's path."""
        return self.stores[0].path


class RunSpec(_Spec):
    """One training run: what to train, on what, how, where and with how many workers."""

    card: ModelSpec
    data: DataSpec
    train: TrainSpec = TrainSpec()
    framework: str = "torch"
    workers: int = Field(1, ge=1)
    hosts: str | None = Field(None, description="horovodrun host list, e.g. 'h1:4,h2:4'")
    tracking_uri: str | None = None
    experiment: str = "deepgalaxy"
    register_model: bool = True
    checkpoint_dir: str | None = None
    init: str | None = Field(None, description="weights the model starts from (train --init): a registered model "
                             "pinned to its version, a saved model folder or an ImageNet weights file")

    @model_validator(mode="after")
    def _check(self) -> RunSpec:
        if self.train.within_k >= self.card.num_classes:
            raise ValueError(
                f"train.within_k={self.train.within_k} must be smaller than num_classes={self.card.num_classes}"
            )
        return self


def describe_errors(exc: ValidationError, limit: int = 4) -> str:
    """``"train.learning_rate: Input should be a finite number; ..."``: each problem at its dotted setting."""
    problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"] else str(e["msg"])
                for e in exc.errors()]
    return first_few(problems, limit, sep="; ")


def flatten(spec: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Flatten a spec to ``{"card.backbone.name": "simple", ...}`` (MLflow params, ``--set`` keys)."""
    out: dict[str, Any] = {}
    for key, value in spec.model_dump(mode="json").items():
        _flatten_into(out, f"{prefix}{key}", value)
    return out


def _flatten_into(out: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten_into(out, f"{key}.{k}", v)
    else:
        out[key] = value


def with_overrides(spec: _SpecT, overrides: dict[str, Any]) -> _SpecT:
    """Return a copy of ``spec`` with dotted-key overrides applied (``{"backbone.options.widths": [8, 16]}``).

    An unset optional section is created by setting one of its fields (``{"properties.hidden": [64]}`` gives a
    card property heads with their other fields at the defaults). The result is validated again, so a wrong key or
    value raises a ``pydantic.ValidationError`` naming it.
    """
    data = spec.model_dump(mode="json")
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            if part in node and node[part] is None:
                node[part] = {}
            if not isinstance(node.get(part), dict):
                raise KeyError(f"--set {dotted}: {part!r} is not a section of {type(spec).__name__}")
            node = node[part]
        node[leaf] = value
    return type(spec).model_validate(data)

