"""Keras backbones of the TensorFlow plugin, parametrised over the registry: every backbone with a tensorflow
factory is built with an unusual channel count, run forward and backward, and checked against its declared
reduction; EfficientNets against keras.applications and the parameter counts in FACTS.md."""

from __future__ import annotations

import numpy as np
import pytest

from deepgalaxy import registry
from deepgalaxy.core.plugins import get_plugin_manager
from deepgalaxy.core.specs import BackboneSpec

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

TF_BACKBONES = sorted(n for n, b in get_plugin_manager().backbones.items() if "tensorflow" in b.factories)
LARGER_SIBLINGS = {"resnet34", "resnet50", *(f"efficientnet-b{i}" for i in range(1, 8))}
"""Same code paths as resnet18 / efficientnet-b0 with more blocks: their shapes and parameter counts are checked
against torch for every card in test_parity.py; running them backward here too would cost minutes."""


def _factory(name: str, **options: object):  # type: ignore[no-untyped-def]
    spec = BackboneSpec(name=name, options=options)
    return spec, registry.backbone_factory(spec, "tensorflow")


def _trainable(model) -> int:  # type: ignore[no-untyped-def]
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def test_every_builtin_backbone_has_a_tensorflow_factory() -> None:
    expected = {"simple", "resnet18", "resnet34", "resnet50", *(f"efficientnet-b{i}" for i in range(8))}
    assert expected <= set(TF_BACKBONES)


@pytest.mark.parametrize("name", [n for n in TF_BACKBONES if n not in LARGER_SIBLINGS])
def test_backbone_forward_backward_any_channels(name: str) -> None:
    spec, factory = _factory(name)
    net = factory(spec, 2)  # neither grayscale nor RGB: the stem must adapt
    r = registry.reduction(spec)
    assert net.reduction == r
    x = tf.constant(np.random.default_rng(0).random((2, r, 2 * r, 2)), tf.float32)
    with tf.GradientTape() as tape:
        m = net(x, training=True)
        loss = tf.reduce_mean(tf.square(m))
    assert tuple(m.shape) == (2, 1, 2, net.out_channels)
    grads = tape.gradient(loss, net.trainable_variables)
    assert len(grads) == len(net.trainable_variables) > 0
    assert all(g is not None for g in grads), "a trainable variable is not connected to the output"
    assert all(bool(tf.reduce_all(tf.math.is_finite(g))) for g in grads)


@pytest.mark.parametrize(("variant", "expected"), [(0, 4_007_548), (4, 17_548_616)])
def test_efficientnet_trainable_counts_match_facts(variant: int, expected: int) -> None:
    spec, factory = _factory(f"efficientnet-b{variant}")
    assert _trainable(factory(spec, 3)) == expected


def test_efficientnet_b0_is_keras_applications_without_input_scaling() -> None:
    spec, factory = _factory("efficientnet-b0")
    ours = factory(spec, 3)
    ref = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(64, 64, 3))
    ref_weights = {v.path: tuple(v.shape) for v in ref.weights if not v.path.startswith("normalization")}
    assert {v.path: tuple(v.shape) for v in ours.weights} == ref_weights
    assert not any(isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization)) for layer in ours.layers)
    assert ours.out_channels == 1280


def test_efficientnet_one_channel_stem_and_drop_connect_option() -> None:
    spec, factory = _factory("efficientnet-b0", drop_connect_rate=0.0)
    net = factory(spec, 1)
    assert _trainable(net) == 4_007_548 - 2 * 9 * 32  # two fewer input channels in the 3x3x32 stem
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in net.layers)


def test_resnet_counts_are_torchvisions() -> None:
    # torchvision's resnet18/34/50 without fc: 11,176,512 / 21,284,672 / 23,508,032 trainable parameters
    for name, expected in [("resnet18", 11_176_512), ("resnet34", 21_284_672)]:
        spec, factory = _factory(name)
        assert _trainable(factory(spec, 3)) == expected, name


@pytest.mark.slow
def test_resnet50_count_is_torchvisions() -> None:
    spec, factory = _factory("resnet50")
    net = factory(spec, 3)
    assert _trainable(net) == 23_508_032
    assert net.out_channels == 2048


def test_simple_widths_option_sets_reduction_and_channels() -> None:
    spec, factory = _factory("simple", widths=[8, 16, 24])
    net = factory(spec, 1)
    assert (net.reduction, net.out_channels) == (8, 24) == (registry.reduction(spec), 24)
    assert net(np.zeros((1, 40, 24, 1), np.float32)).shape == (1, 5, 3, 24)  # any size the stride divides


def test_strided_convs_pad_symmetrically_like_torch() -> None:
    # torch pads a stride-2 3x3 conv by 1 on every side: output (i, j) sees input rows/cols 2i-1 .. 2i+1, so a
    # pixel at (1, 1) reaches all four outputs of a 4x4 image. Keras' 'same' pads only bottom/right: one output.
    spec, factory = _factory("simple", widths=[1])
    net = factory(spec, 1)
    conv = net.get_layer("blocks.0.conv1")
    conv.kernel.assign(np.ones((3, 3, 1, 1), np.float32))
    probe = keras.Model(net.input, conv.output)
    x = np.zeros((1, 4, 4, 1), np.float32)
    x[0, 1, 1, 0] = 1.0
    out = probe(x).numpy()[0, :, :, 0]
    np.testing.assert_array_equal(out, [[1.0, 1.0], [1.0, 1.0]])
