"""How worker processes share machines, the same for every launcher: the ``--hosts`` list (``h1:4,h2:4``), how the
launcher reaches those hosts (:class:`HostAccess`: network interface, ssh port and key), the CPU threads each worker
on a machine may use, and the environment variables that cap the thread pools of every framework (so N workers on
one machine never oversubscribe its cores)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from deepgalaxy.core.errors import DeepGalaxyError, TrainingError

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


THREADS_ENV = "DEEPGALAXY_THREADS"
"""Threads per worker, overriding physical cores available / workers on the machine."""
CPU_TOPOLOGY = Path("/sys/devices/system/cpu")


def available_cores(topology: Path = CPU_TOPOLOGY) -> int:
    """Physical CPU cores this process may run on (``sched_getaffinity``; hyper-threads of one core count once, as
    torch's own default does: two compute threads on one core share its vector units). Where the topology cannot be
    read, the logical CPUs."""
    if not hasattr(os, "sched_getaffinity"):
        return os.cpu_count() or 1
    cpus = os.sched_getaffinity(0)
    try:
        cores = {((topology / f"cpu{c}" / "topology" / "physical_package_id").read_text().strip(),
                  (topology / f"cpu{c}" / "topology" / "core_id").read_text().strip()) for c in cpus}
    except OSError:
        return len(cpus)
    return max(1, len(cores))


def threads_per_worker(local_workers: int, cores: int | None = None) -> int:
    """CPU threads each of ``local_workers`` ranks on this machine may use (at least 1): ``DEEPGALAXY_THREADS`` if
    set, else the physical cores available divided among the ranks."""
    override = os.environ.get(THREADS_ENV, "").strip()
    if override:
        if not override.isdigit() or int(override) < 1:
            raise DeepGalaxyError(f"{THREADS_ENV}={override!r}: give the threads per worker as a whole number >= 1")
        return int(override)
    if cores is None:
        cores = available_cores()
    return max(1, int(cores) // max(1, local_workers))


def capped_thread_env(threads: int) -> dict[str, str]:
    """Environment variables that cap a worker's thread pools at ``threads`` (torch/OpenMP, MKL, OpenBLAS,
    TensorFlow intra-op; TensorFlow inter-op at 1)."""
    n = str(threads)
    return {**{k: n for k in THREAD_ENV}, "TF_NUM_INTEROP_THREADS": "1"}


NETWORK_INTERFACE_ENV = "DEEPGALAXY_NETWORK_INTERFACE"
SSH_PORT_ENV = "DEEPGALAXY_SSH_PORT"
SSH_IDENTITY_FILE_ENV = "DEEPGALAXY_SSH_IDENTITY_FILE"
"""How a launcher reaches the hosts of ``--hosts``, for every launcher and every command that launches (train,
tune, scale): the CLI's ``--network-interface``, ``--ssh-port`` and ``--ssh-identity-file`` set these."""


@dataclass(frozen=True)
class HostAccess:
    """How to reach the hosts: the network interfaces the ranks talk over (present on the launcher and on every
    host), and the ssh port and private key of the logins that start them (None: ssh's own defaults)."""

    network_interfaces: tuple[str, ...] = ()
    ssh_port: int | None = None
    ssh_identity_file: str | None = None


def host_access(environ: Mapping[str, str]) -> HostAccess:
    """The :class:`HostAccess` in ``environ``'s ``DEEPGALAXY_*`` variables, checked (a clear error naming the bad
    value otherwise)."""
    nics = tuple(n.strip() for n in environ.get(NETWORK_INTERFACE_ENV, "").split(",") if n.strip())
    port_text = environ.get(SSH_PORT_ENV, "").strip()
    port = None
    if port_text:
        port = int(port_text) if port_text.isdigit() else 0
        if not 1 <= port <= 65535:
            raise DeepGalaxyError(f"--ssh-port ({SSH_PORT_ENV}) {port_text!r} is not a port number (1-65535)")
    key = environ.get(SSH_IDENTITY_FILE_ENV, "").strip() or None
    if key is not None:
        key = str(Path(key).expanduser().resolve())
        if not os.path.isfile(key):
            raise DeepGalaxyError(f"--ssh-identity-file ({SSH_IDENTITY_FILE_ENV}) {key}: no such file; give the "
                                  "private key that logs in to every host (ssh -i)")
    return HostAccess(nics, port, key)


class HostsLostError(TrainingError):
    """Hosts that stopped answering while a multi-host job ran (the job stopped because of them)."""

    def __init__(self, hosts: list[str], code: int) -> None:
        super().__init__(f"host {', '.join(hosts)} stopped answering (no ssh login) while the job ran; "
                         f"the job stopped (exit code {code})")
        self.hosts, self.code = hosts, code
