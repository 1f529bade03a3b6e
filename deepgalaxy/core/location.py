"""Where a store is read from: a local folder, or a URL (``http://``, ``https://``, ``s3://``, ``file://``).

A :class:`StoreLocation` answers the questions the store checks ask (is this file there?) and gives zarr its store,
the same way for a folder and for a URL, so every check of :mod:`deepgalaxy.core.store` holds over the network
too. A ``file://`` URL is a local folder; the others are read through fsspec (imported only for them; ``s3://``
needs s3fs). A server that does not answer fails after a bounded wait, :data:`TIMEOUT_ENV` seconds (default
:data:`DEFAULT_TIMEOUT_S`) without a byte, with a :class:`DatasetError` naming the URL. Stores are written only to
local paths: :func:`local_output` refuses a URL where an output is expected.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from deepgalaxy.core.errors import DatasetError
from deepgalaxy.core.settings import seconds_from_env

TIMEOUT_ENV = "DEEPGALAXY_DATA_TIMEOUT"
DEFAULT_TIMEOUT_S = 15.0
"""Seconds a dataset server may stay silent (to connect, or between bytes) before reading it fails."""
SCHEMES = ("http", "https", "s3", "file")
PROBES = 4
"""Concurrent requests when checking that a remote store's chunk files exist."""
_NETWORK_MODULES = ("aiohttp", "botocore", "aiobotocore", "s3fs")


