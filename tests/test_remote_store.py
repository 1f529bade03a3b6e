"""Stores read over the network (issue 16, items 3 and 5e): a real store served by Python's http.server, read through
fsspec by open_dataset, the CLI, training, the latent index and predict; the integrity checks and the chunk cache over
HTTP; a 404, a server that never answers and a closed port fail naming the URL after a bounded wait."""

from __future__ import annotations

import functools
import importlib.util
import socket
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deepgalaxy.core.dataset import open_dataset, verify_store
from deepgalaxy.core.errors import DatasetError
from deepgalaxy.core.location import TIMEOUT_ENV
from tests._data_helpers import copy_store, tiny_store
from tests.runs_support import CARD, TINY, cli, make_dataset, mlflow_runs

pytestmark = pytest.mark.timeout(300)


class _Handler(SimpleHTTPRequestHandler):
    """A static file server that records the paths it was asked for (quietly)."""

    asked: list[str]

    def log_message(self, format: str, *args: Any) -> None:
        self.asked.append(self.path)


class _Server(ThreadingHTTPServer):
    request_queue_size = 64  # http.server's 5 drops connections of concurrent requests: 1 s stalls, slow tests


class Served:
    """A folder served over HTTP on 127.0.0.1 (a free port), with the requests it answered."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.asked: list[str] = []
        handler = type("Handler", (_Handler,), {"asked": self.asked})
        self.server = _Server(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{name}"

    def chunk_requests(self) -> int:
        return sum("/images/c/" in p for p in list(self.asked))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("served")
    tiny_store(root / "tiny.zarr")
    server = Served(root)
    try:
        yield server
    finally:
        server.close()


def _damaged(served: Served, name: str) -> tuple[Path, str]:
    """A served copy of the tiny store, to damage."""
    path = copy_store(served.root / "tiny.zarr", served.root / name)
    return path, served.url(name)


# -- reading ------------------------------------------------------------------------------------------------------


def test_a_store_over_http_reads_what_its_folder_reads(served: Served) -> None:
    local, remote = open_dataset(served.root / "tiny.zarr"), open_dataset(served.url("tiny.zarr"))
    assert str(remote.path) == served.url("tiny.zarr") and remote.path.name == "tiny.zarr"
    assert len(remote) == len(local) == 64 and remote.image_shape == local.image_shape
    every = np.arange(len(local))
    assert np.array_equal(remote.images(every), local.images(every))
    assert np.array_equal(remote.labels, local.labels)
    assert all(np.array_equal(remote.metadata[k], local.metadata[k]) for k in local.metadata)
    names = local.store.property_names
    assert remote.store.property_names == names and names
    ours, theirs = remote.store.properties(names), local.store.properties(names)
    assert all(np.array_equal(ours[k], theirs[k], equal_nan=True) for k in theirs)
    assert remote.fingerprint() == local.fingerprint()
    assert not verify_store(served.url("tiny.zarr")).problems


def test_file_urls_are_local_folders(served: Served) -> None:
    path = served.root / "tiny.zarr"
    ds = open_dataset(path.as_uri())
    assert str(ds.path) == path.as_uri() and np.array_equal(ds.images([5]), open_dataset(path).images([5]))


def test_decoded_chunks_are_cached_over_http(served: Served) -> None:
    """The first epoch streams chunks from the server; the second comes from the in-memory copy, unless the cache
    is off."""
    for cache_bytes, second_epoch_asks in ((1 << 20, False), (0, True)):
        ds = open_dataset(served.url("tiny.zarr"), cache_bytes=cache_bytes)
        before = served.chunk_requests()
        first = list(ds.batches(8, epoch=0))
        streamed = served.chunk_requests()
        assert streamed > before
        second = list(ds.batches(8, epoch=0))
        assert (served.chunk_requests() > streamed) == second_epoch_asks, cache_bytes
        assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, second, strict=True))


# -- damage over the network ----------------------------------------------------------------------------------------


def test_a_missing_chunk_is_named_with_the_url_and_rows(served: Served) -> None:
    path, url = _damaged(served, "missing.zarr")
    (path / "images" / "c" / "2" / "0" / "0" / "0").unlink()
    with pytest.raises(DatasetError) as err:
        open_dataset(url)
    text = str(err.value)
    assert text.startswith(f"{url}: array 'images': 1 chunk file(s) missing: c/2/0/0/0 (indices 16..23)"), text
    assert "repair the store on the machine that serves it" in text
    found = verify_store(url)
    assert [(p.array, p.key, p.rows, p.problem) for p in found.problems] == [("images", "c/2/0/0/0", (16, 23),
                                                                             "missing")]


def test_a_corrupt_chunk_is_named_with_the_url_and_rows(served: Served) -> None:
    path, url = _damaged(served, "corrupt.zarr")
    chunk = path / "images" / "c" / "1" / "0" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    ds = open_dataset(url)  # opening checks that chunks exist; reading decodes them
    assert ds.images([0]).shape == (1, 16, 16, 1)
    with pytest.raises(DatasetError, match=rf"^{url}: array 'images' chunk c/1/0/0/0 \(indices 8\.\.15\) cannot be "
                                           "read"):
        ds.images([9])
    (problem,) = verify_store(url).problems
    assert (problem.key, problem.rows, problem.problem) == ("c/1/0/0/0", (8, 15), "corrupt")


# -- faults: 404, no answer, nobody there ---------------------------------------------------------------------------


def test_a_url_with_no_store_is_refused(served: Served) -> None:
    url = served.url("nothing-here.zarr")
    with pytest.raises(DatasetError, match=rf"^{url}: not a deepgalaxy dataset .*zarr.json.*check the URL"):
        open_dataset(url)


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A server that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/tiny.zarr"
    finally:
        sock.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_server_that_never_answers_fails_after_the_bounded_wait(silent_server: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TIMEOUT_ENV, "1")
    start = time.monotonic()
    with pytest.raises(DatasetError, match=rf"^{silent_server}/zarr.json: the server did not answer within 1 s "
                                           rf"\({TIMEOUT_ENV} sets the wait\)"):
        open_dataset(silent_server)
    assert time.monotonic() - start < 10


def test_nobody_at_the_port_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/tiny.zarr"
    start = time.monotonic()
    with pytest.raises(DatasetError, match=rf"^{url}/zarr.json: cannot reach the server"):
        open_dataset(url)
    assert time.monotonic() - start < 10


def test_a_server_that_goes_away_while_reading_is_named(served: Served, tmp_path: Path) -> None:
    """Opened while the server was up, read after it stopped: the error names the URL and the chunk, not damage."""
    own = Served(copy_store(served.root / "tiny.zarr", tmp_path / "tiny.zarr").parent)
    try:
        ds = open_dataset(own.url("tiny.zarr"), cache_bytes=0)
    finally:
        own.close()
    with pytest.raises(DatasetError, match=rf"^{own.url('tiny.zarr')}/images/c/3/0/0/0: cannot reach the server"):
        ds.images([30])


def test_a_bad_timeout_setting_is_refused(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(DatasetError, match=rf"{TIMEOUT_ENV}='soon': not a number of seconds"):
        open_dataset(served.url("tiny.zarr"))


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed: nothing is missing")
def test_s3_without_s3fs_says_what_to_install() -> None:
    with pytest.raises(DatasetError, match=r"^s3://bucket/sims\.zarr: reading s3:// URLs needs .*pip install s3fs"):
        open_dataset("s3://bucket/sims.zarr")


def test_other_schemes_are_refused() -> None:
    with pytest.raises(DatasetError, match=r"^ftp://host/sims\.zarr: ftp:// URLs are not read"):
        open_dataset("ftp://host/sims.zarr")


# -- the CLI --------------------------------------------------------------------------------------------------------


def test_data_info_and_verify_take_urls_and_fail_cleanly(served: Served, silent_server: str, tmp_path: Path) -> None:
    url = served.url("tiny.zarr")
    info = cli("data", "info", url, cwd=tmp_path)
    assert info.returncode == 0 and url in info.stdout and "64 images" in info.stdout, info.stderr
    verified = cli("data", "verify", url, "--no-progress", cwd=tmp_path)
    assert verified.returncode == 0 and f"{url}: no damage" in verified.stdout, verified.stderr
    for bad, why in ((silent_server, "did not answer within 1 s"), (served.url("gone.zarr"), "not a deepgalaxy"),
                     (f"http://127.0.0.1:{_closed_port()}/x.zarr", "cannot reach the server")):
        start = time.monotonic()
        done = cli("data", "info", bad, cwd=tmp_path, env={TIMEOUT_ENV: "1"})
        assert done.returncode == 2 and done.stderr.startswith(f"error: {bad}") and why in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
        assert time.monotonic() - start < 30
    out = cli("data", "simulate", served.url("new.zarr"), "--sims", "1", cwd=tmp_path)
    assert out.returncode == 2 and "a URL, but OUT is written to a local path" in out.stderr, out.stderr
    assert not (tmp_path / "http:").exists()


@pytest.mark.slow
def test_train_index_and_predict_over_http(served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train a tiny model on a served store, index it and predict its images, all by URL (the index is written in
    the current folder: nothing is written to the server)."""
    make_dataset(served.root / "train32.zarr")
    url = served.url("train32.zarr")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [x for s in [*TINY, "train.max_steps_per_epoch=2"] for x in ("--set", s)]
    done = cli("train", CARD, "--data", url, "--epochs", "1", "--no-progress", "--tracking-uri", uri,
               "--run-dir", str(tmp_path / "run"), *sets, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = mlflow_runs(uri)
    assert f"'path': '{url}'" in run.data.params["data.stores"], run.data.params  # the URL as given, unmangled
    assert run.data.tags["dataset_fingerprint"] == open_dataset(served.root / "train32.zarr").fingerprint()
    assert not list(served.root.glob("train32.zarr.index*"))
    from deepgalaxy.cli import app
    from deepgalaxy.cli.common import run_cli

    monkeypatch.chdir(tmp_path)  # in this process (faster than three more interpreters), run where a user would
    assert run_cli(app, ["latent", "index", CARD, "--data", url, "--tracking-uri", uri, "--no-progress"]) == 0
    assert (tmp_path / "train32.zarr.index" / f"{CARD}-v1").is_dir() and not list(served.root.glob("*.index"))
    out = tmp_path / "pred.csv"
    assert run_cli(app, ["predict", CARD, url, "--out", str(out), "--index", url, "-k", "2", "--tracking-uri", uri,
                         "--no-progress"]) == 0
    rows = out.read_text().splitlines()
    assert len(rows) == 1 + 64 and all(r.startswith(url) for r in rows[1:]), rows[:3]
