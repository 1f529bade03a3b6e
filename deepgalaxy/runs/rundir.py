"""What a run directory holds: the run spec, crash-safe checkpoints, the result; shared by train() and the worker.

Kept apart from :mod:`deepgalaxy.runs.worker` so that importing :func:`deepgalaxy.runs.train` does not load the
worker module (which runs as ``python -m deepgalaxy.runs.worker``).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from deepgalaxy.core.errors import DeepGalaxyError
from deepgalaxy.core.specs import RunSpec, describe_errors

RUN_FILE = "run.json"
CHECKPOINT = "checkpoint"
STATE_FILE = "state.json"
MLFLOW_FILE = "mlflow_run.json"
RESULT_FILE = "result.json"
ERROR_FILE = "error.json"
MODEL_DIR = "model"
BEST_DIR = "best"
RANKS_DIR = "ranks"
LOCK_FILE = "run.lock"
LAUNCHER_SLOT = 0
"""The lock slot (byte of ``run.lock``) of ``deepgalaxy train``; worker rank r holds slot ``WORKER_SLOT + r``."""
WORKER_SLOT = 1


def read_run_spec(run_dir: Path) -> RunSpec:
    """The :class:`RunSpec` of ``run_dir/run.json``; a :class:`DeepGalaxyError` naming the file and the problem
    (unreadable, not JSON, an invalid setting such as a ``null`` learning rate) when there is none to read."""
    path = run_dir / RUN_FILE
    try:
        return RunSpec.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise DeepGalaxyError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except ValidationError as exc:
        raise DeepGalaxyError(f"{path}: not a valid run spec ({describe_errors(exc)})") from None


class RunLock:
    """A run directory is trained by one process tree at a time: POSIX record locks on ``run.lock``.

    ``deepgalaxy train`` holds slot 0 for the whole training and each worker rank holds its own slot itself, so a
    worker left running on its own still keeps a ``--resume`` out. Record locks belong to a process: the kernel
    drops them when it ends, however it ends (``kill -9`` too), and reports which PID holds one (``F_GETLK``).
    """

    def __init__(self, run_dir: Path, slot: int) -> None:
        self.run_dir, self.slot = run_dir, slot
        self._fd: int | None = None

    def acquire(self, check_workers: bool = False) -> RunLock:
        """Take the slot (and, with ``check_workers``, make sure no worker holds one); else raise naming the
        run directory and the PID that trains it. File systems without record locks: the run goes unlocked."""
        try:
            fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DeepGalaxyError(f"{self.run_dir / LOCK_FILE}: cannot be opened ({exc.strerror or exc})") from None
        try:
            import fcntl

            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self.slot)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                return self
            holder = _holder(fd, self.slot, 1)
            os.close(fd)
            raise self.busy(holder) from None
        self._fd = fd
        if check_workers:
            holder = _holder(fd, WORKER_SLOT, 0)
            if holder is not None:
                self.release()
                raise self.busy(holder)
        return self

    def busy(self, pid: int | None) -> DeepGalaxyError:
        who = f"another process (PID {pid})" if pid else "another process"
        stop = f"stop it (kill {pid})" if pid else "stop it"
        return DeepGalaxyError(
            f"{self.run_dir} is being trained by {who}; one process trains a run at a time: wait until it ends "
            f"or {stop}, then run this again"
        )

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops this process's locks on it
            self._fd = None


def _holder(fd: int, start: int, length: int) -> int | None:
    """The PID of a process holding a lock that overlaps ``[start, start + length)`` (0: to the end), if any."""
    import fcntl

    if not sys.platform.startswith("linux"):  # struct flock's layout below is Linux's
        return None
    query = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
    try:
        l_type, _, _, _, pid = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, query))
    except OSError:
        return None
    return int(pid) if l_type != fcntl.F_UNLCK and pid > 0 else None


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
