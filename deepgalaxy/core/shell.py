"""Commands printed for the user to type, spelled so that they run from the user's shell.

deepgalaxy often runs from an environment that is not activated (``nox -s demo`` installs into ``.nox/demo``): its
``deepgalaxy`` and ``mlflow`` console scripts are then not on the user's PATH, and a hint that says ``mlflow ui``
would fail. These helpers name a script by its bare name only when the shell finds this environment's one first,
and by its full path otherwise. A wrapper that puts the environment on PATH only for the command it runs (nox
does) passes the user's own PATH in :data:`USER_PATH_ENV`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

__all__ = ["USER_PATH_ENV", "deepgalaxy_command", "python_command", "script_command"]

USER_PATH_ENV = "DEEPGALAXY_USER_PATH"
"""The PATH of the user's shell, when it differs from this process's (``nox -s demo`` sets it)."""


def _bin_dir() -> Path:
    """The folder of this interpreter, where pip puts the environment's console scripts (not resolved: a virtual
    environment's python is a link to the base interpreter, in another folder)."""
    return Path(sys.executable).parent


def _found_here(name: str) -> bool:
    """Whether the shell (PATH) finds ``name`` in this environment's bin folder, before any other."""
    found = shutil.which(name, path=os.environ.get(USER_PATH_ENV) or None)
    if found is None:
        return False
    try:
        return os.path.samefile(Path(found).parent, _bin_dir())
    except OSError:
        return False


def _installed_here(name: str) -> Path | None:
    for candidate in (_bin_dir() / name, _bin_dir() / f"{name}.exe"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def script_command(name: str) -> str:
    """How to run this environment's console script ``name`` (``mlflow``, ``deepgalaxy``) from the user's shell:
    the bare name when PATH finds this environment's one, else its full path; the bare name when this
    environment has none (then it is whatever the user installed)."""
    here = _installed_here(name)
    if here is None or _found_here(name):
        return name
    return shlex.quote(str(here))


def python_command() -> str:
    """How to start this interpreter (the one with deepgalaxy installed) from the user's shell."""
    for name in ("python", "python3"):
        if _found_here(name):
            return name
    return shlex.quote(sys.executable)


def deepgalaxy_command() -> str:
    """How to run the ``deepgalaxy`` command from the user's shell (``python -m deepgalaxy`` without the script)."""
    if _installed_here("deepgalaxy") is None and shutil.which("deepgalaxy") is None:
        return f"{python_command()} -m deepgalaxy"
    return script_command("deepgalaxy")
