"""Training property heads end to end: both frameworks log the same metrics, the saved card carries the targets'
normalisation, Myr per class and the recalibrated sigmas; a version-1 store trains; a store without the properties
is refused before anything starts, naming the missing arrays."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deepgalaxy.core.dataset import open_dataset
from deepgalaxy.core.model import read_card
from deepgalaxy.core.properties import PhysicalUnits, needed_properties, target_table
from deepgalaxy.core.specs import DataSpec
from tests.runs_support import CARD, TINY, cli, make_dataset, make_observations, mlflow_runs
from tests.test_store_properties import as_version_1

FRAMEWORKS = [f for f in ("torch", "tensorflow") if importlib.util.find_spec(f)]
PROPERTIES = ["card.properties.hidden=[8]", "train.max_steps_per_epoch=3"]


def train_properties(data: Path, root: Path, framework: str = "torch") -> Any:
    from deepgalaxy.runs.training import train

    return train(CARD, data, framework=framework, epochs=1, overrides=[*TINY, *PROPERTIES], register=False,
                 tracking_uri=f"sqlite:///{root / 'mlflow.db'}", run_dir=root / f"run-{framework}", progress=False)


def expected_normalisation(data: Path) -> np.ndarray:
    """(mean, std) per target column over the training split, computed here from the store's properties."""
    ds = open_dataset(data)
    spec = DataSpec(path=str(data))
    train, _ = ds.split(spec.split, spec.validation_fraction, spec.seed)
    targets = ("time_since_pericentre", "time_to_coalescence", "mass_ratio", "pericentre", "viewing_direction")
    table = target_table(train.properties(needed_properties(targets)), targets)
    return np.array([(np.nanmean(c), np.nanstd(c)) for c in table.T])


def test_both_frameworks_train_property_heads_into_a_card_that_predicts_in_physical_units(
        tmp_path: Path, subtests: Any) -> None:
    data = make_dataset(tmp_path / "tiny.zarr")
    attrs = open_dataset(data).attrs
    metrics: dict[str, set[str]] = {}
    for framework in FRAMEWORKS:
        with subtests.test(framework=framework):
            result = train_properties(data, tmp_path, framework)
            card = read_card(result.run_dir / "model")
            assert card.properties is not None
            normalisation = np.array(card.properties.normalisation)
            std = normalisation[:, 1]
            # constant columns (one pericentre draw per simulation is not constant; a view vector column may be)
            expected = expected_normalisation(data)
            expected[:, 1] = np.where(expected[:, 1] > 1e-6, expected[:, 1], 1.0)
            np.testing.assert_allclose(normalisation, expected, rtol=1e-5, atol=1e-5)
            assert (std > 0).all()
            time_unit = PhysicalUnits().time_myr
            assert card.class_myr == pytest.approx(attrs["generator"]["params"]["t_end"] / 70 * time_unit)
            assert len(card.properties.sigma_scale) == len(card.properties.columns)
            assert min(card.properties.sigma_scale) > 0
            run = next(r for r in mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}") if r.info.run_id == result.run_id)
            logged = set(run.data.metrics)
            for name in ("train/loss_properties", "val/loss_properties", "val/time_since_pericentre_mae",
                         "val/log10_mass_ratio_mae", "val/pericentre_mae", "val/viewing_angle_error",
                         "val/time_since_pericentre_coverage68", "calibration/view_z_sigma_scale"):
                assert name in logged, name
            assert 0 <= run.data.metrics["val/time_since_pericentre_coverage68"] <= 1
            metrics[framework] = {m for m in logged if not m.startswith(("perf/", "system/", "dist/"))}
    if len(metrics) == 2:
        assert metrics["torch"] == metrics["tensorflow"]


def test_a_version_1_store_trains_property_heads_from_what_it_holds(tmp_path: Path) -> None:
    v2 = make_dataset(tmp_path / "tiny.zarr")
    v1 = as_version_1(v2, tmp_path / "v1.zarr")
    assert open_dataset(v1).attrs["schema_version"] == 1
    card = read_card(train_properties(v1, tmp_path).run_dir / "model")
    assert card.properties is not None
    np.testing.assert_allclose(np.array(card.properties.normalisation)[:, 0], expected_normalisation(v2)[:, 0],
                               rtol=1e-5, atol=1e-5)


def test_a_store_without_the_properties_is_refused_before_training_naming_the_arrays(tmp_path: Path) -> None:
    observations = make_observations(tmp_path / "obs.zarr")
    out = cli("train", "vae-simple", "--data", str(observations), "--set", "card.input_size=32",
              "--set", 'card.properties.targets=["mass_ratio","pericentre"]', "--no-register", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "card 'vae-simple' learns mass_ratio, pericentre" in out.stderr
    assert "properties/mass_ratio" in out.stderr and "properties/pericentre" in out.stderr
    assert "--labels" in out.stderr
    assert not list(tmp_path.glob("runs/*")) and not (tmp_path / "mlruns").exists()
    # the unlabelled store beside simulations gives no targets and trains: its rows count in the other losses
    data = make_dataset(tmp_path / "tiny.zarr")
    from deepgalaxy.runs.training import train

    result = train(CARD, [str(data), f"{observations}:0.25"], epochs=1, overrides=[*TINY, *PROPERTIES],
                   register=False, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", run_dir=tmp_path / "mixed",
                   progress=False)
    assert "val/time_since_pericentre_mae" in result.final
    assert "val/obs/time_since_pericentre_mae" not in result.final  # nothing known to score there
    assert json.loads((result.run_dir / "run.json").read_text())["card"]["properties"]["normalisation"] == []
