"""Per-image physical properties of a store: the unit scaling, schema version 2's ``properties/*`` arrays written by
the simulator, version-1 stores read (properties derived) and resumed, stores that cannot give them."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from skimage import data, io

from deepgalaxy.core.dataset import open_dataset, verify_store
from deepgalaxy.core.errors import DatasetError
from deepgalaxy.core.properties import PROPERTIES, PhysicalUnits
from deepgalaxy.core.schema import ATTRS_KEY, PROPERTIES_GROUP, SCHEMA_VERSION, label_for_snapshot
from deepgalaxy.plugins.ingest.source import ingest
from deepgalaxy.plugins.simulation.physics import Galaxy, parabolic_orbit
from deepgalaxy.plugins.simulation.source import simulate
from tests.conftest import run_cli

SMALL = dict(sims=2, particles=200, size=16, cameras=6, snapshots=6, dt=0.05, workers=1, progress=False)
"""2 simulations x 6 cameras (the six axes) x 6 snapshots = 72 images of 16x16; about a second."""
NAMES = list(PROPERTIES)

# SI constants, to scale the N-body units by hand independently of core.properties
G_SI, MSUN_KG, KPC_M, MYR_S = 6.67430e-11, 1.98847e30, 3.0856776e19, 3.15576e13


def hand_units(halo_mass: float, scale_radius_kpc: float) -> tuple[float, float]:
    """(velocity unit km/s, time unit Myr): v = sqrt(G M / r_s), t = r_s / v, in SI."""
    v = math.sqrt(G_SI * halo_mass * MSUN_KG / (scale_radius_kpc * KPC_M))
    return v / 1e3, scale_radius_kpc * KPC_M / v / MYR_S


@pytest.fixture(scope="module")
def v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulate(tmp_path_factory.mktemp("v2") / "v2.zarr", **SMALL)


def as_version_1(src: Path, dst: Path) -> Path:
    """A copy of ``src`` as the previous schema wrote it: no units, no properties, parameters without the units."""
    shutil.copytree(src, dst)
    root = zarr.open_group(str(dst), mode="r+")
    attrs = dict(root.attrs[ATTRS_KEY])
    del attrs["units"], attrs["properties"]
    params = {k: v for k, v in attrs["generator"]["params"].items() if k not in ("halo_mass", "scale_radius")}
    attrs.update(schema_version=1, generator={**attrs["generator"], "params": params})
    root.attrs[ATTRS_KEY] = attrs
    shutil.rmtree(dst / PROPERTIES_GROUP)
    assert PROPERTIES_GROUP not in zarr.open_group(str(dst), mode="r")
    return dst


def test_unit_scaling_by_hand() -> None:
    default = PhysicalUnits()
    assert default.velocity_kms == pytest.approx(463.7, abs=0.05)
    assert default.time_myr == pytest.approx(42.17, abs=0.005)
    assert default.length_kpc == 20.0
    for mass, radius in ((1e12, 20.0), (1e11, 10.0), (3e10, 2.5)):
        units = PhysicalUnits(mass, radius)
        velocity, time = hand_units(mass, radius)
        assert units.velocity_kms == pytest.approx(velocity, rel=2e-4)
        assert units.time_myr == pytest.approx(time, rel=2e-4)
    assert hand_units(1e11, 10.0)[1] == pytest.approx(47.15, abs=0.01)  # 207.4 km/s: the lighter halo is slower


def test_the_simulation_frame_is_the_orbital_frame() -> None:
    """The secondary starts along +x moving towards +y, angular momentum +z: what the properties assume."""
    centres, velocities = parabolic_orbit((Galaxy(1.0, 1.0), Galaxy(0.5, 0.5 ** (1 / 3))), 0.6, 8.0)
    rel, rel_v = centres[1] - centres[0], velocities[1] - velocities[0]
    np.testing.assert_allclose(rel / np.linalg.norm(rel), [1, 0, 0], atol=1e-12)
    assert rel_v[1] > 0 and rel_v[2] == 0
    spin = np.cross(rel, rel_v)
    np.testing.assert_allclose(spin / np.linalg.norm(spin), [0, 0, 1], atol=1e-12)


def test_a_simulated_store_records_units_and_properties_that_agree_with_its_simulations(v2: Path) -> None:
    ds = open_dataset(v2)
    assert ds.attrs["schema_version"] == SCHEMA_VERSION == 2
    assert ds.attrs["units"] == PhysicalUnits().attrs() and ds.store.units == PhysicalUnits()
    assert ds.attrs["properties"] == sorted(PROPERTIES) == sorted(ds.store.property_names)
    props = ds.properties(NAMES)
    assert all(v.dtype == np.float32 and v.shape == (len(ds),) for v in props.values())
    root = zarr.open_group(str(v2), mode="r")
    sims = {k: root[f"sims/{k}"][:] for k in ("t_pericentre", "t_coalescence", "mass_ratio", "pericentre")}
    meta = ds.metadata
    sim, time, camera = meta["sim_id"], meta["time"].astype(np.float64), meta["camera"]
    myr = hand_units(1e12, 20.0)[1]
    np.testing.assert_allclose(props["time_since_pericentre"], (time - sims["t_pericentre"][sim]) * myr, rtol=3e-4,
                               atol=1e-3)
    before = time < sims["t_pericentre"][sim]
    assert before.any() and (~before).any()
    assert (props["time_since_pericentre"][before] < 0).all() and (props["time_since_pericentre"][~before] >= 0).all()
    coalesced = np.isfinite(sims["t_coalescence"][sim])
    assert np.isnan(props["time_to_coalescence"][~coalesced]).all()
    np.testing.assert_allclose(props["time_to_coalescence"][coalesced],
                               ((sims["t_coalescence"][sim] - time) * myr)[coalesced], rtol=3e-4, atol=1e-3)
    np.testing.assert_array_equal(props["mass_ratio"], sims["mass_ratio"][sim])
    np.testing.assert_allclose(props["pericentre"], sims["pericentre"][sim] * 20.0, rtol=1e-6)
    assert props["pericentre"].min() > 8 and props["pericentre"].max() < 18  # 0.4..0.9 r_s of 20 kpc
    # cameras along +x, -x, +y, -y, +z, -z: (inclination, azimuth) of each line of sight in the orbital frame
    expected = {0: (90, 0), 1: (90, 180), 2: (90, 90), 3: (90, 270), 4: (0, None), 5: (180, None)}
    for c, (inclination, azimuth) in expected.items():
        np.testing.assert_allclose(props["inclination"][camera == c], inclination, atol=1e-4)
        if azimuth is not None:
            np.testing.assert_allclose(props["azimuth"][camera == c], azimuth, atol=1e-4)
    train, val = ds.split(validation_fraction=0.5)
    for part in (train, val):
        got = part.properties(["pericentre", "time_since_pericentre"])
        np.testing.assert_array_equal(got["pericentre"], props["pericentre"][part.indices])
        np.testing.assert_array_equal(got["time_since_pericentre"], props["time_since_pericentre"][part.indices])


def test_other_units_scale_the_properties(tmp_path: Path, v2: Path) -> None:
    """The units change no pixel, only the properties: times by the time unit, the pericentre by r_s."""
    light = simulate(tmp_path / "light.zarr", **SMALL, halo_mass=1e11, scale_radius=10.0)
    a, b = open_dataset(v2), open_dataset(light)
    np.testing.assert_array_equal(a.images(np.arange(len(a))), b.images(np.arange(len(b))))
    assert b.store.units == PhysicalUnits(1e11, 10.0)
    pa, pb = a.properties(NAMES), b.properties(NAMES)
    ratio = hand_units(1e11, 10.0)[1] / hand_units(1e12, 20.0)[1]
    np.testing.assert_allclose(pb["time_since_pericentre"], pa["time_since_pericentre"] * ratio, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(pb["pericentre"], pa["pericentre"] / 2, rtol=1e-6)
    for name in ("mass_ratio", "inclination", "azimuth"):
        np.testing.assert_array_equal(pb[name], pa[name])


def test_a_version_1_store_opens_with_its_properties_derived_and_resumes(tmp_path: Path, v2: Path) -> None:
    old = as_version_1(v2, tmp_path / "v1.zarr")
    ds = open_dataset(old)
    assert ds.attrs["schema_version"] == 1 and ds.store.units == PhysicalUnits()
    assert ds.store.property_names == NAMES
    expected = open_dataset(v2).properties(NAMES)
    for name, values in ds.properties(NAMES).items():
        np.testing.assert_array_equal(values, expected[name], err_msg=name)
    train, _ = ds.split(validation_fraction=0.5)
    np.testing.assert_array_equal(train.properties(["azimuth"])["azimuth"], expected["azimuth"][train.indices])

    # resume: simulation 1 not done, as after an interruption; the same call finishes it, as version 1 had it
    root = zarr.open_group(str(old), mode="r+")
    root["sims/done"][1] = False
    root.attrs[ATTRS_KEY] = {**root.attrs[ATTRS_KEY], "complete": False}
    written: list[int] = []
    simulate(old, workers=1, progress=False, on_written=written.append)
    assert written == [1] and not verify_store(old).problems
    resumed = open_dataset(old)
    assert resumed.attrs["schema_version"] == 1 and PROPERTIES_GROUP not in zarr.open_group(str(old), mode="r")
    for name, values in resumed.properties(NAMES).items():
        np.testing.assert_array_equal(values, expected[name], err_msg=name)
    with pytest.raises(DatasetError, match=r"halo_mass: stored 1e\+12, asked 1e\+11"):
        simulate(old, workers=1, progress=False, halo_mass=1e11)

    info = run_cli("data", "info", str(old))
    assert info.returncode == 0, info.stderr
    assert "units: M200 1e+12 Msun, r_s 20 kpc (time unit 42.17 Myr, velocity unit 463.7 km/s)" in info.stdout
    assert "time_since_pericentre (Myr)" in info.stdout and "derived from the simulation metadata" in info.stdout


def test_more_snapshots_than_classes(tmp_path: Path) -> None:
    """141 snapshots: each its own time (and so its own time since pericentre), labels still the 71 classes."""
    out = simulate(tmp_path / "fine.zarr", **{**SMALL, "sims": 1, "cameras": 2, "snapshots": 141})
    ds = open_dataset(out)
    meta = ds.metadata
    t = ds.properties(["time_since_pericentre"])["time_since_pericentre"]
    for c in range(2):
        mine = meta["camera"] == c
        assert len(np.unique(t[mine])) == 141 and (np.diff(t[mine]) > 0).all()
        labels = meta["label"][mine]
        assert labels.min() == 0 and labels.max() == 70 and set(labels.tolist()) == set(range(71))
        assert (np.diff(labels) >= 0).all()
        np.testing.assert_array_equal(labels, label_for_snapshot(meta["snapshot"][mine], 141))


@pytest.fixture(scope="module")
def real_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("real") / "images"
    folder.mkdir()
    hubble = data.hubble_deep_field()
    for k in range(3):
        io.imsave(folder / f"g{k}.png", hubble[100 * k : 100 * k + 96, :96], check_contrast=False)
    return folder


def test_a_store_without_the_properties_names_the_arrays_and_what_to_do(tmp_path: Path, real_images: Path) -> None:
    plain = open_dataset(ingest(real_images, tmp_path / "plain.zarr", size=16, progress=False, preprocess=False))
    assert plain.store.units is None and plain.store.property_names == []
    with pytest.raises(DatasetError) as err:
        plain.properties(["time_since_pericentre", "mass_ratio"])
    text = str(err.value)
    assert "plain.zarr" in text and "properties/time_since_pericentre, properties/mass_ratio" in text
    assert "deepgalaxy data simulate" in text and "--labels TABLE" in text and "time_since_pericentre" in text

    table = tmp_path / "labels.csv"
    table.write_text("file,class,mass_ratio\ng0.png,3,0.5\ng1.png,,\ng2.png,70,1.5\n")
    labelled = open_dataset(ingest(real_images, tmp_path / "labelled.zarr", size=16, progress=False,
                                   preprocess=False, labels=table))
    assert labelled.store.property_names == ["mass_ratio"]
    np.testing.assert_array_equal(labelled.properties(["mass_ratio"])["mass_ratio"], [0.5, np.nan, 1.5])
    with pytest.raises(DatasetError, match=r"properties/inclination.*gives mass_ratio.*column inclination"):
        labelled.properties(["mass_ratio", "inclination"])
