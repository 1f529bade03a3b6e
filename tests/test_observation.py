"""Observed images: preprocessing (sky, centring and cropping on the system, star masking, the simulator's stretch)
and reading every bad input (FITS blanks, HDUs, no image, decompression bombs, empty folders), from Python and at
the CLI (exit 2, one line)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from skimage import io

from deepgalaxy.core.errors import DatasetError
from deepgalaxy.core.imagefile import ImageFileError, find_images, read_image_file
from deepgalaxy.core.observation import RAW, NoSourceError, PreprocessOptions, preprocess, sky_level
from tests.test_cli_errors import assert_one_line_error, invoke

H, W, SKY, NOISE = 160, 200, 50.0, 1.0
PAIR = ((50.0, 60.0), (62.0, 84.0))
STAR = (40.0, 92.0)


def galaxy_pair(star: bool = True, seed: int = 0) -> np.ndarray:
    """Two Gaussian galaxies left of and above the centre, on a sky of 50 +- 1, and a point-like star near them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]

    def blob(y: float, x: float, s: float, a: float) -> np.ndarray:
        return a * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * s * s))

    img = SKY + rng.normal(0, NOISE, (H, W)) + blob(*PAIR[0], 5.0, 40.0) + blob(*PAIR[1], 4.0, 30.0)
    if star:
        img += blob(*STAR, 0.8, 300.0)
    return img


def to_output(point: tuple[float, float], box: tuple[int, int, int], size: int) -> tuple[int, int]:
    """Where an input pixel lands in the preprocessed image."""
    top, left, side = box
    return int((point[0] - top) / side * size), int((point[1] - left) / side * size)


def test_sky_level_ignores_sources() -> None:
    level, sigma = sky_level(galaxy_pair())
    assert abs(level - SKY) < 0.1 and abs(sigma - NOISE) < 0.1
    plain = np.random.default_rng(1).normal(SKY, NOISE, (H, W))
    assert np.median(galaxy_pair()) > np.median(plain)  # the sources do raise a plain median: the clip matters


def test_preprocess_centres_crops_subtracts_sky_and_masks_the_star() -> None:
    size = 48
    done = preprocess(galaxy_pair(), size, 1, PreprocessOptions(mask_stars=True))
    top, left, side = done.box
    assert abs(done.sky - SKY) < 0.1 and abs(done.noise - NOISE) < 0.1
    # centred on the pair (not on the image centre, 80,100), the box a little larger than the pair's extent
    mid = (np.mean([p[0] for p in PAIR]), np.mean([p[1] for p in PAIR]))
    assert abs(top + side / 2 - mid[0]) < 5 and abs(left + side / 2 - mid[1]) < 5, done.box
    extent = PAIR[1][1] - PAIR[0][1]
    assert extent < side < 4 * extent, done.box
    img = done.image[..., 0].astype(float)
    assert done.image.shape == (size, size, 1) and done.image.dtype == np.uint8
    assert np.median(np.concatenate([img[:4].ravel(), img[-4:].ravel()])) < 10  # background ~0 after subtraction
    assert img[to_output(PAIR[0], done.box, size)] > 200  # the brighter nucleus near full brightness
    star = to_output(STAR, done.box, size)
    assert 0 <= star[0] < size and 0 <= star[1] < size, "the star must lie inside the crop for this test"
    assert done.stars == 1 and img[star] < 10  # masked to the sky
    kept = preprocess(galaxy_pair(), size, 1)  # masking is optional (off by default): the star stays
    assert kept.stars == 0 and kept.image[..., 0][to_output(STAR, kept.box, size)] > 100


def test_preprocess_uses_the_renderers_stretch_and_rgb_luminance() -> None:
    from deepgalaxy.core import brightness
    from deepgalaxy.plugins.simulation import render

    assert render.asinh_stretch is brightness.asinh_stretch  # moved, not copied
    rgb = np.stack([galaxy_pair(star=False, seed=s) / 400 for s in range(3)], axis=-1)
    one, three = preprocess(rgb, 32, 1), preprocess(rgb, 32, 3)
    assert one.image.shape == (32, 32, 1) and three.image.shape == (32, 32, 3)
    assert one.box == three.box
    lum = three.image.astype(float) @ np.array([0.2125, 0.7154, 0.0721])
    assert np.abs(lum - one.image[..., 0]).mean() < 6  # 1 channel = the luminance of the same image


