"""Run the app of ``deepgalaxy serve`` on uvicorn, on a socket bound first so that a port in use is a clear error
and port 0 (any free port) can be told to the user: :func:`run` calls ``ready(url)`` once the server accepts
connections, and returns when Ctrl-C or SIGTERM stops it (uvicorn's own signal handling)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from deepgalaxy.core.errors import DeepGalaxyError


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (0: any free port); a clear error when that is impossible."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise DeepGalaxyError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port (or "
                              "--host), or stop what uses it") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def run(app: Any, sock: socket.socket, ready: Callable[[str], None]) -> None:
    """Serve ``app`` on ``sock`` until stopped; ``ready(url)`` once it accepts connections."""
    make_server(app, sock, ready).run(sockets=[sock])


def make_server(app: Any, sock: socket.socket, ready: Callable[[str], None]) -> Any:
    """The uvicorn server of ``app`` on ``sock`` (``.run(sockets=[sock])`` serves; ``.should_exit = True`` stops
    it, from any thread), calling ``ready(url)`` once it accepts connections."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if not self.should_exit:
                ready(url_of(sock))

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    return Server(config)


__all__ = ["bind", "make_server", "run", "url_of"]
