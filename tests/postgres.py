"""A throw-away PostgreSQL cluster owned by the test session: ``initdb`` into a temporary directory, a server on a free
port of 127.0.0.1 (password login over TCP, no login over the Unix socket outside the directory), one database and
user per :meth:`Postgres.new_database`, stopped and removed at teardown even when a test fails.

As root the cluster runs as the ``postgres`` system user (PostgreSQL refuses to run as root); as any other user it
runs as that user. Each pytest-xdist worker starts its own (the fixture is session-scoped, a session per worker).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.prereq import require, require_program

PG_BIN_ENV = "DEEPGALAXY_TEST_PG_BIN"
PG_BIN = "/usr/lib/postgresql/15/bin"
INSTALL = "apt-get install postgresql-15, or set DEEPGALAXY_TEST_PG_BIN to the directory holding initdb and pg_ctl"
START_TIMEOUT_S = 60


def free_port() -> int:
    """A TCP port of 127.0.0.1 nobody listens on now (the kernel's pick for port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Postgres:
    """A running cluster: its directory (data and socket), port, and the superuser it runs as."""

    directory: Path
    port: int
    os_user: str
    bin_dir: Path
    host: str = "127.0.0.1"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` as the superuser over the cluster's own Unix socket; its output."""
        out = self._run([str(self.bin_dir / "psql"), "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-h",
                         str(self.directory), "-p", str(self.port), "-d", database, "-c", sql], timeout=30)
        return out.stdout

    def new_database(self, prefix: str = "dg") -> tuple[str, str, str]:
        """A new database owned by a new user with a random password: (database, user, password)."""
        name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
        password = secrets.token_hex(8)
        self.psql(f"CREATE USER {name} WITH PASSWORD '{password}'")
        self.psql(f"CREATE DATABASE {name} OWNER {name}")
        return name, name, password

    def uri(self, database: str, user: str, password: str, driver: str = "postgresql+psycopg2") -> str:
        """The SQLAlchemy URI of ``database`` over TCP."""
        return f"{driver}://{user}:{password}@{self.host}:{self.port}/{database}"

    def _run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        kwargs = {} if self.os_user == pwd.getpwuid(os.geteuid()).pw_name else {"user": self.os_user}
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=self.directory,
                             env={**os.environ, "PGTZ": "UTC"}, **kwargs)  # type: ignore[call-overload]
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:1])} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
        return out


def _os_user() -> str:
    """Who runs the cluster: ``postgres`` as root (required), else the current user."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        require(False, "running as root needs a 'postgres' system user to run PostgreSQL (apt-get install "
                       "postgresql-15 makes one)")
    return "postgres"


@contextlib.contextmanager
def running_postgres() -> Iterator[Postgres]:
    """Start a cluster in a new temporary directory; stop it and remove the directory when the block ends."""
    import importlib.util

    require(importlib.util.find_spec("psycopg2") is not None,
            "the PostgreSQL driver psycopg2 is not installed (pip install 'deepgalaxy[server]')")
    bin_dir = Path(os.environ.get(PG_BIN_ENV) or PG_BIN)
    initdb = require_program(str(bin_dir / "initdb"), INSTALL)
    bin_dir = Path(initdb).parent
    user = _os_user()
    # not under pytest's tmp_path: its parents are private to root, and postgres must reach its directory
    directory = Path(tempfile.mkdtemp(prefix="dg-pg-"))
    account = pwd.getpwnam(user)
    os.chown(directory, account.pw_uid, account.pw_gid)
    os.chmod(directory, 0o700)
    cluster = Postgres(directory, 0, user, bin_dir)
    started = False
    try:
        cluster._run([initdb, "-D", str(directory / "data"), "-U", "postgres", "--auth-local=trust",
                      "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8", "--locale=C"], timeout=120)
        for _attempt in range(3):  # another process may take the free port between the pick and the start
            cluster.port = free_port()
            options = f"-p {cluster.port} -k {directory} -c listen_addresses=127.0.0.1 -c fsync=off"
            try:
                cluster._run([str(bin_dir / "pg_ctl"), "-D", str(directory / "data"), "-o", options, "-l",
                              str(directory / "server.log"), "-w", "-t", str(START_TIMEOUT_S), "start"],
                             timeout=START_TIMEOUT_S + 10)
                started = True
                break
            except RuntimeError:
                time.sleep(0.2)
        if not started:
            log = (directory / "server.log").read_text(errors="replace")[-2000:] if (
                directory / "server.log").is_file() else ""
            raise RuntimeError(f"PostgreSQL did not start in {directory}: {log}")
        yield cluster
    finally:
        if started or (directory / "data" / "postmaster.pid").exists():
            _stop(cluster)
        shutil.rmtree(directory, ignore_errors=True)


def _stop(cluster: Postgres) -> None:
    """``pg_ctl stop -m immediate``; if that fails, SIGKILL the postmaster named in its pid file."""
    try:
        cluster._run([str(cluster.bin_dir / "pg_ctl"), "-D", str(cluster.directory / "data"), "-m", "immediate",
                      "-w", "-t", "30", "stop"], timeout=40)
        return
    except (RuntimeError, subprocess.TimeoutExpired):
        pass
    pid_file = cluster.directory / "data" / "postmaster.pid"
    with contextlib.suppress(OSError, ValueError, IndexError):
        os.kill(int(pid_file.read_text().split()[0]), 9)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL cluster of this test session (of this xdist worker); tests make their own databases in it."""
    with running_postgres() as cluster:
        yield cluster


# --- the tracking server on it -------------------------------------------------------------------------------------


SERVER_START_TIMEOUT_S = 180.0
"""``mlflow server`` migrates a new database first: ~15 s, longer on a busy 2-core machine."""


class Server:
    """``deepgalaxy server`` as a user runs it, on one database and port; stopped and started again at will."""

    def __init__(self, backend: str, artifacts: Path, log: Path, host: str = "127.0.0.1") -> None:
        self.backend, self.artifacts, self.log, self.host = backend, artifacts, log, host
        self.port = free_port()
        self.uri = f"http://{host}:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "deepgalaxy", "server", "--backend-store-uri", self.backend,
                 "--artifacts-destination", str(self.artifacts), "--host", self.host, "--port", str(self.port),
                 "--workers", "1"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while "MLflow tracking server ready at" not in self.log.read_text(errors="replace")[offset:]:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"deepgalaxy server did not start: {self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        """SIGTERM (the wrapper stops mlflow's processes), SIGKILL after 30 s."""
        if self.process is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=30)
                break
            except subprocess.TimeoutExpired:
                continue
        self.process = None


@contextlib.contextmanager
def running_server(cluster: Postgres, root: Path, host: str = "127.0.0.1") -> Iterator[Server]:
    """``deepgalaxy server`` on a new database of ``cluster``, listening on ``host``, stopped when the block ends."""
    database, user, password = cluster.new_database()
    root.mkdir(parents=True, exist_ok=True)
    server = Server(cluster.uri(database, user, password, driver="postgresql"), root / "artifacts",
                    root / "server.log", host)
    try:
        server.start()
        yield server
    finally:
        server.stop()
