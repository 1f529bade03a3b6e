"""Issue 12, data cases: --overwrite never deletes what a user owns, damaged stores are found and repaired, and every
message about a store names what differs and suggests a command that works."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import zarr

from deepgalaxy.core.dataset import open_dataset
from deepgalaxy.core.errors import DatasetError
from deepgalaxy.plugins.ingest.source import ingest
from deepgalaxy.plugins.simulation.source import simulate
from tests._data_helpers import TINY, tiny_store
from tests.conftest import run_cli

SIM_ARGS = ["--sims", "2", "--size", "16", "--particles", "200", "--snapshots", "8", "--cameras", "2",
            "--seed", "7", "--workers", "1", "--no-progress"]
"""2 simulations x 2 cameras x 8 snapshots = 32 images of 16 px; image chunks of 8 rows, 16 rows per simulation."""


def _photos(folder: Path) -> dict[str, bytes]:
    """A folder of two real PNG images; returns their bytes by name, to check later that they survived."""
    from skimage import io

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:24, :20]
    galaxy = 180 * np.exp(-((yy - 12) ** 2 + (xx - 9) ** 2) / 18.0)  # something to centre on (ingest preprocesses)
    for name in ("a.png", "b.png"):
        io.imsave(folder / name, (rng.random((24, 20)) * 60 + galaxy).astype(np.uint8), check_contrast=False)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _all_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a store, by its path in the store."""
    root = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(arr[:]) for name, arr in root.arrays()} | {
        f"{g}/{name}": np.asarray(arr[:]) for g, group in root.groups() for name, arr in group.arrays()
    }


def _flip(chunk: Path) -> None:
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))


def _one_line_error(r: object) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)  # type: ignore[attr-defined]
    assert "Traceback" not in r.stderr  # type: ignore[attr-defined]
    return " ".join(r.stderr.split())  # type: ignore[attr-defined]


# -- case 1 and 2: --overwrite ---------------------------------------------------------------------------------------


def test_ingest_overwrite_onto_its_own_input_keeps_the_images(tmp_path: Path) -> None:
    """issue 12 case 1: `data ingest photos photos --overwrite` deleted photos/ before reading it."""
    photos = tmp_path / "photos"
    before = _photos(photos)
    r = run_cli("data", "ingest", str(photos), str(photos), "--size", "8", "--overwrite", "--no-progress")
    assert photos.is_dir() and {p.name: p.read_bytes() for p in photos.iterdir()} == before
    msg = _one_line_error(r)
    assert "photos" in msg and "input" in msg


