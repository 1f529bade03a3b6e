"""The Horovod launcher: command lines, thread budgets, and real 2-rank ``horovodrun --gloo`` trainings."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from deepgalaxy.core.errors import DeepGalaxyError
from deepgalaxy.core.plugins import get_plugin_manager
from deepgalaxy.plugins.horovod import launcher as hl
from tests.runs_support import CARD, TINY, make_dataset, make_observations, mlflow_runs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _horovodrun() -> str | None:
    local = Path(sys.executable).parent / "horovodrun"
    return str(local) if local.is_file() else shutil.which("horovodrun")


needs_horovodrun = pytest.mark.skipif(
    _horovodrun() is None, reason="horovodrun is not installed (build it with scripts/build_horovod.sh)"
)


def test_plugin_provides_the_horovod_launcher() -> None:
    info = get_plugin_manager().launchers.get("horovod")
    assert info.requires == ("horovod",)
    assert get_plugin_manager().launchers.provided("horovod").plugin == "horovod"


def test_hosts_are_parsed_and_checked() -> None:
    assert hl.parse_hosts("h1:4,h2:4") == {"h1": 4, "h2": 4}
    assert hl.parse_hosts("h1, h1:2") == {"h1": 3}
    for bad in ("h1:0", "h1:x", ":2", ","):
        with pytest.raises(DeepGalaxyError, match="--hosts"):
            hl.parse_hosts(bad)


def test_ranks_share_the_cores_of_the_busiest_machine() -> None:
    from deepgalaxy.plugins.local.launcher import LocalLauncher

    launcher = hl.HorovodLauncher()
    assert launcher.ranks_per_machine(3, None) == 3
    assert launcher.ranks_per_machine(6, "h1:4,h2:4") == 4
    assert launcher.ranks_per_machine(2, "a:1,b:1") == 1  # one rank per host: each gets all its cores
    assert launcher.ranks_per_machine(2, "h1:4,h2:4") == 2
    assert LocalLauncher().ranks_per_machine(1, None) == 1


def test_threads_are_shared_between_local_workers() -> None:
    assert hl.threads_per_worker(2, cores=16) == 8
    assert hl.threads_per_worker(4, cores=2) == 1
    env = hl.thread_env(1)
    assert env["OMP_NUM_THREADS"] == env["TF_NUM_INTRAOP_THREADS"]


@needs_horovodrun
def test_command_lines() -> None:
    cmd = hl.horovodrun_command(["python", "-m", "x"], 2, None)
    assert cmd[1:] == ["-np", "2", "-H", "localhost:2", "--gloo", "python", "-m", "x"]
    cmd = hl.horovodrun_command(["python"], 6, "h1:4,h2:4")
    assert cmd[1:6] == ["-np", "6", "-H", "h1:4,h2:2", "--gloo"]  # only the slots the ranks fill
    with pytest.raises(DeepGalaxyError, match="more than the 8 slots"):
        hl.horovodrun_command(["python"], 9, "h1:4,h2:4")


def _two_rank_training(tmp_path: Path, framework: str, observations: bool = False) -> None:
    """Two ranks end identical, with one MLflow run and one version; with ``observations`` each rank draws from its
    own shards of two stores (simulations and an unlabelled store, half of every batch, MMD on)."""
    from deepgalaxy.runs.training import train

    data: list[Path] = [make_dataset(tmp_path / "tiny.zarr")]
    extra = []
    if observations:
        data.append(Path(f"{make_observations(tmp_path / 'obs.zarr')}:0.5"))
        extra = ["card.domain_adaptation=mmd"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = train(CARD, data, framework=framework, workers=2, epochs=2, tracking_uri=uri,
                   overrides=[*TINY, "train.max_steps_per_epoch=4", *extra], run_dir=tmp_path / "run", progress=False)
    ranks = [json.loads((tmp_path / "run" / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["size"] for r in ranks] == [2, 2]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"], "the two ranks ended with different weights"
    (run,) = mlflow_runs(uri)  # exactly one MLflow run, written by rank 0
    assert run.info.run_id == result.run_id and run.info.status == "FINISHED"
    assert run.data.params["workers"] == "2" and run.data.tags["workers"] == "2"
    assert run.data.tags["framework"] == framework and run.data.tags["ranks_in_sync"] == "true"
    assert run.data.metrics["dist/max_param_divergence"] == 0.0
    assert run.data.metrics["perf/images_per_s_per_worker"] == pytest.approx(
        run.data.metrics["perf/images_per_s"] / 2)
    if observations:
        assert run.data.metrics["val/obs/loss_reconstruction"] > 0 and run.data.metrics["train/loss_domain"] > 0
        assert "val/tiny/accuracy" in run.data.metrics and "val/obs/accuracy" not in run.data.metrics
    import mlflow

    versions = mlflow.MlflowClient(uri).search_model_versions(f"name = '{CARD}'")
    assert [int(v.version) for v in versions] == [1] and versions[0].run_id == result.run_id


@pytest.mark.slow
@pytest.mark.horovod
@needs_horovodrun
def test_two_ranks_torch_on_two_stores(tmp_path: Path) -> None:
    _two_rank_training(tmp_path, "torch", observations=True)


@pytest.mark.slow
@pytest.mark.horovod
@needs_horovodrun
def test_two_ranks_tensorflow(tmp_path: Path) -> None:
    pytest.importorskip("horovod.tensorflow")
    _two_rank_training(tmp_path, "tensorflow")
