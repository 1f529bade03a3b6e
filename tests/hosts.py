"""Test hosts on one machine: network namespaces on a bridge, each with its own address and sshd, as a cluster.

:func:`network_hosts` makes N hosts and a "login" namespace (horovodrun is launched from there: a host whose
address is local to the launcher would be run as localhost). Every namespace has one veth on the bridge whose
in-namespace end has the same name (:data:`IFACE`), so ``--network-interface dg0`` names an interface that exists
on the launcher and on every host; ``/etc/netns/NS/hosts`` maps every host name (and the machine's ``hostname``,
which Gloo resolves) to the namespace's own address. Each host runs an sshd (generated host key, key login with a
generated client key, on :data:`SSH_PORT`); the login namespace's ``/etc/ssh/ssh_config`` (``/etc/netns/LOGIN/ssh``)
keeps host keys in a temporary ``known_hosts``. Everything (namespaces, links, ``/etc/netns`` entries, processes,
keys) is removed on exit, also when the test fails. The bridge's address (``Hosts.machine``) is this machine as the
hosts see it: a server the test runs there (a tracking server) is reachable from every host. Needs root, iproute2
and openssh-server.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.prereq import require_program, require_root

IFACE = "dg0"
"""The name of every namespace's interface on the bridge."""
SSH_PORT = 2222
"""Every host's sshd port (not 22, so that a launcher must be told: ``--ssh-port``)."""
READY_S = 20.0
"""How long a host's sshd may take to accept a key login."""
NETNS_ETC = Path("/etc/netns")


@dataclass(frozen=True)
class Host:
    name: str
    """The host name the launcher uses (``--hosts NAME:1``)."""
    netns: str
    address: str


@dataclass
class Hosts:
    """N hosts and the login namespace made by :func:`network_hosts`."""

    hosts: list[Host]
    login: Host
    key: Path
    """The client's private key (``--ssh-identity-file``)."""
    links: list[str]
    """The root-namespace ends of the veth pairs (where :meth:`limit` shapes the traffic into each namespace)."""
    bridge: str
    machine: str
    """The bridge's address: this machine (the root namespace) as every host sees it, e.g. a tracking server's."""
    tmp: Path
    sshd_program: str
    sshd: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start_sshd(self, host: Host) -> None:
        """Start ``host``'s sshd (again, after :meth:`kill`) and wait until it takes a key login."""
        with open(self.tmp / f"sshd_{host.name}.log", "ab") as log:
            self.sshd[host.name] = subprocess.Popen(
                ["ip", "netns", "exec", host.netns, self.sshd_program, "-D", "-e", "-f",
                 str(self.tmp / f"sshd_{host.name}.conf")], stdout=log, stderr=log)
        deadline = time.monotonic() + READY_S
        while (out := self.ssh(host, "true")).returncode != 0:
            if time.monotonic() > deadline:
                log_text = (self.tmp / f"sshd_{host.name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"sshd of {host.name} ({host.address}) accepted no key login within {READY_S} s: "
                                   f"{out.stderr.strip()}\nsshd log:\n{log_text}")
            time.sleep(0.2)

    def hosts_arg(self, slots: int = 1) -> str:
        """``--hosts`` for every host with ``slots`` slots, e.g. ``h1a2b3ca:1,h1a2b3cb:1``."""
        return ",".join(f"{h.name}:{slots}" for h in self.hosts)

    def in_login(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run in the login namespace."""
        return ["ip", "netns", "exec", self.login.netns, *argv]

    def ssh(self, host: Host, command: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
        """``ssh HOST COMMAND`` from the login namespace, with the client key."""
        argv = ["ssh", "-p", str(SSH_PORT), "-i", str(self.key), host.name, command]
        return subprocess.run(self.in_login(argv), capture_output=True, text=True, timeout=timeout)

    def pids(self, host: Host) -> list[int]:
        """Every process running in ``host``'s namespace."""
        out = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True, text=True, timeout=10)
        return [int(p) for p in out.stdout.split()]

    def kill(self, host: Host) -> list[int]:
        """The host dies: SIGKILL to every process in its namespace (its sshd and the ranks it runs)."""
        pids = self.pids(host)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def limit(self, rate: str | None) -> None:
        """Limit every link to ``rate`` (``"1gbit"``) with a tbf qdisc, both ways (each direction is shaped where it
        enters a namespace); ``None``: no limit."""
        for link in self.links:
            subprocess.run(["tc", "qdisc", "del", "dev", link, "root"], capture_output=True, timeout=10)
            if rate:
                _run("tc", "qdisc", "add", "dev", link, "root", "tbf", "rate", rate, "burst", "1mb",
                     "latency", "50ms")


def _run(*argv: str) -> None:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}")


