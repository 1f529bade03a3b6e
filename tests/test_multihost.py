"""Horovod across hosts for real: two hosts made as network namespaces (tests/hosts.py), each with its own sshd,
horovodrun launched over ssh from a third "login" namespace with --network-interface, --ssh-port and
--ssh-identity-file, exactly as on a cluster; and a host that dies during training, then ``--resume``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deepgalaxy.core.errors import DeepGalaxyError
from deepgalaxy.core.workers import HostAccess, host_access
from deepgalaxy.plugins.horovod import launcher as hl
from tests.hosts import IFACE, SSH_PORT, Hosts, network_hosts
from tests.postgres import Postgres, postgres, running_server  # noqa: F401  (the fixture)
from tests.runs_support import CARD, TINY, make_dataset, mlflow_runs, read_state, read_weights

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
HOSTS_GROUP = "multihost"
"""One xdist group: two trainings on two namespace hosts each would oversubscribe a 2-core machine."""


# --- the launcher's options (no hosts needed) ---------------------------------------------------------------------


def test_host_access_becomes_horovodrun_options(tmp_path: Path) -> None:
    key = tmp_path / "id"
    key.write_text("key")
    access = host_access({"DEEPGALAXY_NETWORK_INTERFACE": "eth0, ib0", "DEEPGALAXY_SSH_PORT": "2222",
                          "DEEPGALAXY_SSH_IDENTITY_FILE": str(key)})
    assert access == HostAccess(("eth0", "ib0"), 2222, str(key))
    assert hl.access_args(access) == ["--network-interfaces", "eth0,ib0", "-p", "2222", "--ssh-identity-file",
                                      str(key)]
    assert hl.access_args(host_access({})) == []
    assert hl.ssh_probe("h1", access)[-6:] == ["-p", "2222", "-i", str(key), "h1", "true"]
    for env, bad in (({"DEEPGALAXY_SSH_PORT": "x"}, "--ssh-port"), ({"DEEPGALAXY_SSH_PORT": "70000"}, "--ssh-port"),
                     ({"DEEPGALAXY_SSH_IDENTITY_FILE": str(tmp_path / "nope")}, "--ssh-identity-file")):
        with pytest.raises(DeepGalaxyError, match=bad):
            host_access(env)


def test_horovodrun_command_carries_the_host_access(tmp_path: Path) -> None:
    if hl.shutil.which("horovodrun") is None and not (Path(sys.executable).parent / "horovodrun").is_file():
        pytest.skip("horovodrun is not installed (build it with scripts/build_horovod.sh)")
    cmd = hl.horovodrun_command(["python", "-m", "x"], 2, "a:1,b:1", HostAccess(("dg0",), 2222, "/k"))
    assert cmd[1:] == ["-np", "2", "-H", "a:1,b:1", "--gloo", "--network-interfaces", "dg0", "-p", "2222",
                       "--ssh-identity-file", "/k", "python", "-m", "x"]
    assert hl.horovodrun_command(["python"], 2, None, control="mpi")[1:] == ["-np", "2", "-H", "localhost:2", "--mpi",
                                                                             "python"]


def test_the_mpi_controller_is_chosen_by_environment() -> None:
    assert hl.controller({}) == "gloo" and hl.controller({"DEEPGALAXY_HOROVOD_CONTROLLER": "MPI"}) == "mpi"
    with pytest.raises(DeepGalaxyError, match="DEEPGALAXY_HOROVOD_CONTROLLER"):
        hl.controller({"DEEPGALAXY_HOROVOD_CONTROLLER": "nccl"})


def test_horovodrun_gets_only_the_slots_it_fills() -> None:
    """horovodrun --gloo starts a process on every slot of -H whatever -np says: ``scale --workers 1,2 --hosts
    a:1,b:1`` measured N=1 with two ranks. The host list is cut to the first ``workers`` slots."""
    assert hl.host_slots(1, "a:1,b:1") == "a:1"
    assert hl.host_slots(2, "a:1,b:1") == "a:1,b:1"
    assert hl.host_slots(6, "h1:4,h2:4") == "h1:4,h2:2"
    assert hl.host_slots(3, None) == "localhost:3"
    with pytest.raises(DeepGalaxyError, match="more than the 8 slots"):
        hl.host_slots(9, "h1:4,h2:4")


def test_cli_refuses_a_missing_identity_file(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "deepgalaxy", "train", CARD, "--data", str(tmp_path / "x.zarr"),
                          "--hosts", "a:1,b:1", "--ssh-identity-file", str(tmp_path / "nope")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and "--ssh-identity-file" in out.stderr and "nope" in out.stderr, out.stderr
    assert not (tmp_path / "deepgalaxy-runs").exists()  # refused before anything was written


# --- hosts made of network namespaces -----------------------------------------------------------------------------


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[Hosts]:
    with network_hosts(2, tmp_path / "hosts") as hosts:
        yield hosts


def host_args(hosts: Hosts) -> list[str]:
    return ["--hosts", hosts.hosts_arg(), "--network-interface", IFACE, "--ssh-port", str(SSH_PORT),
            "--ssh-identity-file", str(hosts.key)]


def train_argv(hosts: Hosts, tmp_path: Path, run_dir: Path, epochs: int, steps: int, every: int = 0,
               tracking_uri: str | None = None) -> list[str]:
    data = make_dataset(tmp_path / "tiny.zarr")
    sets = [x for s in [*TINY, f"train.max_steps_per_epoch={steps}"] for x in ("--set", s)]
    return [sys.executable, "-m", "deepgalaxy", "train", CARD, "--data", str(data), *host_args(hosts),
            "--epochs", str(epochs), "--checkpoint-every", str(every), "--no-progress",
            "--tracking-uri", tracking_uri or f"sqlite:///{tmp_path / 'mlflow.db'}", "--run-dir", str(run_dir), *sets]


def start_in_login(hosts: Hosts, argv: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(hosts.in_login(argv), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "COLUMNS": "200"}, start_new_session=True)


def ranks_on_each_host(hosts: Hosts, proc: subprocess.Popen[str], timeout: float = 120) -> bool:
    """True once a training rank runs inside every host's namespace (and none in the login one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if all(any(_is_rank(pid) for pid in hosts.pids(h)) for h in hosts.hosts):
            return not any(_is_rank(pid) for pid in hosts.pids(hosts.login))
        time.sleep(0.2)
    return False


