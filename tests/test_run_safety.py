"""Run safety (issue 12 cases 5, 6, 7, 9, 10, 21): settings that cannot train, workers that outlive their CLI,
a run trained twice at once, unlabelled stores for classifier cards, unreachable or foreign tracking stores, and the
MLflow experiment kind. Real subprocesses, real Zarr stores, real SQLite MLflow stores."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from deepgalaxy.core.errors import DeepGalaxyError
from deepgalaxy.core.specs import BackboneSpec, DataSpec, LossWeights, ModelSpec, RunSpec, TrainSpec, with_overrides
from deepgalaxy.runs.training import build_spec
from tests.runs_support import CARD, TINY, cli, make_dataset, mlflow_runs, read_state

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

NON_FINITE = [float("inf"), float("-inf"), float("nan"), "inf", "-inf", "nan", "Infinity", "-Infinity", "NaN"]
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "tiny.zarr")


def tiny_train(data: Path, *extra: str) -> list[str]:
    sets = [x for s in TINY for x in ("--set", s)]
    return ["train", CARD, "--data", str(data), "--no-progress", *sets, *extra]


def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    """The CLI's error: exit 2, no traceback; returns stderr."""
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, out.stderr[-3000:]
    return out.stderr


# --- case 5: non-finite numbers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", NON_FINITE, ids=str)
def test_specs_reject_non_finite_numbers_everywhere(value: object) -> None:
    """issue 12 case 5: inf, -inf and nan (as floats and as strings) are refused by every number of every spec,
    also inside backbone options, with the setting named."""
    card = ModelSpec(name="c", task="vae", backbone=BackboneSpec(name="simple"))
    train = TrainSpec()
    with pytest.raises(ValidationError, match="learning_rate"):
        with_overrides(train, {"learning_rate": value})
    with pytest.raises(ValidationError, match="grad_clip"):
        with_overrides(train, {"grad_clip": value})
    with pytest.raises(ValidationError, match="kl"):
        LossWeights.model_validate({"kl": value})
    with pytest.raises(ValidationError, match="validation_fraction"):
        DataSpec.model_validate({"path": "x", "validation_fraction": value})
    if isinstance(value, float):  # a string in free-form options stays a string; a number must be finite
        with pytest.raises(ValidationError, match="drop_connect_rate"):
            with_overrides(card, {"backbone.options.drop_connect_rate": value})
        with pytest.raises(ValidationError, match="widths"):
            with_overrides(card, {"backbone.options.widths": [8, value]})
    # a run.json as the old code wrote it for learning_rate=inf (JSON has no inf: null) is invalid too
    run = RunSpec(card=card, data=DataSpec(path="x")).model_dump(mode="json")
    run["train"]["learning_rate"] = None
    with pytest.raises(ValidationError, match="learning_rate"):
        RunSpec.model_validate(run)


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "Infinity", "NaN", "1e999"])
def test_set_non_finite_names_the_setting(tmp_path: Path, text: str) -> None:
    """issue 12 case 5: --set train.learning_rate=inf (any spelling) is a settings error naming the setting."""
    with pytest.raises(DeepGalaxyError, match=r"invalid training settings: train\.learning_rate: .*finite"):
        build_spec(CARD, tmp_path, overrides=[f"train.learning_rate={text}"], tracking_uri="sqlite:///x.db")


@pytest.mark.slow
def test_cli_refuses_inf_learning_rate_before_writing_a_run(tmp_path: Path, data: Path) -> None:
    """issue 12 case 5: the CLI exits 2 naming train.learning_rate, and no run directory is left for --resume."""
    env = {"DEEPGALAXY_RUNS_DIR": str(tmp_path / "runs")}
    out = cli(*tiny_train(data, "--epochs", "1", "--set", "train.learning_rate=inf",
                          "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"), cwd=tmp_path, env=env, timeout=300)
    err = one_line_error(out)
    assert "train.learning_rate" in err and "finite" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def _old_broken_run(root: Path, name: str, run_json: str) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "run.json").write_text(run_json)
    return run


def _inf_run_json(data: Path) -> str:
    """A run.json as the old code wrote it for --set train.learning_rate=inf: the number became null."""
    spec = build_spec(CARD, data, overrides=TINY, tracking_uri="sqlite:///x.db").model_dump(mode="json")
    spec["train"]["learning_rate"] = None
    return json.dumps(spec, indent=2)


