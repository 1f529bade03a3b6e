"""Catalogue-scale inference (issue 18 item 3): ``predict`` and ``latent index`` stream batches, write their output
batch by batch, continue after a real ``kill -9`` to the same bytes as an uninterrupted run, refuse to continue an
output made from another model, and give the same results in 2 worker processes as in 1."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from skimage import io

from deepgalaxy.core.dataset import open_dataset
from deepgalaxy.core.errors import DatasetError
from deepgalaxy.runs.predict import class_summary, open_prediction_index, partial_folder, predict, predict_csv
from tests.test_cli_errors import assert_one_line_error, invoke

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_torch_thread")]

WIDTHS = {"backbone.options.widths": [8, 16]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A simulated store of 256 images of 32 px, a folder of 12 PNGs and a broken file, and two saved full-simple
    models with different (random) weights."""
    from deepgalaxy import registry
    from deepgalaxy.plugins.simulation.source import simulate

    root = tmp_path_factory.mktemp("catalogue")
    store = simulate(root / "cat.zarr", progress=False, workers=1, sims=4, particles=300, size=32, cameras=2,
                     snapshots=32, seed=5)
    pngs = root / "pngs"
    pngs.mkdir()
    ds = open_dataset(store)
    for i, image in enumerate(ds.images(np.arange(0, 240, 20))):
        io.imsave(pngs / f"g{i:02d}.png", image[..., 0], check_contrast=False)
    (pngs / "broken.png").write_bytes(b"\x89PNG truncated")
    for name, seed in (("model", 0), ("other", 1)):
        registry.create("full-simple", seed=seed, input_size=32, **WIDTHS).save(root / name)
    return {"root": root, "store": Path(store), "pngs": pngs, "model": root / "model", "other": root / "other"}


def _load(path: Path):  # type: ignore[no-untyped-def]
    from deepgalaxy import registry

    return registry.load(path, device="cpu")


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _assert_same_rows(a: Path, b: Path, tol: float = 2e-4) -> None:
    """Same files and rows in the same order, the same integers, floats equal to the CSV's 4 decimals (worker
    processes may run another number of threads, which can move the last bit of a float)."""
    ra, rb = _rows(a), _rows(b)
    assert len(ra) == len(rb) and list(ra[0]) == list(rb[0])
    for x, y in zip(ra, rb, strict=True):
        for key in x:
            if x[key] == y[key]:
                continue
            assert abs(float(x[key]) - float(y[key])) <= tol, (key, x, y)


# --- streaming equals the in-memory predict ---------------------------------------------------------------------


def test_streamed_csv_equals_the_in_memory_predict_and_the_model(inputs: dict[str, Path], tmp_path: Path) -> None:
    model = _load(inputs["model"])
    sources = [inputs["pngs"], inputs["store"]]
    streamed = predict_csv(model, sources, tmp_path / "s.csv", batch_size=16, sheet=True)
    in_memory = predict(model, sources, batch_size=16)
    in_memory.write_csv(tmp_path / "m.csv")
    assert (tmp_path / "s.csv").read_bytes() == (tmp_path / "m.csv").read_bytes()
    assert streamed.rows == len(in_memory.records) == 12 + 256
    assert streamed.skipped == in_memory.skipped and Path(streamed.skipped[0][0]).name == "broken.png"
    assert not partial_folder(tmp_path / "s.csv").exists()  # the progress goes once the CSV is complete
    foreign = tmp_path / "mine.csv"
    foreign.write_text("a,b\n")
    with pytest.raises(DatasetError, match="not a file deepgalaxy predict wrote"):
        predict_csv(model, sources, foreign, overwrite=True)
    assert foreign.read_text() == "a,b\n"
    assert streamed.sheet is not None and len(streamed.sheet.records) == 60
    # the oracle: every store image through the model at once
    ds = open_dataset(inputs["store"])
    oracle = class_summary(model.predict(ds.images(np.arange(len(ds))), batch_size=256).probabilities)
    store_rows = _rows(tmp_path / "s.csv")[12:]
    assert [int(r["row"]) for r in store_rows] == list(range(256))
    assert [int(r["predicted_class"]) for r in store_rows] == oracle["predicted_class"].tolist()
    np.testing.assert_allclose([float(r["probability"]) for r in store_rows], oracle["probability"], atol=6e-5)


