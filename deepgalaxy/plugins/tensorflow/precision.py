"""bf16 in the TensorFlow plugin: functions traced under Keras' ``mixed_bfloat16`` policy keep bf16 compute.

Used by the framework (inference) and the trainer (steps) alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import keras

from deepgalaxy.plugins.tensorflow.model import KerasDeepGalaxy

FLOAT32_OUTPUTS = frozenset({"sigmoid", "logits", "mu_out", "logvar_out"})
"""Output layers that stay float32 under bf16, so losses and returned arrays are full precision."""


def _layers(native: KerasDeepGalaxy) -> Iterator[keras.layers.Layer]:
    for models in native.parts().values():
        for sub in models:
            yield from sub.layers


@contextmanager
def precision_policy(native: KerasDeepGalaxy, precision: str) -> Iterator[None]:
    """Trace functions under ``precision`` (``bf16``: Keras' ``mixed_bfloat16``: bf16 compute, fp32 variables).

    Keras bakes the dtype policy into a traced graph, so a ``tf.function`` traced inside this context keeps
    bf16 compute after the policies are restored; the model itself stays fp32 for everything else.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if precision == "fp32":
        yield
        return
    saved = []
    for layer in _layers(native):
        if layer.name not in FLOAT32_OUTPUTS:
            saved.append((layer, layer.dtype_policy))
            layer.dtype_policy = "mixed_bfloat16"
    try:
        yield
    finally:
        for layer, policy in saved:
            layer.dtype_policy = policy
