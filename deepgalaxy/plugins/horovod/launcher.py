"""The Horovod launcher: runs a worker command as N ranks with ``horovodrun --gloo``.

One machine: ``horovodrun -np N -H localhost:N --gloo <argv>``. Several: ``--hosts h1:4,h2:4`` becomes
``-H h1:4,h2:4`` (every host needs the same Python environment and a shared path to the run directory).
Each local rank gets ``cores / local ranks`` threads so that N workers do not oversubscribe the CPU.
``horovodrun`` is killed when the process that launched it dies (even by ``kill -9``); its per-rank middlemen then
terminate the ranks (Horovod watches its own parent that way), and each rank also watches its parent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from deepgalaxy.core.errors import DeepGalaxyError, FrameworkUnavailableError
from deepgalaxy.core.lifetime import tied_to_parent

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS")
INSTALL_HINT = "build it with scripts/build_horovod.sh (Horovod 0.28.1 is source-only; see the README)"


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


def threads_per_worker(local_workers: int, cores: int | None = None) -> int:
    """CPU threads each of ``local_workers`` ranks on this machine may use (at least 1)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, int(cores) // max(1, local_workers))


def thread_env(local_workers: int) -> dict[str, str]:
    """Environment variables that cap each rank's thread pools (torch/OpenMP, MKL, OpenBLAS, TensorFlow)."""
    n = str(threads_per_worker(local_workers))
    return {**{k: n for k in THREAD_ENV}, "TF_NUM_INTEROP_THREADS": "1"}


def find_horovodrun() -> str:
    """The ``horovodrun`` next to this interpreter (the venv's), else on PATH."""
    local = Path(sys.executable).parent / "horovodrun"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("horovodrun")
    if not found:
        raise FrameworkUnavailableError(f"horovodrun was not found next to {sys.executable} or on PATH; {INSTALL_HINT}")
    return found


def horovodrun_command(argv: Sequence[str], workers: int, hosts: str | None) -> list[str]:
    """The full ``horovodrun`` command line for ``workers`` ranks on ``hosts`` (default: this machine)."""
    if workers < 1:
        raise DeepGalaxyError(f"--workers must be at least 1, got {workers}")
    if hosts:
        slots = parse_hosts(hosts)
        if workers > sum(slots.values()):
            raise DeepGalaxyError(
                f"--workers {workers} is more than the {sum(slots.values())} slots of --hosts {hosts!r}; "
                "add slots (HOST:SLOTS) or lower --workers"
            )
        host_arg = ",".join(f"{h}:{n}" for h, n in slots.items())
    else:
        host_arg = f"localhost:{workers}"
    return [find_horovodrun(), "-np", str(workers), "-H", host_arg, "--gloo", *argv]


class HorovodLauncher:
    """Runs the worker command as ``workers`` Horovod ranks (Gloo controller, no MPI needed)."""

    name = "horovod"

    def launch(self, argv: Sequence[str], workers: int, hosts: str | None, env: Mapping[str, str]) -> int:
        cmd = horovodrun_command(argv, workers, hosts)
        local = parse_hosts(hosts).get("localhost", 0) if hosts else workers
        full_env = {**os.environ, **thread_env(local or workers), **env}
        return subprocess.call(tied_to_parent(cmd), env=full_env)
