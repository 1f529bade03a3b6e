"""Cross-framework weights: the numpy converter's layouts, and real torch <-> Keras models giving the same
predictions after a save in one framework and a load in the other (simple and EfficientNet-B0 cards), also
through the MLflow Model Registry."""

from __future__ import annotations

import importlib.util
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deepgalaxy import registry
from deepgalaxy.core import BackboneInfo, BackboneSpec, hookimpl
from deepgalaxy.core.errors import WeightsConversionError, WeightsMismatchError
from deepgalaxy.core.interfaces import Distributed
from deepgalaxy.core.model import Model
from deepgalaxy.core.plugins import PluginManager, reset_plugin_manager
from deepgalaxy.core.specs import ModelSpec, TrainSpec, with_overrides
from deepgalaxy.plugins.convert import convert

# --- the converter alone (numpy only) --------------------------------------------------------------------------


def test_converter_imports_neither_torch_nor_tensorflow() -> None:
    code = ("import sys, deepgalaxy.plugins.convert; "
            "print(sorted(m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_torch_to_tf_layouts_and_names() -> None:
    rng = np.random.default_rng(0)
    torch_w = {
        "encoder.blocks.0.conv1.weight": rng.random((8, 3, 3, 5)).astype(np.float32),  # OIHW, kh=3, kw=5
        "encoder.blocks.0.bn1.weight": np.full(8, 2.0, np.float32),
        "encoder.blocks.0.bn1.bias": np.full(8, 3.0, np.float32),
        "encoder.blocks.0.bn1.running_mean": np.full(8, 4.0, np.float32),
        "encoder.blocks.0.bn1.running_var": np.full(8, 5.0, np.float32),
        "encoder.blocks.0.bn1.num_batches_tracked": np.array(7, np.int64),
        "encoder.blocks.block2a.dwconv.weight": rng.random((96, 1, 3, 3)).astype(np.float32),
        "encoder.blocks.block2a.se_reduce.bias": np.zeros(4, np.float32),
        "head.hidden.0.weight": rng.random((16, 128)).astype(np.float32),  # (out, in)
    }
    tf_w = convert(torch_w, "torch", "tensorflow")
    assert set(tf_w) == {
        "encoder.blocks.0.conv1.kernel", "encoder.blocks.0.bn1.gamma", "encoder.blocks.0.bn1.beta",
        "encoder.blocks.0.bn1.moving_mean", "encoder.blocks.0.bn1.moving_variance",
        "encoder.block2a_dwconv.kernel", "encoder.block2a_se_reduce.bias", "head.hidden.0.kernel",
    }
    k = tf_w["encoder.blocks.0.conv1.kernel"]
    assert k.shape == (3, 5, 3, 8)  # HWIO
    assert k[1, 4, 2, 7] == torch_w["encoder.blocks.0.conv1.weight"][7, 2, 1, 4]
    assert tf_w["encoder.block2a_dwconv.kernel"].shape == (3, 3, 96, 1)
    dw = torch_w["encoder.blocks.block2a.dwconv.weight"]
    assert tf_w["encoder.block2a_dwconv.kernel"][0, 2, 5, 0] == dw[5, 0, 0, 2]
    assert tf_w["head.hidden.0.kernel"].shape == (128, 16)
    assert tf_w["encoder.blocks.0.bn1.moving_variance"][0] == 5.0 and tf_w["encoder.blocks.0.bn1.gamma"][0] == 2.0

    back = convert(tf_w, "tensorflow", "torch")
    assert set(back) == set(torch_w) - {"encoder.blocks.0.bn1.num_batches_tracked"}
    for name, value in back.items():
        np.testing.assert_array_equal(value, torch_w[name], err_msg=name)


def test_same_framework_is_a_copy_and_bad_input_is_refused() -> None:
    w = {"head.out.kernel": np.ones((2, 3), np.float32)}
    assert convert(w, "tensorflow", "tensorflow")["head.out.kernel"].shape == (2, 3)
    with pytest.raises(WeightsMismatchError, match="jax"):
        convert(w, "jax", "tensorflow")
    with pytest.raises(WeightsMismatchError, match="momentum"):
        convert({"encoder.conv1.momentum": np.ones(3)}, "torch", "tensorflow")
    with pytest.raises(WeightsMismatchError, match=r"head\.out\.weight"):
        convert({"head.out.weight": np.ones(3)}, "torch", "tensorflow")


def test_a_backbone_named_differently_converts_by_layer_order() -> None:
    """Layers named differently in the two frameworks pair in order; each variable finds its role and the layout
    that fits the receiving shape (a depthwise kernel where a plain convolution's does not fit)."""
    rng = np.random.default_rng(0)
    torch_w = {
        "encoder.0.weight": rng.random((8, 1, 3, 5)).astype(np.float32),
        "encoder.0.bias": rng.random(8).astype(np.float32),
        "encoder.1.weight": rng.random(8).astype(np.float32),
        "encoder.1.bias": rng.random(8).astype(np.float32),
        "encoder.1.running_mean": rng.random(8).astype(np.float32),
        "encoder.1.running_var": rng.random(8).astype(np.float32),
        "encoder.3.weight": rng.random((8, 1, 3, 3)).astype(np.float32),  # depthwise, no "dwconv" in its name
        "encoder.4.weight": rng.random(8).astype(np.float32),  # a layer norm: weight, bias <-> gamma, beta
        "encoder.4.bias": rng.random(8).astype(np.float32),
        "head.out.weight": rng.random((71, 8)).astype(np.float32),
    }
    keras_shapes = {
        "encoder.stem.kernel": (3, 5, 1, 8), "encoder.stem.bias": (8,),
        "encoder.stem_bn.gamma": (8,), "encoder.stem_bn.beta": (8,), "encoder.stem_bn.moving_mean": (8,),
        "encoder.stem_bn.moving_variance": (8,), "encoder.dw.kernel": (3, 3, 8, 1),
        "encoder.norm.gamma": (8,), "encoder.norm.beta": (8,), "head.out.kernel": (8, 71),
    }
    tf_w = convert(torch_w, "torch", "tensorflow", expected=keras_shapes)
    assert {k: v.shape for k, v in tf_w.items()} == keras_shapes
    assert tf_w["encoder.stem.kernel"][2, 4, 0, 7] == torch_w["encoder.0.weight"][7, 0, 2, 4]
    assert tf_w["encoder.dw.kernel"][0, 2, 5, 0] == torch_w["encoder.3.weight"][5, 0, 0, 2]
    np.testing.assert_array_equal(tf_w["encoder.stem_bn.moving_variance"], torch_w["encoder.1.running_var"])
    np.testing.assert_array_equal(tf_w["encoder.norm.gamma"], torch_w["encoder.4.weight"])

    back = convert(tf_w, "tensorflow", "torch", expected={k: v.shape for k, v in torch_w.items()})
    assert back.keys() == torch_w.keys()
    for name, value in back.items():
        np.testing.assert_array_equal(value, torch_w[name], err_msg=name)


def test_a_backbone_without_correspondence_is_refused_without_blaming_the_weights() -> None:
    tf_w = {"encoder.conv1.kernel": np.ones((3, 3, 1, 8), np.float32), "encoder.conv1.bias": np.ones(8, np.float32)}
    torch_shapes = {"encoder.0.weight": (8, 1, 3, 3), "encoder.0.bias": (8,), "encoder.2.weight": (16, 8, 3, 3)}
    with pytest.raises(WeightsConversionError) as err:
        convert(tf_w, "tensorflow", "torch", expected=torch_shapes)
    text = str(err.value)
    assert "is not available" in text and "tensorflow has 1 layer(s) with weights, torch 2" in text
    assert "BackboneInfo.weight_names" in text and "framework='tensorflow'" in text
    assert "--framework tensorflow" in text and "register a new version" not in text
    assert not isinstance(err.value, WeightsMismatchError)
    named = err.value.loading("'clf', version=3")  # what registry.load raises: the version named in the remedy
    assert "registry.load('clf', version=3, framework='tensorflow')" in str(named)
    assert str(pickle.loads(pickle.dumps(named))) == str(named)


def test_layers_named_alike_but_of_another_card_are_a_mismatch() -> None:
    """Built-in backbones name their layers alike: weights that do not fit the card are left for set_weights to
    report as a mismatch (missing or unexpected names), not as an unavailable conversion."""
    torch_w = {"encoder.blocks.0.conv1.weight": np.ones((8, 1, 3, 3), np.float32)}
    keras_shapes = {"encoder.blocks.0.conv1.kernel": (3, 3, 1, 8), "encoder.blocks.1.conv1.kernel": (3, 3, 8, 16)}
    assert set(convert(torch_w, "torch", "tensorflow", expected=keras_shapes)) == {"encoder.blocks.0.conv1.kernel"}


# --- real models in both frameworks ----------------------------------------------------------------------------

needs_both = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torch", "tensorflow")), reason="needs torch and tensorflow"
)

