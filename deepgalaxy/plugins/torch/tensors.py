"""Tensors across the torch plugin's boundary: NHWC numpy <-> NCHW torch on the model's device, the precision
context, the weights.

Batches are built on the CPU and, for a GPU, copied from pinned memory without blocking (the copy overlaps the
host's work until a result is read back); results come back as float32 numpy whatever the device and precision.

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
CPU = torch.device("cpu")


def weight_items(net: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter and buffer that makes up the weights, in state-dict order."""
    for name, tensor in net.state_dict(keep_vars=True).items():
        if name.rsplit(".", 1)[-1] not in SKIPPED_BUFFERS:
            yield name, tensor


@contextlib.contextmanager
def autocast(precision: str, device_type: str = "cpu") -> Iterator[None]:
    """Mixed precision on ``device_type`` (``cpu``, ``cuda``): bf16 or fp16 (GPU only) autocast; fp32 a no-op."""
    if precision == "fp32":
        yield
    elif precision == "bf16" or (precision == "fp16" and device_type == "cuda"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        with torch.autocast(device_type=device_type, dtype=dtype):
            yield
    else:
        raise ValueError(f"precision {precision!r} on {device_type}: use fp32 or bf16 (fp16 only on cuda)")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``: for a GPU copied from pinned memory, non-blocking."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def to_nchw(x: np.ndarray, channels_last: bool = True, device: torch.device = CPU) -> torch.Tensor:
    """NHWC numpy -> NCHW float32 tensor on ``device`` (a view in channels_last memory format, no copy when
    possible; the NHWC block is what crosses to a GPU)."""
    t = to_device(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), device).permute(0, 3, 1, 2)
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def to_nhwc(t: torch.Tensor) -> np.ndarray:
    """NCHW tensor (any device, any float dtype) -> NHWC float32 numpy."""
    return np.ascontiguousarray(to_numpy(t.permute(0, 2, 3, 1)))


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor (any device, any float dtype) as float32 numpy on the host."""
    return np.asarray(t.detach().float().cpu().numpy())


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
