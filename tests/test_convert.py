"""Cross-framework weights: the numpy converter's layouts, and real torch <-> Keras models giving the same
predictions after a save in one framework and a load in the other (simple and EfficientNet-B0 cards), also
through the MLflow Model Registry."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepgalaxy import registry
from deepgalaxy.core.errors import WeightsMismatchError
from deepgalaxy.core.interfaces import Distributed
from deepgalaxy.core.model import Model
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
