"""One tracking server for every host (issue 16 items 2, 5a, 5b, 5d), for real: ``deepgalaxy server`` on a PostgreSQL
cluster of the test session (tests/postgres.py), a training's rank 0 logging into it, the version loaded back
through the artifact proxy; an unreachable server at start; the server going away during a training; eight
registrations at once.

Every server, cluster and process is the test's own, on free ports of 127.0.0.1, stopped when the test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.postgres import Postgres, Server, free_port, postgres, running_server  # noqa: F401  (the fixture)
from tests.runs_support import CARD, TINY, cli, make_dataset, read_state, read_weights

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tracking_server"), pytest.mark.timeout(600),
              pytest.mark.filterwarnings("ignore::UserWarning")]

TRAIN_TIMEOUT_S = 300.0

@pytest.fixture(scope="module")
def server(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:  # noqa: F811
    """One PostgreSQL-backed tracking server for the module's tests that do not stop it."""
    with running_server(postgres, tmp_path_factory.mktemp("server")) as s:
        yield s


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "tiny.zarr")


def sets(overrides: list[str]) -> list[str]:
    """``--set O`` for each override."""
    return [arg for o in overrides for arg in ("--set", o)]


def run_of(tracking_uri: str, run_id: str):  # type: ignore[no-untyped-def]
    import mlflow

    return mlflow.MlflowClient(tracking_uri).get_run(run_id)


def steps_of(tracking_uri: str, run_id: str, key: str = "train/loss") -> list[int]:
    import mlflow

    return sorted(m.step for m in mlflow.MlflowClient(tracking_uri).get_metric_history(run_id, key))


# --- item 2: a training, its version, and registry.load through the server -------------------------------------


def test_a_training_logs_into_the_postgres_server_and_loads_back_through_the_proxy(
        server: Server, postgres: Postgres, data: Path, tmp_path: Path) -> None:  # noqa: F811
    """Rank 0 logs the run and registers the version on the server; registry.load fetches the artifact through the
    proxy (mlflow-artifacts:/) and holds exactly the weights the training saved; the rows are in PostgreSQL; an index
    build in another process loads the version from the server too."""
    from deepgalaxy import registry
    from deepgalaxy.runs.training import train

    result = train(CARD, data, epochs=2, overrides=[*TINY, "train.max_steps_per_epoch=3"], tracking_uri=server.uri,
                   run_dir=tmp_path / "run", progress=False)
    run = run_of(server.uri, result.run_id)
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info
    assert steps_of(server.uri, result.run_id) == [0, 1]
    assert result.model_version is not None
    model = registry.load(f"{CARD}", version=result.model_version, tracking_uri=server.uri)
    saved = read_weights(tmp_path / "run")
    loaded = model.get_weights()
    assert sorted(saved) == sorted(loaded)
    for key in saved:
        np.testing.assert_array_equal(saved[key], loaded[key], err_msg=key)
    assert list(server.artifacts.rglob("weights.safetensors")), "the artifact did not go through the server's store"
    assert host_answer(server, socket.gethostname()) == 200  # other hosts reach it by this machine's name
    assert host_answer(server, "elsewhere.example.org") == 403  # MLflow's DNS-rebinding guard stays on
    r = cli("latent", "index", CARD, "--data", str(data), "--model-version", str(result.model_version),
            "--tracking-uri", server.uri, "--out", str(tmp_path / "index"), "--no-progress", cwd=tmp_path, timeout=300)
    assert r.returncode == 0 and (tmp_path / "index").is_dir(), r.stderr
    database = server.backend.rsplit("/", 1)[1]
    rows = postgres.psql(f"SELECT run_id FROM model_versions WHERE name = '{CARD}' AND version = "
                         f"{result.model_version}", database=database)
    assert rows.strip() == result.run_id


