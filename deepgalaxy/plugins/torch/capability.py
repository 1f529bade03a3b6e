"""Speed-ups switched by what this machine measured, not by what the machine they were tuned on did.

A decision (e.g. whether the folded depthwise weight gradient beats torch's own for one shape) is measured once, the
first time it is needed, and kept in a small JSON file under the user's cache folder
(``$XDG_CACHE_HOME/deepgalaxy/torch-capability.json``, else ``~/.cache/deepgalaxy/...``), keyed by the CPU model,
the torch version and the intra-op thread count, so later processes on the same machine reuse it. A cache that
cannot be read or written is ignored (the decision is measured again). Each switch has a ``DEEPGALAXY_*`` variable:
``1`` forces it on, ``0`` off, ``auto`` (the default) measures.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from deepgalaxy.core.errors import DeepGalaxyError
from deepgalaxy.core.hardware import cpu_info

CACHE_NAME = "torch-capability.json"
SWITCH_VALUES = ("auto", "1", "0")


def cache_file() -> Path:
    """Where measured decisions are kept: ``$XDG_CACHE_HOME/deepgalaxy`` (else ``~/.cache/deepgalaxy``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "deepgalaxy" / CACHE_NAME


def machine_key() -> str:
    """What a measurement depends on: the CPU model, the torch version and the intra-op threads."""
    return f"{cpu_info().model} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def switch(env: str) -> str:
    """The setting of switch ``env``: ``auto``, ``1`` or ``0`` (a clear error naming the variable otherwise)."""
    value = os.environ.get(env, "auto").strip().lower() or "auto"
    if value not in SWITCH_VALUES:
        raise DeepGalaxyError(f"{env}={os.environ[env]!r}: use auto (measure on this machine), 1 (on) or 0 (off)")
    return value


_lock = threading.Lock()


def measured(feature: str, case: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The record of ``feature`` for ``case`` on this machine: from the cache file, else ``measure()`` (a JSON-able
    dict) run now and kept."""
    path, key = cache_file(), machine_key()
    with _lock:
        table = _read(path)
        record = table.get(key, {}).get(feature, {}).get(case)
        if isinstance(record, dict):
            return record
        record = measure()
        table = _read(path)  # another process may have written meanwhile
        table.setdefault(key, {}).setdefault(feature, {})[case] = record
        _write(path, table)
        return record


def _read(path: Path) -> dict[str, Any]:
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def _write(path: Path, table: dict[str, Any]) -> None:
    """Replace the cache file in one step (a reader never sees half of it); give up quietly where it cannot."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
