"""``TorchFramework``: the ``torch`` implementation of :class:`deepgalaxy.core.interfaces.Framework`.

Weights cross the boundary as ``{state-dict name: numpy array}`` (torch layouts: conv ``(out, in/groups, kh, kw)``,
linear ``(out, in)``), batch-norm running statistics included, the unused ``num_batches_tracked`` counters
excluded. Names are documented in :mod:`deepgalaxy.plugins.torch.net`, :mod:`.parts` and the backbone modules.
Models are kept in ``channels_last`` memory format (faster on CPU for the depthwise convs of EfficientNets); that is
invisible from outside: inputs and outputs are NHWC numpy, weights are contiguous arrays.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from deepgalaxy.core.errors import ShapeError, WeightsMismatchError
from deepgalaxy.core.interfaces import Distributed, InferenceOp, Part
from deepgalaxy.core.model import check_weights_fit
from deepgalaxy.core.specs import ModelSpec, TrainSpec
from deepgalaxy.plugins.torch.net import DeepGalaxyNet

SKIPPED_BUFFERS = ("num_batches_tracked",)


def weight_items(net: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter and buffer that makes up the weights, in state-dict order."""
    for name, tensor in net.state_dict(keep_vars=True).items():
        if name.rsplit(".", 1)[-1] not in SKIPPED_BUFFERS:
            yield name, tensor


@contextlib.contextmanager
def autocast(precision: str) -> Iterator[None]:
    """bf16 autocast on CPU when ``precision == "bf16"``; a no-op for fp32."""
    if precision == "bf16":
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            yield
    elif precision == "fp32":
        yield
    else:
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")


def to_nchw(x: np.ndarray, channels_last: bool = True) -> torch.Tensor:
    """NHWC numpy -> NCHW float32 tensor (a view in channels_last memory format, no copy when possible)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).permute(0, 3, 1, 2)
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def to_nhwc(t: torch.Tensor) -> np.ndarray:
    """NCHW tensor -> NHWC float32 numpy."""
    return np.ascontiguousarray(t.detach().float().permute(0, 2, 3, 1).cpu().numpy())


class TorchFramework:
    """Builds cards as :class:`DeepGalaxyNet`, runs inference, moves weights, makes trainers."""

    name = "torch"

    def __init__(self, channels_last: bool = True) -> None:
        self.channels_last = channels_last

    # -- building -----------------------------------------------------------------------------------------------

    def build(self, card: ModelSpec, seed: int | None = None) -> DeepGalaxyNet:
        """The native model for ``card``; with ``seed`` the initial weights do not depend on global RNG state."""
        from deepgalaxy.registry import backbone_factory

        factory = backbone_factory(card.backbone, "torch")
        rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        with rng:
            if seed is not None:
                torch.manual_seed(seed)
            net = DeepGalaxyNet(card, factory(card.backbone, card.channels))
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
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
        """One batch of ``logits``, ``encode`` (mu), ``reconstruct`` or ``decode`` under inference mode."""
        was_training = native.training
        native.eval()
        try:
            with torch.inference_mode(), autocast(precision):
                if op == "decode":
                    z = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
                    return to_nhwc(native.part("decoder")(native.part("latent").decode(z)))
                if x.ndim != 4:
                    raise ShapeError(f"{op} expects NHWC images, got shape {x.shape}")
                m = native.encoder(to_nchw(x, self.channels_last))
                if op == "logits":
                    return native.part("head")(m).float().numpy()
                if op == "encode":
                    return native.part("latent").encode(m)[0].float().numpy()
                if op == "reconstruct":
                    return to_nhwc(native.part("decoder")(m))
                raise ValueError(f"unknown inference op {op!r}; use logits, encode, reconstruct or decode")
        finally:
            native.train(was_training)

    # -- weights ------------------------------------------------------------------------------------------------

    def get_weights(self, native: nn.Module) -> dict[str, np.ndarray]:
        """A copy of every weight and buffer as contiguous numpy arrays, keyed by state-dict name."""
        return {n: t.detach().cpu().contiguous().numpy().copy() for n, t in weight_items(native)}

    def set_weights(self, native: nn.Module, weights: Mapping[str, np.ndarray]) -> None:
        """Copy ``weights`` into ``native`` bit-exactly; every name must be present with the same shape."""
        own = dict(weight_items(native))
        check_weights_fit(self.name, {n: tuple(t.shape) for n, t in own.items()}, weights)
        with torch.no_grad():
            for n, t in own.items():
                t.copy_(torch.from_numpy(np.ascontiguousarray(weights[n])).to(t.dtype))

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
        from deepgalaxy.plugins.torch.trainer import TorchTrainer

        return TorchTrainer(native, card, train, dist, channels_last=self.channels_last)
