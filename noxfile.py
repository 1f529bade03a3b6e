"""Developer sessions: tests, lint, typecheck, demo, horovod. Every install goes through constraints.txt."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "venv"

PYTHON = "3.11"
CONSTRAINTS = ("-c", "constraints.txt")


def install_project(session: nox.Session, extras: str = "torch,tensorflow,fits,server,dev") -> None:
    """torch first and exactly 2.13.0 (anything newer pulls CUDA wheels), then the project."""
    session.install(*CONSTRAINTS, "pip>=24", "wheel", "setuptools>=69", "packaging")
    session.install(*CONSTRAINTS, "torch==2.13.0")
    session.install(*CONSTRAINTS, "-e", f".[{extras}]")


def install_horovod(session: nox.Session) -> None:
    """Build Horovod 0.28.1 from source with Gloo for torch and TensorFlow (skipped when already importable)."""
    session.run("bash", "scripts/build_horovod.sh", env={"PYTHON": f"{session.virtualenv.location}/bin/python"},
                external=True)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole test suite, as CI runs it."""
    install_project(session)
    install_horovod(session)
    session.run("pytest", "-n", "2", "--dist", "loadgroup", *session.posargs)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """Simulate a small dataset, train a small card, register it in MLflow, load it back, predict and search."""
    install_project(session, extras="torch")
    # the hints the demo prints must run in the user's shell, whose PATH lacks this session's environment
    session.run("deepgalaxy", "demo", *session.posargs, env={"DEEPGALAXY_USER_PATH": os.environ.get("PATH", "")})


@nox.session(python=PYTHON)
def horovod(session: nox.Session) -> None:
    """Build and install Horovod into the tests session's environment's interpreter (or this one)."""
    install_project(session)
    install_horovod(session)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install(*CONSTRAINTS, "ruff>=0.5")
    session.run("ruff", "check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy over the whole package against the real torch and TensorFlow types; strict on core, tracking and
    registry (configured in pyproject.toml)."""
    install_project(session)
    session.run("mypy", "deepgalaxy")
