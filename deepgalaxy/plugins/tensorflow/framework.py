"""The ``tensorflow`` framework: builds cards as Keras 3 models, runs inference, moves weights in and out.

Images arrive as NHWC float32 numpy arrays (Keras' own layout, so nothing is transposed). Weights leave as
``{part.layer.variable: array}`` (:func:`deepgalaxy.plugins.tensorflow.model.weight_items`), batch-norm moving
statistics included; :mod:`deepgalaxy.plugins.convert` turns torch state dicts into that naming and layout.
"""

from __future__ import annotations

import os
import random

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter off the console

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from deepgalaxy.core.device import Accelerator, batch_too_large
from deepgalaxy.core.interfaces import Distributed, InferenceOp, Part
from deepgalaxy.core.specs import BackboneSpec, ModelSpec, TrainSpec
from deepgalaxy.plugins.tensorflow import devices
from deepgalaxy.plugins.tensorflow.model import (
    KerasDeepGalaxy,
    get_weights,
    property_outputs,
    set_weights,
    weight_items,
)
from deepgalaxy.plugins.tensorflow.precision import precision_policy
from deepgalaxy.plugins.tensorflow.trainer import TensorFlowTrainer

EAGER_CALLS = 2
"""Inference calls per op and precision run eagerly before the op is traced into a graph."""

