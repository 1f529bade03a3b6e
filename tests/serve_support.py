"""``deepgalaxy serve`` started for real for the tests: a tiny trained model, registered, over its tiny store.

:func:`served` trains version 1 of a tiny full-simple (:func:`tests.runs_support.train_tiny`), starts
``deepgalaxy serve`` on a free port of 127.0.0.1 in a subprocess, waits (bounded) for its ready line and stops it
afterwards: the API tests, the browser test and the load test all talk to it over HTTP.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.runs_support import train_tiny

READY = re.compile(r"^serving (?P<model>\S+) v(?P<version>\d+) at (?P<url>http://\S+)$")
"""The line ``deepgalaxy serve`` prints on stdout once it accepts connections."""
START_TIMEOUT = 180.0
"""Seconds to wait for the ready line (loading torch and the model, indexing the store on a busy machine)."""


def write_store_png(data: Path, row: int, out: Path) -> Path:
    """Row ``row`` of the store ``data`` as a PNG file (a simulated image to upload)."""
    from PIL import Image

    from deepgalaxy.core.dataset import open_dataset

    image = open_dataset(data).images([row])[0]
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(out)
    return out


@contextmanager
def served(tmp_path_factory: pytest.TempPathFactory, *args: str,
           timeout: float = START_TIMEOUT) -> Iterator[tuple[str, dict[str, Any]]]:
    """``deepgalaxy serve`` on a tiny registered model: yields (base URL, info) with info ``model``, ``version``,
    ``run_id``, ``tracking_uri``, ``data`` (the store), ``image`` (a PNG of store row 0), ``rows`` (store rows),
    ``log`` (the server's stderr file) and ``process``; ``args`` are extra options of ``deepgalaxy serve``."""
    root = tmp_path_factory.mktemp("serve")
    result, data, uri = train_tiny(root, steps=3)
    from deepgalaxy.core.dataset import open_dataset

    rows = len(open_dataset(data))
    info: dict[str, Any] = {"model": result.model_name, "version": result.model_version, "run_id": result.run_id,
                            "tracking_uri": uri, "data": data, "rows": rows, "log": root / "serve.log",
                            "image": write_store_png(data, 0, root / "row0.png")}
    command = [sys.executable, "-m", "deepgalaxy", "serve", str(result.model_name), "--data", str(data),
               "--tracking-uri", uri, "--host", "127.0.0.1", "--port", "0", "--no-progress", *args]
    with info["log"].open("w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=root,
                                   env={**os.environ, "COLUMNS": "200"})
        info["process"] = process
        lines: list[str] = []
        ready = threading.Event()

        def read() -> None:  # drains stdout for the server's whole life
            assert process.stdout is not None
            for line in process.stdout:
                lines.append(line.rstrip("\n"))
                if READY.match(lines[-1]):
                    ready.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + timeout
            while not ready.wait(0.2):
                if process.poll() is not None or time.monotonic() > deadline:
                    why = f"exited with code {process.returncode}" if process.poll() is not None else "timed out"
                    pytest.fail(f"deepgalaxy serve {why} before its ready line; stdout: {lines}; stderr:\n"
                                f"{info['log'].read_text()[-3000:]}")
            match = next(m for m in map(READY.match, lines) if m)
            info["ready_line"] = match.group(0)
            yield match["url"], info
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(15)
            reader.join(5)
            info["stdout"] = lines


__all__ = ["READY", "START_TIMEOUT", "served", "write_store_png"]
