"""What this machine's CPU is and does natively, read without a framework: its model, cores and instruction sets.

``precision="auto"`` picks bf16 on a CPU only where it is native (AVX-512 BF16, AMX or Arm BF16): elsewhere torch
and TensorFlow emulate it, many times slower than fp32. Runs record :func:`cpu_info` as MLflow tags
(:func:`hardware_tags`), so a figure is always read with the machine that made it.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
"""CPU flags (as /proc/cpuinfo spells them) of native bf16 arithmetic: x86's AVX-512 BF16 and AMX, Arm's BF16."""
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8",
                  "avx_vnni", "neon", "asimd", "sve", "bf16")
"""The flags worth a tag: those that decide which kernels the frameworks run."""


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's model name, its logical cores and its instruction-set flags."""

    model: str
    cores: int
    flags: frozenset[str]

    @property
    def native_bf16(self) -> bool:
        """Whether bf16 arithmetic is native (AVX-512 BF16, AMX or Arm BF16), not emulated."""
        return any(f in self.flags for f in BF16_FLAGS)

    @property
    def vector_isa(self) -> str:
        """The widest vector instruction set: ``AMX``, ``AVX-512``, ``AVX2``, ``NEON``/``SVE`` or ``baseline``."""
        for flag, name in (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"), ("sve", "SVE"),
                           ("asimd", "NEON"), ("neon", "NEON")):
            if flag in self.flags:
                return name
        return "baseline"

    def describe(self) -> str:
        """One line for benchmark output: ``AMD EPYC 7B13 (2 cores, AVX2, bf16 emulated)``."""
        bf16 = "bf16 native" if self.native_bf16 else "bf16 emulated"
        return f"{self.model} ({self.cores} cores, {self.vector_isa}, {bf16})"


@functools.cache
def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> CpuInfo:
    """This machine's CPU, from ``/proc/cpuinfo`` on Linux (elsewhere the model from :mod:`platform`, no flags)."""
    model, flags = "", frozenset[str]()
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "Processor") and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return CpuInfo(model or platform.processor() or platform.machine() or "unknown CPU", cores, flags)


def hardware_tags(device: str, precision: str, gpu: str | None = None, cpu: CpuInfo | None = None) -> dict[str, str]:
    """MLflow tags of the hardware a run used: the CPU, its relevant flags, the device, the GPU and the precision."""
    cpu = cpu or cpu_info()
    tags = {"hardware.cpu": cpu.model, "hardware.cpu_cores": str(cpu.cores), "hardware.cpu_isa": cpu.vector_isa,
            "hardware.cpu_flags": " ".join(f for f in REPORTED_FLAGS if f in cpu.flags),
            "hardware.device": device, "hardware.precision": precision}
    if gpu:
        tags["hardware.gpu"] = gpu
    return tags
