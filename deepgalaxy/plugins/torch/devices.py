"""The GPUs torch sees, where a model is, whether work fits in a GPU's memory, and the measured cost of bf16 on
this CPU."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from deepgalaxy.core.device import Accelerator


def accelerators() -> list[Accelerator]:
    """Every CUDA device torch sees (bf16 native from compute capability 8.0, Ampere, on)."""
    if not torch.cuda.is_available():
        return []
    found = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        found.append(Accelerator(i, props.name, int(props.total_memory), (props.major, props.minor) >= (8, 0)))
    return found


def torch_device(device: str) -> torch.device:
    """A resolved device name (``cpu``, ``cuda:N``) as a torch device."""
    return torch.device(device)


def device_of(net: nn.Module) -> torch.device:
    """The device of ``net``'s parameters (where it runs)."""
    return next(net.parameters()).device


def fits(work: Callable[[], object]) -> bool:
    """Whether ``work`` runs without running out of GPU memory; the CUDA cache is emptied before and after, so
    one try does not leave memory held for the next."""
    torch.cuda.empty_cache()
    try:
        work()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()


@functools.cache
def bf16_slowdown() -> float:
    """Time of a 3x3 convolution under bf16 autocast over its time in fp32 on this CPU (best of 5 each)."""
    x = torch.rand(8, 32, 64, 64).contiguous(memory_format=torch.channels_last)
    w = torch.rand(32, 32, 3, 3).contiguous(memory_format=torch.channels_last)

    def best(bf16: bool) -> float:
        times = []
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            F.conv2d(x, w, padding=1)  # warm-up: oneDNN picks its kernel
            for _ in range(5):
                start = time.perf_counter()
                F.conv2d(x, w, padding=1)
                times.append(time.perf_counter() - start)
        return min(times)

    return best(True) / best(False)