def is_url(where: str | os.PathLike[str]) -> bool:
    """Whether ``where`` is a URL (``scheme://...``) rather than a path."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", os.fspath(where)) is not None


def local_output(where: str | os.PathLike[str], what: str) -> Path:
    """``where`` as the local path of an output; a URL is refused (stores are read from URLs, written locally)."""
    if is_url(where):
        raise DatasetError(f"{what} {os.fspath(where)}: a URL, but {what} is written to a local path; write it "
                           "locally and serve that folder (any static file server, e.g. `python -m http.server`)")
    return Path(where).expanduser()


def data_timeout() -> float:
    """The wait for a silent dataset server: ``$DEEPGALAXY_DATA_TIMEOUT`` seconds, else :data:`DEFAULT_TIMEOUT_S`."""
    return seconds_from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, error=DatasetError)


class StoreLocation:
    """A store's place. ``local``: its folder (a path, or a ``file://`` URL); None for a remote URL (``url``).

    ``str()`` is the store as the user named it (the URL, or the path with ``~`` expanded), for messages.
    """

    def __init__(self, where: str | os.PathLike[str]) -> None:
        text = os.fspath(where)
        self.url: str | None = None
        self.local: Path | None = None
        self._store: Any = None
        if not is_url(text):
            self.local = Path(text).expanduser()
            self.text = str(self.local)
            return
        scheme = text.split("://", 1)[0].lower()
        if scheme not in SCHEMES:
            raise DatasetError(f"{text}: {scheme}:// URLs are not read; give a path or an http://, https://, s3:// "
                               "or file:// URL of the store's folder")
        self.text = text.rstrip("/")
        if scheme == "file":
            self.local = Path(url2pathname(urlparse(self.text).path))
        else:
            self.url = self.text

    @classmethod
    def of(cls, where: str | os.PathLike[str] | StoreLocation) -> StoreLocation:
        """``where`` as a location (a location is returned as it is)."""
        return where if isinstance(where, StoreLocation) else cls(where)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"StoreLocation({self.text!r})"

    @property
    def name(self) -> str:
        """The store's folder name (``sims.zarr``)."""
        return self.text.rstrip("/").rsplit("/", 1)[-1]

    def absolute(self) -> str:
        """The store's absolute path, or its URL: what records of the store (indexes, runs) keep."""
        return str(self.local.resolve()) if self.local is not None and not is_url(self.text) else self.text

    def exists(self) -> bool:
        """Whether a local store's folder exists (a remote one is found through its ``zarr.json``)."""
        return self.local is None or self.local.exists()

    def files_exist(self, keys: Sequence[str]) -> list[bool]:
        """Whether each file ``keys`` (relative to the store, ``images/c/0/0/0/0``) is there.

        Remote files are asked for their first byte, :data:`PROBES` at a time; a server fault raises the
        :class:`DatasetError` of :meth:`fault`.
        """
        if self.local is not None:
            return [(self.local / key).is_file() for key in keys]
        if not keys:
            return []
        from zarr.abc.store import RangeByteRequest
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        store = self.zarr_store()

        async def probe(key: str, gate: asyncio.Semaphore) -> bool:
            async with gate:
                try:
                    return await store.get(key, default_buffer_prototype(), RangeByteRequest(0, 1)) is not None
                except Exception as exc:
                    raise (self.fault(exc, key) or exc) from exc

        async def probe_all() -> list[bool]:
            gate = asyncio.Semaphore(PROBES)
            return list(await asyncio.gather(*(probe(key, gate) for key in keys)))

        result: list[bool] = sync(probe_all())
        return result

    def read_bytes(self, key: str) -> bytes | None:
        """The file ``key`` of the store (``zarr.json``), None when it is not there."""
        if self.local is not None:
            try:
                return (self.local / key).read_bytes()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return None
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        try:
            found = sync(self.zarr_store().get(key, default_buffer_prototype()))
        except Exception as exc:
            raise (self.fault(exc, key) or exc) from exc
        return None if found is None else bytes(found.to_bytes())

    def zarr_store(self) -> Any:
        """What ``zarr.open_group`` reads: the local folder, or a read-only fsspec store of the URL."""
        if self.local is not None:
            return str(self.local)
        if self._store is None:
            from zarr.storage import FsspecStore

            try:
                self._store = FsspecStore.from_url(str(self.url), storage_options=self._storage_options(),
                                                   read_only=True)
            except ImportError as exc:
                raise DatasetError(f"{self}: reading {self.scheme}:// URLs needs a package that is not installed "
                                   f"({exc}); install it: pip install {_PACKAGES.get(self.scheme, 'fsspec')}") from None
        return self._store

    @property
    def scheme(self) -> str:
        """``http``, ``https``, ``s3``, ``file``; empty for a path."""
        return self.text.split("://", 1)[0].lower() if is_url(self.text) else ""

    def _storage_options(self) -> dict[str, Any]:
        """fsspec options bounding every wait for the server by :func:`data_timeout`."""
        timeout = data_timeout()
        if self.scheme in ("http", "https"):
            import aiohttp

            return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout,
                                                                       sock_read=timeout)}}
        if self.scheme == "s3":
            return {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout,
                                      "retries": {"max_attempts": 2}}}
        return {}

    def fault(self, exc: BaseException, key: str) -> DatasetError | None:
        """The error naming the URL for a network fault while reading ``key``; None for anything else (a chunk
        that does not decode, a local store)."""
        if self.local is not None:
            return None
        seen: list[BaseException] = []
        cause: BaseException | None = exc
        while cause is not None and cause not in seen:
            seen.append(cause)
            cause = cause.__cause__ or cause.__context__
        where = f"{self}/{key}"
        for e in seen:
            if isinstance(e, TimeoutError):
                return DatasetError(
                    f"{where}: the server did not answer within {data_timeout():g} s ({TIMEOUT_ENV} sets the wait); "
                    "check that the server is up and the URL names it"
                )
        for e in seen:
            status = getattr(e, "status", None)
            if isinstance(status, int) and status >= 400:
                return DatasetError(f"{where}: the server answered {status} {getattr(e, 'message', '')}".rstrip()
                                    + "; check the URL and that the server serves the store's folder")
            network = type(e).__module__.split(".")[0] in _NETWORK_MODULES
            if network or (isinstance(e, OSError) and not isinstance(e, FileNotFoundError)):
                return DatasetError(f"{where}: cannot reach the server ({type(e).__name__}: {e}); check that it "
                                    "is running and the URL's host and port")
        return None


_PACKAGES = {"s3": "s3fs", "http": "aiohttp", "https": "aiohttp"}


__all__ = ["DEFAULT_TIMEOUT_S", "TIMEOUT_ENV", "StoreLocation", "data_timeout", "is_url", "local_output"]