CARDS = {
    "simple": {"input_size": 32, "backbone.options.widths": [8, 16], "head_hidden": [16],
               "decoder_channels": [16, 8]},
    "b0": {"input_size": 64, "head_hidden": [16], "latent_channels": 4},
}


def card(backbone: str, task: str = "full") -> ModelSpec:
    return with_overrides(registry.card(f"{task}-{backbone}"), CARDS[backbone])


def perturb_batch_norm(model: Model, seed: int = 0) -> None:
    """Non-trivial batch-norm parameters and statistics, so their conversion matters."""
    rng = np.random.default_rng(seed)
    fw = registry.get_framework(model.framework)
    weights = model.get_weights()
    for name, value in weights.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("running_mean", "moving_mean", "bias", "beta"):
            weights[name] = (value + rng.normal(0, 0.1, value.shape)).astype(np.float32)
        elif leaf in ("running_var", "moving_variance", "gamma") or (leaf == "weight" and value.ndim == 1):
            weights[name] = (value * rng.uniform(0.6, 1.4, value.shape)).astype(np.float32)
    fw.set_weights(model.native, weights)


def assert_same_predictions(a: Model, b: Model, size: int) -> None:
    rng = np.random.default_rng(1)
    x = rng.random((2, size, size, 1)).astype(np.float32)
    z = rng.normal(size=(2, a.card.latent_dim)).astype(np.float32)
    fa, fb = registry.get_framework(a.framework), registry.get_framework(b.framework)
    needs = {"logits": "head", "encode": "latent", "reconstruct": "decoder", "decode": "latent"}
    for op, inp in [("logits", x), ("encode", x), ("reconstruct", x), ("decode", z)]:
        if needs[op] not in a.card.parts:
            continue
        ya, yb = fa.infer(a.native, op, inp), fb.infer(b.native, op, inp)  # type: ignore[arg-type]
        assert ya.shape == yb.shape, op
        np.testing.assert_allclose(yb, ya, atol=2e-4 * max(1.0, float(np.abs(ya).max())), rtol=1e-3, err_msg=op)


