"""The TensorFlow :class:`~deepgalaxy.core.interfaces.FrameworkRuntime`: intra-op threads and tensors for a
launcher's collective operations; in a Horovod rank, the GPU of its local rank. Imports tensorflow when built (never
from plugin.py)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow as tf

from deepgalaxy.plugins.tensorflow.devices import pin_gpu


def horovod_local_rank() -> int | None:
    """This process's local rank when it is a rank of a ``horovodrun`` launch of several, else None."""
    if int(os.environ.get("HOROVOD_SIZE", "1")) <= 1:
        return None
    import horovod.tensorflow as hvd

    if not hvd.is_initialized():
        hvd.init()
    return int(hvd.local_rank())


class TensorFlowRuntime:
    """Built by a rank before anything runs in TensorFlow (the launcher's collective builds it right after Horovod
    starts), so a Horovod rank pins its GPU here: TensorFlow then sees that one GPU as ``/GPU:0``."""

    name = "tensorflow"

    def __init__(self) -> None:
        local_rank = horovod_local_rank()
        if local_rank is not None:
            pin_gpu(local_rank)

    def set_threads(self, threads: int) -> None:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # the runtime was already initialised
            pass

    def tensor(self, values: np.ndarray) -> Any:
        return tf.constant(values)

    def numpy(self, tensor: Any) -> np.ndarray:
        return np.asarray(tensor)  # materialises: eager ops may return before finishing