def test_two_workers_give_what_one_gives(inputs: dict[str, Path], tmp_path: Path) -> None:
    from deepgalaxy.runs.latent import build_index

    model = _load(inputs["model"])
    index = open_prediction_index(model, inputs["store"])
    for workers in (1, 2):
        predict_csv(model, [inputs["pngs"], inputs["store"]], tmp_path / f"w{workers}.csv", index=index, k=3,
                    batch_size=32, workers=workers)
        build_index(model, inputs["store"], tmp_path / f"index{workers}", batch_size=32, progress=False,
                    workers=workers)
    _assert_same_rows(tmp_path / "w1.csv", tmp_path / "w2.csv")
    assert _rows(tmp_path / "w2.csv")[12]["nn1_row"] == "0"  # a store row's nearest indexed image is itself
    z1, z2 = (np.load(tmp_path / f"index{w}" / "z.npy") for w in (1, 2))
    np.testing.assert_allclose(z1, z2, atol=1e-5)
    assert not (tmp_path / "index2" / "partial").exists() and not partial_folder(tmp_path / "w2.csv").exists()


# --- a real kill, then --resume ---------------------------------------------------------------------------------


def _killed(args: list[str], progress: Path, after_units: int) -> int:
    """Start ``deepgalaxy ARGS``, SIGKILL it once its progress record counts ``after_units`` batches; return the
    batches it had written."""
    proc = subprocess.Popen([sys.executable, "-m", "deepgalaxy", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(progress.read_text())["units"] >= after_units:
                    proc.send_signal(signal.SIGKILL)
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.002)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    return int(json.loads(progress.read_text())["units"])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deepgalaxy", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_predict_resumes_after_a_kill_to_the_bytes_of_a_clean_run(inputs: dict[str, Path], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out, clean = tmp_path / "p.csv", tmp_path / "clean.csv"
    base = ["predict", str(inputs["model"]), str(inputs["pngs"]), str(inputs["store"]), "-b", "1", "--device", "cpu",
            "--no-progress"]
    done = _killed([*base, "--out", str(out)], partial_folder(out) / "progress.json", after_units=20)
    assert 20 <= done < 12 + 1 + 256 and len(_rows(out)) < 268
    # another model's results are never appended: refused, naming what differs
    other = ["predict", str(inputs["other"]), *base[2:], "--out", str(out), "--resume"]
    assert_one_line_error(*invoke(other, capsys), other, mentions="model:")
    again = [*base, "--out", str(out)]  # without --resume: refused, saying how to continue
    assert_one_line_error(*invoke(again, capsys), again, mentions="--resume")
    resumed = _cli(*base, "--out", str(out), "--resume")
    assert resumed.returncode == 0 and "resumed after batch" in resumed.stdout, resumed.stderr
    assert invoke([*base, "--out", str(clean)], capsys)[0] == 0
    assert out.read_bytes() == clean.read_bytes()
    assert not partial_folder(out).exists()


def test_index_build_continues_after_a_kill_to_the_vectors_of_a_clean_build(
        inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, clean = tmp_path / "index", tmp_path / "clean"
    base = ["latent", "index", str(inputs["model"]), "--data", str(inputs["store"]), "-b", "1", "--device", "cpu",
            "--no-progress"]
    done = _killed([*base, "--out", str(out)], out / "partial" / "progress.json", after_units=20)
    assert 20 <= done < 256 and not (out / "index.json").exists()
    other = ["latent", "index", str(inputs["other"]), *base[3:], "--out", str(out), "--resume"]
    assert_one_line_error(*invoke(other, capsys), other, mentions="model:")
    resumed = _cli(*base, "--out", str(out))  # a plain re-run continues a matching build
    assert resumed.returncode == 0, resumed.stderr
    assert invoke([*base, "--out", str(clean)], capsys)[0] == 0
    np.testing.assert_array_equal(np.load(out / "z.npy"), np.load(clean / "z.npy"))
    assert not (out / "partial").exists()


# --- errors at the CLI ----------------------------------------------------------------------------------------------


def test_cli_refuses_bad_resume_device_and_precision(inputs: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.csv"
    base = ["predict", str(inputs["model"]), str(inputs["pngs"]), "--out", str(out), "--no-progress"]
    for extra, mentions in ((["--resume"], "no interrupted predict"),
                            (["--resume", "--overwrite"], "--resume"),
                            (["--device", "tpu"], "tpu"),
                            (["--device", "cpu", "--precision", "fp16"], "fp16")):
        assert_one_line_error(*invoke([*base, *extra], capsys), [*base, *extra], mentions=mentions)
    assert not out.exists()
    (tmp_path / "p.csv.partial").mkdir()
    (tmp_path / "p.csv.partial" / "mine.txt").write_text("not deepgalaxy's")
    assert_one_line_error(*invoke(base, capsys), base, mentions="not the progress of a deepgalaxy predict")
    index = ["latent", "index", str(inputs["model"]), "--data", str(inputs["store"]), "--out", str(tmp_path / "i"),
             "--no-progress"]
    for extra, mentions in ((["--resume"], "no interrupted index build"), (["--device", "cuda:7"], "cuda")):
        assert_one_line_error(*invoke([*index, *extra], capsys), [*index, *extra], mentions=mentions)
