"""Ingest real images: sizes, channels, FITS, unreadable files listed and skipped (never blank images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage import data, io

from deepgalaxy.core.dataset import open_dataset
from deepgalaxy.core.errors import DatasetError
from deepgalaxy.plugins.ingest.source import IngestSource, ingest


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    hubble = data.hubble_deep_field()[:300, :400]  # real galaxies, RGB, not square
    io.imsave(d / "hubble.png", hubble, check_contrast=False)
    io.imsave(d / "sub" / "hubble.jpg", hubble[:200, :200], check_contrast=False)
    io.imsave(d / "gray.png", (np.arange(64 * 48).reshape(48, 64) % 256).astype(np.uint8), check_contrast=False)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (d / "notes.txt").write_text("ignored: not an image suffix")
    return d


def test_ingest_rgb_and_gray_with_unreadable_listed(folder: Path, tmp_path: Path) -> None:
    out = ingest(folder, tmp_path / "rgb.zarr", size=32, channels=3, progress=False, preprocess=False)
    ds = open_dataset(out)
    assert len(ds) == 3 and ds.image_shape == (32, 32, 3)
    assert ds.attrs["files"] == ["gray.png", "hubble.png", "sub/hubble.jpg"]
    assert [s["file"] for s in ds.attrs["skipped"]] == ["broken.png"]
    # preprocessed (the default), the grey ramp has nothing above its sky to centre on: listed, not blank
    pre = open_dataset(ingest(folder, tmp_path / "pre.zarr", size=32, channels=3, progress=False))
    assert pre.attrs["files"] == ["hubble.png", "sub/hubble.jpg"]
    assert {s["file"]: s["error"] for s in pre.attrs["skipped"]}["gray.png"].startswith("nothing above the sky")
    assert (ds.labels == -1).all() and (ds.metadata["sim_id"] == -1).all()
    assert np.isnan(ds.metadata["mass_ratio"]).all()
    imgs = ds.images(np.arange(3))
    assert all(img.std() > 5 for img in imgs)  # no blank images
    gray = open_dataset(ingest(folder, tmp_path / "g.zarr", size=16, channels=1, progress=False, preprocess=False))
    assert gray.image_shape == (16, 16, 1)
    train, val = gray.split()  # real images: each its own group in a simulation split
    assert len(train) + len(val) == 3 and len(val) >= 1


def test_ingest_fits(tmp_path: Path) -> None:
    from astropy.io import fits

    d = tmp_path / "fits"
    d.mkdir()
    yy, xx = np.mgrid[:40, :50]
    galaxy = np.exp(-((xx - 30) ** 2 + (yy - 15) ** 2) / 30.0) * 1000 + 10
    fits.PrimaryHDU(galaxy.astype(np.float32)).writeto(d / "g.fits")
    ds = open_dataset(ingest(d, tmp_path / "f.zarr", size=20, progress=False, preprocess=False))
    img = ds.images([0])[0, ..., 0]
    assert img.max() > 200 and img.min() < 30
    # FITS rows run bottom-up: the blob at row 15 of 40 (from the bottom) lands in the lower half
    assert np.unravel_index(img.argmax(), img.shape)[0] > 10
    centred = open_dataset(ingest(d, tmp_path / "c.zarr", size=20, progress=False)).images([0])[0, ..., 0]
    peak = np.unravel_index(centred.argmax(), centred.shape)
    assert abs(peak[0] - 9.5) <= 1.5 and abs(peak[1] - 9.5) <= 1.5, peak  # preprocessed: centred on the blob


def test_ingest_bad_input(tmp_path: Path, folder: Path) -> None:
    with pytest.raises(DatasetError, match="not a folder"):
        ingest(tmp_path / "missing", tmp_path / "o.zarr")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        ingest(empty, tmp_path / "o.zarr")
    (empty / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(DatasetError, match=r"none of the 1 image files could be read \(first: bad\.jpg"):
        ingest(empty, tmp_path / "o.zarr", progress=False)
    with pytest.raises(DatasetError, match="channels=2"):
        ingest(folder, tmp_path / "o.zarr", channels=2)
    out = IngestSource().create(tmp_path / "o.zarr", progress=False, directory=folder, size=8)
    with pytest.raises(DatasetError, match="already exists"):
        ingest(folder, out, size=8, progress=False)
