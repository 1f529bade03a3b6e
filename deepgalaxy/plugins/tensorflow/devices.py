"""The GPUs TensorFlow sees, the device a model runs on, and the measured cost of bf16 on this CPU."""

from __future__ import annotations

import functools
import time

import tensorflow as tf

from deepgalaxy.core.device import Accelerator


def accelerators() -> list[Accelerator]:
    """Every GPU TensorFlow sees (bf16 native from compute capability 8.0, Ampere, on)."""
    found = []
    for i, gpu in enumerate(tf.config.list_physical_devices("GPU")):
        details = tf.config.experimental.get_device_details(gpu)
        capability = tuple(details.get("compute_capability", (0, 0)))
        found.append(Accelerator(i, str(details.get("device_name", gpu.name)), 0, capability >= (8, 0)))
    return found


def tf_device(device: str) -> str:
    """A resolved device name (``cpu``, ``cuda:N``) as TensorFlow spells it (``/CPU:0``, ``/GPU:N``)."""
    return "/CPU:0" if device == "cpu" else f"/GPU:{device.split(':')[1]}"


@functools.cache
def bf16_slowdown() -> float:
    """Time of a 3x3 convolution in bf16 over its time in fp32 on this CPU (best of 5 each)."""
    def best(dtype: tf.DType) -> float:
        with tf.device("/CPU:0"):
            x = tf.cast(tf.random.uniform((8, 64, 64, 32)), dtype)
            w = tf.cast(tf.random.uniform((3, 3, 32, 32)), dtype)
            tf.nn.conv2d(x, w, 1, "SAME").numpy()
            times = []
            for _ in range(5):
                start = time.perf_counter()
                tf.nn.conv2d(x, w, 1, "SAME").numpy()
                times.append(time.perf_counter() - start)
        return min(times)

    return best(tf.bfloat16) / best(tf.float32)