def test_simulate_overwrite_keeps_an_ordinary_folder(tmp_path: Path) -> None:
    """issue 12 case 2: `data simulate work --overwrite` silently deleted work/thesis.tex; the advice without
    --overwrite must not suggest --overwrite for a folder it will not replace."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("\\chapter{Mergers}\n")
    r = run_cli("data", "simulate", str(work), *SIM_ARGS, "--overwrite")
    assert (work / "thesis.tex").is_file() and (work / "thesis.tex").read_text() == "\\chapter{Mergers}\n"
    assert sorted(p.name for p in work.iterdir()) == ["thesis.tex"]
    msg = _one_line_error(r)
    assert "thesis.tex" in msg and "only replaces deepgalaxy stores and empty folders" in msg
    plain = _one_line_error(run_cli("data", "simulate", str(work), *SIM_ARGS))
    assert "work" in plain and "pass --overwrite" not in plain


def test_overwrite_replaces_a_store_and_uses_an_empty_folder(tmp_path: Path) -> None:
    """issue 12 cases 1-2: what --overwrite may replace still works: a deepgalaxy store, an empty folder."""
    out = tiny_store(tmp_path / "s.zarr", sims=1)
    simulate(out, progress=False, workers=1, overwrite=True, **{**TINY, "sims": 1, "size": 24})
    assert open_dataset(out).image_shape == (24, 24, 1)
    photos = tmp_path / "photos"
    _photos(photos)
    ingest(photos, out, size=8, progress=False, overwrite=True)  # a simulated store replaced by an ingested one
    assert len(open_dataset(out)) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(open_dataset(ingest(photos, empty, size=8, progress=False, overwrite=True))) == 2
    (tmp_path / "empty2").mkdir()
    assert len(open_dataset(tiny_store(tmp_path / "empty2", sims=1))) == 16  # no --overwrite needed


def test_overwrite_never_touches_an_input(tmp_path: Path) -> None:
    """issue 12 case 1: output == input, output inside the input, input inside the output: refused, images kept."""
    photos = tmp_path / "photos"
    before = _photos(photos)
    for out in (photos, photos / "store.zarr"):
        for overwrite in (False, True):
            with pytest.raises(DatasetError, match="input"):
                ingest(photos, out, size=8, progress=False, overwrite=overwrite)
    # a store that holds the input folder (the user put the photos inside it)
    store = tiny_store(tmp_path / "s.zarr", sims=1)
    inner = store / "photos"
    inner_before = _photos(inner)
    with pytest.raises(DatasetError, match="input"):
        ingest(inner, store, size=8, progress=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in inner.iterdir()} == inner_before
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before
    assert not (photos / "store.zarr").exists()


def test_overwrite_refuses_a_file_and_a_store_holding_user_files(tmp_path: Path) -> None:
    """issue 12 case 2: --overwrite replaces nothing but a store or an empty folder."""
    paper = tmp_path / "paper.pdf"
    paper.write_bytes(b"%PDF-1.7")
    with pytest.raises(DatasetError, match=r"paper\.pdf: .*only replaces deepgalaxy stores and empty folders"):
        tiny_store(paper, sims=1, overwrite=True)
    assert paper.read_bytes() == b"%PDF-1.7"
    store = tiny_store(tmp_path / "s.zarr", sims=1)
    (store / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match=r"notes\.txt"):
        tiny_store(store, sims=1, size=24, overwrite=True)
    assert (store / "notes.txt").read_text() == "mine"


# -- case 11: verify ---------------------------------------------------------------------------------------------------


def test_verify_reports_corrupt_and_missing_chunks(tmp_path: Path) -> None:
    """issue 12 case 11: `data info` called a store with a corrupt chunk healthy; `data verify` finds it."""
    store = tmp_path / "s.zarr"
    assert run_cli("data", "simulate", str(store), *SIM_ARGS).returncode == 0
    ok = run_cli("data", "verify", str(store))
    assert ok.returncode == 0, ok.stderr
    assert "no damage" in ok.stdout

    _flip(store / "images" / "c" / "3" / "0" / "0" / "0")
    info = run_cli("data", "info", str(store))
    assert info.returncode == 0, info.stderr
    assert "not verified" in info.stdout and f"deepgalaxy data verify {store}" in " ".join(info.stdout.split())
    bad = run_cli("data", "verify", str(store))
    msg = _one_line_error(bad)
    out = " ".join(bad.stdout.split())
    assert "'images' chunk c/3/0/0/0 rows 24..31 (simulation 1): corrupt" in out
    assert f"deepgalaxy data simulate {store}" in msg

    (store / "meta" / "time" / "c" / "0").unlink()
    both = run_cli("data", "verify", str(store))
    _one_line_error(both)
    out = " ".join(both.stdout.split())
    assert "'meta/time' chunk c/0 rows 0..15 (simulation 0): missing" in out and "c/3/0/0/0" in out


# -- case 12: repair by re-running simulate --------------------------------------------------------------------------


def test_simulate_again_repairs_missing_and_corrupt_chunks(tmp_path: Path) -> None:
    """issue 12 case 12: re-running simulate said "wrote" and left a missing chunk missing."""
    store, reference = tmp_path / "s.zarr", tmp_path / "ref.zarr"
    for path in (store, reference):
        assert run_cli("data", "simulate", str(path), *SIM_ARGS).returncode == 0
    (store / "images" / "c" / "1" / "0" / "0" / "0").unlink()  # simulation 0
    r = run_cli("data", "simulate", str(store), *SIM_ARGS)
    assert r.returncode == 0, r.stderr
    assert "repair" in r.stdout and "simulation 0" in " ".join(r.stdout.split())
    want = _all_arrays(reference)
    got = _all_arrays(store)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)

    # the advice of a reader that meets a corrupt chunk is a command that repairs it
    _flip(store / "sims" / "snapshot_times" / "c" / "1" / "0")  # simulation 1
    _flip(store / "images" / "c" / "2" / "0" / "0" / "0")  # simulation 1
    with pytest.raises(DatasetError, match=re.escape(f"`deepgalaxy data simulate {store}`")) as err:
        open_dataset(store).images([17])
    command = re.search(r"`(deepgalaxy data simulate [^`]+)`", str(err.value))
    assert command is not None
    fixed = run_cli(*shlex.split(command.group(1))[1:], "--no-progress")
    assert fixed.returncode == 0, fixed.stderr
    got = _all_arrays(store)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert run_cli("data", "verify", str(store)).returncode == 0


# -- case 13: resume with other parameters ---------------------------------------------------------------------------


def test_resume_with_other_parameters_names_only_those(tmp_path: Path) -> None:
    """issue 12 case 13: the refusal listed all sixteen stored parameters without saying which one differs."""
    store = tiny_store(tmp_path / "s.zarr", sims=1)
    with pytest.raises(DatasetError) as err:
        tiny_store(store, sims=1, size=24, particles=400)
    msg = str(err.value)
    assert "size: stored 16, asked 24" in msg and "particles: stored 300, asked 400" in msg
    assert "camera" not in msg and "seed" not in msg and "friction" not in msg


# -- case 14: files that are not images ------------------------------------------------------------------------------


def test_ingest_says_empty_or_not_an_image(tmp_path: Path) -> None:
    """issue 12 case 14: a text file named .png and a zero-byte .jpg got imageio's "pip install imageio" advice."""
    photos = tmp_path / "photos"
    _photos(photos)
    (photos / "notes.png").write_text("not a picture\n")
    (photos / "zero.jpg").write_bytes(b"")
    r = run_cli("data", "ingest", str(photos), str(tmp_path / "o.zarr"), "--size", "8", "--no-progress")
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    assert "skipped 2 unreadable" in out and "pip install" not in out
    assert "notes.png: not a PNG image" in out
    assert "zero.jpg: empty file (0 bytes)" in out