@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed Keras' initializers for one build, then restore Python's and numpy's global RNG states."""
    if seed is None:
        yield
        return
    py_state, np_state = random.getstate(), np.random.get_state()
    keras.utils.set_random_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class TensorFlowFramework:
    """Keras 3 implementation of :class:`deepgalaxy.core.interfaces.Framework`."""

    name = "tensorflow"

    def build(self, card: ModelSpec, backbone: Callable[[BackboneSpec, int], keras.Model],
              seed: int | None = None) -> KerasDeepGalaxy:
        """The card's parts around ``backbone(card.backbone, card.channels)`` (the backbone's Keras factory)."""
        with _seeded(seed):
            return KerasDeepGalaxy(card, backbone(card.backbone, card.channels))

    # -- structure ----------------------------------------------------------------------------------------------

    def num_parameters(self, native: KerasDeepGalaxy, part: Part | None = None, trainable: bool = True) -> int:
        """Trainable parameters, or with ``trainable=False`` every weight including batch-norm statistics
        (Keras' total; the torch plugin counts the same)."""
        parts = native.parts()
        if part is not None and part not in parts:
            raise ValueError(f"model {native.card.name!r} has no part {part!r}; parts: {', '.join(parts)}")
        total = 0
        for name in [part] if part else list(parts):
            for sub in parts[name]:
                for var in sub.trainable_weights if trainable else sub.weights:
                    total += int(np.prod(var.shape))
        return total

    # -- devices ------------------------------------------------------------------------------------------------

    def accelerators(self) -> list[Accelerator]:
        """The GPUs TensorFlow sees."""
        return devices.accelerators()

    def to_device(self, native: KerasDeepGalaxy, device: str) -> KerasDeepGalaxy:
        """``native`` moved to ``device`` (``cpu``, ``cuda:N``): its variables re-created there (values kept), its
        calls run under that ``tf.device``. Functions traced for the old device are dropped."""
        devices.place(native, device)
        return native

    def bf16_slowdown(self) -> float:
        """bf16 over fp32 time of a convolution on this CPU, measured once per process."""
        return devices.bf16_slowdown()

    # -- inference ----------------------------------------------------------------------------------------------

    def infer(self, native: KerasDeepGalaxy, op: InferenceOp, x: np.ndarray, precision: str = "fp32") -> np.ndarray:
        """One inference batch (NHWC float32 images or ``(N, latent_dim)`` z) without gradients or dropout, on the
        model's device; a batch too large for its memory is a :class:`DeviceError` naming a batch size that fits."""
        try:
            return np.asarray(self.infer_tensor(native, op, x, precision), dtype=np.float32)
        except tf.errors.ResourceExhaustedError:
            pass  # out of the handler, so the failed batch's tensors are freed before the probes
        raise batch_too_large(len(x), devices.device_name(native.run_device), lambda n: devices.fits(
            lambda: self.infer_tensor(native, op, x[:n], precision).numpy()), f"{op} inference")

    def infer_tensor(self, native: KerasDeepGalaxy, op: InferenceOp, x: np.ndarray, precision: str = "fp32"
                     ) -> tf.Tensor:
        """:meth:`infer`'s float32 output as a tensor on the device it was computed on (``native.run_device``).

        The first :data:`EAGER_CALLS` calls of an op run eagerly; later ones through a ``tf.function`` traced
        once. Tracing a large backbone costs seconds, more than a few eager batches: one-off predictions stay
        quick and long inference loops get the graph's speed.
        """
        entry = self._infer_entry(native, op, precision)
        t = tf.convert_to_tensor(np.asarray(x, dtype=np.float32))
        with devices.placed(native.run_device):
            if entry["calls"] < EAGER_CALLS:
                entry["calls"] += 1
                with precision_policy(native, precision):
                    return tf.cast(entry["body"](t), tf.float32)
            if entry["fn"] is None:
                fn = tf.function(lambda x: tf.cast(entry["body"](x), tf.float32), input_signature=[entry["spec"]])
                with precision_policy(native, precision):
                    fn.get_concrete_function()  # trace now, under the requested policy
                entry["fn"] = fn
            return entry["fn"](t)

    def _infer_entry(self, native: KerasDeepGalaxy, op: InferenceOp, precision: str) -> dict[str, Any]:
        if native.__dict__.get("_dg_infer_at") != native.run_device:  # traced on another device, old variables
            native.__dict__.update(_dg_infer={}, _dg_infer_at=native.run_device)
        cache: dict[tuple[str, str], dict[str, Any]] = native.__dict__.setdefault("_dg_infer", {})
        key = (op, precision)
        if key in cache:
            return cache[key]
        card = native.card
        images = tf.TensorSpec((None, None, None, card.channels), tf.float32)

        def need(model: keras.Model | None, part: str) -> keras.Model:
            if model is None:
                raise ValueError(f"{op}: card {card.name!r} (task {card.task!r}) has no {part}")
            return model

        if op == "logits":
            head = need(native.head, "head")
            spec, body = images, lambda x: head(native.encoder(x, training=False), training=False)
        elif op == "encode":
            lat = need(native.latent_encoder, "latent model")
            spec, body = images, lambda x: lat(native.encoder(x, training=False), training=False)[0]
        elif op == "reconstruct":
            dec = need(native.decoder, "decoder")
            spec, body = images, lambda x: dec(native.encoder(x, training=False), training=False)
        elif op == "properties":
            props = need(native.properties, "property heads")
            spec = images

            def body(x: Any) -> Any:
                return keras.ops.concatenate(property_outputs(props(native.encoder(x, training=False),
                                                                     training=False)), axis=1)
        elif op == "decode":
            lat_dec, dec = need(native.latent_decoder, "latent model"), need(native.decoder, "decoder")
            spec = tf.TensorSpec((None, card.latent_dim), tf.float32)
            body = lambda z: dec(lat_dec(z, training=False), training=False)  # noqa: E731
        else:
            raise ValueError(f"unknown inference op {op!r}; expected logits, encode, reconstruct, decode or properties")

        cache[key] = {"body": body, "spec": spec, "calls": 0, "fn": None}
        return cache[key]

    # -- weights ------------------------------------------------------------------------------------------------

    def get_weights(self, native: KerasDeepGalaxy) -> dict[str, np.ndarray]:
        """Every weight and batch-norm statistic as float32 numpy, named ``part.layer.variable``."""
        return get_weights(native)

    def set_weights(self, native: KerasDeepGalaxy, weights: Mapping[str, np.ndarray]) -> None:
        """Assign weights by name; every name and shape must match the model rebuilt from the card."""
        set_weights(native, weights)

    def convert_weights(self, weights: Mapping[str, np.ndarray], source: str, card: ModelSpec,
                        native: KerasDeepGalaxy | None = None) -> dict[str, np.ndarray]:
        """Weights saved by another framework (``source``) in this one's naming and layout (fitted to ``native``)."""
        from deepgalaxy.plugins.convert import convert

        expected = None if native is None else {n: tuple(v.shape) for n, v in weight_items(native)}
        return convert(dict(weights), source, self.name, card, expected)

    # -- training -----------------------------------------------------------------------------------------------

    def trainer(self, native: KerasDeepGalaxy, card: ModelSpec, train: TrainSpec, dist: Distributed) -> Any:
        """A custom-step trainer (not ``model.fit``, which fails under Horovod and tf.distribute with Keras 3)."""
        return TensorFlowTrainer(native, card, train, dist)
