"""Every CLI command, found by walking the app, answers a usage error or a missing input with exit code 2 and one
line on stderr, never a traceback (issue 12 case 4); Ctrl-C during `data simulate` says how to resume (case 19);
the hints the demo prints are commands that work where the user stands (case 20); the README stands on its own
(case 22); the constraints pins and the dependency ranges cannot drift apart (the issue's last bullet); one meaning
per flag, the latent-space commands in one group and their old spellings hidden (issue 13 item 4).

Most commands run in this process through ``deepgalaxy.cli.common.run_cli`` (``main()`` is exactly
``sys.exit(run_cli(app))``), so torch and MLflow are imported once; the issue's own examples run as real subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer.main

from deepgalaxy.cli import app
from deepgalaxy.cli.common import run_cli
from tests.conftest import REPO
from tests.conftest import run_cli as run_cli_subprocess
from tests.runs_support import CARD, TINY, make_dataset

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

LATENT = {"latent index", "latent search", "latent cluster", "latent evaluate", "latent interpolate"}
OLD_LATENT = {"index build": "latent index", "search": "latent search", "cluster": "latent cluster",
              "evaluate-search": "latent evaluate", "interpolate": "latent interpolate"}
"""The latent-space commands before the `latent` group (issue 13): hidden deprecated aliases for one release."""
TODAY = {
    "plugins", "demo", "train", "tune", "scale", "predict", "server", "serve", *LATENT, *OLD_LATENT,
    "models list", "models show", "models versions", "models promote",
    "data simulate", "data ingest", "data info", "data show",
}
"""The commands that exist today: the walk must find at least these (so a broken walk fails the test)."""


# --- walking the app ---------------------------------------------------------------------------------------------


def walk(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every (path, click command) of the app, groups included, depth first."""
    yield path, command
    for name, sub in sorted((getattr(command, "commands", None) or {}).items()):
        yield from walk(sub, (*path, name))


ROOT = typer.main.get_command(app)
ALL = list(walk(ROOT))
GROUPS = {" ".join(p) or "(root)": (p, c) for p, c in ALL if getattr(c, "commands", None)}
COMMANDS = {" ".join(p): (p, c) for p, c in ALL if not getattr(c, "commands", None)}


def is_argument(param: Any) -> bool:
    return getattr(param, "param_type_name", "") == "argument"


def is_number(param: Any) -> bool:
    """An int or float parameter (typer 0.29 keeps the annotation; click-based typer a click type)."""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    click_type = getattr(getattr(param, "type", None), "name", None)
    return annotation in (int, float) or click_type in ("integer", "float")


def test_the_walk_finds_every_command_of_today() -> None:
    """issue 12 case 4: the walk below is what drives the other tests; it must see at least today's commands."""
    assert set(COMMANDS) >= TODAY, sorted(TODAY - set(COMMANDS))
    assert {"(root)", "data", "models", "latent", "index"} <= set(GROUPS)


def test_old_spellings_are_hidden_and_each_flag_has_one_meaning() -> None:
    """issue 13 item 4: the latent-space commands are one group; their old spellings are hidden aliases (they still
    answer usage errors like every command above, and warn when run: tests/test_latent.py). -V/--version is only the
    package version and -n only the worker count, except in hidden deprecated spellings."""
    for old in OLD_LATENT:
        path = old.split()
        assert getattr(GROUPS["(root)"][1].commands[path[0]], "hidden", False), old
    assert not getattr(GROUPS["(root)"][1].commands["latent"], "hidden", True)
    meanings: dict[str, set[str]] = {}
    for _path, command in ALL:
        for param in command.params:
            if not getattr(param, "hidden", False):
                for flag in (f for f in (*param.opts, *param.secondary_opts) if f.startswith("-")):
                    meanings.setdefault(flag, set()).add(param.name)
    assert meanings["-V"] == meanings["--version"] == {"version"}, meanings["--version"]
    assert meanings["-n"] == {"workers"} and meanings["--model-version"] == {"model_version"}


# --- what a usage error and a missing input look like --------------------------------------------------------------


