"""The merger simulator: determinism, resume after interruption, physics sanity, plugin registration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from deepgalaxy.core.dataset import open_dataset
from deepgalaxy.core.errors import DatasetError
from deepgalaxy.plugins.simulation.physics import Galaxy, MergerParams, parabolic_orbit, simulate_merger
from deepgalaxy.plugins.simulation.render import camera_directions
from deepgalaxy.plugins.simulation.source import simulate
from tests._data_helpers import TINY, tiny_store


def _arrays(path: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    names = ["images", "labels", *(f"meta/{k}" for k in ("sim_id", "camera", "mass_ratio", "snapshot", "time")),
             "sims/t_pericentre", "sims/t_coalescence", "sims/snapshot_times", "sims/pericentre"]
    return {n: root[n][:] for n in names}


@pytest.mark.slow
def test_same_seed_same_store_different_seed_different(tmp_path: Path) -> None:
    a = _arrays(tiny_store(tmp_path / "a.zarr", sims=2))
    b = _arrays(tiny_store(tmp_path / "b.zarr", sims=2))
    c = _arrays(tiny_store(tmp_path / "c.zarr", sims=2, seed=8))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not np.array_equal(a["images"], c["images"])


@pytest.mark.slow
def test_workers_do_not_change_the_result(tmp_path: Path) -> None:
    one = _arrays(tiny_store(tmp_path / "one.zarr", sims=2))
    two = _arrays(simulate(tmp_path / "two.zarr", progress=False, workers=2, **{**TINY, "sims": 2}))
    for key in one:
        np.testing.assert_array_equal(one[key], two[key], err_msg=key)


@pytest.mark.slow
def test_resume_after_interruption_redoes_only_unfinished(tmp_path: Path) -> None:
    out = tmp_path / "resume.zarr"
    written: list[int] = []

    def crash_after_two(sim: int) -> None:
        written.append(sim)
        if len(written) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate(out, progress=False, workers=1, on_written=crash_after_two, **TINY)
    with pytest.raises(DatasetError, match="incomplete store"):
        open_dataset(out)
    assert len(open_dataset(out, allow_incomplete=True)) == 2 * 16
    resumed: list[int] = []
    simulate(out, progress=False, workers=1, on_written=resumed.append, **TINY)
    assert sorted(resumed) == [2, 3]  # the two finished simulations were not redone
    reference = _arrays(tiny_store(tmp_path / "ref.zarr"))
    for key, value in _arrays(out).items():
        np.testing.assert_array_equal(value, reference[key], err_msg=key)
    assert len(open_dataset(out)) == 64


def test_existing_store_with_other_parameters_is_not_overwritten(tmp_path: Path) -> None:
    out = tiny_store(tmp_path / "s.zarr", sims=1)
    with pytest.raises(DatasetError, match="exists with other simulation parameters"):
        tiny_store(out, sims=1, size=24)
    tiny_store(out, sims=1, size=24, overwrite=True)
    assert open_dataset(out).image_shape == (24, 24, 1)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("an empty folder is used; one holding files is not")
    with pytest.raises(DatasetError, match="not a deepgalaxy store"):
        tiny_store(tmp_path / "notes", sims=1)


def test_bad_parameters_are_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cameras=15 must be between 1 and 14"):
        simulate(tmp_path / "x.zarr", cameras=15)
    with pytest.raises(DatasetError, match="unknown simulation parameter"):
        simulate(tmp_path / "x.zarr", planets=3)


def test_times_and_key_events_are_recorded(tmp_path: Path) -> None:
    root = zarr.open_group(str(tiny_store(tmp_path / "t.zarr", sims=2)), mode="r")
    times = root["sims/snapshot_times"][:]
    assert times.shape == (2, 8) and np.allclose(times[0], np.linspace(0, 40, 8))
    t_peri = root["sims/t_pericentre"][:]
    assert np.all((t_peri > 3) & (t_peri < 20))  # first passage roughly a quarter of the way in
    assert root["sims/mass_ratio"][:].tolist() == pytest.approx([0.25, 1 / 3])


def test_orbit_is_bound_by_friction_and_nuclei_coalesce() -> None:
    rng = np.random.default_rng(0)
    result = simulate_merger(MergerParams(mass_ratio=1.0, pericentre=0.6, particles=200, snapshots=11,
                                          t_end=40, dt=0.04, friction=0.8), rng)
    sep = np.linalg.norm(result.centres[:, 1] - result.centres[:, 0], axis=1)
    assert sep[0] == pytest.approx(8.0)
    assert 0 < result.t_pericentre < result.t_coalescence < 40
    assert sep[-1] == 0.0  # one remnant nucleus after coalescence
    # stars stay bound to the remnant: most within a few scale radii of the nucleus
    r = np.linalg.norm(result.positions[-1] - result.centres[-1, 0], axis=1)
    assert np.median(r) < 3.0


def test_no_friction_no_merger() -> None:
    result = simulate_merger(MergerParams(mass_ratio=1.0, pericentre=0.6, particles=50, snapshots=11, t_end=40,
                                          dt=0.04, friction=0.0), np.random.default_rng(0))
    assert np.isnan(result.t_coalescence)


def test_parabolic_orbit_has_zero_energy_in_the_extended_potential() -> None:
    gals = (Galaxy(1.0, 1.0), Galaxy(0.5, 0.5 ** (1 / 3)))
    pos, vel = parabolic_orbit(gals, 0.6, 8.0)
    rel_v = vel[1] - vel[0]
    energy = 0.5 * rel_v @ rel_v + gals[0].potential(8.0) + gals[1].potential(8.0)
    assert energy == pytest.approx(0.0, abs=1e-12)
    assert np.allclose(pos[0] * 1.0 + pos[1] * 0.5, 0)  # centre of mass at the origin


def test_cameras() -> None:
    dirs = camera_directions(14)
    assert dirs.shape == (14, 3) and np.allclose(np.linalg.norm(dirs, axis=1), 1)
    assert len({tuple(d) for d in dirs.round(6)}) == 14


@pytest.mark.slow
def test_observation_degrades_images(tmp_path: Path) -> None:
    clean = open_dataset(tiny_store(tmp_path / "clean.zarr", sims=1)).images(np.arange(16))
    noisy = open_dataset(tiny_store(tmp_path / "obs.zarr", sims=1, observe=True)).images(np.arange(16))
    assert (clean == 0).mean() > 0.3  # empty sky is black
    assert (noisy == 0).mean() < (clean == 0).mean()  # sky noise and stars fill it


def test_plugin_provides_the_source() -> None:
    from deepgalaxy.core.interfaces import resolve
    from deepgalaxy.core.plugins import PluginManager

    pm = PluginManager()
    info = pm.dataset_sources.get("simulation")
    assert isinstance(info.loader, str)
    assert resolve(info.loader)().name == "simulation"
    assert pm.dataset_sources.get("ingest").loader == "deepgalaxy.plugins.ingest.source:IngestSource"
