"""`deepgalaxy data simulate / ingest / info / show` as a user runs them (fresh interpreter each)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli


@pytest.mark.slow
def test_simulate_info_show(tmp_path: Path) -> None:
    out = tmp_path / "cli.zarr"
    args = ["data", "simulate", str(out), "--sims", "3", "--size", "16", "--particles", "200", "--snapshots", "8",
            "--cameras", "2", "--workers", "1", "--no-progress"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    again = run_cli(*args)  # complete store, same parameters: nothing to redo
    assert again.returncode == 0, again.stderr

    info = run_cli("data", "info", str(out))
    assert info.returncode == 0, info.stderr
    assert "48 images 16x16x1" in info.stdout and "per mass ratio" in info.stdout and "validation" in info.stdout
    assert "0.25" in info.stdout and "0.333" in info.stdout

    png = tmp_path / "grid.png"
    show = run_cli("data", "show", str(out), "--out", str(png), "--sims", "2", "--steps", "0,30,70")
    assert show.returncode == 0, show.stderr
    from skimage import io

    img = io.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 10


def test_bad_store_gives_one_line_error(tmp_path: Path) -> None:
    r = run_cli("data", "info", str(tmp_path / "nothing.zarr"))
    assert r.returncode == 2
    assert "nothing.zarr: no such dataset store" in r.stderr and "Traceback" not in r.stderr
    bad = run_cli("data", "simulate", str(tmp_path / "x.zarr"), "--mass-ratios", "1/0")
    assert bad.returncode == 2 and "cannot read numbers from '1/0'" in bad.stderr


def test_ingest_reports_skipped(tmp_path: Path) -> None:
    from skimage import io

    d = tmp_path / "imgs"
    d.mkdir()
    io.imsave(d / "a.png", (np.random.default_rng(0).random((20, 30)) * 255).astype(np.uint8), check_contrast=False)
    (d / "b.jpg").write_bytes(b"broken")
    r = run_cli("data", "ingest", str(d), str(tmp_path / "real.zarr"), "--size", "8", "--no-progress",
                "--no-preprocess")  # noise has no system to centre on: preprocessing would skip it too
    assert r.returncode == 0, r.stderr
    assert "wrote 1 images" in r.stdout and "skipped 1 unreadable" in r.stdout and "b.jpg" in r.stdout