def test_resume_names_the_picked_run_and_why_it_cannot_continue(tmp_path: Path, data: Path) -> None:
    """issue 12 case 5: --resume says which run directory it picked and why (the newest unfinished run of the
    card), and that it cannot continue it (run.json invalid: the setting named), with what to do; no traceback."""
    root = tmp_path / "runs"
    older = _old_broken_run(root, f"{CARD}-20240101-000000-aaaa", "{}")
    time.sleep(0.05)
    broken = _old_broken_run(root, f"{CARD}-20240102-000000-bbbb", _inf_run_json(data))
    os.utime(older / "run.json", (1, 1))
    out = cli("train", CARD, "--resume", cwd=tmp_path, env={"DEEPGALAXY_RUNS_DIR": str(root)}, timeout=120)
    err = one_line_error(out)
    assert str(broken) in err and "newest unfinished run" in err and repr(CARD) in err
    assert "train.learning_rate" in err and "--run-dir" in err, err


@pytest.mark.parametrize("content", ["not json at all", '{"card": 3}', "[]"])
def test_resume_of_an_unreadable_run_json_names_the_directory(tmp_path: Path, content: str) -> None:
    """issue 12 case 5: a run.json that is not JSON or not a run spec: the directory named, what to do."""
    run = _old_broken_run(tmp_path, "run", content)
    out = cli("train", "--resume", "--run-dir", str(run), cwd=tmp_path, timeout=120)
    err = one_line_error(out)
    assert str(run / "run.json") in err and "cannot be resumed" in err and "without --resume" in err, err
    root = tmp_path / "runs"
    _old_broken_run(root, f"{CARD}-20240101-000000-cccc", content)
    out = cli("train", CARD, "--resume", cwd=tmp_path, env={"DEEPGALAXY_RUNS_DIR": str(root)}, timeout=120)
    err = one_line_error(out)
    assert f"{CARD}-20240101-000000-cccc" in err and "cannot be resumed" in err, err


def test_resume_of_another_cards_run_names_both(tmp_path: Path, data: Path) -> None:
    """issue 12 case 5: --resume CARD --run-dir DIR where DIR trains another card: both named, no traceback."""
    spec = build_spec(CARD, data, overrides=TINY, tracking_uri="sqlite:///x.db")
    run = _old_broken_run(tmp_path, "run", spec.model_dump_json())
    err = one_line_error(cli("train", "vae-simple", "--resume", "--run-dir", str(run), cwd=tmp_path, timeout=120))
    assert str(run) in err and repr(CARD) in err and "'vae-simple'" in err


