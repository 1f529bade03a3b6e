"""Starting ranks through a launcher plugin, and what a rank gets back from it.

- :func:`check_framework`: is this framework known (registered by a plugin) and installed? Asked once, before
  anything is written or launched, by train, tune and scale.
- :func:`launcher_for`: the launcher plugin (``horovod`` for several workers or hosts, else ``local``).
- :func:`launch`: launch, then turn the rank's ``error.json`` (or a missing result) into a :class:`TrainingError`.
- :func:`rank_collective`: inside a rank, the :class:`~deepgalaxy.core.interfaces.Collective` its launcher provides
  for its framework, so runs/ never imports a launcher or a framework.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deepgalaxy.core.errors import FrameworkUnavailableError, TrainingError, UnknownNameError
from deepgalaxy.core.interfaces import Collective, resolve
from deepgalaxy.core.plugins import get_plugin_manager
from deepgalaxy.core.workers import HostsLostError
from deepgalaxy.runs.rundir import ERROR_FILE, RESULT_FILE


def check_framework(name: str) -> None:
    """Refuse a framework no plugin provides (naming those that exist), or one whose packages are missing."""
    frameworks = get_plugin_manager().frameworks
    if name not in frameworks.names():
        raise UnknownNameError("framework", name, frameworks.names())
    missing = [m for m in frameworks.get(name).requires if importlib.util.find_spec(m) is None]
    if missing:
        raise FrameworkUnavailableError(f"framework {name!r} needs {', '.join(missing)}, which is not installed; "
                                        f"install it with: pip install 'deepgalaxy[{name}]'")


def default_launcher(workers: int, hosts: str | None) -> str:
    """``horovod`` for several workers or hosts, else ``local``."""
    return "horovod" if workers > 1 or hosts else "local"


def launcher_for(name: str | None, workers: int, hosts: str | None) -> Any:
    """The launcher plugin: ``name`` if given, else :func:`default_launcher`."""
    name = name or default_launcher(workers, hosts)
    info = get_plugin_manager().launchers.get(name)
    missing = [m for m in info.requires if importlib.util.find_spec(m) is None]
    if missing:
        hint = " build it with scripts/build_horovod.sh (see the README)" if "horovod" in missing else ""
        raise FrameworkUnavailableError(f"launcher {name!r} needs {', '.join(missing)}, which is not installed;{hint}")
    return resolve(info.loader)()


def launch(launcher: Any, argv: Sequence[str], workers: int, hosts: str | None, env: Mapping[str, str],
           directory: Path, failed: str, no_result: str) -> None:
    """Run ``argv`` as ``workers`` ranks writing into ``directory``; raise when rank 0 left ``error.json`` or no
    ``result.json``. ``failed`` and ``no_result`` are the messages, with ``{message}`` (the first line of the
    rank's error), ``{code}`` (the exit code) and ``{directory}`` filled in; hosts the launcher lost are named
    before ``no_result``."""
    (directory / ERROR_FILE).unlink(missing_ok=True)
    try:
        code = launcher.launch(argv, workers, hosts, env)
    except HostsLostError as exc:
        then = no_result.format(message=str(exc), code=exc.code, directory=directory)
        raise TrainingError(f"{exc}; {then}") from None
    error = directory / ERROR_FILE
    if error.is_file():
        message = json.loads(error.read_text())["error"].split("\n")[0]
        raise TrainingError(failed.format(message=message, code=code, directory=directory))
    if code != 0 or not (directory / RESULT_FILE).is_file():
        raise TrainingError(no_result.format(message="", code=code, directory=directory))


def rank_collective(launcher: str | None, framework: str, workers: int, hosts: str | None) -> Collective:
    """In a rank: the collective of its launch, from ``launcher`` (default :func:`default_launcher`)."""
    info = get_plugin_manager().frameworks.get(framework)
    chosen: Collective = launcher_for(launcher, workers, hosts).collective(info)
    return chosen
