"""One MLflow tracking server for every host (``deepgalaxy server``): ``mlflow server`` on a PostgreSQL (or any
SQLAlchemy) backend store with its artifact proxy, started only after the database answered, and ready when its
``/health`` answers.

What this adds to a bare ``mlflow server`` command line: a ``postgresql://`` URI names the psycopg2 driver (SQLAlchemy
2.1 would look for psycopg 3); an unreachable database, a wrong password or a missing driver is one clear error
before the server starts (MLflow would print a traceback per worker); MLflow's job runner is off and the workers
few (its defaults start ~15 processes); the machine's own name is an allowed ``Host`` header (MLflow's default
allows only local and private addresses), so ``MLFLOW_TRACKING_URI=http://<this host>:PORT`` works on every host.
Artifacts go through the server (``mlflow-artifacts:/``): hosts need no shared filesystem.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from deepgalaxy.core.errors import DeepGalaxyError

SERVER_EXTRA = "pip install 'deepgalaxy[server]'"
"""How a user installs the PostgreSQL driver (psycopg2) with deepgalaxy."""
DRIVERS = {"postgresql": "psycopg2", "postgresql+psycopg2": "psycopg2"}
"""SQLAlchemy dialects of the backend URI -> the Python module they need."""
CONNECT_TIMEOUT_S = 10
STOP_TIMEOUT_S = 15.0
JOB_EXECUTION_ENV = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"
"""Off: MLflow's GenAI job runner adds a dozen processes and ~2.5 GB that model development does not use."""


def hide_password(uri: str) -> str:
    """``uri`` with its password shown as ``***`` (for messages and logs)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return str(make_url(uri).render_as_string(hide_password=True))
    except (ArgumentError, ValueError):
        return uri


def backend_store_uri(uri: str) -> str:
    """The backend URI MLflow is given: ``postgresql://`` names the psycopg2 driver; a driver that is not installed
    is an error that says how to install it."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise DeepGalaxyError(f"--backend-store-uri {uri!r} is not a database URI; give e.g. "
                              "postgresql://USER:PASSWORD@HOST:5432/DATABASE or sqlite:///mlflow.db")
    if scheme == "postgresql":
        scheme = "postgresql+psycopg2"
    module = DRIVERS.get(scheme)
    if module is not None:
        import importlib.util

        if importlib.util.find_spec(module) is None:
            raise DeepGalaxyError(f"--backend-store-uri {hide_password(uri)}: the PostgreSQL driver {module} is not "
                                  f"installed; install it with: {SERVER_EXTRA}")
    return f"{scheme}://{rest}"


def check_backend(uri: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Connect to the backend store once: an unreachable server, a wrong password or a missing database is an error
    naming the URI (password hidden) and what the database said, before any server process starts."""
    import sqlalchemy
    from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

    shown = hide_password(uri)
    connect_args = {"connect_timeout": int(max(1, timeout_s))} if uri.startswith("postgresql") else {}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=connect_args)
    except (ArgumentError, NoSuchModuleError, ImportError) as exc:
        raise DeepGalaxyError(f"--backend-store-uri {shown} cannot be used: {_first_line(exc)}") from None
    try:
        with engine.connect():
            pass
    except DBAPIError as exc:
        raise DeepGalaxyError(
            f"the backend store {shown} cannot be reached: {_first_line(exc.orig or exc)}; check the host, port, "
            "user, password and database in --backend-store-uri (and that PostgreSQL is running and accepts "
            "password logins from this host: listen_addresses, pg_hba.conf)"
        ) from None
    finally:
        engine.dispose()


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def tracking_uri_of(host: str, port: int) -> str:
    """The URI users set (``MLFLOW_TRACKING_URI`` / ``--tracking-uri``): a server listening on every address is
    reached by this machine's name."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    return f"http://{host}:{port}"


def allowed_hosts(host: str, port: int) -> str:
    """The ``Host`` headers the server accepts: MLflow's default (local and private addresses) plus ``host`` and
    this machine's names, so the URI :func:`tracking_uri_of` prints works from every host."""
    from mlflow.server.security_utils import get_default_allowed_hosts

    names = {host, socket.gethostname(), socket.getfqdn()} - {"", "0.0.0.0", "::"}
    return ",".join([*get_default_allowed_hosts(), *sorted(f"{n}{suffix}" for n in names for suffix in ("", ":*"))])


def check_port_free(host: str, port: int) -> None:
    """Refuse a port something already listens on, naming it (mlflow would fail later, in one of its workers)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise DeepGalaxyError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); "
                                  "choose another --port, or stop what is using it") from None


@dataclass
class ServerSpec:
    """What ``deepgalaxy server`` runs: the stores, the address, the number of web workers."""

    backend_store_uri: str
    artifacts_destination: str
    host: str = "127.0.0.1"
    port: int = 5000
    workers: int = 2

    def command(self) -> list[str]:
        """The ``mlflow server`` command line (this interpreter's MLflow)."""
        return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_store_uri,
                "--artifacts-destination", self.artifacts_destination, "--serve-artifacts", "--host", self.host,
                "--port", str(self.port), "--workers", str(self.workers),
                "--allowed-hosts", allowed_hosts(self.host, self.port)]

    @property
    def tracking_uri(self) -> str:
        return tracking_uri_of(self.host, self.port)

    @property
    def local_uri(self) -> str:
        """Where this machine reaches the server (a wildcard address through the loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(self.host, self.host)
        return f"http://{host}:{self.port}"


def artifacts_destination(where: str) -> str:
    """A local folder as an absolute path (the server may run elsewhere than the shell); a URI (``s3://...``) as
    it is."""
    return where if "://" in where else str(Path(where).expanduser().resolve())


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Poll ``url/health`` until it answers 200; an error when the server exits or ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        code = process.poll()
        if code is not None:
            raise DeepGalaxyError(f"mlflow server exited with code {code} before it answered at {url} "
                                  "(its messages are above)")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise DeepGalaxyError(f"mlflow server did not answer at {url}/health within {timeout_s:g} s; "
                                  "give it longer with --wait SECONDS (a new database takes ~15 s to migrate)")
        time.sleep(0.25)


@contextlib.contextmanager
def running_server(spec: ServerSpec, wait_s: float, stdout: int | None = None,
                   stderr: int | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``mlflow server`` for ``spec``, checked first (driver, database, port), answering ``/health`` inside the
    block; stopped (its whole process group) when the block ends, however it ends."""
    spec.backend_store_uri = backend_store_uri(spec.backend_store_uri)
    check_backend(spec.backend_store_uri)
    check_port_free(spec.host, spec.port)
    if "://" not in spec.artifacts_destination:
        Path(spec.artifacts_destination).mkdir(parents=True, exist_ok=True)
    from deepgalaxy.core.lifetime import tied_to_parent

    env = {**os.environ, JOB_EXECUTION_ENV: "false"}
    process = subprocess.Popen(tied_to_parent(spec.command()), env=env, stdout=stdout, stderr=stderr,
                               start_new_session=True)
    try:
        wait_healthy(spec.local_uri, process, wait_s)
        yield process
    finally:
        stop_group(process)


def stop_group(process: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM to the server's process group, SIGKILL to what is left after ``timeout_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):  # workers left behind by the main process
            os.killpg(process.pid, signal.SIGKILL)
        return
