"""Physical properties with 68% intervals (:mod:`deepgalaxy.core.property_prediction`, ``Model.predict_properties``)
and ``deepgalaxy predict`` for a model with property heads: the arithmetic against hand computation from the heads'
raw output, the intervals' width and coverage, the circular azimuth, the CSV columns, and untrained heads refused."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from skimage import io

from deepgalaxy.core.model import Model
from deepgalaxy.core.observation import load_observation
from deepgalaxy.core.properties import TARGETS, target_columns, view_vector
from deepgalaxy.core.property_prediction import Estimate, PropertiesNotTrainedError, property_prediction
from deepgalaxy.core.specs import PropertyHeads
from deepgalaxy.runs.predict import CLASS_MYR_COLUMNS, COLUMNS, PredictionRecord, property_columns, sheet_title
from tests.test_cli_errors import assert_one_line_error, invoke
from tests.test_observation import galaxy_pair

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_torch_thread")]

SCALE = [[-50.0, 300.0], [800.0, 400.0], [0.0, 0.3], [15.0, 8.0], [0.1, 0.6], [-0.2, 0.5], [0.3, 0.55]]
"""(mean, std) of the seven default target columns, as training would record them."""
CLASS_MYR = 23.7
NAMES = ["time_since_pericentre", "time_to_coalescence", "mass_ratio", "pericentre", "inclination", "azimuth"]
TINY: dict[str, Any] = {"input_size": 32, "backbone.options.widths": [8, 16], "decoder_channels": [16, 8],
                        "head_hidden": [16]}


def _model(normalisation: list[list[float]] | None = SCALE, class_myr: float | None = CLASS_MYR,
           properties: bool = True) -> Model:
    """A tiny full-simple in torch: with property heads normalised by ``normalisation`` (None: untrained)."""
    from deepgalaxy import registry

    extra: dict[str, Any] = {"class_myr": class_myr} if class_myr is not None else {}
    if properties:
        extra["properties"] = {"hidden": [16], "normalisation": normalisation or []}
    return registry.create("full-simple", framework="torch", seed=1, **TINY, **extra)


def _raw(mean: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    return np.concatenate([mean, logvar], axis=1)


HEADS = PropertyHeads(normalisation=tuple((m, s) for m, s in SCALE))


def _view_raw(inclination: float, azimuth: float, logvar: float) -> np.ndarray:
    """The raw output of HEADS for a mean view vector at (inclination, azimuth) and every log-variance ``logvar``."""
    scale = np.asarray(SCALE)
    physical = np.concatenate([scale[:4, 0], view_vector(np.array([inclination]), np.array([azimuth]))[0]])
    return _raw(((physical - scale[:, 0]) / scale[:, 1])[None], np.full((1, 7), logvar))


# --- the arithmetic ---------------------------------------------------------------------------------------------


def test_properties_from_the_model_match_hand_computation_from_its_raw_output() -> None:
    model = _model()
    x = np.random.default_rng(0).random((5, 32, 32, 1)).astype(np.float32)
    raw = model.backend.infer(model.native, "properties", x).astype(np.float64)
    got = model.predict_properties(x, batch_size=2)
    assert got.names == NAMES and got.columns == tuple(target_columns(list(TARGETS)))
    for i in range(5):
        mean = [raw[i, c] * s + m for c, (m, s) in enumerate(SCALE)]
        sigma = [math.exp(raw[i, 7 + c] / 2) * s for c, (_, s) in enumerate(SCALE)]
        for name, c in (("time_since_pericentre", 0), ("time_to_coalescence", 1), ("pericentre", 3)):
            assert got.row(i)[name] == pytest.approx((mean[c], mean[c] - sigma[c], mean[c] + sigma[c]), rel=1e-5)
        assert got.row(i)["mass_ratio"] == pytest.approx(
            (10 ** mean[2], 10 ** (mean[2] - sigma[2]), 10 ** (mean[2] + sigma[2])), rel=1e-5)
        vx, vy, vz = mean[4:]
        assert got.values["inclination"][i] == pytest.approx(
            math.degrees(math.acos(vz / math.sqrt(vx * vx + vy * vy + vz * vz))), abs=1e-4)
        assert got.values["azimuth"][i] == pytest.approx(math.degrees(math.atan2(vy, vx)) % 360, abs=1e-4)
        np.testing.assert_allclose(got.mean[i], mean, rtol=1e-5)
        np.testing.assert_allclose(got.sigma[i], sigma, rtol=1e-5)


def test_gaussian_intervals_hold_the_value_and_widen_with_the_log_variance() -> None:
    logvar = np.array([-3.0, -1.0, 0.0, 1.0, 3.0])
    mean = np.random.default_rng(1).normal(size=(1, 7)).repeat(5, axis=0)
    got = property_prediction(_raw(mean, logvar[:, None].repeat(7, axis=1)), HEADS)
    for name, (c, std) in {"time_since_pericentre": (0, 300.0), "time_to_coalescence": (1, 400.0),
                           "pericentre": (3, 8.0)}.items():
        value, low, high = got.values[name], got.low[name], got.high[name]
        assert (low < value).all() and (value < high).all()
        np.testing.assert_allclose(high - low, 2 * np.exp(logvar / 2) * std)
        np.testing.assert_allclose(value, mean[:, c] * std + SCALE[c][0])
    q, q_low, q_high = got.values["mass_ratio"], got.low["mass_ratio"], got.high["mass_ratio"]
    assert (q_low < q).all() and (q < q_high).all() and (np.diff(q_high / q_low) > 0).all()
    log_sigma = np.exp(logvar / 2) * 0.3
    np.testing.assert_allclose(np.log10(q_high) - np.log10(q), log_sigma)  # 10** of the log10 q interval
    np.testing.assert_allclose(np.log10(q) - np.log10(q_low), log_sigma)
    # the recalibrated sigmas: each column's factor widens its interval, the values stay
    factors = (1.0, 1.0, 2.0, 3.0, 1.0, 1.0, 1.0)
    wider = property_prediction(_raw(mean, logvar[:, None].repeat(7, axis=1)),
                                HEADS.model_copy(update={"sigma_scale": factors}))
    np.testing.assert_allclose(wider.high["pericentre"] - wider.low["pericentre"], 3 * (high - low))
    np.testing.assert_allclose(np.log10(wider.high["mass_ratio"] / wider.values["mass_ratio"]), 2 * log_sigma)
    np.testing.assert_allclose(wider.values["pericentre"], value)


@pytest.mark.parametrize(("inclination", "azimuth"), [(35.0, 120.0), (90.0, 250.0), (140.0, 10.0), (60.0, 359.9)])
def test_a_sure_viewing_direction_gives_its_angles_and_a_narrow_interval(inclination: float, azimuth: float) -> None:
    got = property_prediction(_view_raw(inclination, azimuth, logvar=-24.0), HEADS)  # sigma ~ 6e-6 * std
    for name, truth in (("inclination", inclination), ("azimuth", azimuth)):
        assert got.values[name][0] == pytest.approx(truth, abs=1e-6)
        assert got.low[name][0] <= got.values[name][0] <= got.high[name][0]
        assert got.high[name][0] - got.low[name][0] < 1e-2
        assert got.covers(name, np.array([truth]))[0]


@pytest.mark.parametrize("azimuth", [2.0, 358.0])
def test_the_azimuth_interval_wraps_across_zero(azimuth: float) -> None:
    got = property_prediction(_view_raw(80.0, azimuth, logvar=-3.0), HEADS)  # a spread of some degrees
    value, low, high = got.values["azimuth"][0], got.low["azimuth"][0], got.high["azimuth"][0]
    assert value == pytest.approx(azimuth, abs=1e-6)
    assert 2 < high - low < 60 and low < value < high
    assert (low < 0) if azimuth < 180 else (high > 360)  # reported unwrapped: low <= value <= high as numbers
    across = np.array([0.0, 360.0, 359.0, 1.0])  # just across zero from the value: inside the interval
    assert got.covers("azimuth", across).all()
    assert not got.covers("azimuth", np.array([azimuth + 180.0, (azimuth + 90) % 360])).any()


def test_angle_intervals_cover_68_percent_of_independent_draws() -> None:
    """The intervals of drawn angles against a brute-force oracle: directions drawn with another seed fall inside
    them about 68% of the time (a wrongly wrapped azimuth or a wrong percentile would not)."""
    for inclination, azimuth, logvar in ((50.0, 3.0, -2.0), (100.0, 200.0, -1.0), (70.0, 357.0, -3.0)):
        raw = _view_raw(inclination, azimuth, logvar)
        got = property_prediction(raw, HEADS)
        mean, sigma = got.mean[0, 4:], got.sigma[0, 4:]
        v = mean + sigma * np.random.default_rng(99).standard_normal((20000, 3))
        inc = np.degrees(np.arccos(v[:, 2] / np.linalg.norm(v, axis=1)))
        az = np.degrees(np.arctan2(v[:, 1], v[:, 0])) % 360
        for name, truth in (("inclination", inc), ("azimuth", az)):
            covered = _covers(got, name, truth)
            assert covered == pytest.approx(0.683, abs=0.04), (name, inclination, azimuth, logvar)
            assert got.covers(name, truth).mean() == covered
            assert got.covers(name, got.values[name])[0] and got.high[name][0] - got.low[name][0] < 90  # one arc


def _covers(got: Any, name: str, truth: np.ndarray) -> float:
    low, high = got.low[name][0], got.high[name][0]
    if name == "azimuth":  # by hand: shift each truth by whole turns into [low, low + 360)
        shifted = low + np.mod(truth - low, 360.0)
        return float(((shifted >= low) & (shifted <= high)).mean())
    return float(((truth >= low) & (truth <= high)).mean())


def test_results_do_not_depend_on_the_batch() -> None:
    raw = np.random.default_rng(3).normal(size=(6, 14))
    together = property_prediction(raw, HEADS)
    for i in (0, 4):
        alone = property_prediction(raw[i : i + 1], HEADS)
        for name in NAMES:
            assert alone.row(0)[name] == together.row(i)[name]


def test_a_subset_of_targets_gives_only_its_properties() -> None:
    heads = PropertyHeads(targets=("viewing_direction", "mass_ratio"), normalisation=((0, 1),) * 4)
    got = property_prediction(np.zeros((2, 8)), heads)
    assert got.names == ["inclination", "azimuth", "mass_ratio"]
    np.testing.assert_allclose(got.values["mass_ratio"], 1.0)
    with pytest.raises(ValueError, match=r"expected \(N, 8\)"):
        property_prediction(np.zeros((2, 14)), heads)


def test_untrained_or_missing_property_heads_are_refused() -> None:
    with pytest.raises(PropertiesNotTrainedError, match="property heads of model 'x' were not trained"):
        property_prediction(np.zeros((1, 14)), PropertyHeads(), "x")
    x = np.zeros((1, 32, 32, 1), np.float32)
    with pytest.raises(PropertiesNotTrainedError, match="'full-simple' were not trained"):
        _model(normalisation=None).predict_properties(x)
    with pytest.raises(ValueError, match=r"predict_properties\(\) needs a properties"):
        _model(properties=False).predict_properties(x)


# --- predict -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("photos")
    for seed in range(2):
        io.imsave(d / f"pair{seed}.png", np.clip(galaxy_pair(seed=seed) * 2 - 60, 0, 255).astype(np.uint8),
                  check_contrast=False)
    return d


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def test_predict_cli_writes_every_property_with_its_interval_and_the_class_in_myr(
        photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deepgalaxy.cli import app
    from deepgalaxy.cli.common import run_cli
    from deepgalaxy.runs.predict import class_summary

    model = _model()
    folder = model.save(tmp_path / "model")
    out = tmp_path / "p.csv"
    capsys.readouterr()
    assert run_cli(app, ["predict", str(folder), str(photos), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert all(f in printed for f in ("time_since_pericentre (Myr)", "pericentre (kpc)", "23.7 Myr per class"))
    header, rows = _read_csv(out)
    assert header == [*COLUMNS, *CLASS_MYR_COLUMNS, *property_columns(NAMES)]
    images = np.stack([load_observation(str(photos / f"pair{i}.png"), 32, 1).image for i in range(2)])
    want = model.predict_properties(images)
    classes = class_summary(model.predict(images).probabilities)
    for i, row in enumerate(rows):
        for name in NAMES:
            for column, value in zip(property_columns([name]), want.row(i)[name], strict=True):
                assert float(row[column]) == pytest.approx(value, abs=1e-4, rel=1e-4), column
            assert float(row[f"{name}_low"]) <= float(row[f"{name}_high"])
        assert float(row["predicted_class_myr"]) == pytest.approx(classes["predicted_class"][i] * CLASS_MYR)
        assert float(row["expected_class_myr"]) == pytest.approx(classes["expected_class"][i] * CLASS_MYR, abs=1e-3)
        assert float(row["class_low_myr"]) <= float(row["expected_class_myr"]) <= float(row["class_high_myr"])


def test_predict_without_property_heads_or_class_myr_has_no_such_columns(photos: Path, tmp_path: Path) -> None:
    from deepgalaxy.runs.predict import predict

    result = predict(_model(properties=False, class_myr=None), [photos / "pair0.png"])
    assert result.columns() == list(COLUMNS) and result.records[0].properties == {}
    assert result.records[0].expected_class_myr is None
    path = result.write_csv(tmp_path / "p.csv")
    assert _read_csv(path)[0] == list(COLUMNS)


def test_predict_refuses_untrained_property_heads(photos: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    folder = _model(normalisation=None).save(tmp_path / "untrained")
    args = ["predict", str(folder), str(photos), "--out", str(tmp_path / "p.csv"), "--no-progress"]
    assert_one_line_error(*invoke(args, capsys), args, mentions="were not trained")
    assert not (tmp_path / "p.csv").exists()


def test_the_sheet_shows_the_time_since_pericentre_with_its_interval() -> None:
    record = PredictionRecord(file="a.png", properties={"time_since_pericentre": Estimate(-120.4, -180.2, -60.6)})
    assert sheet_title(record).splitlines()[-1] == "t-peri -120 [-180, -61] Myr"
