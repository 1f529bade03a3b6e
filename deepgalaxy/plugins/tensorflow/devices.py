"""The GPUs TensorFlow sees, where a model's variables live and its ops run, a Horovod rank's GPU, out-of-memory
probes, and the measured cost of bf16 on this CPU."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from deepgalaxy.core.device import Accelerator
from deepgalaxy.core.errors import DeviceError


def accelerators() -> list[Accelerator]:
    """Every GPU visible to TensorFlow in this process, numbered as TensorFlow does (``/GPU:N``: after a Horovod rank
    pins its GPU it sees one, ``cuda:0``); bf16 native from compute capability 8.0, Ampere, on. TensorFlow tells no
    GPU's total memory without allocating on it, so ``memory_bytes`` stays 0."""
    found = []
    for i, gpu in enumerate(tf.config.get_visible_devices("GPU")):
        details = tf.config.experimental.get_device_details(gpu)
        capability = tuple(details.get("compute_capability", (0, 0)))
        found.append(Accelerator(i, str(details.get("device_name", gpu.name)), 0, capability >= (8, 0)))
    return found


def tf_device(device: str) -> str:
    """A resolved device name (``cpu``, ``cuda:N``) as TensorFlow spells it (``/CPU:0``, ``/GPU:N``)."""
    return "/CPU:0" if device == "cpu" else f"/GPU:{device.split(':')[1]}"


def device_name(run_device: str | None) -> str:
    """A model's ``run_device`` as users write devices (``cpu``, ``cuda:N``; None: TensorFlow's first choice)."""
    if run_device is None:
        return "cuda:0" if tf.config.get_visible_devices("GPU") else "cpu"
    spec = tf.DeviceSpec.from_string(run_device)
    return f"cuda:{spec.device_index or 0}" if spec.device_type == "GPU" else "cpu"


def placed(run_device: str | None) -> contextlib.AbstractContextManager[Any]:
    """``tf.device(run_device)``, or no placement at all for None."""
    return tf.device(run_device) if run_device else contextlib.nullcontext()


def _on(variable: tf.Variable, target: tf.DeviceSpec) -> bool:
    spec = tf.DeviceSpec.from_string(variable.device)
    return spec.device_type == target.device_type and (spec.device_index or 0) == (target.device_index or 0)


def place(native: Any, device: str) -> None:
    """Make a Keras model run on ``device`` (``cpu``, ``cuda:N``): ``native.run_device`` set (its calls run under
    that ``tf.device``) and every variable's backing ``tf.Variable`` that lives elsewhere re-created there, values
    kept.

    Keras creates variables where the model is built and has no call to move them; ops that update a variable run
    on its device, so a model left there would train its weights on the old device whatever ``tf.device`` says."""
    native.run_device = tf_device(device)
    target = tf.DeviceSpec.from_string(native.run_device)
    for var in native.variables:
        old = var.value
        if not _on(old, target):
            with tf.device(native.run_device):
                var._value = tf.Variable(tf.identity(old), dtype=old.dtype, trainable=old.trainable,
                                         name=var.name, aggregation=old.aggregation,
                                         synchronization=old.synchronization)


def check_fp16(precision: str, run_device: str | None) -> None:
    """A :class:`DeviceError` for fp16 where the model runs on the CPU (the core refuses it earlier; this guards
    callers that reach the plugin directly)."""
    if precision == "fp16" and device_name(run_device) == "cpu":
        raise DeviceError("precision 'fp16' needs a GPU and this TensorFlow model runs on the CPU; use fp32, or "
                          "bf16 where the CPU does it natively")


def fits(run: Callable[[], object]) -> bool:
    """Whether ``run()`` ran without TensorFlow running out of memory (a probe for ``batch_too_large``)."""
    try:
        run()
    except tf.errors.ResourceExhaustedError:
        return False
    return True


def pin_gpu(local_rank: int) -> None:
    """Make this process see only the GPU of its ``local_rank`` (modulo the GPUs there are), allocating its memory
    as needed rather than all at once: one Horovod rank per GPU. Must run before TensorFlow sets up its devices;
    afterwards it is an error unless that GPU alone is already visible."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return
    gpu = gpus[local_rank % len(gpus)]
    try:
        tf.config.set_visible_devices(gpu, "GPU")
        tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:
        if tf.config.get_visible_devices("GPU") != [gpu]:
            raise DeviceError(f"local rank {local_rank}: TensorFlow set up its devices before this rank could pin "
                              f"its GPU ({gpu.name}); build the runtime before any TensorFlow op") from None


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
