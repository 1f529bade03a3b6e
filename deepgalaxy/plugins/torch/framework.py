"""``TorchFramework``: the ``torch`` implementation of :class:`deepgalaxy.core.interfaces.Framework`.

Weights cross the boundary as ``{state-dict name: numpy array}`` (torch layouts: conv ``(out, in/groups, kh, kw)``,
linear ``(out, in)``), batch-norm running statistics included, the unused ``num_batches_tracked`` counters
excluded. Names are documented in :mod:`deepgalaxy.plugins.torch.net`, :mod:`.parts` and the backbone modules.
Models are kept in ``channels_last`` memory format (faster on CPU for the depthwise convs of EfficientNets); that is
invisible from outside: inputs and outputs are NHWC numpy, weights are contiguous arrays.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from deepgalaxy.core.device import Accelerator, batch_too_large
from deepgalaxy.core.errors import ShapeError, WeightsMismatchError
from deepgalaxy.core.interfaces import Distributed, InferenceOp, Part
from deepgalaxy.core.specs import BackboneSpec, ModelSpec, TrainSpec
from deepgalaxy.plugins.torch import devices
from deepgalaxy.plugins.torch.net import DeepGalaxyNet, property_outputs
from deepgalaxy.plugins.torch.parts import VAE
from deepgalaxy.plugins.torch.tensors import (
    SKIPPED_BUFFERS,
    autocast,
    get_weights,
    set_weights,
    to_device,
    to_nchw,
    to_nhwc,
    to_numpy,
    weight_items,
)
from deepgalaxy.plugins.torch.trainer import TorchTrainer


class TorchFramework:
    """Builds cards as :class:`DeepGalaxyNet`, runs inference, moves weights, makes trainers."""

    name = "torch"

    def __init__(self, channels_last: bool = True) -> None:
        self.channels_last = channels_last

    # -- building -----------------------------------------------------------------------------------------------

    def build(self, card: ModelSpec, backbone: Callable[[BackboneSpec, int], nn.Module],
              seed: int | None = None) -> DeepGalaxyNet:
        """The native model for ``card`` around ``backbone(card.backbone, card.channels)``; with ``seed`` the
        initial weights do not depend on global RNG state."""
        rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        with rng:
            if seed is not None:
                torch.manual_seed(seed)
            net = DeepGalaxyNet(card, backbone(card.backbone, card.channels))
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs lack it
        return net

    def num_parameters(self, native: DeepGalaxyNet, part: Part | None = None, trainable: bool = True) -> int:
        """Trainable parameters, or with ``trainable=False`` all of them plus batch-norm statistics (Keras' total)."""
        module = native if part is None else native.part(part)
        if trainable:
            return sum(p.numel() for p in module.parameters() if p.requires_grad)
        buffers = sum(b.numel() for n, b in module.named_buffers() if n.rsplit(".", 1)[-1] not in SKIPPED_BUFFERS)
        return sum(p.numel() for p in module.parameters()) + buffers

    # -- inference ----------------------------------------------------------------------------------------------

    def infer(self, native: DeepGalaxyNet, op: InferenceOp, x: np.ndarray, precision: str = "fp32") -> np.ndarray:
        """One batch of ``logits``, ``encode`` (mu), ``reconstruct``, ``decode`` or ``properties`` (normalised means
        then log-variances, ``(N, 2K)``) under inference mode, on the device of ``native``; float32 numpy back.
        A batch too large for the GPU's memory is a ``DeviceError`` naming a batch size that fits (tried)."""
        try:
            return self._infer(native, op, x, precision)
        except torch.cuda.OutOfMemoryError:
            pass  # leave the handler first: its traceback holds the failed batch's GPU memory
        device = str(devices.device_of(native))
        raise batch_too_large(len(x), device, lambda n: devices.fits(lambda: self._infer(native, op, x[:n], precision)),
                              f"inference ({op})")

    def _infer(self, native: DeepGalaxyNet, op: InferenceOp, x: np.ndarray, precision: str) -> np.ndarray:
        was_training = native.training
        native.eval()
        device = devices.device_of(native)
        try:
            with torch.inference_mode(), autocast(precision, device.type):
                if op == "decode":
                    z = to_device(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), device)
                    return to_nhwc(native.part("decoder")(cast(VAE, native.part("latent")).decode(z)))
                if x.ndim != 4:
                    raise ShapeError(f"{op} expects NHWC images, got shape {x.shape}")
                m = native.encoder(to_nchw(x, self.channels_last, device))
                if op == "logits":
                    return to_numpy(native.part("head")(m))
                if op == "encode":
                    return to_numpy(cast(VAE, native.part("latent")).encode(m)[0])
                if op == "reconstruct":
                    return to_nhwc(native.part("decoder")(m))
                if op == "properties":
                    return np.concatenate([to_numpy(t) for t in property_outputs(native.part("properties")(m))],
                                          axis=1)
                raise ValueError(f"unknown inference op {op!r}; use logits, encode, reconstruct, decode or properties")
        finally:
            native.train(was_training)

    # -- devices ------------------------------------------------------------------------------------------------

    def accelerators(self) -> list[Accelerator]:
        """The CUDA devices torch sees."""
        return devices.accelerators()

    def to_device(self, native: DeepGalaxyNet, device: str) -> DeepGalaxyNet:
        """``native`` moved to ``device`` (``cpu``, ``cuda:N``), memory format kept."""
        return native.to(devices.torch_device(device))

    def bf16_slowdown(self) -> float:
        """bf16 over fp32 time of a convolution on this CPU, measured once per process."""
        return devices.bf16_slowdown()

    # -- weights ------------------------------------------------------------------------------------------------

    def get_weights(self, native: nn.Module) -> dict[str, np.ndarray]:
        """A copy of every weight and buffer as contiguous numpy arrays, keyed by state-dict name."""
        return get_weights(native)

    def set_weights(self, native: nn.Module, weights: Mapping[str, np.ndarray]) -> None:
        """Copy ``weights`` into ``native`` bit-exactly; every name must be present with the same shape."""
        set_weights(native, weights)

    def convert_weights(self, weights: Mapping[str, np.ndarray], source: str, card: ModelSpec,
                        native: nn.Module | None = None) -> dict[str, np.ndarray]:
        """Another framework's weights in torch naming/layout (fitted to ``native``), via the shared converter."""
        try:
            from deepgalaxy.plugins import convert as converter
        except ImportError as exc:
            raise WeightsMismatchError(
                f"cannot convert weights saved by {source!r} to torch: the converter module "
                f"deepgalaxy.plugins.convert is not available ({exc}); load them with framework={source!r}"
            ) from None
        expected = None if native is None else {n: tuple(t.shape) for n, t in weight_items(native)}
        return dict(converter.convert(weights, source=source, target="torch", card=card, expected=expected))

    # -- training -----------------------------------------------------------------------------------------------

    def trainer(self, native: DeepGalaxyNet, card: ModelSpec, train: TrainSpec, dist: Distributed) -> Any:
        """A :class:`~deepgalaxy.plugins.torch.trainer.TorchTrainer` (Horovod-wrapped when ``dist.size > 1``)."""
        return TorchTrainer(native, card, train, dist, channels_last=self.channels_last)
