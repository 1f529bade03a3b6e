"""``data ingest --labels`` and ``deepgalaxy predict``: labels tables (and their bad forms), predictions from the CLI
and from Python on a tiny trained model, the CSV columns, the nearest simulated images with --index, the sheet."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from skimage import io

from deepgalaxy.cli import app
from deepgalaxy.core.dataset import open_dataset
from deepgalaxy.core.errors import DatasetError, DeepGalaxyError
from deepgalaxy.core.observation import load_observation
from deepgalaxy.plugins.ingest.source import ingest
from deepgalaxy.runs.predict import (
    CLASS_MYR_COLUMNS,
    COLUMNS,
    NEIGHBOUR_FIELDS,
    class_summary,
    open_prediction_index,
    predict,
)
from tests.runs_support import CARD, train_tiny
from tests.test_cli_errors import assert_one_line_error, invoke
from tests.test_observation import galaxy_pair

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic observed pairs (PNG, a FITS in a subfolder) and one broken file."""
    from astropy.io import fits

    d = tmp_path_factory.mktemp("photos") / "obs"
    (d / "deep").mkdir(parents=True)
    for seed in range(2):
        io.imsave(d / f"pair{seed}.png", np.clip(galaxy_pair(seed=seed) * 2 - 60, 0, 255).astype(np.uint8),
                  check_contrast=False)
    fits.PrimaryHDU(galaxy_pair(seed=5).astype(np.float32)).writeto(d / "deep" / "pair.fits")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return d


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Version 1 of a tiny full-simple (1 short epoch on 64 simulated images of 32 px), registered and saved."""
    root = tmp_path_factory.mktemp("predict")
    _, data, uri = train_tiny(root, steps=3)
    return {"uri": uri, "data": str(data), "folder": str(root / "run" / "model"), "root": str(root)}


@pytest.fixture(scope="module")
def model(trained: dict[str, str]):  # type: ignore[no-untyped-def]
    from deepgalaxy import registry

    return registry.load(Path(trained["folder"]))


# --- the class summary -----------------------------------------------------------------------------------------


def test_class_summary_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(71, 0.3), size=20)
    got = class_summary(p)
    for i, row in enumerate(p):
        cdf = np.cumsum(row)
        assert got["class_low"][i] == next(c for c in range(71) if cdf[c] >= 0.16)
        assert got["class_high"][i] == next(c for c in range(71) if cdf[c] >= 0.84)
        assert got["expected_class"][i] == pytest.approx(sum(c * q for c, q in enumerate(row)))
        assert got["entropy"][i] == pytest.approx(-sum(q * np.log(q) for q in row if q > 0))
        assert got["predicted_class"][i] == row.argmax() and got["probability"][i] == row.max()
    certain = class_summary(np.eye(71)[[30]])
    assert (certain["class_low"][0], certain["class_high"][0], certain["entropy"][0]) == (30, 30, 0.0)


# --- ingest with a labels table ------------------------------------------------------------------------------------


def _table(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_ingest_with_labels_and_properties(photos: Path, tmp_path: Path) -> None:
    import zarr

    table = _table(tmp_path / "t.csv", "file,class,mass_ratio,age\npair0.png,12,0.5,\npair1.png,,1,3.5\n"
                   "deep/pair.fits,70,0.25,1\nbroken.jpg,3,,\n")
    ds = open_dataset(ingest(photos, tmp_path / "l.zarr", size=32, progress=False, labels=table))
    assert ds.attrs["files"] == ["deep/pair.fits", "pair0.png", "pair1.png"]  # broken.jpg skipped with its row
    assert ds.labels.tolist() == [70, 12, -1]
    assert ds.attrs["properties"] == ["age", "mass_ratio"]
    group = zarr.open_group(str(ds.path), mode="r")
    np.testing.assert_array_equal(group["properties/mass_ratio"][:], np.float32([0.25, 0.5, 1]))
    np.testing.assert_array_equal(np.isnan(group["properties/age"][:]), [False, True, False])


@pytest.mark.parametrize(("text", "message"), [
    ("file,class\npair0.png,1\npair1.png,2\ndeep/pair.fits,3\nbroken.jpg,4\npair0.png,5\n",
     r"1 file\(s\) listed twice: pair0.png \(lines 2 and 6\)"),
    ("file,class\npair0.png,1\npair1.png,2\ndeep/pair.fits,3\nbroken.jpg,4\nnosuch.png,5\nother/x.fits,1\n",
     r"2 file\(s\) not among the images of the folder: nosuch.png, other/x.fits"),
    ("file,class\npair0.png,1\ndeep/pair.fits,3\n", r"2 image\(s\) of the folder have no row: broken.jpg, pair1.png"),
    ("name,class\npair0.png,1\n", r"no 'file' column \(columns: name, class\)"),
    ("file,class\npair0.png,71\npair1.png,2\ndeep/pair.fits,3\nbroken.jpg,4\n", r"line 2: class '71' is not"),
    ("file,mass ratio\npair0.png,1\n", "column names must be unique identifiers"),
    ("file\npair0.png\n", "neither a 'class' column nor a property column"),
])
def test_bad_labels_tables_are_refused_naming_the_files(photos: Path, tmp_path: Path, text: str, message: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    table = _table(tmp_path / "t.csv", text)
    with pytest.raises(DatasetError, match=message):
        ingest(photos, tmp_path / "l.zarr", size=16, progress=False, labels=table)
    args = ["data", "ingest", str(photos), str(tmp_path / "c.zarr"), "--labels", str(table), "--size", "16",
            "--no-progress"]
    assert_one_line_error(*invoke(args, capsys), args, mentions=str(table))
    assert not (tmp_path / "l.zarr").exists() and not (tmp_path / "c.zarr").exists()


# --- predict from Python ----------------------------------------------------------------------------------------------


def test_predict_from_python_matches_the_model_on_the_preprocessed_images(model, photos: Path) -> None:  # type: ignore[no-untyped-def]
    result = predict(model, [photos])
    assert [Path(r.file).name for r in result.records] == ["pair.fits", "pair0.png", "pair1.png"]
    assert [Path(f).name for f, _ in result.skipped] == ["broken.jpg"]
    images = np.stack([load_observation(r.file, 32, 1).image for r in result.records])
    oracle = class_summary(model.predict(images).probabilities)
    for i, record in enumerate(result.records):
        assert record.predicted_class == oracle["predicted_class"][i]
        assert record.expected_class == pytest.approx(oracle["expected_class"][i], abs=1e-4)
        assert record.class_low <= record.class_high and 0 <= record.entropy <= np.log(71) + 1e-6
        np.testing.assert_array_equal(record.image, images[i])
    raw = predict(model, [galaxy_pair(seed=1)])  # arrays: preprocessed like files
    assert raw.records[0].file == "array 0[0]" and raw.records[0].predicted_class is not None


def test_predict_refuses_what_it_cannot_do(model, photos: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from deepgalaxy import registry

    with pytest.raises(DatasetError, match="no such file or folder"):
        predict(model, [tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        predict(model, [tmp_path / "empty"])
    with pytest.raises(DatasetError, match=r"none of the 1 image file\(s\) could be read \(first: .*broken.jpg"):
        predict(model, [photos / "broken.jpg"])
    fcae = registry.create("fcae-simple", input_size=32, **{"backbone.options.widths": [8, 16]})
    with pytest.raises(DeepGalaxyError, match=r"'fcae-simple' \(task 'fcae'\) has no classifier head.*clf-\* or "
                                              r"full-\* model$"):
        predict(fcae, [photos])
    with pytest.raises(DeepGalaxyError, match="--index needs a model with a VAE latent space"):
        open_prediction_index(fcae, tmp_path)


def test_a_vae_without_head_gives_the_nearest_simulated_images(trained: dict[str, str], photos: Path) -> None:
    from deepgalaxy import registry

    vae = registry.create("vae-simple", seed=0, input_size=32, **{"backbone.options.widths": [8, 16]})
    with pytest.raises(DeepGalaxyError, match="or give an index of simulated images"):
        predict(vae, [photos])
    index = open_prediction_index(vae, trained["data"])  # no index beside the store: built in memory
    assert len(index) == 64 and not list(Path(trained["root"]).glob("*.index"))
    result = predict(vae, [photos], index=index, k=2)
    record = result.records[0]
    assert record.predicted_class is None and len(record.neighbours) == 2
    assert record.neighbours[0].distance <= record.neighbours[1].distance


# --- predict at the CLI -----------------------------------------------------------------------------------------------


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def test_predict_cli_registered_model_with_index_and_sheet(trained: dict[str, str], photos: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out, sheet = tmp_path / "p.csv", tmp_path / "sheet.png"
    rc = invoke(["latent", "index", CARD, "--data", trained["data"], "--tracking-uri", trained["uri"],
                 "--no-progress"], capsys)[0]
    assert rc == 0
    args = ["predict", CARD, str(photos), trained["data"], "--out", str(out), "--index", trained["data"], "-k", "3",
            "--sheet", str(sheet), "--tracking-uri", trained["uri"], "--no-progress"]
    capsys.readouterr()
    from deepgalaxy.cli.common import run_cli

    assert run_cli(app, args) == 0
    printed = capsys.readouterr().out
    assert "predicted 67 image(s) with full-simple v1" in printed and "skipped" in printed and "broken.jpg" in printed
    header, rows = _read_csv(out)
    # trained on a simulated store, the model knows Myr per class: the classes come in Myr too
    assert header == [*COLUMNS, *CLASS_MYR_COLUMNS, *(f"nn{i}_{f}" for i in (1, 2, 3) for f in NEIGHBOUR_FIELDS)]
    assert len(rows) == 3 + 64
    store_rows = [r for r in rows if r["row"]]
    assert [int(r["row"]) for r in store_rows] == list(range(64))
    # a store row's nearest simulated image is itself, at distance 0: the index is the store's
    assert all(int(r["nn1_row"]) == int(r["row"]) and float(r["nn1_distance"]) < 1e-3 for r in store_rows)
    labels = open_dataset(trained["data"]).labels
    assert all(int(r["nn1_class"]) == labels[int(r["row"])] for r in store_rows)
    for r in rows:
        assert int(r["class_low"]) <= int(r["class_high"]) and 0 <= int(r["predicted_class"]) < 71
        assert float(r["nn1_distance"]) <= float(r["nn2_distance"]) <= float(r["nn3_distance"])
    from PIL import Image

    with Image.open(sheet) as im:
        assert im.width > 500 and im.height > 500
    # again: refused without --overwrite, replaced with it; a file predict did not write is never replaced
    assert_one_line_error(*invoke(args, capsys), args, mentions="--overwrite")
    assert invoke([*args, "--overwrite"], capsys)[0] == 0
    foreign = tmp_path / "mine.csv"
    foreign.write_text("a,b\n1,2\n")
    bad = [*args[:4], "--out", str(foreign), "--overwrite", "--tracking-uri", trained["uri"], "--no-progress"]
    assert_one_line_error(*invoke(bad, capsys), bad, mentions="not a file deepgalaxy predict wrote")
    assert foreign.read_text() == "a,b\n1,2\n"


def test_predict_cli_saved_folder_and_bad_inputs(trained: dict[str, str], photos: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.csv"
    args = ["predict", trained["folder"], str(photos / "pair0.png"), "--out", str(out), "--no-progress"]
    assert invoke(args, capsys)[0] == 0
    header, rows = _read_csv(out)
    assert header == [*COLUMNS, *CLASS_MYR_COLUMNS] and len(rows) == 1 and rows[0]["file"].endswith("pair0.png")
    (tmp_path / "empty").mkdir()
    for inputs, mentions in (([str(tmp_path / "empty")], "no images found"),
                             ([str(photos / "broken.jpg")], "broken.jpg"),
                             ([str(tmp_path / "nosuch.png")], "nosuch.png")):
        bad = ["predict", trained["folder"], *inputs, "--out", str(tmp_path / "x.csv"), "--no-progress"]
        assert_one_line_error(*invoke(bad, capsys), bad, mentions=mentions)
    assert not (tmp_path / "x.csv").exists()
