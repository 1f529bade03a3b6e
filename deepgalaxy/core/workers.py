"""How worker processes share machines, the same for every launcher: the ``--hosts`` list (``h1:4,h2:4``), the
CPU threads each worker on a machine may use, and the environment variables that cap the thread pools of every
framework (so N workers on one machine never oversubscribe its cores)."""

from __future__ import annotations

import os

from deepgalaxy.core.errors import DeepGalaxyError

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS")


def parse_hosts(hosts: str) -> dict[str, int]:
    """``"h1:4,h2:4"`` -> ``{"h1": 4, "h2": 4}``; a host without ``:slots`` has one slot."""
    out: dict[str, int] = {}
    for item in hosts.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, slots = item.partition(":")
        try:
            n = int(slots) if slots else 1
        except ValueError:
            n = 0
        if not name or n < 1:
            raise DeepGalaxyError(f"--hosts {hosts!r}: {item!r} is not HOST:SLOTS with SLOTS >= 1 (e.g. 'h1:4,h2:4')")
        out[name] = out.get(name, 0) + n
    if not out:
        raise DeepGalaxyError(f"--hosts {hosts!r} names no host; use e.g. 'h1:4,h2:4'")
    return out


def available_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_worker(local_workers: int, cores: int | None = None) -> int:
    """CPU threads each of ``local_workers`` ranks on this machine may use (at least 1)."""
    if cores is None:
        cores = available_cores()
    return max(1, int(cores) // max(1, local_workers))


def capped_thread_env(threads: int) -> dict[str, str]:
    """Environment variables that cap a worker's thread pools at ``threads`` (torch/OpenMP, MKL, OpenBLAS,
    TensorFlow intra-op; TensorFlow inter-op at 1)."""
    n = str(threads)
    return {**{k: n for k in THREAD_ENV}, "TF_NUM_INTEROP_THREADS": "1"}