@needs_both
@pytest.mark.parametrize("backbone", ["simple", pytest.param("b0", marks=pytest.mark.slow)])
def test_torch_model_loads_in_tensorflow_with_same_predictions(backbone: str, tmp_path: Path) -> None:
    spec = card(backbone)
    torch_model = registry.create(spec, framework="torch", seed=0)
    perturb_batch_norm(torch_model)
    torch_model.save(tmp_path / "torch")
    tf_model = registry.load(tmp_path / "torch", framework="tensorflow")
    assert tf_model.framework == "tensorflow"
    assert_same_predictions(torch_model, tf_model, spec.input_size)


@needs_both
@pytest.mark.parametrize("backbone", ["simple", pytest.param("b0", marks=pytest.mark.slow)])
def test_tensorflow_trained_model_loads_in_torch_with_same_predictions(backbone: str, tmp_path: Path) -> None:
    spec = card(backbone)
    tf_model = registry.create(spec, framework="tensorflow", seed=0)
    if backbone == "simple":  # a trained model: moved weights and batch-norm statistics
        trainer = registry.get_framework("tensorflow").trainer(
            tf_model.native, spec, TrainSpec(optimizer="adam", learning_rate=1e-2), Distributed())
        rng = np.random.default_rng(2)
        for _ in range(2):
            trainer.train_step(rng.random((2, 32, 32, 1)).astype(np.float32), np.array([1, 2]))
    else:  # tracing EfficientNet's training step costs a minute on 2 cores: perturb instead
        perturb_batch_norm(tf_model)
    tf_model.save(tmp_path / "tf")
    torch_model = registry.load(tmp_path / "tf", framework="torch")
    assert_same_predictions(tf_model, torch_model, spec.input_size)
    # and back again: weights identical to the start
    torch_model.save(tmp_path / "again")
    again = registry.load(tmp_path / "again", framework="tensorflow").get_weights()
    for name, value in tf_model.get_weights().items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)


@needs_both
def test_weights_of_another_card_are_refused_after_conversion(tmp_path: Path) -> None:
    registry.create(card("simple"), framework="torch", seed=0).save(tmp_path / "m")
    other = registry.create(with_overrides(card("simple"), {"head_hidden": [8]}), framework="tensorflow")
    with pytest.raises(WeightsMismatchError, match=r"head\.hidden\.0\.kernel"):
        other.load_weights(tmp_path / "m" / "weights.safetensors")