# --- case 6: workers end with their CLI; a run is trained by one process at a time --------------------------------


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _wait_for(what: str, ready: object, proc: subprocess.Popen[str], timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():  # type: ignore[operator]
            return
        if proc.poll() is not None:
            out = proc.communicate()[0] if proc.stdout else ""
            raise AssertionError(f"the process ended before {what} (code {proc.returncode}):\n{str(out)[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout} s")


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts in their own session; whatever is left of their groups is killed afterwards."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _start(argv: list[str], cwd: Path, spawned: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "COLUMNS": "200"})
    spawned.append(proc)
    return proc


def _kill_cli_only(proc: subprocess.Popen[str], workers: list[int], run: Path) -> None:
    """kill -9 the CLI process alone (not its group); its workers must be gone within a few seconds, without
    having trained on to the end (a fast orphan could finish within the wait)."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "the worker kept training after its CLI was killed"
    assert not (run / "result.json").exists(), "the worker trained on to the end after its CLI was killed"


@pytest.mark.slow
def test_kill_9_of_the_cli_ends_its_worker_and_resume_trains_once(tmp_path: Path, data: Path,
                                                                   spawned: list[subprocess.Popen[str]]) -> None:
    """issue 12 case 6: kill -9 of only the `deepgalaxy train` process ends its worker within seconds; the resume
    afterwards finishes with one val/loss per epoch, and no error.json beside result.json."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tmp_path / "run"
    args = tiny_train(data, "--epochs", "3", "--checkpoint-every", "3", "--tracking-uri", uri, "--run-dir", str(run))
    proc = _start([sys.executable, "-m", "deepgalaxy", *args], tmp_path, spawned)
    _wait_for("a checkpoint inside the first epoch", lambda: (read_state(run) or {}).get("next_batch", 0) >= 3, proc)
    workers = _children(proc.pid)
    assert workers, "the CLI has no worker process"
    _kill_cli_only(proc, workers, run)

    resumed = cli("train", "--resume", "--run-dir", str(run), "--no-progress", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / "result.json").is_file() and not (run / "error.json").exists()
    import mlflow

    (mlrun,) = mlflow_runs(uri)
    assert mlrun.info.status == "FINISHED"
    history = mlflow.MlflowClient(uri).get_metric_history(mlrun.info.run_id, "val/loss")
    assert sorted(m.step for m in history) == [0, 1, 2]


@pytest.mark.slow
def test_resume_of_a_run_being_trained_is_refused(tmp_path: Path, data: Path,
                                                   spawned: list[subprocess.Popen[str]]) -> None:
    """issue 12 case 6: while `deepgalaxy train` trains a run, --resume of it exits 2 naming the run directory and
    the PID holding it; a worker training the run on its own (as one left behind would) holds it too."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tmp_path / "run"
    args = tiny_train(data, "--epochs", "50", "--checkpoint-every", "3", "--tracking-uri", uri, "--run-dir", str(run))
    proc = _start([sys.executable, "-m", "deepgalaxy", *args], tmp_path, spawned)
    _wait_for("the first checkpoint", lambda: read_state(run) is not None, proc)
    workers = _children(proc.pid)
    busy = cli("train", "--resume", "--run-dir", str(run), "--no-progress", cwd=tmp_path, timeout=120)
    err = one_line_error(busy)
    assert str(run) in err and any(f"PID {pid}" in err for pid in (proc.pid, *workers)), err
    _kill_cli_only(proc, workers, run)

    killed_at = read_state(run)
    worker = _start([sys.executable, "-m", "deepgalaxy.runs.worker", str(run / "run.json"), "--no-progress"],
                    tmp_path, spawned)
    _wait_for("the lone worker's next checkpoint", lambda: read_state(run) != killed_at, worker)
    busy = cli("train", "--resume", "--run-dir", str(run), "--no-progress", cwd=tmp_path, timeout=120)
    err = one_line_error(busy)
    assert str(run) in err and f"PID {worker.pid}" in err, err
    assert worker.poll() is None


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


@pytest.mark.slow
def test_kill_9_of_the_cli_ends_horovodrun_and_its_ranks(tmp_path: Path, data: Path,
                                                         spawned: list[subprocess.Popen[str]]) -> None:
    """issue 12 case 6: with --workers 2, kill -9 of only the CLI ends horovodrun and both ranks (Horovod gives a
    rank 5 s to end after SIGTERM), before the training could run on to its end."""
    pytest.importorskip("horovod.torch")
    run = tmp_path / "run"
    args = tiny_train(data, "--epochs", "50", "--workers", "2", "--checkpoint-every", "3",
                      "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--run-dir", str(run))
    proc = _start([sys.executable, "-m", "deepgalaxy", *args], tmp_path, spawned)
    _wait_for("the first checkpoint", lambda: read_state(run) is not None, proc)
    tree = _descendants(proc.pid)
    ranks = [pid for pid in tree if _argv(pid)[1:3] == ["-m", "deepgalaxy.runs.worker"]]
    assert len(ranks) == 2, [_argv(pid) for pid in tree]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(pid) for pid in tree):
        time.sleep(0.2)
    assert not [_argv(pid) for pid in tree if _alive(pid)], "processes outlived the killed CLI"
    assert not (run / "result.json").exists(), "the ranks trained on to the end after their CLI was killed"


# --- case 7: a classifier card on an unlabelled store -------------------------------------------------------------


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from skimage import io

    from deepgalaxy.plugins.ingest.source import ingest

    tmp = tmp_path_factory.mktemp("obs")
    photos = tmp / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        io.imsave(photos / f"galaxy{i}.png", rng.integers(0, 255, (40, 40), dtype=np.uint8), check_contrast=False)
    return ingest(photos, tmp / "obs.zarr", size=32, channels=1, progress=False, preprocess=False)  # noise: no system


@pytest.mark.parametrize("card", ["classifier-simple", "full-simple"])
def test_classifier_card_on_unlabelled_store_is_refused_before_launch(tmp_path: Path, unlabelled: Path,
                                                                       card: str) -> None:
    """issue 12 case 7: a card with a classifier head on an ingested (unlabelled) store: exit 2 before anything
    is launched, saying the store has no labels and which cards can use it."""
    root = tmp_path / "runs"
    sets = [x for s in ("card.input_size=32", "card.backbone.options.widths=[8,16]", "train.batch_size=2")
            for x in ("--set", s)]
    out = cli("train", card, "--data", str(unlabelled), "--epochs", "1", "--no-progress", *sets,
              "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", cwd=tmp_path, env={"DEEPGALAXY_RUNS_DIR": str(root)},
              timeout=300)
    err = one_line_error(out)
    assert str(unlabelled) in err and "no labels" in err and "fcae-" in err and "vae-" in err, err
    assert not root.exists() or not any(root.iterdir())


# --- case 9: an unreachable tracking server -----------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers (a hung server)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.mark.parametrize("kind", ["closed", "silent"])
def test_unreachable_tracking_server_fails_fast_naming_the_uri(tmp_path: Path, data: Path, kind: str,
                                                               request: pytest.FixtureRequest) -> None:
    """issue 12 case 9: --tracking-uri of a closed port (or a server that never answers): an error within a
    stated bound naming the URI, exit 2, before any training starts."""
    port = _closed_port() if kind == "closed" else request.getfixturevalue("silent_server")
    uri = f"http://127.0.0.1:{port}"
    root = tmp_path / "runs"
    t0 = time.monotonic()
    out = cli(*tiny_train(data, "--epochs", "1", "--tracking-uri", uri), cwd=tmp_path, timeout=120,
              env={"DEEPGALAXY_RUNS_DIR": str(root), "DEEPGALAXY_TRACKING_TIMEOUT": "3"})
    took = time.monotonic() - t0
    err = one_line_error(out)
    assert uri in err and "3 s" in err and "DEEPGALAXY_TRACKING_TIMEOUT" in err, err
    assert took < 30, took
    assert not root.exists() or not any(root.iterdir())


# --- case 10: an mlflow.db that is not MLflow's -------------------------------------------------------------------


def _foreign_sqlite(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("create table thesis (chapter text)")
        db.execute("insert into thesis values ('introduction')")
    db.close()


@pytest.mark.parametrize("kind", ["text", "foreign-sqlite"])
def test_mlflow_db_that_is_not_mlflows_is_named_and_left_alone(tmp_path: Path, data: Path, kind: str) -> None:
    """issue 12 case 10: the default ./mlflow.db being a text file (or another program's SQLite database): exit 2,
    the file named with what to do, and the file byte for byte unchanged."""
    db = tmp_path / "mlflow.db"
    if kind == "text":
        db.write_text("my notes, not a database\n" * 10)
    else:
        _foreign_sqlite(db)
    before = db.read_bytes()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([sys.executable, "-m", "deepgalaxy", *tiny_train(data, "--epochs", "1")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300,
                         env={**env, "COLUMNS": "200", "DEEPGALAXY_RUNS_DIR": str(tmp_path / "runs")})
    err = one_line_error(out)
    assert str(db) in err and "--tracking-uri" in err, err
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("mlflow")) in (
        ["mlflow.db"], ["mlflow.db", "mlflow.db.lock"])


def test_an_mlflow_store_busy_in_another_process_is_still_mlflows(tmp_path: Path) -> None:
    """issue 12 case 10, the other way round: an MLflow store that another process is writing (a lone worker, a
    second training) cannot be read at that moment; that is no sign of another program's file, so it is not refused
    (it was, as "SQLite cannot read it: database is locked", and a resumed worker stopped)."""
    import sqlite3

    from deepgalaxy.tracking.store import check_sqlite, prepare_store

    db = tmp_path / "mlflow.db"
    prepare_store(f"sqlite:///{db}", "deepgalaxy")
    writer = sqlite3.connect(db, isolation_level=None)
    try:
        writer.execute("BEGIN EXCLUSIVE")
        check_sqlite(db)
    finally:
        writer.execute("ROLLBACK")
        writer.close()


# --- case 21: the experiment kind ---------------------------------------------------------------------------------


def test_experiments_are_tagged_for_model_development(tmp_path: Path) -> None:
    """issue 12 case 21: prepare_store (used by train, tune, scale, the latent-space commands and
    register_directory) tags a new experiment, and an existing one that lacks the tag, with
    mlflow.experimentKind=custom_model_development; a kind the user chose is kept."""
    import mlflow

    from deepgalaxy.tracking import prepare_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    prepare_store(uri, "fresh")
    client = mlflow.MlflowClient(uri)
    key, value = EXPERIMENT_KIND
    assert client.get_experiment_by_name("fresh").tags.get(key) == value  # type: ignore[union-attr]
    old = client.create_experiment("made-before")
    chosen = client.create_experiment("chosen", tags={key: "genai_development"})
    prepare_store(uri, "made-before")
    prepare_store(uri, "chosen")
    assert client.get_experiment(old).tags.get(key) == value
    assert client.get_experiment(chosen).tags.get(key) == "genai_development"
