"""The collective of a single process (rank 0 of 1): every reduction is the identity. What a launcher returns
when it runs one worker, or when a rank finds itself alone."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from deepgalaxy.core.interfaces import Distributed


class LocalCollective:
    """A :class:`~deepgalaxy.core.interfaces.Collective` of one rank."""

    def __init__(self) -> None:
        self.dist = Distributed()

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float64)

    def allreduce_max(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, dtype=np.float64)

    def barrier(self) -> None:
        pass

    def allreduce_probe(self, nbytes: int) -> Callable[[str], None]:
        return lambda name: None
