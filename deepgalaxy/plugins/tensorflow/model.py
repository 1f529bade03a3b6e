"""The Keras model built from a card: encoder E (a backbone), decoder D, classifier head, VAE over M.

Same architecture as the torch plugin (so shapes, parameter counts and converted weights agree):

- D: ``log2(reduction)`` stages of nearest x2 upsampling + Conv3x3 (no bias) + BN + ReLU with channels
  ``card.decoder_channels[-stages:]`` (the last entry repeated when there are too few), then Conv3x3 to
  ``card.channels`` (bias) + sigmoid.
- Head: Flatten (NHWC order) or global average pool, Dense + ReLU + Dropout(0.2) per ``card.head_hidden``,
  Dense(num_classes) logits.
- Property heads (cards with ``properties``): the same head with ``properties.hidden`` and a mean and a raw
  log-variance per target column (``Dense(2K)``), the log-variance bounded by a scaled tanh.
- VAE: 1x1 conv F -> ``latent_channels`` + ReLU, Flatten, Dense -> mu, Dense -> logvar;
  decode: Dense(h*w*latent_channels) + ReLU, reshape to (h, w, latent_channels), 1x1 conv -> F.

Weight names are ``{part}.{layer}.{variable}``, e.g. ``encoder.blocks.0.conv1.kernel``,
``decoder.stages.0.bn.moving_mean``, ``latent.mu.bias`` (see :func:`weight_items`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import keras
import numpy as np
from keras import layers

from deepgalaxy.core.contract import (
    FEATURES,
    LATENT_RECONSTRUCTION,
    LOGITS,
    LOGVAR,
    MU,
    PROPERTY_LOGVAR,
    PROPERTY_LOGVAR_BOUND,
    PROPERTY_MEAN,
    RECONSTRUCTION,
    decoder_widths,
)
from deepgalaxy.core.errors import ShapeError
from deepgalaxy.core.model import check_weights_fit
from deepgalaxy.core.specs import ModelSpec
from deepgalaxy.plugins.tensorflow.backbones import BN_EPS, BN_MOMENTUM, conv_init

HEAD_DROPOUT = 0.2


def build_decoder(card: ModelSpec, in_channels: int, reduction: int) -> keras.Model:
    """D: feature maps (any size) -> images ``reduction`` times larger, sigmoid output."""
    inputs = keras.Input((None, None, in_channels), name="features")
    x = inputs
    for i, ch in enumerate(decoder_widths(card, reduction)):
        x = layers.UpSampling2D(2, interpolation="nearest", name=f"stages.{i}.up")(x)
        x = layers.Conv2D(ch, 3, padding="same", use_bias=False, kernel_initializer=conv_init(),
                          name=f"stages.{i}.conv")(x)
        x = layers.BatchNormalization(epsilon=BN_EPS, momentum=BN_MOMENTUM, name=f"stages.{i}.bn")(x)
        x = layers.ReLU(name=f"stages.{i}.relu")(x)
    x = layers.Conv2D(card.channels, 3, padding="same", name="out")(x)
    x = layers.Activation("sigmoid", dtype="float32", name="sigmoid")(x)
    return keras.Model(inputs, x, name="decoder")


def build_head(card: ModelSpec, feature_shape: tuple[int, int, int], hidden: Sequence[int] | None = None,
               units: int | None = None, name: str = "head") -> keras.Model:
    """A dense head over M: flatten or average pool -> hidden dense layers -> ``units`` outputs; by default the
    classifier head (``card.head_hidden``, ``card.num_classes`` logits), also the property heads (``properties``)."""
    inputs = keras.Input(feature_shape, name="features")
    x = layers.Flatten(name="flatten")(inputs) if card.head_pool == "flatten" else (
        layers.GlobalAveragePooling2D(name="pool")(inputs))
    for i, width in enumerate(card.head_hidden if hidden is None else hidden):
        x = layers.Dense(width, activation="relu", name=f"hidden.{i}")(x)
        x = layers.Dropout(HEAD_DROPOUT, name=f"hidden.{i}.dropout")(x)
    x = layers.Dense(card.num_classes if units is None else units, name="out")(x)
    x = layers.Activation("linear", dtype="float32", name="logits")(x)
    return keras.Model(inputs, x, name=name)


def property_outputs(raw: Any) -> tuple[Any, Any]:
    """(means, bounded log-variances) from the property heads' raw ``(N, 2K)`` output (means first)."""
    mean, logvar = keras.ops.split(keras.ops.cast(raw, "float32"), 2, axis=1)
    return mean, PROPERTY_LOGVAR_BOUND * keras.ops.tanh(logvar / PROPERTY_LOGVAR_BOUND)


