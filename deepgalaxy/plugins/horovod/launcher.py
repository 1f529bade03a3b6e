"""The Horovod launcher: runs a worker command as N ranks with ``horovodrun --gloo`` (``--mpi`` with
``DEEPGALAXY_HOROVOD_CONTROLLER=mpi``, for a Horovod built with MPI).

One machine: ``horovodrun -np N -H localhost:N --gloo <argv>``. Several: ``--hosts h1:4,h2:4`` becomes
``-H h1:4,h2:4`` (every host needs the same Python environment and a shared path to the run directory), with the
:class:`~deepgalaxy.core.workers.HostAccess` of ``DEEPGALAXY_*`` (``--network-interfaces``, ``-p``,
``--ssh-identity-file``). When a multi-host job fails, every host is asked for an ssh login: those that do not
answer are named (:class:`~deepgalaxy.core.workers.HostsLostError`), so a dead host is not mistaken for a bug.
Each rank gets ``cores / ranks on the busiest machine`` threads so that N workers do not oversubscribe the CPU.
``horovodrun`` is killed when the process that launched it dies (even by ``kill -9``); its per-rank middlemen then
terminate the ranks (Horovod watches its own parent that way), and each rank also watches its parent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from deepgalaxy.core.errors import DeepGalaxyError, FrameworkUnavailableError
from deepgalaxy.core.interfaces import Collective, FrameworkInfo
from deepgalaxy.core.lifetime import tied_to_parent
from deepgalaxy.core.workers import (
    HostAccess,
    HostsLostError,
    capped_thread_env,
    host_access,
    parse_hosts,
    threads_per_worker,
)

INSTALL_HINT = "build it with scripts/build_horovod.sh (Horovod 0.28.1 is source-only; see the README)"
CONTROLLER_ENV = "DEEPGALAXY_HOROVOD_CONTROLLER"
"""``gloo`` (default: works with the Gloo-only build of scripts/build_horovod.sh) or ``mpi`` (``horovodrun --mpi``,
for a Horovod built with MPI, e.g. on a cluster whose MPI knows its interconnect)."""
CONTROLLERS = ("gloo", "mpi")
PROBE_TIMEOUT_S = 5
"""How long the ssh login that checks a host after a failed job may take to connect."""


def thread_env(local_workers: int) -> dict[str, str]:
    """Environment variables that cap each of ``local_workers`` ranks' thread pools at its share of the cores."""
    return capped_thread_env(threads_per_worker(local_workers))


def find_horovodrun() -> str:
    """The ``horovodrun`` next to this interpreter (the venv's), else on PATH."""
    local = Path(sys.executable).parent / "horovodrun"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("horovodrun")
    if not found:
        raise FrameworkUnavailableError(f"horovodrun was not found next to {sys.executable} or on PATH; {INSTALL_HINT}")
    return found


def controller(environ: Mapping[str, str]) -> str:
    """The controller in ``DEEPGALAXY_HOROVOD_CONTROLLER`` (default ``gloo``), checked."""
    name = environ.get(CONTROLLER_ENV, "").strip().lower() or "gloo"
    if name not in CONTROLLERS:
        raise DeepGalaxyError(f"{CONTROLLER_ENV}={name!r}: use gloo (the default) or mpi (a Horovod built with MPI)")
    return name


def horovodrun_command(argv: Sequence[str], workers: int, hosts: str | None,
                       access: HostAccess = HostAccess(), control: str = "gloo") -> list[str]:
    """The full ``horovodrun`` command line for ``workers`` ranks on ``hosts`` (default: this machine), reaching
    them as ``access`` says, with the ``control`` controller (``gloo`` or ``mpi``)."""
    return [find_horovodrun(), "-np", str(workers), "-H", host_slots(workers, hosts), f"--{control}",
            *access_args(access), *argv]


def host_slots(workers: int, hosts: str | None) -> str:
    """``-H`` for ``workers`` ranks: ``localhost:N`` without ``hosts``, else the first ``workers`` slots of ``hosts``
    in order (horovodrun --gloo starts a rank on every slot it is given, whatever ``-np`` says)."""
    if workers < 1:
        raise DeepGalaxyError(f"--workers must be at least 1, got {workers}")
    if not hosts:
        return f"localhost:{workers}"
    slots = parse_hosts(hosts)
    if workers > sum(slots.values()):
        raise DeepGalaxyError(
            f"--workers {workers} is more than the {sum(slots.values())} slots of --hosts {hosts!r}; "
            "add slots (HOST:SLOTS) or lower --workers"
        )
    used, left = [], workers
    for host, n in slots.items():
        if left > 0:
            used.append(f"{host}:{min(n, left)}")
            left -= n
    return ",".join(used)


def access_args(access: HostAccess) -> list[str]:
    """``horovodrun`` options for ``access``."""
    args = ["--network-interfaces", ",".join(access.network_interfaces)] if access.network_interfaces else []
    if access.ssh_port is not None:
        args += ["-p", str(access.ssh_port)]
    if access.ssh_identity_file is not None:
        args += ["--ssh-identity-file", access.ssh_identity_file]
    return args


def ssh_probe(host: str, access: HostAccess) -> list[str]:
    """The command line of a non-interactive ssh login to ``host`` that runs ``true``."""
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={PROBE_TIMEOUT_S}"]
    if access.ssh_port is not None:
        cmd += ["-p", str(access.ssh_port)]
    if access.ssh_identity_file is not None:
        cmd += ["-i", access.ssh_identity_file]
    return [*cmd, host, "true"]


def unreachable_hosts(hosts: Sequence[str], access: HostAccess) -> list[str]:
    """The ``hosts`` that accept no ssh login now (asked at once, each within about ``2 * PROBE_TIMEOUT_S``)."""

    def answers(host: str) -> bool:
        try:
            return subprocess.run(ssh_probe(host, access), capture_output=True,
                                  timeout=2 * PROBE_TIMEOUT_S).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    with ThreadPoolExecutor(max_workers=min(16, len(hosts)) or 1) as pool:
        alive = list(pool.map(answers, hosts))
    return [h for h, ok in zip(hosts, alive, strict=True) if not ok]


class HorovodLauncher:
    """Runs the worker command as ``workers`` Horovod ranks (Gloo controller, no MPI needed)."""

    name = "horovod"

    def launch(self, argv: Sequence[str], workers: int, hosts: str | None, env: Mapping[str, str]) -> int:
        """Run the ranks; a failed multi-host job whose hosts do not all answer raises :class:`HostsLostError`."""
        full_env = {**os.environ, **thread_env(self.ranks_per_machine(workers, hosts)), **env}
        access = host_access(full_env)
        cmd = horovodrun_command(argv, workers, hosts, access, controller(full_env))
        code = subprocess.call(tied_to_parent(cmd), env=full_env)
        if code != 0 and hosts:
            lost = unreachable_hosts(list(parse_hosts(host_slots(workers, hosts))), access)
            if lost:
                raise HostsLostError(lost, code)
        return code

    def ranks_per_machine(self, workers: int, hosts: str | None) -> int:
        """Every rank on this machine without ``hosts``; else the busiest host's slots (ranks fill slots)."""
        return min(workers, max(parse_hosts(hosts).values())) if hosts else workers

    def collective(self, framework: FrameworkInfo) -> Collective:
        from deepgalaxy.plugins.horovod.worker import collective

        return collective(framework)
