"""The TensorFlow framework through the public registry: every task's card builds its parts, inference ops give
the documented shapes, weights round-trip through safetensors, mismatches are refused, seeds are deterministic."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from deepgalaxy import registry
from deepgalaxy.core.errors import WeightsMismatchError
from deepgalaxy.core.model import WEIGHTS_FILE, read_weights
from deepgalaxy.core.specs import ModelSpec, with_overrides

pytest.importorskip("tensorflow")

SMALL = {"input_size": 32, "backbone.options.widths": [8, 16], "head_hidden": [16], "decoder_channels": [16, 8]}
"""Tiny versions of the cards: reduction 4, 8x8x16 feature maps."""


def small(name: str, **extra: object) -> ModelSpec:
    return with_overrides(registry.card(name), {**SMALL, **extra})


def images(n: int = 3, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, size, size, 1)).astype(np.float32)


@pytest.fixture(scope="module")
def full_model():  # type: ignore[no-untyped-def]
    return registry.create(small("full-simple"), framework="tensorflow", seed=0)


def test_fcae_reconstructs_any_size_the_stride_divides() -> None:
    model = registry.create(small("fcae-simple"), framework="tensorflow", seed=0)
    assert model.reconstruct(images(2, size=48)).shape == (2, 48, 48, 1)


def test_inference_is_deterministic_and_bf16_is_close(full_model) -> None:  # type: ignore[no-untyped-def]
    x = images()
    fw = registry.get_framework("tensorflow")
    a = fw.infer(full_model.native, "logits", x)
    np.testing.assert_array_equal(a, fw.infer(full_model.native, "logits", x))
    b = fw.infer(full_model.native, "logits", x, precision="bf16")
    assert b.dtype == np.float32 and not np.array_equal(a, b)  # really computed in bf16
    np.testing.assert_allclose(b, a, atol=0.05 * np.abs(a).max() + 1e-3)
    # the fp32 path is unchanged after a bf16 call (third call: the traced graph instead of eager execution)
    np.testing.assert_allclose(fw.infer(full_model.native, "logits", x), a, rtol=1e-5, atol=1e-6)


def test_weights_round_trip_through_safetensors(full_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    full_model.save(tmp_path / "m")
    weights, framework = read_weights(tmp_path / "m" / WEIGHTS_FILE)
    assert framework == "tensorflow"
    assert any(k.endswith("moving_variance") for k in weights) and any(k.endswith("moving_mean") for k in weights)
    loaded = registry.load(tmp_path / "m")  # framework taken from the file
    assert loaded.framework == "tensorflow"
    reloaded = loaded.get_weights()
    for k, v in full_model.get_weights().items():
        np.testing.assert_array_equal(reloaded[k], v, err_msg=k)
    x = images()
    np.testing.assert_array_equal(loaded.encode(x), full_model.encode(x))
    np.testing.assert_array_equal(loaded.reconstruct(x), full_model.reconstruct(x))


def test_weight_names_are_deterministic_part_layer_variable(full_model) -> None:  # type: ignore[no-untyped-def]
    names = list(full_model.get_weights())
    assert names[:3] == ["encoder.blocks.0.conv1.kernel", "encoder.blocks.0.bn1.gamma", "encoder.blocks.0.bn1.beta"]
    assert {n.split(".")[0] for n in names} == {"encoder", "decoder", "head", "latent"}
    again = registry.create(small("full-simple"), framework="tensorflow")
    assert list(again.get_weights()) == names


def test_mismatched_weights_are_refused_naming_them(full_model) -> None:  # type: ignore[no-untyped-def]
    fw = registry.get_framework("tensorflow")
    weights = full_model.get_weights()
    weights.pop("head.out.bias")
    with pytest.raises(WeightsMismatchError, match=r"head\.out\.bias"):
        fw.set_weights(full_model.native, weights)
    weights = full_model.get_weights()
    weights["decoder.out.kernel"] = np.zeros((3, 3, 8, 2), np.float32)
    with pytest.raises(WeightsMismatchError, match=r"decoder\.out\.kernel"):
        fw.set_weights(full_model.native, weights)
    other = registry.create(small("classifier-simple", head_hidden=[8]), framework="tensorflow")
    with pytest.raises(WeightsMismatchError, match=r"missing|unexpected"):
        fw.set_weights(other.native, full_model.get_weights())


def test_seeded_builds_are_reproducible_and_leave_global_rng_alone() -> None:
    fw = registry.get_framework("tensorflow")
    card = small("vae-simple")
    random.seed(123)
    np.random.seed(123)
    before = (random.random(), np.random.random())
    random.seed(123)
    np.random.seed(123)
    a = fw.get_weights(registry.create(card, "tensorflow", seed=7).native)
    assert (random.random(), np.random.random()) == before
    b = fw.get_weights(registry.create(card, "tensorflow", seed=7).native)
    c = fw.get_weights(registry.create(card, "tensorflow", seed=8).native)
    k = "encoder.blocks.0.conv1.kernel"
    np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a[k], c[k])


def test_same_shaped_kernels_are_initialised_independently() -> None:
    # regression: a Keras initializer instance draws its seed once, so sharing one made equal kernels
    w = registry.create(small("fcae-simple"), framework="tensorflow", seed=0).get_weights()
    assert w["encoder.blocks.1.conv2.kernel"].shape == w["decoder.stages.0.conv.kernel"].shape
    assert not np.array_equal(w["encoder.blocks.1.conv2.kernel"], w["decoder.stages.0.conv.kernel"])


def test_unknown_inference_op_and_missing_part_raise(full_model) -> None:  # type: ignore[no-untyped-def]
    fw = registry.get_framework("tensorflow")
    with pytest.raises(ValueError, match="unknown inference op"):
        fw.infer(full_model.native, "explain", images())  # type: ignore[arg-type]
    clf = registry.create(small("classifier-simple"), framework="tensorflow")
    with pytest.raises(ValueError, match="has no decoder"):
        fw.infer(clf.native, "reconstruct", images())
    with pytest.raises(ValueError, match="no part 'latent'"):
        fw.num_parameters(clf.native, "latent")