def test_raw_options_keep_the_centre_square_and_nothing_to_centre_on_is_refused() -> None:
    raw = preprocess((galaxy_pair() * 1.0).astype(np.uint8), 40, 1, RAW)
    assert raw.box == (0, (W - H) // 2, H)
    with pytest.raises(NoSourceError, match="constant image"):
        preprocess(np.full((20, 20), 7, dtype=np.uint8), 16, 1)
    with pytest.raises(NoSourceError, match="nothing above the sky"):
        preprocess(np.random.default_rng(0).normal(0, 1, (64, 64)), 16, 1)


# --- reading files ---------------------------------------------------------------------------------------------


def _fits(path: Path, *hdus: object) -> Path:
    from astropy.io import fits

    fits.HDUList(list(hdus)).writeto(path)
    return path


def test_fits_blanks_hdus_and_no_image(tmp_path: Path) -> None:
    from astropy.io import fits

    img = galaxy_pair().astype(np.float32)
    holed = img.copy()
    holed[:10, :] = np.nan
    done = read_image_file(_fits(tmp_path / "nan.fits", fits.PrimaryHDU(holed)))
    assert np.isfinite(done.pixels).all() and done.linear
    assert abs(done.pixels[-1, 0] - SKY) < 1.0  # blank rows (at the bottom after the flip) hold the sky level
    assert any("2000 blank (NaN/inf) pixels set to the sky level" in n for n in done.notes)
    mostly = img.copy()
    mostly[:100] = np.nan
    with pytest.raises(ImageFileError, match="62% of the pixels are blank"):
        read_image_file(_fits(tmp_path / "mostly.fits", fits.PrimaryHDU(mostly)))

    several = _fits(tmp_path / "mef.fits", fits.PrimaryHDU(), fits.ImageHDU(img, name="SCI"),
                    fits.ImageHDU(img[::2, ::2], name="WHT"))
    first = read_image_file(several)
    assert first.pixels.shape == (H, W) and first.notes == ["HDU 1 (SCI) of 3, the first image HDU"]
    assert read_image_file(several, hdu="wht").pixels.shape == (H // 2, W // 2)
    with pytest.raises(ImageFileError, match=r"HDU 'PRIMARY' is not an image HDU .*images: 1, 2"):
        read_image_file(several, hdu="PRIMARY")

    table = fits.BinTableHDU.from_columns([fits.Column(name="flux", format="E", array=np.ones(3))])
    with pytest.raises(ImageFileError, match=r"no image HDU \(HDUs: 0 PRIMARY PrimaryHDU; 1 (\(no name\)|\w+) "
                                             r"BinTableHDU\)"):
        read_image_file(_fits(tmp_path / "table.fits", fits.PrimaryHDU(), table))


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width`` x ``height`` but holds one row of data: a decompression-bomb header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
                     + chunk(b"IEND", b""))
    return path


def test_decompression_bombs_are_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    bomb = _png_declaring(tmp_path / "bomb.png", 8000, 8000)  # under Pillow's limit (89 Mpx), over ours
    with pytest.raises(ImageFileError, match=r"8000 x 8000 = 64,000,000 pixels, above the limit of "
                                             r"40,000,000 .*--max-pixels"):
        read_image_file(bomb)
    with pytest.raises(ImageFileError, match="Pillow's decompression-bomb check"):
        read_image_file(_png_declaring(tmp_path / "huge.png", 100_000, 100_000))
    small = tmp_path / "small.png"
    io.imsave(small, (galaxy_pair() % 256).astype(np.uint8), check_contrast=False)
    with pytest.raises(ImageFileError, match="above the limit of 1,000"):
        read_image_file(small, max_pixels=1000)
    assert read_image_file(small).pixels.shape == (H, W)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own check stays on
    with pytest.raises(ImageFileError, match="Pillow's decompression-bomb check"):
        read_image_file(small)


def test_empty_folders_and_files_that_are_not_images(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no images found"):
        find_images(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageFileError, match="empty file"):
        read_image_file(tmp_path / "empty.png")
    (tmp_path / "text.jpg").write_text("hello there, I am text")
    with pytest.raises(ImageFileError, match=r"not a JPEG image.*looks like text"):
        read_image_file(tmp_path / "text.jpg")


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One folder per bad input, each holding only that file (or nothing)."""
    from astropy.io import fits

    root = tmp_path_factory.mktemp("bad")
    made: dict[str, Path] = {}
    for name in ("empty", "nan", "noimage", "bomb", "flat"):
        made[name] = root / name
        made[name].mkdir()
    img = np.full((40, 40), np.nan, dtype=np.float32)
    _fits(made["nan"] / "allnan.fits", fits.PrimaryHDU(img))
    table = fits.BinTableHDU.from_columns([fits.Column(name="flux", format="E", array=np.ones(3))])
    _fits(made["noimage"] / "table.fits", fits.PrimaryHDU(), table)
    _png_declaring(made["bomb"] / "bomb.png", 8000, 8000)
    io.imsave(made["flat"] / "flat.png", np.full((20, 20), 9, np.uint8), check_contrast=False)
    return made


@pytest.mark.parametrize(("case", "mentions"), [
    ("empty", "no images found"), ("nan", "every pixel is blank"), ("noimage", "no image HDU"),
    ("bomb", "above the limit of 40,000,000"), ("flat", "constant image"),
])
def test_ingest_cli_bad_input_is_one_line(case: str, mentions: str, bad_inputs: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    args = ["data", "ingest", str(bad_inputs[case]), str(tmp_path / "out.zarr"), "--size", "16", "--no-progress"]
    rc, err = invoke(args, capsys)
    assert_one_line_error(rc, err, args, mentions)
    assert not (tmp_path / "out.zarr").exists()
