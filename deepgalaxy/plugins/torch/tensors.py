"""Tensors across the torch plugin's boundary: NHWC numpy <-> NCHW torch, the precision context, the weights.

Weights cross as ``{state-dict name: numpy array}`` (torch layouts), batch-norm running statistics included, the
unused ``num_batches_tracked`` counters excluded. Used by the framework and the trainer alike (neither imports
the other for them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import nn

from deepgalaxy.core.model import check_weights_fit

FRAMEWORK = "torch"

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


def get_weights(native: nn.Module) -> dict[str, np.ndarray]:
    """A copy of every weight and buffer as contiguous numpy arrays, keyed by state-dict name."""
    return {n: t.detach().cpu().contiguous().numpy().copy() for n, t in weight_items(native)}


def set_weights(native: nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Copy ``weights`` into ``native`` bit-exactly; every name must be present with the same shape."""
    own = dict(weight_items(native))
    check_weights_fit(FRAMEWORK, {n: tuple(t.shape) for n, t in own.items()}, weights)
    with torch.no_grad():
        for n, t in own.items():
            t.copy_(torch.from_numpy(np.ascontiguousarray(weights[n])).to(t.dtype))
