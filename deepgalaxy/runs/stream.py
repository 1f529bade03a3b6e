"""Stream the units (batches) of a catalogue-scale job through a model, in order, in process or in worker processes.

A :class:`Job` (predicting files or store rows, encoding a store) is cut into numbered units of about one batch each:
``read(unit)`` does the input side (reading, decompressing, preprocessing), ``run(model, loaded)`` the model side
(inference, formatting) and returns the unit's result as named numpy arrays. :func:`stream` yields the results of
units ``start..units-1`` in unit order, so a caller can write them as they come and an interrupted run continues at
the first unit it had not written:

- ``workers=1``: in this process; a background thread reads the next units (``PREFETCH`` ahead) while the model
  runs the current one, so the input side overlaps inference and at most ``PREFETCH + 1`` batches are in memory.
- ``workers=N``: N processes (``python -m deepgalaxy.runs.stream WORKDIR RANK``, each ending with its parent), each with
  ``cores / N`` threads, each loading the model itself with ``registry.load`` from a copy saved in ``workdir`` (a
  model is never pickled), on the GPU of its rank (modulo the GPUs) when the model runs on one, and taking units
  ``start + rank, start + rank + N, ...``. A worker writes each result as
  an ``.npz`` (no pickle) in ``workdir``; this process hands them on in unit order and deletes them.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from deepgalaxy.core.errors import DeepGalaxyError

if TYPE_CHECKING:
    from deepgalaxy.core.model import Model

PREFETCH = 2
"""Units read ahead of the one the model runs."""
SPEC_FILE = "stream.json"
MODEL_DIR = "model"
ERROR_SUFFIX = ".error"
POLL_S = 0.01
JOB_MODULES = ("deepgalaxy.runs.",)
"""Where a worker may find the class of a job (the ``job`` entry of its spec)."""

Result = dict[str, np.ndarray]


class Job(Protocol):
    """Work cut into numbered units; rebuilt in a worker process from :meth:`spec` by ``cls.from_spec``."""

    def units(self) -> int: ...

    def read(self, unit: int) -> Any: ...

    def run(self, model: Model, loaded: Any) -> Result: ...

    def spec(self) -> dict[str, Any]: ...


def job_name(job: Job) -> str:
    """``module:Class`` of a job, for the worker that rebuilds it."""
    return f"{type(job).__module__}:{type(job).__qualname__}"


def prefetched(read: Callable[[int], Any], units: range, ahead: int = PREFETCH) -> Iterator[Any]:
    """``read(u)`` for every unit ``u`` in order, computed in a background thread ``ahead`` units in advance."""
    out: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=max(1, ahead))
    stop = threading.Event()

    def work() -> None:
        try:
            for unit in units:
                item = ("item", read(unit))
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out.put(("end", None))
        except BaseException as exc:  # handed to the consumer, raised there
            out.put(("error", exc))

    thread = threading.Thread(target=work, name="deepgalaxy-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = out.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        while thread.is_alive():  # unblock a reader waiting on a full queue
            with contextlib.suppress(queue.Empty):
                out.get(timeout=0.1)


def stream(model: Model, job: Job, start: int = 0, workers: int = 1, workdir: Path | None = None
           ) -> Iterator[tuple[int, Result]]:
    """``(unit, result)`` for units ``start..job.units()-1``, in unit order (see the module docstring)."""
    n = job.units()
    if workers <= 1 or n - start <= 1:
        for unit, loaded in zip(range(start, n), prefetched(job.read, range(start, n)), strict=True):
            yield unit, job.run(model, loaded)
        return
    if workdir is None:
        raise DeepGalaxyError("several workers need a folder for their results (workdir)")
    yield from _in_workers(model, job, start, min(workers, n - start), workdir)


def unit_file(workdir: Path, unit: int) -> Path:
    return workdir / f"unit-{unit:09d}.npz"


def _in_workers(model: Model, job: Job, start: int, workers: int, workdir: Path) -> Iterator[tuple[int, Result]]:
    from deepgalaxy.core.lifetime import tied_to_parent
    from deepgalaxy.core.workers import capped_thread_env, threads_per_worker

    workdir.mkdir(parents=True, exist_ok=True)
    for stale in [*workdir.glob("unit-*.npz*"), *workdir.glob(f"*{ERROR_SUFFIX}")]:  # a killed run's leftovers
        stale.unlink()
    if (workdir / MODEL_DIR).exists():
        shutil.rmtree(workdir / MODEL_DIR)
    model.save(workdir / MODEL_DIR)
    spec = {"job": job_name(job), "spec": job.spec(), "framework": model.framework, "device": model.device,
            "precision": model.precision, "start": start, "workers": workers}
    (workdir / SPEC_FILE).write_text(json.dumps(spec))
    env = {**os.environ, **capped_thread_env(threads_per_worker(workers))}
    procs = [subprocess.Popen(tied_to_parent([sys.executable, "-m", "deepgalaxy.runs.stream", str(workdir),
                                              str(rank)]), env=env, stdout=subprocess.DEVNULL)
             for rank in range(workers)]
    try:
        for unit in range(start, job.units()):
            path = unit_file(workdir, unit)
            rank = (unit - start) % workers
            while not path.exists():
                if procs[rank].poll() is not None and not path.exists():
                    raise _worker_failed(workdir, rank, procs[rank].returncode)
                time.sleep(POLL_S)
            with np.load(path, allow_pickle=False) as npz:
                result = {k: npz[k] for k in npz.files}
            path.unlink()
            yield unit, result
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _worker_failed(workdir: Path, rank: int, code: int | None) -> DeepGalaxyError:
    error = workdir / f"{rank}{ERROR_SUFFIX}"
    message = error.read_text().strip() if error.is_file() else f"it exited with code {code} and left no message"
    return DeepGalaxyError(f"worker {rank} failed: {message}")


def run_worker(workdir: Path, rank: int) -> int:
    """In a worker process: load the model saved in ``workdir``, rebuild the job and write the results of this
    rank's units (the module docstring). A failure is written to ``RANK.error`` (its message, one line)."""
    from deepgalaxy import registry
    from deepgalaxy.core.interfaces import resolve
    from deepgalaxy.core.lifetime import watch_parent

    watch_parent()
    try:
        spec = json.loads((workdir / SPEC_FILE).read_text())
        if not str(spec["job"]).startswith(JOB_MODULES):
            raise DeepGalaxyError(f"{spec['job']!r} is not a deepgalaxy job")
        device = "cuda" if str(spec["device"]).startswith("cuda") else "cpu"  # worker r: the GPU r (modulo)
        model = registry.load(workdir / MODEL_DIR, framework=spec["framework"], device="cpu").to(
            device, spec["precision"], local_rank=rank)
        job = resolve(spec["job"]).from_spec(spec["spec"], model)
        mine = range(int(spec["start"]) + rank, job.units(), int(spec["workers"]))
        for unit, loaded in zip(mine, prefetched(job.read, mine), strict=True):
            result = job.run(model, loaded)
            target = unit_file(workdir, unit)
            with open(f"{target}.part", "wb") as fh:
                np.savez(fh, **result)
            os.replace(f"{target}.part", target)
    except Exception as exc:
        (workdir / f"{rank}{ERROR_SUFFIX}").write_text(f"{type(exc).__name__}: {exc}"
                                                       if not isinstance(exc, DeepGalaxyError) else str(exc))
        return 1
    return 0


__all__ = ["PREFETCH", "Job", "Result", "job_name", "prefetched", "run_worker", "stream", "unit_file"]

if __name__ == "__main__":
    sys.exit(run_worker(Path(sys.argv[1]), int(sys.argv[2])))
