"""Observed simulations: each effect of ``--observe`` measurably does what its parameter says, bad values are refused,
images are deterministic for a seed (resume included), and a store records how it was observed."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy import ndimage

from deepgalaxy.cli import app
from deepgalaxy.cli.common import run_cli
from deepgalaxy.core.dataset import open_dataset
from deepgalaxy.core.errors import DatasetError
from deepgalaxy.core.schema import ATTRS_KEY
from deepgalaxy.plugins.simulation.observe import Observation, Poses, draw_poses, observe, sersic_stamp
from deepgalaxy.plugins.simulation.physics import MergerParams, simulate_merger
from deepgalaxy.plugins.simulation.render import observed_flux, project
from deepgalaxy.plugins.simulation.source import simulate
from tests._data_helpers import TINY, tiny_store

NOTHING = dict(psf_fwhm=0.0, sky_noise=0.0, stars=0.0)
"""An observation that changes nothing, to switch on one effect at a time."""


@pytest.fixture(scope="module")
def merger() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Snapshots 0 and 1 of a small merger: (positions, centres, weights)."""
    r = simulate_merger(MergerParams(mass_ratio=0.5, pericentre=0.6, particles=3000, snapshots=2, t_end=0.04,
                                     dt=0.02), np.random.default_rng(3))
    return r.positions, r.centres, r.weights


