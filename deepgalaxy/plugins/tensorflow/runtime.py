"""The TensorFlow :class:`~deepgalaxy.core.interfaces.FrameworkRuntime`: intra-op threads and tensors for a
launcher's collective operations. Imports tensorflow when built (never from plugin.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf


class TensorFlowRuntime:
    name = "tensorflow"

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
