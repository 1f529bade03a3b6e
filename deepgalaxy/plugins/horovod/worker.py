"""Inside a rank: who am I (rank, size, local rank) and reductions across ranks, through the framework's Horovod
binding.

Horovod has one binding per framework (``horovod.torch``, ``horovod.tensorflow``); a process must initialise the
one its framework uses, which the framework plugin names (``FrameworkInfo.bindings["horovod"]``) along with the
runtime that turns numpy arrays into its tensors. Outside ``horovodrun`` (no ``HOROVOD_RANK`` in the environment)
everything is local: rank 0 of 1 and reductions are the identity.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from deepgalaxy.core.collective import LocalCollective
from deepgalaxy.core.errors import FrameworkUnavailableError
from deepgalaxy.core.interfaces import Collective, Distributed, FrameworkInfo, FrameworkRuntime, resolve
from deepgalaxy.plugins.horovod.launcher import INSTALL_HINT


def under_horovodrun() -> bool:
    """True inside a process started by ``horovodrun`` (it sets ``HOROVOD_RANK`` and ``HOROVOD_SIZE``)."""
    return "HOROVOD_RANK" in os.environ and "HOROVOD_SIZE" in os.environ


class HorovodCollective:
    """Reductions through the framework's Horovod binding (already initialised)."""

    def __init__(self, runtime: FrameworkRuntime, hvd: Any) -> None:
        self.dist = Distributed(rank=hvd.rank(), size=hvd.size(), local_rank=hvd.local_rank())
        self.runtime, self.hvd = runtime, hvd
        self._calls = 0

    def _reduce(self, values: np.ndarray, op: Any) -> np.ndarray:
        x = np.ascontiguousarray(values, dtype=np.float64)
        self._calls += 1
        name = f"deepgalaxy.reduce.{self._calls}"
        return self.runtime.numpy(self.hvd.allreduce(self.runtime.tensor(x), op=op, name=name))

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        return self._reduce(values, self.hvd.Sum)

    def allreduce_max(self, values: np.ndarray) -> np.ndarray:
        return self._reduce(values, self.hvd.Max)

    def barrier(self) -> None:
        self._reduce(np.zeros(1), self.hvd.Sum)

    def allreduce_probe(self, nbytes: int) -> Callable[[str], None]:
        x = self.runtime.tensor(np.ones(max(1, nbytes // 4), dtype=np.float32))

        def reduce(name: str) -> None:
            self.runtime.numpy(self.hvd.allreduce(x, name=name))

        return reduce


def collective(framework: FrameworkInfo) -> Collective:
    """The :class:`Collective` of this process: Horovod's under ``horovodrun``, else the local one."""
    if not under_horovodrun() or int(os.environ.get("HOROVOD_SIZE", "1")) <= 1:
        return LocalCollective()
    module = framework.bindings.get("horovod")
    if module is None or framework.runtime is None:
        raise FrameworkUnavailableError(
            f"framework {framework.name!r} declares no Horovod binding (FrameworkInfo.bindings['horovod'] and "
            "runtime); run it with 1 worker"
        )
    try:
        hvd = importlib.import_module(module)
    except ImportError as exc:
        raise FrameworkUnavailableError(f"cannot import {module} ({exc}); {INSTALL_HINT}") from None
    hvd.init()
    return HorovodCollective(resolve(framework.runtime)(), hvd)
