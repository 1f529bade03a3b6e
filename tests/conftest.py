"""Shared fixtures: run the real CLI in a subprocess, install plugin packages into a temporary target."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Tests run two xdist workers on two cores: OpenMP threads that spin while preempted slow torch steps ~8x
# (measured: 7 s vs 0.9 s per classifier-simple step). Must be set before torch is imported; children inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# One TensorFlow thread pool thread each, for the same reason: two workers on two cores, tiny graphs dominated by op
# dispatch (measured on a Keras EfficientNet-B7 at 32 px: weights read 0.6 -> 0.2 s, inference 1.3 -> 0.8 s).
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
# The torch plugin keeps its measured speed-up decisions in the user's cache folder: tests (and the processes they
# start) keep theirs in a folder of their own, so a test run never writes to ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="deepgalaxy-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``deepgalaxy ARGS`` as a user would, in a fresh interpreter (so plugin loading starts clean)."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "deepgalaxy", *args], capture_output=True, text=True, env=full_env,
        cwd=cwd, timeout=timeout,
    )


@pytest.fixture
def install_package(tmp_path: Path) -> Callable[[Path], dict[str, str]]:
    """pip-install a package directory into a private target; return the env that puts it on sys.path."""

    def install(package_dir: Path) -> dict[str, str]:
        target = tmp_path / "site"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
             "--target", str(target), str(package_dir)],
            check=True, capture_output=True, text=True,
        )
        return {"PYTHONPATH": os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH", "")) if p)}

    return install


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread for a module: tiny tensors gain nothing from more, and on a busy machine OpenMP
    barriers stall (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
