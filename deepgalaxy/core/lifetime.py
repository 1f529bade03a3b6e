"""Child processes that end with their parent: a training worker never goes on alone after its CLI is killed.

``kill -9`` of ``deepgalaxy train`` gives it no chance to stop its worker (or ``horovodrun``); a worker left on its
own would train the run beside the next ``--resume``. On Linux the kernel can deliver a signal to a process when its
parent dies (``prctl(PR_SET_PDEATHSIG)``); it survives ``exec``, so :func:`tied_to_parent` starts a command through
this module, which asks for the signal, checks that the parent did not die in the meantime, and ``exec``s the command
(no ``preexec_fn``: code run between ``fork`` and ``exec`` in a threaded parent can deadlock). :func:`watch_parent`
is the fallback inside a worker: a thread that ends the process when its parent changes (it was re-parented).

    python -m deepgalaxy.core.lifetime PARENT_PID COMMAND [ARGS...]
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
WATCH_INTERVAL_S = 1.0
"""How often :func:`watch_parent` looks at the parent PID."""


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def tied_to_parent(argv: list[str]) -> list[str]:
    """``argv`` wrapped so that the process it starts is killed when this (the calling) process dies."""
    return [sys.executable, "-m", "deepgalaxy.core.lifetime", str(os.getpid()), *argv]


def watch_parent(interval_s: float = WATCH_INTERVAL_S) -> threading.Thread:
    """A daemon thread that kills this process once its parent has changed (the parent died; we were re-parented)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="deepgalaxy-parent-watch", daemon=True)
    thread.start()
    return thread


def main(argv: list[str]) -> int:
    """Exec ``argv[1:]`` with the parent-death signal set, unless the parent ``argv[0]`` is already gone."""
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: python -m deepgalaxy.core.lifetime PARENT_PID COMMAND [ARGS...]", file=sys.stderr)
        return 2
    die_with_parent()
    if os.getppid() != int(argv[0]):  # the parent died before the signal was asked for
        return 1
    os.execvp(argv[1], argv[1:])
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
