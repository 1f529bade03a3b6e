"""Which device and precision a model runs in: ``device`` and ``precision`` as users write them, resolved against
what the framework sees (its GPUs) and what the hardware does natively (:mod:`deepgalaxy.core.hardware`).

``device``: ``auto`` (the GPU of this rank's local rank when a GPU is visible, else the CPU), ``cpu``, ``cuda``
(the local rank's GPU; an error where none is visible, never a silent CPU run) or ``cuda:N``.
``precision``: ``fp32``; ``bf16`` and ``fp16`` (mixed precision: weights stay fp32, compute in 16 bits; fp16 only on a
GPU, with a loss scaler when training); ``auto``: bf16 where the device does it natively (a GPU that supports it,
a CPU with AVX-512 BF16, AMX or Arm BF16), else fp32. bf16 asked for where the CPU only emulates it runs, with one
warning that gives its measured cost.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from deepgalaxy.core.errors import DeviceError
from deepgalaxy.core.hardware import CpuInfo, cpu_info

DEVICES = "auto, cpu, cuda or cuda:N"
"""The device names deepgalaxy takes, as error messages list them."""
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DEVICE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


@dataclass(frozen=True)
class Accelerator:
    """One GPU a framework sees: its index in ``cuda:N``, name, memory and whether bf16 is native on it."""

    index: int
    name: str
    memory_bytes: int = 0
    bf16: bool = False

    def describe(self) -> str:
        memory = f", {self.memory_bytes / 2**30:.0f} GiB" if self.memory_bytes else ""
        return f"cuda:{self.index} ({self.name}{memory})"


def parse_device(text: str, what: str = "device") -> str:
    """``text`` checked and normalised (``"CUDA:0"`` -> ``"cuda:0"``); a :class:`DeviceError` naming the forms."""
    name = str(text).strip().lower()
    match = _DEVICE.match(name)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        hint = " (deepgalaxy runs on NVIDIA GPUs as cuda and on CPUs)" if name.split(":")[0] in (
            "gpu", "mps", "xpu", "tpu", "rocm", "hip") else ""
        raise DeviceError(f"{what} {text!r} is not a device: use {DEVICES}{hint}")
    return name


def parse_precision(text: str, what: str = "precision") -> str:
    """``text`` checked against :data:`PRECISIONS`."""
    name = str(text).strip().lower()
    if name not in PRECISIONS:
        raise DeviceError(f"{what} {text!r} is not a precision: use {', '.join(PRECISIONS)}")
    return name


def resolve_device(requested: str, gpus: Sequence[Accelerator], local_rank: int = 0) -> str:
    """``cpu`` or ``cuda:N`` for ``requested`` given the visible ``gpus``; under Horovod each rank on a machine
    takes the GPU of its ``local_rank`` (modulo the GPUs it sees)."""
    name = parse_device(requested)
    if name == "cpu" or (name == "auto" and not gpus):
        return "cpu"
    if not gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "no driver or a CPU-only framework build"
        raise DeviceError(f"device {requested!r}: no GPU is visible to this process ({why}); use device cpu or auto")
    if name in ("auto", "cuda"):
        return f"cuda:{gpus[local_rank % len(gpus)].index}"
    index = int(name.split(":")[1])
    if index not in {g.index for g in gpus}:
        raise DeviceError(f"device {requested!r}: only {len(gpus)} GPU(s) visible: "
                          f"{', '.join(g.describe() for g in gpus)}; use one of those, or cuda for the first")
    return name


def gpu_of(device: str, gpus: Sequence[Accelerator]) -> Accelerator | None:
    """The accelerator ``device`` (resolved) names, or None on the CPU."""
    if not device.startswith("cuda:"):
        return None
    index = int(device.split(":")[1])
    return next((g for g in gpus if g.index == index), None)


def resolve_precision(requested: str, device: str, gpus: Sequence[Accelerator] = (), cpu: CpuInfo | None = None,
                      slowdown: Callable[[], float] | None = None) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``requested`` on ``device`` (resolved).

    ``slowdown`` measures how many times slower bf16 is than fp32 on this CPU: called (once per process) only to
    warn when bf16 is asked for where the CPU emulates it."""
    name = parse_precision(requested)
    gpu = gpu_of(device, gpus)
    if gpu is None and device.startswith("cuda"):
        raise DeviceError(f"device {device!r} is not one of the visible GPUs")
    cpu = cpu or cpu_info()
    if name == "auto":
        native = gpu.bf16 if gpu is not None else cpu.native_bf16
        return "bf16" if native else "fp32"
    if name == "fp16" and gpu is None:
        raise DeviceError("precision 'fp16' needs a GPU: CPUs have no fast fp16 training path; on the CPU use fp32, "
                          f"or bf16 where it is native (this CPU: {cpu.describe()}), or auto to choose")
    if name == "bf16" and gpu is None and not cpu.native_bf16:
        _warn_emulated(cpu, slowdown)
    return name


def batch_too_large(batch_size: int, device: str, fits: Callable[[int], bool], what: str = "a step") -> DeviceError:
    """The error for ``what`` running out of memory on ``device`` at ``batch_size``, naming the largest of the halved
    batch sizes that ``fits`` (a probe that runs the same work at a given batch size and says whether it fitted)."""
    size = batch_size // 2
    while size >= 1 and not fits(size):
        size //= 2
    hint = (f"; batch size {size} fits (tried): use it (predict, latent index: --batch-size {size}; train: --set "
            f"train.batch_size={size})" if size >= 1 else
            "; not even one image fits: use a smaller card or input size, or run on the CPU (device cpu)")
    return DeviceError(f"{what} with batch size {batch_size} does not fit in the memory of {device}{hint}")


_warned: set[str] = set()


def _warn_emulated(cpu: CpuInfo, slowdown: Callable[[], float] | None) -> None:
    if cpu.model in _warned:
        return
    _warned.add(cpu.model)
    cost = ""
    if slowdown is not None:
        cost = f" (measured here: {slowdown():.1f}x the time of fp32 for a convolution)"
    warnings.warn(f"bf16 is emulated on this CPU, {cpu.describe()}: it has no native bf16 (AVX-512 BF16, AMX, Arm "
                  f"BF16), so bf16 runs slower than fp32{cost}; use precision auto or fp32", RuntimeWarning,
                  stacklevel=3)