def _point_source(size: int = 65) -> np.ndarray:
    flux = np.zeros((1, 1, size, size), dtype=np.float32)
    flux[0, 0, size // 2, size // 2] = 1.0
    return flux


def _fwhm(image: np.ndarray) -> float:
    """Full width at half maximum along the row and the column through the peak, each half-maximum crossing
    interpolated linearly between pixel centres; the mean of the two."""
    y, x = np.unravel_index(np.argmax(image), image.shape)
    widths = []
    for profile, centre in ((image[y], x), (image[:, x], y)):
        half = profile[centre] / 2
        sides = []
        for step in (1, -1):
            i = centre
            while profile[i + step] > half:
                i += step
            sides.append(abs(i - centre) + (profile[i] - half) / (profile[i] - profile[i + step]))
        widths.append(sum(sides))
    return float(np.mean(widths))


@pytest.mark.parametrize("psf", ["gaussian", "moffat"])
@pytest.mark.parametrize("fwhm", [2.0, 3.5, 6.0])
def test_psf_fwhm_of_a_point_source(psf: str, fwhm: float) -> None:
    obs = Observation(**{**NOTHING, "psf": psf, "psf_fwhm": fwhm})
    image = observe(_point_source(), obs, reference=1.0, light=1.0, seed=0)[0, 0]
    assert _fwhm(image) == pytest.approx(fwhm, rel=0.10)
    assert image.sum() == pytest.approx(1.0, rel=1e-3)  # flux is kept


def test_moffat_and_gaussian_have_their_own_shapes() -> None:
    """At one FWHM from the centre a Gaussian is at 2^-4 of its peak, a Moffat of beta b at (1 + 4(2^(1/b) - 1))^-b
    (0.099 for beta 4.765, 0.155 for beta 2.5): the heavier wings are really there."""
    fwhm = 6.0
    for psf, beta in (("gaussian", 4.765), ("moffat", 4.765), ("moffat", 2.5)):
        image = observe(_point_source(), Observation(**{**NOTHING, "psf": psf, "psf_fwhm": fwhm, "moffat_beta": beta}),
                        1.0, 1.0, 0)[0, 0]
        expected = 2.0**-4 if psf == "gaussian" else (1 + 4 * (2 ** (1 / beta) - 1)) ** -beta
        assert image[32, 32 + int(fwhm)] / image[32, 32] == pytest.approx(expected, rel=0.05), (psf, beta)


def test_sky_noise_sigma_in_an_empty_region(merger: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """Sky noise is sky_noise x the merger's central surface brightness (the brightest pixel of the unobserved first
    snapshot), measured in a corner far from the galaxies; the linear flux keeps negative values."""
    positions, centres, weights = merger
    clean = project(positions, centres, weights, 64, 2, 12.0)
    noisy = observed_flux(positions, centres, weights, 64, 2, 12.0, Observation(**{**NOTHING, "sky_noise": 0.01}), 1)
    corner = noisy[:, :, :12, :12]
    assert np.all(clean[:, :, :12, :12] == 0)  # an empty region
    assert corner.std() == pytest.approx(0.01 * clean[0].max(), rel=0.05)
    assert abs(corner.mean()) < 4 * corner.std() / math.sqrt(corner.size)  # zero mean: sky-subtracted


def test_shot_noise_is_poisson_with_the_asked_counts_at_the_centre() -> None:
    reference, counts = 50.0, 400.0
    for level in (1.0, 0.25):  # at I0 and at a quarter of it: variance proportional to the flux
        flux = np.full((1, 4, 64, 64), level * reference, dtype=np.float32)
        out = observe(flux, Observation(**{**NOTHING, "peak_counts": counts}), reference, 1.0, 0)
        assert out.mean() == pytest.approx(level * reference, rel=0.01)
        assert out.std() == pytest.approx(reference * math.sqrt(level / counts), rel=0.03)


def test_foreground_stars_number_and_magnitudes() -> None:
    """Poisson number per image with the asked mean; magnitudes within the range, with Euclidean counts (10^0.6 more
    stars per magnitude fainter)."""
    light, mean = 1000.0, 6.0
    out = observe(np.zeros((50, 4, 32, 32), dtype=np.float32),
                  Observation(**{**NOTHING, "stars": mean, "star_mags": (1.0, 9.0)}), 1.0, light, 0)
    per_image = (out > 0).sum(axis=(2, 3)).ravel()
    assert per_image.mean() == pytest.approx(mean, abs=4 * math.sqrt(mean / per_image.size))
    assert per_image.var() == pytest.approx(mean, rel=0.3)  # Poisson: variance = mean
    mags = -2.5 * np.log10(out[out > 0] / light)
    assert mags.min() >= 1.0 - 1e-4 and mags.max() <= 9.0 + 1e-4
    faintest, next_ = ((mags > 8) & (mags <= 9)).sum(), ((mags > 7) & (mags <= 8)).sum()
    assert faintest / next_ == pytest.approx(10**0.6, rel=0.3)


def test_background_galaxies_are_elliptical_sersic_blobs() -> None:
    stamp, top, left = sersic_stamp(30.3, 20.7, r_e=5.0, n=1.0, q=1.0, angle=0.0)
    yy, xx = np.mgrid[top : top + stamp.shape[0], left : left + stamp.shape[1]] + 0.5
    r = np.hypot(xx - 30.3, yy - 20.7)
    assert stamp.sum() == pytest.approx(1.0)
    assert np.sum(stamp[r < 5.0]) == pytest.approx(0.5, abs=0.04)  # half the light within the effective radius
    assert np.average(xx, weights=stamp) == pytest.approx(30.3, abs=0.02)
    flat, top, left = sersic_stamp(20.0, 20.0, r_e=4.0, n=1.0, q=0.5, angle=math.pi / 2)  # major axis along y
    yy, xx = np.mgrid[top : top + flat.shape[0], left : left + flat.shape[1]] + 0.5
    ratio = np.average((xx - 20) ** 2, weights=flat) / np.average((yy - 20) ** 2, weights=flat)
    assert ratio == pytest.approx(0.5**2, rel=0.15)

    out = observe(np.zeros((20, 2, 128, 128), dtype=np.float32),
                  Observation(**{**NOTHING, "background_galaxies": 3.0, "background_radius": (0.5, 1.0)}), 1.0, 1e3, 0)
    found = [ndimage.label(image > 0)[1] for image in out.reshape(-1, 128, 128)]
    assert np.mean(found) == pytest.approx(3.0, abs=0.8)  # a few overlap
    assert np.mean([(image > 0).sum() / n for image, n in zip(out.reshape(-1, 128, 128), found, strict=True)
                    if n]) > 9  # extended, not points


def _centroid(image: np.ndarray) -> np.ndarray:
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    return np.array([np.average(xx, weights=image), np.average(yy, weights=image)])


VIEW = 2
"""A camera that sees the two galaxies well apart (camera 0 looks along the line joining them)."""


def _pose(dx: float = 0.0, dy: float = 0.0, scale: float = 1.0, degrees: float = 0.0) -> Poses:
    """The same pose in every image of one snapshot seen by cameras 0..VIEW."""
    return Poses(*(np.full((1, VIEW + 1), v) for v in (dx, dy, scale, math.radians(degrees))))


def test_shift_moves_the_centroid_by_the_asked_subpixel_amount(
        merger: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    positions, centres, weights = merger
    args = (positions[:1], centres[:1], weights, 128, VIEW + 1, 8.0)
    before = _centroid(project(*args)[0, VIEW])
    after = _centroid(project(*args, poses=_pose(dx=0.3, dy=-0.2))[0, VIEW])
    np.testing.assert_allclose(after - before, [0.3, -0.2], atol=0.03)
    drawn = draw_poses(Observation(shift=0.5), np.random.default_rng(0), (40, 5))
    assert drawn is not None
    assert np.abs(drawn.dx).max() <= 0.5 and np.abs(drawn.dx).max() > 0.45 and np.abs(drawn.dy).max() <= 0.5
    assert draw_poses(Observation(), np.random.default_rng(0), (40, 5)) is None  # nothing moves by default


def test_scale_jitter_changes_size_at_constant_surface_brightness(
        merger: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    positions, centres, weights = merger
    args = (positions[:1], centres[:1], weights, 96, VIEW + 1, 8.0)
    base, zoomed = project(*args)[0, VIEW], project(*args, poses=_pose(scale=1.25))[0, VIEW]

    def radius(image: np.ndarray) -> float:
        yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
        cx, cy = _centroid(image)
        return float(np.sqrt(np.average((xx - cx) ** 2 + (yy - cy) ** 2, weights=image)))

    assert radius(zoomed) / radius(base) == pytest.approx(1.25, rel=0.03)
    assert zoomed.sum() / base.sum() == pytest.approx(1.25**2, rel=0.02)  # flux ~ area: same surface brightness
    drawn = draw_poses(Observation(scale_jitter=0.25), np.random.default_rng(0), (200, 5))
    assert drawn is not None
    assert drawn.scale.min() >= 1 / 1.25 and drawn.scale.max() <= 1.25
    assert abs(np.log(drawn.scale).mean()) < 0.02  # log-uniform: as often smaller as larger


def test_position_angle_rotates_the_image(merger: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """The pair's long axis (from second moments, y up as displayed) turns by the asked angle, counter-clockwise."""
    positions, centres, weights = merger
    args = (positions[:1], centres[:1], weights, 64, VIEW + 1, 12.0)

    def axis_angle(image: np.ndarray) -> float:
        yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
        cx, cy = _centroid(image)
        x, y = xx - cx, -(yy - cy)
        mxx, myy, mxy = (np.average(v, weights=image) for v in (x * x, y * y, x * y))
        return math.degrees(0.5 * math.atan2(2 * mxy, mxx - myy))

    before = axis_angle(project(*args)[0, VIEW])
    after = axis_angle(project(*args, poses=_pose(degrees=30))[0, VIEW])
    assert (after - before + 90) % 180 - 90 == pytest.approx(30.0, abs=1.5)
    drawn = draw_poses(Observation(pa_jitter=180), np.random.default_rng(0), (200, 5))
    assert drawn is not None and np.degrees(np.abs(drawn.angle)).max() > 170


def test_redshift_divides_the_flux_by_one_plus_z_to_the_fourth_before_the_stretch(
        merger: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    positions, centres, weights = merger
    args = (positions, centres, weights, 32, 2, 8.0)
    clean = observed_flux(*args)
    dimmed = observed_flux(*args, Observation(**{**NOTHING, "redshift": 0.5}), seed=0)
    np.testing.assert_allclose(dimmed, clean / 1.5**4, rtol=1e-6)
    # stars and sky are not dimmed: against them the merger fades
    obs = dict(NOTHING, sky_noise=0.01)
    near = observed_flux(*args, Observation(**obs), seed=0)
    far = observed_flux(*args, Observation(**obs, redshift=0.5), seed=0)
    np.testing.assert_allclose(near - far, clean * (1 - 1.5**-4), atol=1e-3 * clean.max())


def test_each_effect_draws_from_its_own_stream(merger: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """Sky noise does not move the stars: (stars + sky) - (sky alone) = stars alone; and a seed fixes everything."""
    positions, centres, weights = merger
    args = (positions, centres, weights, 32, 2, 8.0)
    both = observed_flux(*args, Observation(**{**NOTHING, "stars": 5.0, "sky_noise": 0.01}), seed=4)
    sky = observed_flux(*args, Observation(**{**NOTHING, "sky_noise": 0.01}), seed=4)
    stars = observed_flux(*args, Observation(**{**NOTHING, "stars": 5.0}), seed=4)
    clean = observed_flux(*args)
    np.testing.assert_allclose(both - sky, stars - clean, atol=1e-5 * clean.max())
    every = Observation(psf="moffat", peak_counts=500, stars=3, background_galaxies=2, shift=0.5, scale_jitter=0.2,
                        pa_jitter=180, redshift=0.2)
    once, again = (observed_flux(*args, every, seed=4) for _ in range(2))
    np.testing.assert_array_equal(once, again)
    assert not np.array_equal(once, observed_flux(*args, every, seed=5))


@pytest.mark.parametrize(("params", "mentions"), [
    ({"psf": "airy"}, "--psf"),
    ({"psf_fwhm": -1.0}, "--psf-fwhm"),
    ({"psf_fwhm": math.nan}, "--psf-fwhm"),
    ({"moffat_beta": 1.0}, "--moffat-beta"),
    ({"sky_noise": -0.1}, "--sky-noise"),
    ({"peak_counts": math.inf}, "--peak-counts"),
    ({"stars": -2.0}, "--stars"),
    ({"stars": 1e9}, "--stars"),
    ({"star_mags": (9.0, 0.0)}, "--star-mags"),
    ({"star_mags": (1.0,)}, "--star-mags"),
    ({"background_galaxies": -1.0}, "--background-galaxies"),
    ({"background_radius": (0.0, 2.0)}, "--background-radius"),
    ({"shift": -0.5}, "--shift"),
    ({"scale_jitter": 2.0}, "--scale-jitter"),
    ({"pa_jitter": 181.0}, "--pa-jitter"),
    ({"redshift": -0.1}, "--redshift"),
])
def test_bad_observation_values_are_refused_by_name(params: dict[str, object], mentions: str) -> None:
    with pytest.raises(DatasetError, match=mentions):
        Observation(**params)  # type: ignore[arg-type]


def test_the_cli_refuses_bad_observation_values_in_one_line(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.zarr"
    for extra, mentions in ((["--observe", "--psf-fwhm", "-1"], "--psf-fwhm"),
                            (["--observe", "--star-mags", "9,0"], "--star-mags"),
                            (["--observe", "--background-radius", "x"], "--background-radius"),
                            (["--observe", "--redshift", "nan"], "--redshift"),
                            (["--stars", "3"], "--observe")):
        capsys.readouterr()
        rc = run_cli(app, ["data", "simulate", str(out), *extra, "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and mentions in err, (extra, err)
        assert "Traceback" not in err and not out.exists()


OBSERVED = dict(observe=True, psf="moffat", psf_fwhm=2.0, sky_noise=0.002, peak_counts=2000.0, stars=2.0,
                background_galaxies=1.0, shift=0.5, scale_jitter=0.1, pa_jitter=20.0, redshift=0.1)


def test_a_store_says_how_it_was_observed_and_resume_checks_it(tmp_path: Path) -> None:
    out = tiny_store(tmp_path / "obs.zarr", sims=1, **OBSERVED)
    params = open_dataset(out).attrs["generator"]["params"]
    for key, value in OBSERVED.items():
        assert params[key] == value, key
    assert params["star_mags"] == [0.0, 9.0] and params["background_radius"] == [0.5, 3.0]  # defaults recorded too
    with pytest.raises(DatasetError, match="psf_fwhm: stored 2, asked 3"):
        tiny_store(out, sims=1, **{**OBSERVED, "psf_fwhm": 3.0})
    simulate(out, progress=False)  # the store's own parameters: nothing to do
    clean = open_dataset(tiny_store(tmp_path / "clean.zarr", sims=1)).attrs["generator"]["params"]
    assert "psf_fwhm" not in clean  # an unobserved store does not claim a PSF


def test_observed_store_resumes_to_identical_images(tmp_path: Path) -> None:
    """An interrupted observed store, resumed, equals one written in one go (every effect seeded per simulation)."""
    out = tmp_path / "resume.zarr"
    params = {**TINY, **OBSERVED, "sims": 2}

    def stop(sim: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate(out, progress=False, workers=1, on_written=stop, **params)
    simulate(out, progress=False, workers=1, **params)
    reference = tiny_store(tmp_path / "ref.zarr", **{**OBSERVED, "sims": 2})
    a, b = (zarr.open_group(str(p), mode="r")["images"][:] for p in (out, reference))
    np.testing.assert_array_equal(a, b)
    clean = open_dataset(tiny_store(tmp_path / "clean.zarr", sims=2)).images(np.arange(32))
    assert not np.array_equal(clean, b)


def test_an_unobserved_store_of_the_previous_version_still_resumes_an_observed_one_does_not(tmp_path: Path) -> None:
    """Version 2 renders unobserved images exactly as version 1 did: a version-1 store without --observe resumes (a
    deleted chunk is re-simulated identically); one with --observe is refused, since its images would differ."""
    out = tiny_store(tmp_path / "v1.zarr", sims=2)
    root = zarr.open_group(str(out), mode="r+")
    attrs = dict(root.attrs[ATTRS_KEY])
    attrs["generator"] = {**attrs["generator"], "version": 1,
                          "params": {**attrs["generator"]["params"], "psf_sigma": 1.5, "stars": 8, "sky_noise": 0.6}}
    root.attrs[ATTRS_KEY] = attrs
    before = root["images"][:]
    next(p for p in sorted((out / "images").rglob("*")) if p.is_file() and p.name != "zarr.json").unlink()
    repaired: list[int] = []
    simulate(out, progress=False, workers=1, on_written=repaired.append)
    assert repaired == [0]
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["images"][:], before)
    attrs["generator"]["params"]["observe"] = True
    root.attrs[ATTRS_KEY] = attrs
    with pytest.raises(DatasetError, match=r"version 1 \(observed\).*cannot be resumed"):
        simulate(out, progress=False, workers=1)