@needs_both
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_registered_torch_version_loads_in_tensorflow(tmp_path: Path) -> None:
    from deepgalaxy.registry import store

    spec = card("simple", task="vae")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    torch_model = registry.create(spec, framework="torch", seed=0)
    trainer = registry.get_framework("torch").trainer(torch_model.native, spec, TrainSpec(optimizer="adam",
                                                                                       learning_rate=1e-2),
                                                  Distributed())
    rng = np.random.default_rng(3)
    for _ in range(3):
        trainer.train_step(rng.random((2, 32, 32, 1)).astype(np.float32), np.array([0, 1]))
    torch_model.save(tmp_path / "saved")
    store.register_directory(tmp_path / "saved", name="vae-simple", tracking_uri=uri)
    loaded = registry.load("vae-simple", framework="tensorflow", tracking_uri=uri)
    assert loaded.framework == "tensorflow" and loaded.source["version"] == 1
    assert_same_predictions(torch_model, loaded, 32)


# --- a third-party backbone whose torch modules are created in another order than its Keras layers ----------------


def torch_reordered(spec: BackboneSpec, in_channels: int) -> Any:
    """Two stride-2 convolutions, the second created first (so its state dict lists it first)."""
    from torch import nn

    class Reordered(nn.Module):
        reduction, out_channels = 4, 16

        def __init__(self) -> None:
            super().__init__()
            self.second = nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.first = nn.Conv2d(in_channels, 8, 3, stride=2, padding=1)

        def forward(self, x: Any) -> Any:
            return self.second(self.first(x).relu()).relu()

    return Reordered()


def keras_reordered(spec: BackboneSpec, in_channels: int) -> Any:
    import keras
    from keras import layers

    images = keras.Input((None, None, in_channels))
    x = layers.Conv2D(8, 3, strides=2, activation="relu", name="conv_a")(layers.ZeroPadding2D(1)(images))
    x = layers.Conv2D(16, 3, strides=2, activation="relu", name="conv_b")(layers.ZeroPadding2D(1)(x))
    net = keras.Model(images, x)
    net.reduction, net.out_channels = 4, 16
    return net


class Reordered:
    @hookimpl
    def deepgalaxy_backbones(self) -> list[BackboneInfo]:
        factories = {"torch": torch_reordered, "tensorflow": keras_reordered}
        return [BackboneInfo("reordered", factories, reduction=4),
                BackboneInfo("reordered-declared", factories, reduction=4,
                             weight_names={"first": "conv_a", "second": "conv_b"})]


@pytest.fixture
def reordered() -> Iterator[None]:
    reset_plugin_manager(lambda: PluginManager(extra=[("reordered", Reordered())]))
    yield
    reset_plugin_manager()


def reordered_card(backbone: str) -> ModelSpec:
    return ModelSpec(name=f"classifier-{backbone}", task="classifier", backbone=BackboneSpec(name=backbone),
                     input_size=16, head_hidden=[8])


@needs_both
@pytest.mark.usefixtures("reordered")
def test_a_declared_correspondence_converts_what_layer_order_cannot(tmp_path: Path) -> None:
    trained = registry.create(reordered_card("reordered-declared"), framework="tensorflow", seed=0)
    trained.save(tmp_path / "tf")
    loaded = registry.load(tmp_path / "tf", framework="torch")
    assert_same_predictions(trained, loaded, 16)


@needs_both
@pytest.mark.usefixtures("reordered")
def test_no_correspondence_names_the_backbone_and_the_framework_that_trained_it(tmp_path: Path) -> None:
    registry.create(reordered_card("reordered"), framework="tensorflow", seed=0).save(tmp_path / "tf")
    with pytest.raises(WeightsConversionError) as err:
        registry.load(tmp_path / "tf", framework="torch")
    text = str(err.value)
    assert "converting the tensorflow weights of backbone 'reordered' (card 'classifier-reordered') to torch is " \
           "not available" in text
    assert f"registry.load(Path({str(tmp_path / 'tf')!r}), framework='tensorflow')" in text
    assert "register a new version" not in text
    # a registered version is named by its name and version (load_registered hands load_directory its source)
    with pytest.raises(WeightsConversionError, match=r"registry\.load\('clf', version=2, framework='tensorflow'\)"):
        registry.load_directory(tmp_path / "tf", "torch", source={"name": "clf", "version": 2})
    assert registry.load(tmp_path / "tf").framework == "tensorflow"  # where it was trained, it loads