def host_answer(server: Server, host: str) -> int:
    """The HTTP status of a REST call to the server naming it ``host`` in the Host header."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{server.uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=x",
                                     headers={"Host": f"{host}:{server.port}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return 200 if exc.code == 404 else int(exc.code)  # 404: it answered (no such experiment)


# --- 5a: unreachable at start ----------------------------------------------------------------------------------


def test_an_unreachable_server_is_named_before_any_training_starts(data: Path, tmp_path: Path) -> None:
    """5a: a closed port -> exit 2, one line naming the URI, in bounded time, and no run directory was made."""
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    r = cli("train", CARD, "--data", str(data), "--tracking-uri", uri, "--epochs", "1", *sets(TINY),
            cwd=tmp_path, env={"DEEPGALAXY_RUNS_DIR": str(tmp_path / "runs")}, timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and uri in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_the_server_command_refuses_a_wrong_password_and_a_closed_database_port(
        postgres: Postgres, tmp_path: Path) -> None:  # noqa: F811
    """Bad input to `deepgalaxy server`: exit 2, one line naming the store (password hidden), no traceback."""
    database, user, password = postgres.new_database()
    for uri, says in ((postgres.uri(database, user, "wrong-password", driver="postgresql"), "password"),
                      (f"postgresql://{user}:{password}@127.0.0.1:{free_port()}/{database}", "refused")):
        r = cli("server", "--backend-store-uri", uri, "--port", str(free_port()), "--artifacts-destination",
                str(tmp_path / "a"), cwd=tmp_path, timeout=120)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert says in lines[0] and user in lines[0] and password not in lines[0], lines[0]


@pytest.mark.parametrize(("uri", "says"), [
    ("mysql://user:secret@127.0.0.1:1/db", "No module named 'MySQLdb'"),  # a driver that is not installed
    ("nonsense", "not a database URI"),
    ("nosuchdb://host/db", "nosuchdb"),
])
def test_the_server_command_refuses_a_store_it_cannot_use(uri: str, says: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Bad --backend-store-uri: exit 2, one line naming it and why, the password hidden, nothing started."""
    from deepgalaxy.cli import app
    from deepgalaxy.cli.common import run_cli

    capsys.readouterr()
    rc = run_cli(app, ["server", "--backend-store-uri", uri, "--port", str(free_port()), "--artifacts-destination",
                       str(tmp_path / "a")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: --backend-store-uri"), lines
    assert says in lines[0] and "secret" not in lines[0], lines[0]
    assert not (tmp_path / "a").exists()


# --- 5b: the server goes away during a training -----------------------------------------------------------------


def start_training(data: Path, run_dir: Path, uri: str, epochs: int, wait_s: float) -> subprocess.Popen[str]:
    args = ["train", CARD, "--data", str(data), "--tracking-uri", uri, "--epochs", str(epochs), "--run-dir",
            str(run_dir), "--no-progress", *sets([*TINY, "train.max_steps_per_epoch=6"])]
    return subprocess.Popen([sys.executable, "-m", "deepgalaxy", *args], cwd=run_dir.parent, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "DEEPGALAXY_TRACKING_WAIT": str(wait_s)})


def stop_server_after_first_epoch(training: subprocess.Popen[str], run_dir: Path, server: Server) -> str:
    """Once epoch 1 is checkpointed (its metrics were logged before), hold the worker (SIGSTOP) while the server
    is stopped, so the later epochs surely find it gone; the run id."""
    import psutil

    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    while (read_state(run_dir) or {}).get("epoch", 0) < 1:
        assert training.poll() is None, training.communicate()
        assert time.monotonic() < deadline, "epoch 1 never ended"
        time.sleep(0.02)
    workers = [p for p in psutil.Process(training.pid).children(recursive=True)
               if "deepgalaxy.runs.worker" in " ".join(p.cmdline())]
    assert workers
    for w in workers:
        w.suspend()
    try:
        run_id = str(json.loads((run_dir / "mlflow_run.json").read_text())["run_id"])
        assert 0 in steps_of(server.uri, run_id)
        server.stop()
    finally:
        for w in workers:
            w.resume()
    return run_id


@contextlib.contextmanager
def running_again_at_the_end(server: Server) -> Iterator[Server]:
    """The module's server, which the block may stop: running again when the block ends, however it ends."""
    try:
        yield server
    finally:
        if server.process is None:
            server.start()


def test_training_goes_on_while_the_server_is_away_and_its_metrics_arrive_when_it_is_back(
        server: Server, data: Path, tmp_path: Path) -> None:
    """5b: the server stops after epoch 1 or 2; the later epochs are kept; the server comes back on the same port
    and database while the training waits at its end: every epoch is in the one run, and one version is registered."""
    with running_again_at_the_end(server):
        run_dir = tmp_path / "run"
        training = start_training(data, run_dir, server.uri, epochs=4, wait_s=240)
        try:
            run_id = stop_server_after_first_epoch(training, run_dir, server)
            deadline = time.monotonic() + TRAIN_TIMEOUT_S
            while not (run_dir / "pending_metrics.jsonl").is_file() or '"step": 3' not in (
                    run_dir / "pending_metrics.jsonl").read_text():
                assert training.poll() is None and time.monotonic() < deadline, training.communicate()
                time.sleep(0.2)
            server.start()
            _out, err = training.communicate(timeout=TRAIN_TIMEOUT_S)
        finally:
            if training.poll() is None:
                training.kill()
        assert training.returncode == 0, err
        assert "does not answer" in err and "answers again" in err, err
        assert steps_of(server.uri, run_id) == [0, 1, 2, 3]
        assert run_of(server.uri, run_id).info.status == "FINISHED"
        assert json.loads((run_dir / "result.json").read_text())["run_id"] == run_id
        versions = [v for v in registry_versions(server.uri) if v.run_id == run_id]
        assert len(versions) == 1, versions
        assert not (run_dir / "pending_metrics.jsonl").exists()


def test_a_server_that_stays_away_stops_the_training_and_resume_finishes_the_same_run(
        server: Server, data: Path, tmp_path: Path) -> None:
    """5b: the server does not come back within the wait: the training stops with a message naming the server and
    the --resume command; after the server is back, --resume finishes the same MLflow run with every epoch."""
    with running_again_at_the_end(server):
        run_dir = tmp_path / "run"
        training = start_training(data, run_dir, server.uri, epochs=3, wait_s=3)
        try:
            run_id = stop_server_after_first_epoch(training, run_dir, server)
            _out, err = training.communicate(timeout=TRAIN_TIMEOUT_S)
        finally:
            if training.poll() is None:
                training.kill()
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert training.returncode == 2 and lines, err
        assert server.uri in lines[-1] and f"--resume --run-dir {run_dir}" in lines[-1], lines[-1]
        assert '"step": 2' in (run_dir / "pending_metrics.jsonl").read_text()
        server.start()
        r = cli("train", "--resume", "--run-dir", str(run_dir), "--no-progress", cwd=tmp_path,
                timeout=TRAIN_TIMEOUT_S)
        assert r.returncode == 0, r.stderr
        assert json.loads((run_dir / "result.json").read_text())["run_id"] == run_id
        assert steps_of(server.uri, run_id) == [0, 1, 2]
        assert run_of(server.uri, run_id).info.status == "FINISHED"
        assert len([v for v in registry_versions(server.uri) if v.run_id == run_id]) == 1


def registry_versions(uri: str) -> list:
    from deepgalaxy.registry.store import versions

    return versions(CARD, tracking_uri=uri)


# --- 5d: eight registrations at once ---------------------------------------------------------------------------

REGISTER = """
import sys, time
from pathlib import Path
from deepgalaxy.registry.store import register_version
go = Path(sys.argv[4])
Path(f"{go}.ready{sys.argv[5]}").touch()
while not go.exists():
    time.sleep(0.005)
start = time.time()
version = register_version(sys.argv[1], sys.argv[2], tags={"who": sys.argv[5]}, tracking_uri=sys.argv[3])
print(start, time.time(), version)
"""


def test_eight_registrations_at_once_make_eight_versions(server: Server, tmp_path: Path) -> None:
    """5d: eight processes register the same logged model under one new name at the same moment: versions 1-8,
    each process's exactly once, none lost or duplicated."""
    from deepgalaxy import registry
    from deepgalaxy.core.specs import with_overrides
    from deepgalaxy.registry.store import log_pyfunc_model, versions
    from deepgalaxy.tracking import active_run

    overrides = {k.removeprefix("card."): json.loads(v) for k, v in (o.split("=", 1) for o in TINY)
                 if k.startswith("card.")}
    model_dir = registry.create(with_overrides(registry.card(CARD), overrides), framework="torch", seed=0).save(
        tmp_path / "model")
    with active_run(server.uri, "concurrency", "source") as run:
        model_uri = log_pyfunc_model(model_dir)
    name = f"concurrent-{run.info.run_id[:8]}"
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", REGISTER, model_uri, name, server.uri, str(go), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(8)]
    try:
        deadline = time.monotonic() + 180
        while len(list(tmp_path.glob("go.ready*"))) < 8:  # every process has imported mlflow and waits
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a process did not start"
            time.sleep(0.1)
        go.touch()
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    returned = sorted(int(out.split()[-1]) for out, _ in outs)
    spans = [tuple(map(float, out.split()[-3:-1])) for out, _ in outs]
    first_end = min(end for _, end in spans)
    assert sum(start < first_end for start, _ in spans) >= 2, spans  # they did run at the same time
    assert returned == list(range(1, 9)), returned
    found = versions(name, tracking_uri=server.uri)
    assert sorted(v.version for v in found) == list(range(1, 9))
    assert sorted(v.tags["who"] for v in found) == [str(i) for i in range(8)]


# --- item 2: a tune against the server --------------------------------------------------------------------------


def test_a_tune_logs_its_study_and_trials_into_the_server(server: Server, postgres: Postgres, data: Path,  # noqa: F811
                                                          tmp_path: Path) -> None:
    """Two tiny trials: the study's run and one child run per trial, with their metrics, are on the server; the
    Optuna study itself lives in PostgreSQL too (every host of a cluster can run trials of it)."""
    import mlflow

    from deepgalaxy.runs.tune import tune

    database, user, password = postgres.new_database("optuna")
    result = tune(CARD, data, trials=2, epochs=1, overrides=[*TINY, "train.max_steps_per_epoch=2"],
                  storage=postgres.uri(database, user, password), tracking_uri=server.uri, run_dir=tmp_path / "tune",
                  progress=False, pruner="none")
    assert result.finished == 2 and result.tracking_uri == server.uri
    client = mlflow.MlflowClient(server.uri)
    parent = client.get_run(result.run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert len(children) == 2
    assert all("val/loss" in child.data.metrics for child in children), [c.data.metrics for c in children]