@contextlib.contextmanager
def network_hosts(count: int, tmp: Path, rate: str | None = None) -> Iterator[Hosts]:
    """``count`` hosts (plus the login namespace) with names unique to this process; ``rate`` limits the links.
    Skips (fails in CI) without root, iproute2, tc or sshd."""
    require_root()
    for program in ("ip", "tc"):
        require_program(program, "apt-get install iproute2")
    sshd = require_program("/usr/sbin/sshd", "apt-get install openssh-server")
    require_program("ssh-keygen", "apt-get install openssh-client")
    tag = f"{os.getpid() % 100000:05d}{secrets.token_hex(1)}"  # 7 characters: dgb/dgv + tag + index <= 15
    subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}"
    tmp.mkdir(parents=True, exist_ok=True)
    names = [chr(ord("a") + i) for i in range(count)] + ["l"]
    made = [Host(f"h{tag}{n}", f"dg-{tag}-{n}", f"{subnet}.{10 + i}") for i, n in enumerate(names)]
    hosts = Hosts(hosts=made[:-1], login=made[-1], key=tmp / "id_ed25519", links=[f"dgv{tag}{n}" for n in names],
                  bridge=f"dgb{tag}", machine=f"{subnet}.1", tmp=tmp, sshd_program=sshd)
    try:
        _make_network(hosts, made)
        hosts.limit(rate)
        _start_sshds(hosts)
        yield hosts
    finally:
        _clean_up(hosts, made)


def _make_network(hosts: Hosts, made: list[Host]) -> None:
    """The bridge, a veth per namespace (``dg0`` inside), addresses, and each namespace's ``/etc/hosts``."""
    _run("ip", "link", "add", hosts.bridge, "type", "bridge")
    _run("ip", "addr", "add", f"{hosts.machine}/24", "dev", hosts.bridge)
    _run("ip", "link", "set", hosts.bridge, "up")
    lines = ["127.0.0.1 localhost", *(f"{h.address} {h.name}" for h in made)]
    for host, link in zip(made, hosts.links, strict=True):
        _run("ip", "netns", "add", host.netns)
        _run("ip", "link", "add", link, "type", "veth", "peer", "name", IFACE, "netns", host.netns)
        _run("ip", "link", "set", link, "master", hosts.bridge, "up")
        _run("ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", IFACE)
        _run("ip", "-n", host.netns, "link", "set", IFACE, "up")
        _run("ip", "-n", host.netns, "link", "set", "lo", "up")
        etc = NETNS_ETC / host.netns
        etc.mkdir(parents=True)
        # Gloo resolves the machine's hostname: it must be this namespace's address, not 127.0.0.1
        (etc / "hosts").write_text("\n".join([*lines, f"{host.address} {socket.gethostname()}"]) + "\n")
    login_ssh = NETNS_ETC / hosts.login.netns / "ssh"
    login_ssh.mkdir()
    (login_ssh / "ssh_config").write_text(
        "Host *\n"
        f"    UserKnownHostsFile {hosts.tmp / 'known_hosts'}\n"
        "    StrictHostKeyChecking accept-new\n"
        "    BatchMode yes\n"
        "    ConnectTimeout 5\n"
    )


def _start_sshds(hosts: Hosts) -> None:
    """A key pair for the client, and per host a host key and an sshd in its namespace; wait for key logins."""
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hosts.key))
    (hosts.tmp / "authorized_keys").write_text(hosts.key.with_suffix(".pub").read_text())
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    for host in hosts.hosts:
        host_key = hosts.tmp / f"host_{host.name}"
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key))
        (hosts.tmp / f"sshd_{host.name}.conf").write_text(
            f"Port {SSH_PORT}\nListenAddress {host.address}\nHostKey {host_key}\n"
            f"PidFile {hosts.tmp / f'sshd_{host.name}.pid'}\nAuthorizedKeysFile {hosts.tmp / 'authorized_keys'}\n"
            "UsePAM no\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\nPrintMotd no\n"
        )
    for host in hosts.hosts:
        hosts.start_sshd(host)


def _clean_up(hosts: Hosts, made: list[Host]) -> None:
    """Kill every process in the namespaces, delete namespaces, links, the bridge, ``/etc/netns`` entries, keys."""
    for host in made:
        with contextlib.suppress(Exception):
            hosts.kill(host)
    for proc in hosts.sshd.values():
        with contextlib.suppress(Exception):
            proc.kill()
            proc.wait(timeout=10)
    for host in made:
        subprocess.run(["ip", "netns", "del", host.netns], capture_output=True, timeout=30)
        shutil.rmtree(NETNS_ETC / host.netns, ignore_errors=True)
    for link in [*hosts.links, hosts.bridge]:
        subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=30)
    for key in hosts.tmp.glob("*id_ed25519*"):
        key.unlink(missing_ok=True)
    for key in hosts.tmp.glob("host_*"):
        key.unlink(missing_ok=True)