def invoke(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``deepgalaxy ARGS`` through the real entry point's function, in this process: (exit code, stderr)."""
    capsys.readouterr()
    rc = run_cli(app, list(args))
    return (0 if rc is None else int(rc)), capsys.readouterr().err


def assert_one_line_error(rc: int, err: str, args: list[str], mentions: str | None = None) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    shown = f"deepgalaxy {' '.join(args)} -> exit {rc}, stderr:\n{err}"
    assert rc == 2, shown
    assert "Traceback" not in err, shown
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    if mentions is not None:
        assert mentions.lower() in lines[0].lower(), f"the message does not name {mentions!r}: {shown}"


@pytest.fixture(scope="module")
def tracking_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MLflow store for the module (creating a SQLite store costs seconds)."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def in_tmp(tmp_path: Path, tracking_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory and an MLflow store of the tests' own: nothing lands in the repository."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tracking_dir / 'mlflow.db'}")
    return tmp_path


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_refuses_a_usage_error_in_one_line(name: str, in_tmp: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """issue 12 case 4: an unknown flag, and a missing required argument/option, on every command of the walk."""
    path, command = COMMANDS[name]
    args = [*path, "--bogus-flag"]
    assert_one_line_error(*invoke(args, capsys), args, mentions="--bogus-flag")
    if any(p.required for p in command.params):
        args = list(path)
        assert_one_line_error(*invoke(args, capsys), args, mentions="Missing")


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_every_group_refuses_an_unknown_flag_or_command_in_one_line(name: str, in_tmp: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """issue 12 case 4: `deepgalaxy nosuchcommand`, `deepgalaxy data nosuchcommand`, `deepgalaxy data --bogus-flag`."""
    path, group = GROUPS[name]
    args = [*path, "--bogus-flag"]
    assert_one_line_error(*invoke(args, capsys), args, mentions="--bogus-flag")
    if getattr(group, "default_command", None) is None:  # `models X` lists the cards matching X
        args = [*path, "nosuchcommand"]
        assert_one_line_error(*invoke(args, capsys), args, mentions="nosuchcommand")


def test_run_cli_handles_both_typers_and_clicks_exception_classes(capsys: pytest.CaptureFixture[str]) -> None:
    """issue 12 case 4: typer 0.29 raises its own classes (typer._click.exceptions), older typer raises click's; a
    command (or a plugin's callback) may raise either. Each usage error is one line and exit 2, each Exit its code."""
    import click
    import typer

    probe = typer.Typer()
    raised: dict[str, BaseException] = {
        "typer-usage": typer.BadParameter("typer says no"), "click-usage": click.BadParameter("click says no"),
        "click-error": click.ClickException("click failed"), "typer-exit": typer.Exit(3),
        "click-exit": click.exceptions.Exit(4),
    }

    @probe.command()
    def fail(kind: str) -> None:
        raise raised[kind]

    @probe.command()
    def other() -> None:  # two commands: `fail` is a subcommand, as in deepgalaxy
        pass

    for kind, (code, text) in {"typer-usage": (2, "typer says no"), "click-usage": (2, "click says no"),
                               "click-error": (1, "click failed"), "typer-exit": (3, None),
                               "click-exit": (4, None)}.items():
        capsys.readouterr()
        rc = run_cli(probe, ["fail", kind])
        err = capsys.readouterr().err
        assert rc == code and "Traceback" not in err, (kind, rc, err)
        if text:
            assert err.count("\n") == 1 and err.startswith("error: ") and text in err, (kind, err)


# --- missing inputs ----------------------------------------------------------------------------------------------

INPUTS = {
    # parameter name -> (a value that does not exist, the key of a valid value in `valid` below or None)
    "model": ("nosuch-model", "model"),
    "name": ("nosuch-model", None),
    "card": ("nosuch-card", "card"),
    "data": ("{tmp}/missing.zarr", "data"),
    "directory": ("{tmp}/missing-images", "images"),
    "queries": ("{tmp}/missing-query.png", "query"),
    "start": ("{tmp}/missing-a.png", "row0"),
    "end": ("{tmp}/missing-b.png", "row1"),
    "inputs": ("{tmp}/missing-input.png", "images"),
}
"""Parameters that name something the command reads: each is tried missing while the others are valid."""
VALUES = {"version": "1", "out": "{tmp}/new.zarr"}
"""Required parameters that are not inputs (a number, a store to write): always given this value."""


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Real inputs: a tiny store, a saved tiny full-simple model, a folder with an image, a query image."""
    from skimage import io

    from deepgalaxy import registry
    from deepgalaxy.core.specs import with_overrides

    root = tmp_path_factory.mktemp("valid")
    data = make_dataset(root / "tiny.zarr")
    overrides = {k.removeprefix("card."): json.loads(v) for k, v in (o.split("=", 1) for o in TINY)
                 if k.startswith("card.")}
    card = with_overrides(registry.card(CARD), overrides)
    model = registry.create(card, framework="torch", seed=0).save(root / "model")
    images = root / "images"
    images.mkdir()
    pixels = (np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)
    io.imsave(images / "a.png", pixels, check_contrast=False)
    return {"model": str(model), "card": CARD, "data": str(data), "images": str(images),
            "query": str(images / "a.png"), "row0": "0", "row1": "1"}


def input_params(command: Any) -> list[Any]:
    """The parameters of ``command`` that name an input; fails on a required parameter nobody classified."""
    unknown = [p.name for p in command.params if p.required and p.name not in INPUTS and p.name not in VALUES]
    assert not unknown, f"classify the required parameter(s) {unknown} in INPUTS or VALUES of this test"
    return [p for p in command.params if p.name in INPUTS and not is_number(p)]


def command_line(path: tuple[str, ...], command: Any, values: dict[str, str]) -> list[str]:
    """``path`` + positional arguments in order + ``--option value`` for every parameter given in ``values``."""
    positional: list[str] = []
    options: list[str] = []
    for p in command.params:
        if p.name not in values:
            continue
        if is_argument(p):
            positional.append(values[p.name])
        else:
            options += [p.opts[0], values[p.name]]
    return [*path, *positional, *options]


MISSING_CASES = [(name, p.name) for name, (_, command) in sorted(COMMANDS.items()) for p in input_params(command)]


def test_missing_input_cases_cover_the_commands_that_read_inputs() -> None:
    """issue 12 case 4: the walk yields a missing-input case for each command that reads something."""
    covered = {name for name, _ in MISSING_CASES}
    assert {"train", "tune", "scale", *LATENT, *OLD_LATENT,
            "models show", "models versions", "models promote", "data ingest", "data info", "data show",
            "predict", "serve"} <= covered
    # no inputs at all: only the usage checks apply
    assert not {"plugins", "demo", "data simulate", "models list"} & covered


@pytest.mark.parametrize(("name", "missing"), MISSING_CASES, ids=[f"{n}:{m}" for n, m in MISSING_CASES])
def test_every_command_names_a_missing_input_in_one_line(name: str, missing: str, valid: dict[str, str],
                                                         in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """issue 12 case 4: each input of each command, missing while the others are valid -> exit 2, one line naming it."""
    path, command = COMMANDS[name]
    values = {}
    for p in command.params:
        if p.name in VALUES and p.required:
            values[p.name] = VALUES[p.name].format(tmp=in_tmp)
        elif p.name in INPUTS and not is_number(p):
            absent, key = INPUTS[p.name]
            use_absent = p.name == missing or key is None
            values[p.name] = absent.format(tmp=in_tmp) if use_absent else valid[key]
    args = command_line(path, command, values)
    if "--no-progress" not in args and any("--no-progress" in getattr(p, "secondary_opts", ()) for p in command.params):
        args.append("--no-progress")
    absent = INPUTS[missing][0].format(tmp=in_tmp)
    assert_one_line_error(*invoke(args, capsys), args, mentions=Path(absent).name)


def test_a_bad_list_value_is_one_line(valid: dict[str, str], in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """issue 12 case 4: found while probing options by hand: `data show STORE --steps x` raised a ValueError."""
    args = ["data", "show", valid["data"], "--steps", "0,x", "--out", str(in_tmp / "g.png")]
    assert_one_line_error(*invoke(args, capsys), args, mentions="--steps")
    assert not (in_tmp / "g.png").exists()


# --- the issue's own examples, through real subprocesses -------------------------------------------------------------

ISSUE_CASES = [
    (["train", "full-simple", "--data", "x.zarr", "--workers", "0"], "--workers"),
    (["train", "full-simple", "--data", "x.zarr", "--epochs", "0"], "--epochs"),
    (["train", "full-simple", "--data", "x.zarr", "--bogus-flag"], "--bogus-flag"),
    (["data", "simulate"], "OUT"),
    (["data", "simulate", "x.zarr", "--sims", "two"], "--sims"),
    (["nosuchcommand"], "nosuchcommand"),
    (["search", "full-simple", "--data", "x.zarr", "-k", "0"], "-k"),
    (["models", "promote", "vae-simple", "abc"], "VERSION"),
    (["models", "versions", "nosuch-model"], "nosuch-model"),  # a fresh MLflow store: no log lines either
]


@pytest.mark.parametrize(("args", "mentions"), ISSUE_CASES, ids=[" ".join(a) for a, _ in ISSUE_CASES])
def test_the_issues_usage_errors_exit_2_with_one_line(args: list[str], mentions: str, tmp_path: Path) -> None:
    """issue 12 case 4: the listed usage errors, as a user types them (fresh interpreter, real entry point)."""
    r = run_cli_subprocess(*args, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""}, timeout=120)
    assert_one_line_error(r.returncode, r.stderr, args, mentions=mentions)
    if args[0] != "models":
        assert "See `deepgalaxy" in r.stderr and "--help`" in r.stderr, r.stderr
    assert not (tmp_path / "x.zarr").exists()


def test_no_arguments_prints_the_help(tmp_path: Path) -> None:
    """issue 12 case 4: `deepgalaxy` alone (and `deepgalaxy data`) prints the help, no traceback."""
    for args in ([], ["data"]):
        r = run_cli_subprocess(*args, cwd=tmp_path, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "Usage: deepgalaxy" in r.stdout and "Traceback" not in r.stderr, r.stdout + r.stderr


# --- case 19: Ctrl-C during `data simulate` --------------------------------------------------------------------------


def _as_from_a_terminal() -> None:
    """SIGINT as a shell hands it to a command: delivered, default action. A test worker may pass it down blocked or
    ignored (a library it ran masks it while starting helper processes), and a blocked SIGINT never arrives."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_ctrl_c_during_simulate_says_how_to_resume_and_resuming_completes(tmp_path: Path) -> None:
    """issue 12 case 19: SIGINT to the process group (what Ctrl-C does) once the store exists -> exit 130, a line
    saying what was interrupted and that the same command resumes; the same command then completes."""
    out = tmp_path / "sims.zarr"
    args = ["data", "simulate", str(out), "--sims", "8", "--size", "16", "--particles", "3000", "--snapshots", "8",
            "--cameras", "2", "--workers", "2", "--no-progress"]
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "deepgalaxy", *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=_as_from_a_terminal)
    deadline = time.monotonic() + 120
    while not (out / "sims" / "done").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the workers are simulating now
    assert proc.poll() is None, "the simulation finished before it could be interrupted: make it longer"
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 130, (proc.returncode, stdout, stderr)
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    assert "interrupted" in lines[0] and str(out) in lines[0] and "run the same command again" in lines[0], stderr

    again = run_cli_subprocess(*args, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "wrote" in again.stdout
    info = run_cli_subprocess("data", "info", str(out), cwd=tmp_path, timeout=120)
    assert info.returncode == 0, info.stderr
    assert "128 images 16x16x1" in info.stdout and "incomplete" not in info.stdout, info.stdout


# --- case 20: hints that work where the user stands ------------------------------------------------------------------


def _bin_dir() -> Path:
    return Path(sys.executable).parent


def _path_without_venv() -> str:
    """A PATH like the user's after `nox -s demo`: the environment's bin folder is not on it."""
    here = _bin_dir().resolve()
    return os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != here)


def _runnable(executable: str) -> bool:
    import shutil

    found = shutil.which(executable, path=_path_without_venv()) if os.sep not in executable else executable
    return found is not None and os.access(found, os.X_OK) and Path(found).is_file()


def test_ui_hint_names_an_mlflow_that_runs_without_the_environment_on_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 12 case 20: `mlflow ui` from a PATH that lacks the environment's bin folder must still run, and open
    the store the runs are in (an explicit, absolute --backend-store-uri)."""
    import shlex

    from deepgalaxy.tracking import ui_hint

    assert (_bin_dir() / "mlflow").is_file(), "the test environment has no mlflow executable next to python"
    monkeypatch.setenv("PATH", _path_without_venv())
    monkeypatch.chdir(tmp_path)
    for uri in (f"sqlite:///{tmp_path / 'mlflow.db'}", "sqlite:///mlflow.db"):
        words = shlex.split(ui_hint(uri).split("   (")[0])
        assert _runnable(words[0]), (uri, words)
        assert Path(words[0]).name == "mlflow" and words[1] == "ui", words
        assert words[words.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'mlflow.db'}", words
    assert "http://127.0.0.1:9999" in ui_hint("http://127.0.0.1:9999")


def test_demo_hints_are_runnable_without_the_environment_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 12 case 20: the demo's closing hints name a python and a deepgalaxy that run from the user's PATH."""
    import shlex

    from deepgalaxy.cli.demo import closing_hints

    monkeypatch.setenv("PATH", _path_without_venv())
    text = closing_hints("sqlite:////tmp/somewhere/mlflow.db", Path("demo/mergers.zarr"), 3)
    commands = [line.split(": ", 1)[1] for line in text.splitlines() if ": " in line]
    assert len(commands) == 4, text
    for command in commands:
        first = shlex.split(command)[0]
        assert _runnable(first), (first, text)
    assert any(Path(shlex.split(c)[0]).name == "deepgalaxy" for c in commands), text
    assert any(Path(shlex.split(c)[0]).name.startswith("python") for c in commands), text


def test_demo_hints_follow_the_users_path_when_a_wrapper_changed_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    """issue 12 case 20 under `nox -s demo`: nox puts the environment on the demo's PATH but not on the user's; the
    user's PATH comes in DEEPGALAXY_USER_PATH, and the hints must run there."""
    import shlex

    from deepgalaxy.cli.demo import closing_hints
    from deepgalaxy.core.shell import USER_PATH_ENV

    monkeypatch.setenv("PATH", os.pathsep.join([str(_bin_dir()), _path_without_venv()]))
    monkeypatch.setenv(USER_PATH_ENV, _path_without_venv())
    text = closing_hints("sqlite:////tmp/somewhere/mlflow.db", Path("demo/mergers.zarr"), 3)
    for command in [line.split(": ", 1)[1] for line in text.splitlines() if ": " in line]:
        assert _runnable(shlex.split(command)[0]), (command, text)


# --- case 22 and the pins --------------------------------------------------------------------------------------------


def test_readme_stands_on_its_own() -> None:
    """issue 12 case 22: the README never sends a user to files they do not have."""
    text = (REPO / "README.md").read_text()
    for private in ("FACTS.md", "FACTS", "../shared", "shared/"):
        assert private not in text, private
    assert "## Install deepgalaxy for your own work" in text


def _pins() -> dict[str, Any]:
    from packaging.requirements import Requirement

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins[req.name.lower()] = req
    return pins


def _project_requirements() -> list[Any]:
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    return [Requirement(line) for line in lines]


def test_every_pin_satisfies_the_users_range() -> None:
    """issue 12 (last bullet): what CI tests (constraints.txt) is inside what users get (pyproject.toml ranges)."""
    pins = _pins()
    for req in _project_requirements():
        pin = pins.get(req.name.lower())
        if pin is None:
            continue
        (version,) = [s.version for s in pin.specifier if s.operator == "=="]
        assert req.specifier.contains(version, prereleases=True), f"{pin} is outside {req}"


def test_the_apis_the_cli_and_artifacts_depend_on_are_pinned_and_bounded() -> None:
    """issue 12 (last bullet): typer (0.29 moved to its own exception classes), click, pydantic, safetensors, mlflow,
    zarr... pinned exactly for CI, and given an upper bound for users."""
    pins = _pins()
    needed = {"typer", "click", "pydantic", "pydantic-core", "safetensors", "mlflow", "zarr", "numcodecs", "rich",
              "pluggy", "numpy", "optuna", "scikit-image", "torch", "tensorflow-cpu", "keras"}
    assert needed <= set(pins), sorted(needed - set(pins))
    for name in needed:
        assert [s.operator for s in pins[name].specifier] == ["=="], pins[name]
    ranges = {r.name.lower(): r for r in _project_requirements()}
    for name in ("typer", "pydantic", "safetensors", "mlflow", "zarr", "numpy"):
        assert any(s.operator == "<" for s in ranges[name].specifier), f"{ranges[name]} has no upper bound"


def test_the_pins_are_what_the_tests_run_on() -> None:
    """issue 12 (last bullet): a pin that differs from the installed version would be untested."""
    from importlib.metadata import PackageNotFoundError, version

    for name, pin in _pins().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue
        assert pin.specifier.contains(installed, prereleases=True), f"{pin}, installed {installed}"