def build_latent(card: ModelSpec, feature_shape: tuple[int, int, int]) -> tuple[keras.Model, keras.Model]:
    """VAE over M: an encoder M -> (mu, logvar) and a decoder z -> M'."""
    h, w, f = feature_shape
    lc = card.latent_channels
    m = keras.Input(feature_shape, name="features")
    x = layers.Conv2D(lc, 1, activation="relu", name="reduce")(m)
    x = layers.Flatten(name="flatten")(x)
    mu = layers.Dense(card.latent_dim, name="mu")(x)
    logvar = layers.Dense(card.latent_dim, name="logvar")(x)
    mu = layers.Activation("linear", dtype="float32", name="mu_out")(mu)
    logvar = layers.Activation("linear", dtype="float32", name="logvar_out")(logvar)
    encoder = keras.Model(m, [mu, logvar], name="latent_encoder")
    z = keras.Input((card.latent_dim,), name="z")
    y = layers.Dense(h * w * lc, activation="relu", name="expand")(z)
    y = layers.Reshape((h, w, lc), name="reshape")(y)
    y = layers.Conv2D(f, 1, name="restore")(y)
    decoder = keras.Model(z, y, name="latent_decoder")
    return encoder, decoder


class KerasDeepGalaxy(keras.Model):  # type: ignore[misc]  # keras ships no type hints
    """The parts a card builds, sharing one encoder. ``call`` returns a dict of the outputs the task has."""

    def __init__(self, card: ModelSpec, backbone: keras.Model, **kwargs: Any) -> None:
        super().__init__(name=card.name.replace("-", "_"), **kwargs)
        self.card = card
        self.reduction = int(backbone.reduction)
        self.feature_channels = int(backbone.out_channels)
        if card.input_size % self.reduction:
            raise ShapeError(
                f"card {card.name!r}: input_size {card.input_size} is not divisible by the backbone's reduction "
                f"{self.reduction}"
            )
        side = card.input_size // self.reduction
        self.feature_shape = (side, side, self.feature_channels)
        self.encoder = backbone
        self.decoder = build_decoder(card, self.feature_channels, self.reduction) if "decoder" in card.parts else None
        self.head = build_head(card, self.feature_shape) if "head" in card.parts else None
        self.latent_encoder: keras.Model | None = None
        self.latent_decoder: keras.Model | None = None
        if "latent" in card.parts:
            self.latent_encoder, self.latent_decoder = build_latent(card, self.feature_shape)
        props = card.properties
        self.properties = None if props is None else build_head(
            card, self.feature_shape, props.hidden, 2 * len(props.columns), name="properties")
        self.noise = keras.random.SeedGenerator(0, name="noise")
        self.run_device: str | None = None
        """The ``tf.device`` its calls run under (``/CPU:0``, ``/GPU:N``), set by ``TensorFlowFramework.to_device``;
        None: TensorFlow's own placement."""

    def parts(self) -> dict[str, list[keras.Model]]:
        """Part name -> the Keras models that make it up (the VAE is two)."""
        out: dict[str, list[keras.Model]] = {"encoder": [self.encoder]}
        if self.decoder is not None:
            out["decoder"] = [self.decoder]
        if self.head is not None:
            out["head"] = [self.head]
        if self.latent_encoder is not None and self.latent_decoder is not None:
            out["latent"] = [self.latent_encoder, self.latent_decoder]
        if self.properties is not None:
            out["properties"] = [self.properties]
        return out

    def sample(self, mu: Any, logvar: Any) -> Any:
        """Reparameterisation: ``z = mu + exp(0.5 * logvar) * eps``."""
        eps = keras.random.normal(keras.ops.shape(mu), seed=self.noise, dtype=mu.dtype)
        return mu + keras.ops.exp(0.5 * logvar) * eps

    def call(self, images: Any, training: bool = False) -> dict[str, Any]:
        m = self.encoder(images, training=training)
        out: dict[str, Any] = {FEATURES: m}
        if self.decoder is not None:
            out[RECONSTRUCTION] = self.decoder(m, training=training)
        if self.head is not None:
            out[LOGITS] = self.head(m, training=training)
        if self.latent_encoder is not None and self.latent_decoder is not None:
            mu, logvar = self.latent_encoder(m, training=training)
            z = self.sample(mu, logvar) if training else mu
            out[MU], out[LOGVAR] = mu, logvar
            out[LATENT_RECONSTRUCTION] = self.latent_decoder(z, training=training)
        if self.properties is not None:
            out[PROPERTY_MEAN], out[PROPERTY_LOGVAR] = property_outputs(self.properties(m, training=training))
        return out


def weight_items(model: KerasDeepGalaxy) -> Iterator[tuple[str, Any]]:
    """``(name, variable)`` for every weight and batch-norm statistic, in a deterministic order.

    Names are ``{part}.{layer name}.{variable name}``; layer names are unique inside each Keras part model.
    """
    for part, models in model.parts().items():
        for sub in models:
            for layer in sub.layers:
                for var in layer.weights:
                    yield f"{part}.{layer.name}.{var.name}", var


def get_weights(model: KerasDeepGalaxy) -> dict[str, np.ndarray]:
    """Every weight and batch-norm statistic as float32 numpy, named ``part.layer.variable``."""
    return {name: np.asarray(var.numpy(), dtype=np.float32) for name, var in weight_items(model)}


def set_weights(model: KerasDeepGalaxy, weights: Mapping[str, np.ndarray]) -> None:
    """Assign weights by name; every name and shape must match the model rebuilt from the card."""
    variables = dict(weight_items(model))
    check_weights_fit("tensorflow", {n: tuple(v.shape) for n, v in variables.items()}, weights)
    for name, var in variables.items():
        var.assign(np.asarray(weights[name], dtype=np.float32))