def _is_rank(pid: int) -> bool:
    """Is ``pid`` a training rank (``python -m deepgalaxy.runs.worker``; horovodrun and ssh name it as arguments)?"""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return argv[1:3] == [b"-m", b"deepgalaxy.runs.worker"]


@pytest.mark.slow
@pytest.mark.xdist_group(HOSTS_GROUP)
@pytest.mark.timeout(300)
def test_hosts_answer_at_their_own_address(two_hosts: Hosts) -> None:
    """Each host resolves the machine's hostname to its own address (Gloo needs it) and the others by name."""
    a, b = two_hosts.hosts
    out = two_hosts.ssh(a, f"hostname -i; getent hosts {b.name}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == a.address and b.address in out.stdout


@pytest.mark.slow
@pytest.mark.horovod
@pytest.mark.xdist_group(HOSTS_GROUP)
@pytest.mark.timeout(300)
def test_train_on_two_hosts_into_one_tracking_server(two_hosts: Hosts, postgres: Postgres,  # noqa: F811
                                                     tmp_path: Path) -> None:
    """``deepgalaxy train --hosts a:1,b:1`` from the login namespace, tracked by ``deepgalaxy server`` on PostgreSQL
    running on this machine (the hosts reach it at the bridge's address): one rank in each host's namespace,
    identical weights on both, one MLflow run, one model version, loaded back from another host."""
    run_dir = tmp_path / "run"
    with running_server(postgres, tmp_path / "server", host=two_hosts.machine) as server:
        argv = train_argv(two_hosts, tmp_path, run_dir, epochs=2, steps=3, tracking_uri=server.uri)
        proc = start_in_login(two_hosts, argv, tmp_path)
        try:
            spread = ranks_on_each_host(two_hosts, proc)
            out = proc.communicate(timeout=240)[0]
        finally:
            proc.kill()
        assert proc.returncode == 0, out[-4000:]
        assert spread, f"the ranks did not run one in each host's namespace:\n{out[-3000:]}"
        ranks = [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert [r["size"] for r in ranks] == [2, 2]
        assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"], "the two hosts ended with different weights"
        (run,) = mlflow_runs(server.uri)
        assert run.info.status == "FINISHED" and run.data.tags["ranks_in_sync"] == "true"
        assert run.data.params["workers"] == "2" and run.info.artifact_uri.startswith("mlflow-artifacts:/")
        import mlflow

        (version,) = mlflow.MlflowClient(server.uri).search_model_versions(f"name = '{CARD}'")
        assert version.run_id == run.info.run_id and int(version.version) == 1
        # another host loads the version through the server alone (artifacts through its proxy)
        load = (f"from deepgalaxy import registry; from deepgalaxy.runs.worker import weights_digest; "
                f"print(weights_digest(registry.load('{CARD}', tracking_uri='{server.uri}').get_weights()))")
        other = subprocess.run(["ip", "netns", "exec", two_hosts.hosts[1].netns, sys.executable, "-c", load],
                               capture_output=True, text=True, timeout=180, cwd=tmp_path)
        assert other.returncode == 0, other.stderr[-3000:]
        assert other.stdout.split()[-1] == ranks[0]["weights_sha256"], "the loaded version holds other weights"



STOP_S = 60
"""How long the job may take to stop once a host died."""


@pytest.mark.slow
@pytest.mark.horovod
@pytest.mark.xdist_group(HOSTS_GROUP)
@pytest.mark.timeout(400)
def test_a_host_dies_then_resume_continues_the_run(two_hosts: Hosts, tmp_path: Path) -> None:
    """Kill every process of one host once the run has checkpointed: the job stops within :data:`STOP_S` with an
    error naming that host and the ``--resume`` command; with the host back, ``--resume`` continues from the
    checkpoint into the same MLflow run, and one model version comes of it."""
    run_dir = tmp_path / "run"
    dead = two_hosts.hosts[1]
    proc = start_in_login(two_hosts, train_argv(two_hosts, tmp_path, run_dir, epochs=2, steps=4, every=2), tmp_path)
    killed_at = None
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            state = read_state(run_dir)
            if state is not None:
                killed_at = state
                two_hosts.kill(dead)
                break
            time.sleep(0.05)
        t_kill = time.monotonic()
        out = proc.communicate(timeout=STOP_S + 30)[0]
        stopped_s = time.monotonic() - t_kill
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    assert killed_at is not None, f"the training ended before it checkpointed:\n{out[-3000:]}"
    assert proc.returncode == 2, out[-3000:]  # a deepgalaxy error: one line, no traceback
    error = [line for line in out.splitlines() if line.startswith("error:")]
    assert error and f"host {dead.name} stopped answering" in error[-1] and "--resume" in error[-1], out[-3000:]
    assert two_hosts.hosts[0].name not in error[-1]
    print(f"the job stopped {stopped_s:.1f} s after {dead.name} died")
    assert stopped_s < STOP_S, f"the job took {stopped_s:.0f} s to stop after {dead.name} died"
    assert not (run_dir / "result.json").exists()
    last = read_state(run_dir)  # the checkpoint --resume starts from
    assert last is not None and last["epoch"] >= killed_at["epoch"], (killed_at, last)
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]

    two_hosts.start_sshd(dead)  # the host is back; the run continues with rank 0 on it (--hosts in another order)
    moved = ",".join(f"{h.name}:1" for h in reversed(two_hosts.hosts))
    access = ["--hosts", moved, *host_args(two_hosts)[2:]]
    resumed = subprocess.run(two_hosts.in_login([sys.executable, "-m", "deepgalaxy", "train", "--resume", "--run-dir",
                                                 str(run_dir), "--no-progress", *access]),
                             cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    # the surviving rank may checkpoint once more between the state read above and the kill taking effect
    assert f"from epoch {last['epoch'] + 1}, step" in resumed.stderr, resumed.stderr[-2000:]
    assert json.loads((run_dir / "run.json").read_text())["hosts"] == moved
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (run,) = mlflow_runs(uri)
    assert run.info.run_id == run_id and run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    assert run.data.tags["ranks_in_sync"] == "true"
    import mlflow

    (version,) = mlflow.MlflowClient(uri).search_model_versions(f"name = '{CARD}'")
    assert version.run_id == run_id and int(version.version) == 1
    assert read_weights(run_dir)


@pytest.mark.slow
@pytest.mark.horovod
@pytest.mark.xdist_group(HOSTS_GROUP)
@pytest.mark.timeout(300)
def test_scale_across_two_hosts(two_hosts: Hosts, tmp_path: Path) -> None:
    """``deepgalaxy scale --workers 1,2 --hosts a:1,b:1`` from the login namespace: both points measured (2 workers
    across the link, with allreduce times at several message sizes), the model checked against the 2-worker one."""
    data = make_dataset(tmp_path / "tiny.zarr")
    sets = [x for s in TINY for x in ("--set", s)]
    argv = [sys.executable, "-m", "deepgalaxy", "scale", CARD, "--data", str(data), "--workers", "1,2",
            *host_args(two_hosts), "--threads", "1", "--steps", "3", "--warmup", "1", "--no-progress",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--run-dir", str(tmp_path / "scale"),
            "--plot", str(tmp_path / "scaling.png"), *sets]
    out = subprocess.run(two_hosts.in_login(argv), cwd=tmp_path, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "scale" / "scaling.json").read_text())
    assert result["params"]["hosts"] == two_hosts.hosts_arg()
    points = {p["workers"]: p for p in result["points"]}
    assert sorted(points) == [1, 2] and all(p["images_per_s"] > 0 for p in points.values())
    sizes = [s[1] for s in points[2]["allreduce"]]
    assert len(sizes) >= 2 and sizes[-1] == points[2]["gradient_bytes"]
    assert all(s[0] == 2 and s[2] > 0 for s in points[2]["allreduce"])
    (check,) = result["model_check"]
    assert check["workers"] == 2 and check["predicted_step_s"] > 0
    assert (tmp_path / "scaling.png").is_file()
