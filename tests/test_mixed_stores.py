"""Several stores in one training (issue 14): labelled simulations and unlabelled observations in every batch,
each store's share, masked losses, validation per store, exact resume positions, both frameworks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from deepgalaxy.core.dataset import open_dataset
from deepgalaxy.core.errors import DatasetError
from deepgalaxy.core.mixture import StorePart, batch_rows, mixed_batches
from deepgalaxy.core.specs import DataSpec, StoreSpec
from tests.runs_support import CARD, TINY, cli, make_dataset, make_observations, mlflow_runs

FRAMEWORKS = [f for f in ("torch", "tensorflow") if importlib.util.find_spec(f)]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mixed")
    return make_dataset(root / "sims.zarr"), make_observations(root / "obs.zarr")


def test_shares_of_a_batch() -> None:
    names = ["sims", "obs", "more"]
    assert batch_rows([None], 16, names[:1]) == [16]
    assert batch_rows([None, 0.25], 16, names[:2]) == [12, 4]
    assert batch_rows([None, None], 7, names[:2]) == [4, 3]  # the rest divided equally, the first gets more
    assert batch_rows([0.5, None, None], 9, names) == [4, 3, 2]
    assert batch_rows([0.34, 0.66], 3, names[:2]) == [1, 2]  # every share given: rounding goes to the largest
    with pytest.raises(DatasetError, match=r"'obs' gets no row of a batch of 4 \(share 0.1\)"):
        batch_rows([None, 0.1], 4, names[:2])


def test_data_arguments_and_the_spec() -> None:
    assert StoreSpec.from_argument("obs.zarr:0.5") == StoreSpec(path="obs.zarr", share=0.5)
    assert StoreSpec.from_argument("/data/sims.zarr").share is None
    assert StoreSpec.from_argument("http://host:8000").path == "http://host:8000"  # a port, not a share
    assert StoreSpec.from_argument("http://host:8000/obs.zarr:0.25").share == 0.25
    for bad in ("obs.zarr:half", "obs.zarr:1.5", "obs.zarr:0"):
        with pytest.raises(ValueError, match="is not a fraction of the batch in \\(0, 1\\]"):
            StoreSpec.from_argument(bad)
    old = DataSpec.model_validate({"path": "/d/sims.zarr", "seed": 3})  # a run.json of an earlier version
    assert old.stores == [StoreSpec(path="/d/sims.zarr")] and old.path == "/d/sims.zarr" and old.seed == 3
    assert StoreSpec(path="/d/obs.zarr/").name == "obs"
    with pytest.raises(ValueError, match="must add up to 1"):
        DataSpec(stores=[StoreSpec(path="a", share=0.5), StoreSpec(path="b", share=0.25)])
    with pytest.raises(ValueError, match="both called 'sims'"):
        DataSpec(stores=[StoreSpec(path="x/sims.zarr"), StoreSpec(path="y/sims.zarr", share=0.5)])


def _parts(stores: tuple[Path, Path], rows: tuple[int, int], rank: int = 0, size: int = 1) -> list[StorePart]:
    out = []
    for name, path, n in zip(("sims", "obs"), stores, rows, strict=True):
        train, _ = open_dataset(path).split("simulation", 0.25, 0)
        out.append(StorePart(name, train.shard(rank, size, seed=0), n))
    return out


def test_every_batch_holds_each_stores_rows_and_resumes_exactly(stores: tuple[Path, Path]) -> None:
    parts = _parts(stores, (3, 2))
    steps = parts[0].train.num_batches(3)
    assert len(parts[1].train) < steps * 2  # the observations cycle within an epoch
    epochs = [list(mixed_batches(parts, epoch, steps, seed=5)) for epoch in (0, 1)]
    for x, y in epochs[0]:
        assert x.shape == (5, 32, 32, 1) and (y[:3] >= 0).all() and (y[3:] == -1).all()
    obs_rows = np.concatenate([x[3:] for x, _ in epochs[0] + epochs[1]]).reshape(-1, 32 * 32)
    distinct = {row.tobytes() for row in obs_rows}
    assert len(distinct) == len(parts[1].train)  # every observation drawn, across passes
    for epoch, start in ((0, 4), (1, 1), (1, steps - 1)):  # resumed at any position: the same batches
        tail = list(mixed_batches(parts, epoch, steps, seed=5, start_batch=start))
        assert len(tail) == steps - start
        for (x, y), (x0, y0) in zip(tail, epochs[epoch][start:], strict=True):
            np.testing.assert_array_equal(x, x0)
            np.testing.assert_array_equal(y, y0)


def test_each_rank_draws_from_its_own_shard_of_every_store(stores: tuple[Path, Path]) -> None:
    seen = []
    for rank in (0, 1):
        parts = _parts(stores, (2, 2), rank=rank, size=2)
        seen.append([set(p.train.indices.tolist()) for p in parts])
    for store in (0, 1):
        assert seen[0][store] and seen[1][store] and not seen[0][store] & seen[1][store]


@pytest.mark.slow
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_training_on_simulations_and_observations(tmp_path: Path, stores: tuple[Path, Path],
                                                  framework: str) -> None:
    sims, obs = stores
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [x for s in [*TINY, "train.max_steps_per_epoch=3", "card.domain_adaptation=mmd"] for x in ("--set", s)]
    done = cli("train", CARD, "--data", str(sims), "--data", f"{obs}:0.5", "--framework", framework, "--epochs", "1",
               "--no-progress", "--tracking-uri", uri, "--run-dir", str(tmp_path / "run"), *sets, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = mlflow_runs(uri)
    m = run.data.metrics
    for store in ("sims", "obs"):  # validation per store, beside the totals
        assert m[f"val/{store}/loss_reconstruction"] > 0, store
    assert "val/sims/accuracy" in m and "val/obs/accuracy" not in m  # observations have no labels to score
    assert m["val/accuracy"] == m["val/sims/accuracy"]
    n_sims, n_obs = (len(open_dataset(p).split("simulation", 0.2, 0)[1]) for p in stores)
    assert m["val/loss_reconstruction"] == pytest.approx(
        (m["val/sims/loss_reconstruction"] * n_sims + m["val/obs/loss_reconstruction"] * n_obs) / (n_sims + n_obs),
        rel=1e-5)
    assert m["train/loss_domain"] > 0  # half of every batch is unlabelled: there is a discrepancy to reduce
    assert run.data.params["data.train_images"] == str(sum(
        len(open_dataset(p).split("simulation", 0.2, 0)[0]) for p in stores))


def test_a_head_needs_labelled_images_somewhere(tmp_path: Path, stores: tuple[Path, Path]) -> None:
    _, obs = stores
    sets = [x for s in TINY for x in ("--set", s)]
    alone = cli("train", CARD, "--data", str(obs), "--epochs", "1", "--tracking-uri",
                f"sqlite:///{tmp_path / 'n.db'}", *sets, cwd=tmp_path)
    assert alone.returncode == 2 and "no labels" in alone.stderr and alone.stderr.count("\n") == 1, alone.stderr
    bad_share = cli("train", CARD, "--data", str(obs), "--data", f"{obs}:2", cwd=tmp_path)
    assert bad_share.returncode == 2 and "is not a fraction" in bad_share.stderr, bad_share.stderr
