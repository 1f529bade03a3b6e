"""Inside a rank: who am I (rank, size, local rank) and sums across ranks, through the framework's Horovod module.

Horovod has one binding per framework (``horovod.torch``, ``horovod.tensorflow``); a process must initialise the
one its framework plugin uses, so :func:`collective` takes the framework name. Outside ``horovodrun`` (no
``HOROVOD_RANK`` in the environment) everything is local: rank 0 of 1 and sums are the identity.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import numpy as np

from deepgalaxy.core.errors import FrameworkUnavailableError
from deepgalaxy.core.interfaces import Distributed
from deepgalaxy.plugins.horovod.launcher import INSTALL_HINT

_MODULES = {"torch": "horovod.torch", "tensorflow": "horovod.tensorflow"}


def under_horovodrun() -> bool:
    """True inside a process started by ``horovodrun`` (it sets ``HOROVOD_RANK`` and ``HOROVOD_SIZE``)."""
    return "HOROVOD_RANK" in os.environ and "HOROVOD_SIZE" in os.environ


class Collective:
    """Rank identity and cross-rank reductions of numpy arrays; the local (1-rank) version."""

    def __init__(self, dist: Distributed | None = None) -> None:
        self.dist = dist or Distributed()

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum of ``values`` over all ranks (float64)."""
        return np.asarray(values, dtype=np.float64)

    def allreduce_max(self, values: np.ndarray) -> np.ndarray:
        """Element-wise maximum over all ranks (float64)."""
        return np.asarray(values, dtype=np.float64)

    def barrier(self) -> None:
        """Wait until every rank reaches this point."""


class HorovodCollective(Collective):
    """Reductions through ``horovod.torch`` or ``horovod.tensorflow`` (already initialised)."""

    def __init__(self, framework: str, hvd: Any) -> None:
        super().__init__(Distributed(rank=hvd.rank(), size=hvd.size(), local_rank=hvd.local_rank()))
        self.framework, self.hvd = framework, hvd
        self._calls = 0

    def _reduce(self, values: np.ndarray, op: Any) -> np.ndarray:
        x = np.ascontiguousarray(values, dtype=np.float64)
        self._calls += 1
        name = f"deepgalaxy.reduce.{self._calls}"
        if self.framework == "torch":
            import torch

            return self.hvd.allreduce(torch.from_numpy(x), op=op, name=name).numpy()
        import tensorflow as tf

        return np.asarray(self.hvd.allreduce(tf.constant(x), op=op, name=name))

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        return self._reduce(values, self.hvd.Sum)

    def allreduce_max(self, values: np.ndarray) -> np.ndarray:
        return self._reduce(values, self.hvd.Max)

    def barrier(self) -> None:
        self._reduce(np.zeros(1), self.hvd.Sum)


def collective(framework: str) -> Collective:
    """The :class:`Collective` of this process: Horovod's under ``horovodrun``, else the local one."""
    if not under_horovodrun() or int(os.environ.get("HOROVOD_SIZE", "1")) <= 1:
        return Collective()
    module = _MODULES.get(framework)
    if module is None:
        raise FrameworkUnavailableError(
            f"framework {framework!r} has no Horovod binding (supported: {', '.join(_MODULES)}); run it with 1 worker"
        )
    try:
        hvd = importlib.import_module(module)
    except ImportError as exc:
        raise FrameworkUnavailableError(f"cannot import {module} ({exc}); {INSTALL_HINT}") from None
    hvd.init()
    return HorovodCollective(framework, hvd)


def distributed(framework: str) -> Distributed:
    """This rank's :class:`Distributed` (rank, size, local_rank), initialising Horovod when under horovodrun."""
    return collective(framework).dist
