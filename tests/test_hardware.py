"""The CPU as /proc/cpuinfo describes it, and the MLflow tags made from it."""

from __future__ import annotations

from pathlib import Path

from deepgalaxy.core.hardware import REPORTED_FLAGS, cpu_info, hardware_tags

EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2 fma sha_ni
"""
SAPPHIRE = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: avx2 fma avx512f avx512_bf16 amx_tile amx_bf16 amx_int8
"""
GRAVITON = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp bf16
"""


def _info(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return cpu_info.__wrapped__(str(path))


def test_avx2_cpu_emulates_bf16(tmp_path: Path) -> None:
    cpu = _info(tmp_path, EPYC)
    assert cpu.model == "AMD EPYC 7B13"
    assert cpu.vector_isa == "AVX2" and not cpu.native_bf16
    assert "bf16 emulated" in cpu.describe()


def test_amx_cpu_has_native_bf16(tmp_path: Path) -> None:
    cpu = _info(tmp_path, SAPPHIRE)
    assert cpu.native_bf16 and cpu.vector_isa == "AMX"
    tags = hardware_tags("cpu", "bf16", cpu=cpu)
    assert tags["hardware.cpu"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert tags["hardware.cpu_flags"].split() == [f for f in REPORTED_FLAGS if f in cpu.flags]
    assert tags["hardware.precision"] == "bf16" and "hardware.gpu" not in tags


def test_arm_cpu_without_model_name(tmp_path: Path) -> None:
    cpu = _info(tmp_path, GRAVITON)
    assert cpu.vector_isa == "NEON" and cpu.native_bf16  # Arm's BF16 extension
    assert not _info(tmp_path, GRAVITON.replace(" bf16", "")).native_bf16
    assert cpu.model  # falls back to the platform's name, never empty


def test_missing_cpuinfo_still_describes(tmp_path: Path) -> None:
    cpu = cpu_info.__wrapped__(str(tmp_path / "nowhere"))
    assert cpu.flags == frozenset() and cpu.cores >= 1 and cpu.model


def test_this_machine_tags_name_the_gpu() -> None:
    tags = hardware_tags("cuda:0", "bf16", gpu="NVIDIA H200")
    assert tags["hardware.gpu"] == "NVIDIA H200" and tags["hardware.device"] == "cuda:0"
    assert tags["hardware.cpu"] == cpu_info().model
