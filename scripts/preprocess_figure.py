"""Draw docs/preprocess.png: observed images as read and after deepgalaxy's preprocessing (core/observation.py).

The images are license-clean and ship with the dependencies: three crops of scikit-image's Hubble Deep Field
(public domain) and a synthetic FITS pair off-centre, on a sky offset with noise, a foreground star and a blank
(NaN) strip. Run: ``python scripts/preprocess_figure.py [OUT.png]``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from astropy.io import fits
from skimage import data, io

from deepgalaxy.core.observation import PreprocessOptions, draw_preprocessing


def synthetic_pair() -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:200, :260]

    def blob(y: float, x: float, s: float, a: float) -> np.ndarray:
        return a * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * s * s))

    tail = sum(blob(70 + 3 * t, 150 + 4 * t, 3.0, 6.0) for t in range(12))
    img = 100 + rng.normal(0, 2, yy.shape) + blob(60, 90, 8, 80) + blob(80, 130, 6, 50) + tail + blob(150, 60, 1, 400)
    img[:, :12] = np.nan
    return img.astype(np.float32)[::-1]  # FITS rows run bottom-up


def main(out: Path) -> Path:
    hubble = data.hubble_deep_field()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, (y, x) in {"hdf-a": (380, 180), "hdf-b": (40, 560), "hdf-c": (600, 720)}.items():
            io.imsave(folder / f"{name}.png", hubble[y : y + 220, x : x + 260], check_contrast=False)
        fits.PrimaryHDU(synthetic_pair()).writeto(folder / "synthetic-pair.fits")
        paths = sorted(folder.iterdir())
        return draw_preprocessing(paths, out, size=64, channels=1, options=PreprocessOptions(mask_stars=True))


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[1] / "docs" / "preprocess.png"))
