"""What a run directory holds: the run spec, crash-safe checkpoints, the result; shared by train() and the worker.

Kept apart from :mod:`deepgalaxy.runs.worker` so that importing :func:`deepgalaxy.runs.train` does not load the
worker module (which runs as ``python -m deepgalaxy.runs.worker``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"
CHECKPOINT = "checkpoint"
STATE_FILE = "state.json"
MLFLOW_FILE = "mlflow_run.json"
RESULT_FILE = "result.json"
ERROR_FILE = "error.json"
MODEL_DIR = "model"
BEST_DIR = "best"
RANKS_DIR = "ranks"


def read_state(run_dir: Path) -> dict[str, Any] | None:
    """The newest complete checkpoint's state (``checkpoint/``, else ``checkpoint.old/``), with its directory."""
    for name in (CHECKPOINT, CHECKPOINT + ".old"):
        path = run_dir / name / STATE_FILE
        if path.is_file():
            state: dict[str, Any] = json.loads(path.read_text())
            state["_dir"] = str(run_dir / name)
            return state
    return None


def write_checkpoint(run_dir: Path, trainer: Any, state: dict[str, Any]) -> None:
    """Write trainer checkpoint + ``state.json`` into ``checkpoint.tmp`` and swap it in (crash-safe)."""
    tmp, final, old = run_dir / (CHECKPOINT + ".tmp"), run_dir / CHECKPOINT, run_dir / (CHECKPOINT + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "trainer").mkdir(parents=True)
    trainer.save_checkpoint(tmp / "trainer")
    (tmp / STATE_FILE).write_text(json.dumps({k: v for k, v in state.items() if not k.startswith("_")}))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
