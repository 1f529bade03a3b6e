"""The torch :class:`~deepgalaxy.core.interfaces.FrameworkRuntime`: intra-op threads and tensors for a launcher's
collective operations. Imports torch when built (never from plugin.py)."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch


class TorchRuntime:
    name = "torch"

    def set_threads(self, threads: int) -> None:
        torch.set_num_threads(threads)
        with contextlib.suppress(RuntimeError):  # fixed by an earlier parallel call; intra-op is what matters
            torch.set_num_interop_threads(1)

    def tensor(self, values: np.ndarray) -> Any:
        return torch.from_numpy(values)

    def numpy(self, tensor: Any) -> np.ndarray:
        return np.asarray(tensor.numpy())
