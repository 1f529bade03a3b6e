"""Mixed precision in the TensorFlow plugin: functions traced under Keras' ``mixed_bfloat16`` or ``mixed_float16``
policy keep 16-bit compute (variables stay float32).

Used by the framework (inference) and the trainer (steps) alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import keras

from deepgalaxy.plugins.tensorflow.devices import check_fp16
from deepgalaxy.plugins.tensorflow.model import KerasDeepGalaxy

POLICIES = {"bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
"""The Keras dtype policy of each mixed precision."""

FLOAT32_OUTPUTS = frozenset({"sigmoid", "logits", "mu_out", "logvar_out"})
"""Output layers that stay float32 under mixed precision, so losses and returned arrays are full precision."""


def _layers(native: KerasDeepGalaxy) -> Iterator[keras.layers.Layer]:
    for models in native.parts().values():
        for sub in models:
            yield from sub.layers


@contextmanager
def precision_policy(native: KerasDeepGalaxy, precision: str) -> Iterator[None]:
    """Trace functions under ``precision`` (``bf16``, ``fp16``: Keras' mixed policies of :data:`POLICIES`, 16-bit
    compute and fp32 variables); fp16 where the model runs on the CPU is a :class:`DeviceError`.

    Keras bakes the dtype policy into a traced graph, so a ``tf.function`` traced inside this context keeps
    16-bit compute after the policies are restored; the model itself stays fp32 for everything else.
    """
    if precision not in ("fp32", *POLICIES):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16', got {precision!r}")
    check_fp16(precision, native.run_device)
    if precision == "fp32":
        yield
        return
    saved = []
    for layer in _layers(native):
        if layer.name not in FLOAT32_OUTPUTS:
            saved.append((layer, layer.dtype_policy))
            layer.dtype_policy = POLICIES[precision]
    try:
        yield
    finally:
        for layer, policy in saved:
            layer.dtype_policy = policy