# -- case 18: advice that works ---------------------------------------------------------------------------------------


def test_empty_validation_split_names_the_setting(tmp_path: Path) -> None:
    """issue 12 case 18: "needs more simulations" did not name the setting that fixes it."""
    ds = open_dataset(tiny_store(tmp_path / "s.zarr"))  # 4 simulations
    with pytest.raises(DatasetError, match=r"--set data\.validation_fraction=") as err:
        ds.split("simulation", 0.1)
    fraction = re.search(r"--set data\.validation_fraction=([0-9.]+)", str(err.value))
    assert fraction is not None
    train, val = ds.split("simulation", float(fraction.group(1)))
    assert len(train) and len(val)


def test_suggested_commands_for_a_non_store_work(tmp_path: Path) -> None:
    """issue 12 case 18: `data info` on a folder that is not a store suggested `data simulate` of that same folder,
    which then refused it."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("mine")
    msg = _one_line_error(run_cli("data", "info", str(work)))
    suggested = re.search(r"`deepgalaxy data simulate (\S+)`", msg)
    assert suggested is not None
    made = run_cli("data", "simulate", suggested.group(1), *SIM_ARGS)
    assert made.returncode == 0, made.stderr
    assert run_cli("data", "info", suggested.group(1)).returncode == 0
    refused = _one_line_error(run_cli("data", "simulate", str(work), *SIM_ARGS))
    other = re.search(r"choose another path, e\.g\. `([^`]+)`", refused)
    assert other is not None and not Path(other.group(1)).exists()
    assert (work / "thesis.tex").read_text() == "mine"
