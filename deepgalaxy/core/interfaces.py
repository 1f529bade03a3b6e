"""Interfaces every framework plugin implements, and the contracts of Framework, Launcher and DatasetSource.

Layout conventions (the same for every framework, as seen from core):

- Images cross the core boundary as numpy ``float32`` arrays in **NHWC** layout, values in ``[0, 1]``:
  ``(N, H, W, C)``. A framework converts to its own layout (PyTorch: NCHW) inside the plugin.
- Feature maps M of the encoder are ``(N, H/r, W/r, F)`` where ``r`` is the backbone's reduction (stride 32 for
  ResNets and EfficientNets) and ``F`` its feature channels (EfficientNet-B0: 1280, B4: 1792; ResNet-18/34: 512).
- Logits are ``(N, num_classes)``; latent vectors ``(N, latent_dim)``.

The model-part interfaces (:class:`Backbone`, :class:`Encoder`, :class:`Decoder`, :class:`Head`,
:class:`LatentModel`) are structural: a framework's modules satisfy them by having the documented call
signature; tensors there are the framework's own type in the framework's own layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from deepgalaxy.core.device import Accelerator
from deepgalaxy.core.specs import BackboneSpec, ModelSpec, TrainSpec

Part = Literal["encoder", "decoder", "head", "latent", "properties"]
PARTS: tuple[str, ...] = ("encoder", "decoder", "head", "latent", "properties")
InferenceOp = Literal["logits", "encode", "reconstruct", "decode", "properties"]


# --- model parts (framework-native tensors) -------------------------------------------------------------------


@runtime_checkable
class Backbone(Protocol):
    """Feature extractor: images ``(N, C, H, W)`` (torch) / ``(N, H, W, C)`` (keras) -> feature maps M.

    ``reduction`` is the spatial downsampling factor (input side / feature-map side); inputs must be divisible
    by it. ``out_channels`` is F, the number of feature-map channels.
    """

    reduction: int
    out_channels: int


class Encoder(Protocol):
    """E: images -> feature maps M (a Backbone, possibly with an input adapter for the channel count)."""

    def __call__(self, images: Any) -> Any: ...


class Decoder(Protocol):
    """D: feature maps M -> images X-hat of the input's size, values in [0, 1] (sigmoid output).

    Fully convolutional (upsampling + convolutions, no dense layer), so it works at any size E accepts.
    """

    def __call__(self, features: Any) -> Any: ...


class Head(Protocol):
    """Classifier head: M -> flatten (or global average pool) -> dense layers -> ``num_classes`` logits."""

    def __call__(self, features: Any) -> Any: ...


class LatentModel(Protocol):
    """VAE over the feature maps: M -> (mu, logvar), z = mu + exp(0.5 * logvar) * eps -> reconstructed M'.

    ``encode(M)`` returns ``(mu, logvar)``, each ``(N, latent_dim)``; ``decode(z)`` returns feature maps shaped
    like M. The training loss includes ``KL = -0.5 * sum(1 + logvar - mu^2 - exp(logvar))`` per sample.
    """

    def encode(self, features: Any) -> tuple[Any, Any]: ...

    def decode(self, z: Any) -> Any: ...


# --- what a training step reports -----------------------------------------------------------------------------

LOSS_TERMS: tuple[str, ...] = ("loss", "loss_classifier", "loss_reconstruction", "loss_latent", "loss_kl",
                               "loss_domain", "loss_properties")
"""Metric names every framework reports (those a card's task has); identical names keep MLflow runs comparable."""


@dataclass
class StepResult:
    """What one training or evaluation step returns to core.

    ``losses`` maps names from :data:`LOSS_TERMS` to batch means (only the terms the task has; ``loss`` is the
    weighted total). ``predicted`` holds the argmax class per image for tasks with a head, so core computes
    accuracy, within-k accuracy and confusion matrices identically for every framework. ``recon_mse`` is the
    image reconstruction mean squared error for tasks with a decoder. ``properties`` holds the property heads'
    predicted normalised means and log-variances ``(N, 2K)`` (means first) for cards with ``properties``.
    """

    losses: dict[str, float]
    predicted: np.ndarray | None = None
    recon_mse: float | None = None
    properties: np.ndarray | None = None


class Trainer(Protocol):
    """Stateful training loop body for one model, built by :meth:`Framework.trainer`.

    Under Horovod the trainer wraps its optimizer for allreduce, broadcasts initial state from rank 0, and its
    ``train_step`` returns the *local* batch's numbers (core averages across ranks when it needs to).
    """

    def train_step(self, images: np.ndarray, labels: np.ndarray) -> StepResult:
        """One optimisation step on a batch: images ``(N, H, W, C)`` float32 in [0, 1], labels ``(N,)`` int64."""
        ...

    def eval_step(self, images: np.ndarray, labels: np.ndarray) -> StepResult:
        """Losses and predictions without updating anything (inference mode, no dropout)."""
        ...

    def save_checkpoint(self, directory: Path) -> None:
        """Write model weights, optimizer state and the framework's RNG state to ``directory`` (no pickle)."""
        ...

    def load_checkpoint(self, directory: Path) -> None:
        """Restore what :meth:`save_checkpoint` wrote, so training continues as if never interrupted."""
        ...


@dataclass(frozen=True)
class Distributed:
    """Data-parallel context handed to a framework: ``rank`` of ``size`` workers; ``size == 1`` is local."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_root(self) -> bool:
        return self.rank == 0


# --- contracts of plugins -------------------------------------------------------------------------------------


class Framework(Protocol):
    """A deep-learning framework implementation (``torch``, ``tensorflow``).

    ``native`` below is the framework's own model object (an ``nn.Module``, a ``keras.Model``) built from a card.
    Weights cross the boundary as ``{name: numpy array}`` in the framework's own naming and layout, saved with
    safetensors; ``convert_weights`` turns another framework's dictionary into this one's.
    """

    name: str

    def build(self, card: ModelSpec, backbone: Callable[[BackboneSpec, int], Any], seed: int | None = None) -> Any:
        """Build the native model for ``card`` around ``backbone(card.backbone, card.channels)`` (random
        initialisation, seeded when ``seed`` is given). The caller hands over the backbone factory (the registry:
        a :class:`deepgalaxy.core.contract.BackboneBuilder`); a framework never looks one up."""
        ...

    def num_parameters(self, native: Any, part: Part | None = None, trainable: bool = True) -> int:
        """Count parameters of the whole model or one part (``encoder``, ``decoder``, ``head``, ``latent``)."""
        ...

    def infer(self, native: Any, op: InferenceOp, x: np.ndarray, precision: str = "fp32") -> np.ndarray:
        """Run one inference batch without gradients.

        ``logits``: images -> ``(N, num_classes)``; ``encode``: images -> latent mean ``(N, latent_dim)``;
        ``reconstruct``: images -> images; ``decode``: z ``(N, latent_dim)`` -> images. Images are NHWC float32
        numpy, results float32 numpy, whatever the device ``native`` is on; ``precision`` is resolved (``fp32``,
        ``bf16``, ``fp16``).
        """
        ...

    def accelerators(self) -> list[Accelerator]:
        """The GPUs this framework sees in this process (empty on a CPU-only machine or build)."""
        ...

    def to_device(self, native: Any, device: str) -> Any:
        """``native`` placed on ``device`` (resolved: ``cpu`` or ``cuda:N``; see :mod:`deepgalaxy.core.device`);
        inference and training then run there. Weights on disk stay device-independent."""
        ...

    def bf16_slowdown(self) -> float:
        """How many times slower a bf16 convolution is than fp32 on this CPU, measured (for the emulation warning)."""
        ...

    def get_weights(self, native: Any) -> dict[str, np.ndarray]:
        """All weights and buffers (batch-norm statistics included), in this framework's naming."""
        ...

    def set_weights(self, native: Any, weights: Mapping[str, np.ndarray]) -> None:
        """Load weights produced by :meth:`get_weights`; raise ``WeightsMismatchError`` naming what differs."""
        ...

    def convert_weights(self, weights: Mapping[str, np.ndarray], source: str, card: ModelSpec,
                        native: Any = None) -> dict[str, np.ndarray]:
        """Convert another framework's weights (``source`` is its name) into this framework's naming and layout.

        ``native`` is the model they will be loaded into: with it, a backbone whose layers are named differently in
        the two frameworks converts by its declared :attr:`BackboneInfo.weight_names` or by layer order.
        """
        ...

    def trainer(self, native: Any, card: ModelSpec, train: TrainSpec, dist: Distributed) -> Trainer:
        """A :class:`Trainer` for ``native`` (optimizer from ``train``, Horovod-wrapped when ``dist.size > 1``)."""
        ...


class Collective(Protocol):
    """Inside a rank: who it is, and reductions of numpy arrays across all ranks of its launch.

    A launcher provides it (:meth:`Launcher.collective`), so runs/ never imports a launcher or a framework; with
    one rank every reduction is the identity.
    """

    dist: Distributed

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum of ``values`` over all ranks (float64)."""
        ...

    def allreduce_max(self, values: np.ndarray) -> np.ndarray:
        """Element-wise maximum over all ranks (float64)."""
        ...

    def barrier(self) -> None:
        """Wait until every rank reaches this point."""
        ...

    def allreduce_probe(self, nbytes: int) -> Callable[[str], None]:
        """A function that allreduces one float32 tensor of ``nbytes`` (made once, in the framework's own form)
        under the given name and returns when it is done: what a scaling measurement times."""
        ...


class FrameworkRuntime(Protocol):
    """What a worker process needs of a framework besides its models: its thread pools, and its tensors for the
    collective operations of a launcher. Built by ``FrameworkInfo.runtime``; imports the framework when built."""

    name: str

    def set_threads(self, threads: int) -> None:
        """Cap the framework's intra-op thread pool at ``threads`` (inter-op at 1) in this process."""
        ...

    def tensor(self, values: np.ndarray) -> Any:
        """A framework tensor holding ``values`` (shared memory where the framework allows)."""
        ...

    def numpy(self, tensor: Any) -> np.ndarray:
        """A framework tensor as a numpy array; returns when the tensor's value is computed."""
        ...


class Launcher(Protocol):
    """Runs N worker processes of one training (``local``: a single process; ``horovod``: horovodrun), and inside
    each of them provides the :class:`Collective` that joins them."""

    name: str

    def launch(self, argv: Sequence[str], workers: int, hosts: str | None, env: Mapping[str, str]) -> int:
        """Run ``argv`` (a ``python -m ...`` command line) as ``workers`` ranks; return the exit code."""
        ...

    def ranks_per_machine(self, workers: int, hosts: str | None) -> int:
        """The most of the ``workers`` ranks this launcher puts on one machine of ``hosts`` (default: this one):
        each rank there gets that share of the machine's cores (:mod:`deepgalaxy.core.workers`)."""
        ...

    def collective(self, framework: FrameworkInfo) -> Collective:
        """In a rank this launcher started: the :class:`Collective` of the launch, through ``framework``'s
        binding for this launcher (``framework.bindings[launcher name]``) and its :class:`FrameworkRuntime`."""
        ...


class DatasetSource(Protocol):
    """Something that writes a deepgalaxy Zarr store (the simulator, an image-folder ingester)."""

    name: str

    def create(self, out: Path, progress: bool = True, **params: Any) -> Path:
        """Write (or resume writing) a store at ``out`` and return its path."""
        ...


# --- what hooks return ----------------------------------------------------------------------------------------

Factory = Callable[..., Any] | str
"""A callable, or a lazy ``"package.module:attr"`` reference imported only when used (keeps CLI start fast)."""


@dataclass(frozen=True)
class BackboneInfo:
    """A named backbone and its factory per framework: ``factory(spec: BackboneSpec, in_channels: int)``.

    ``reduction`` is the input/feature-map size ratio, or a function of the spec when options change it.

    Weights trained in one framework load in the other when the backbone's weighted layers correspond: by name
    (the built-in backbones), else in order (the same layers with the same shapes, as in a plain sequential net).
    ``weight_names`` declares the correspondence instead, for layers that are named differently and not in the same
    order: torch module path -> Keras layer name, both relative to the backbone (``{"0": "conv1"}``).

    ``pretrained`` reads weights published for the backbone by other libraries (``train --init FILE``): a function
    ``read(path, spec, in_channels) -> PretrainedWeights``, or None when the backbone has no such reader.
    """

    name: str
    factories: Mapping[str, Factory]
    description: str = ""
    reduction: int | Callable[[BackboneSpec], int] = 32
    weight_names: Mapping[str, str] = field(default_factory=dict)
    pretrained: Factory | None = None

    def reduction_for(self, spec: BackboneSpec) -> int:
        return self.reduction(spec) if callable(self.reduction) else self.reduction


@dataclass
class PretrainedWeights:
    """A backbone's weights read from another library's file (Keras' ``.h5``, timm's safetensors), in deepgalaxy's
    naming of ``framework`` (``encoder.*``), plus what the file holds that the backbone has no place for
    (``unused``: an ImageNet classifier, Keras' input normalization) and how weights were adapted (``notes``)."""

    framework: str
    weights: dict[str, np.ndarray]
    unused: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FrameworkInfo:
    """A framework implementation; ``loader()`` returns a :class:`Framework` (imports the framework lazily)."""

    name: str
    loader: Factory
    requires: tuple[str, ...] = ()
    description: str = ""
    runtime: Factory | None = None
    """Returns the framework's :class:`FrameworkRuntime` (thread pools, tensors for collective operations)."""
    bindings: Mapping[str, str] = field(default_factory=dict)
    """Per launcher, the module of the launcher's binding for this framework (``{"horovod": "horovod.torch"}``)."""


@dataclass(frozen=True)
class LauncherInfo:
    """A launcher; ``loader()`` returns a :class:`Launcher`."""

    name: str
    loader: Factory
    requires: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class DatasetSourceInfo:
    """A dataset source; ``loader()`` returns a :class:`DatasetSource`."""

    name: str
    loader: Factory
    description: str = ""
    requires: tuple[str, ...] = field(default_factory=tuple)


def resolve(factory: Factory) -> Any:
    """Import a lazy ``"module:attr"`` reference, or return a callable as is."""
    if callable(factory):
        return factory
    import importlib

    module, _, attr = factory.partition(":")
    obj: Any = importlib.import_module(module)
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


__all__ = [
    "LOSS_TERMS",
    "PARTS",
    "Backbone",
    "BackboneInfo",
    "BackboneSpec",
    "Collective",
    "DatasetSource",
    "DatasetSourceInfo",
    "Decoder",
    "Distributed",
    "Encoder",
    "Framework",
    "FrameworkInfo",
    "FrameworkRuntime",
    "Head",
    "InferenceOp",
    "LatentModel",
    "Launcher",
    "LauncherInfo",
    "Part",
    "PretrainedWeights",
    "StepResult",
    "Trainer",
    "resolve",
]


def iter_batches(n: int, batch_size: int) -> Iterator[slice]:
    """Slices covering ``range(n)`` in batches of ``batch_size`` (the last may be shorter)."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))
