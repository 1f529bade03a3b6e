"""The framework contract, tested once over framework x every card that framework supports (timm style: the
registry drives the parameters, so a card or framework added by any plugin is tested without being listed): one
test per card, one subtest per framework, so a card is built once per framework for every check.

Each card is built at the smallest input size its backbone allows, has the documented output shapes under the
contract's output names, round-trips its weights bit-exactly (get/set, and save/load through safetensors:
``Model.save`` / ``registry.load(directory)``), and trains one SGD step on a batch of four (:func:`step_mode` and
:func:`rebuilds_from_the_card` say where TensorFlow's large backbones take a shorter path). Cards both frameworks
support build the same architecture: the same parameter counts part by part and the same output shapes
(measured by the card's contract checks in each framework). The shared pieces of the contract
(:mod:`deepgalaxy.core.contract`: batch validation, the optimizer table, the decoder widths, the backbone reduction
check, the backbone options) are tested against both frameworks here too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deepgalaxy import registry
from deepgalaxy.core.backbone_options import BackboneOptionError
from deepgalaxy.core.contract import (
    FEATURES,
    LATENT_RECONSTRUCTION,
    LOGITS,
    LOGVAR,
    MU,
    OPTIMIZERS,
    RECONSTRUCTION,
    BackboneBuilder,
    check_batch,
    decoder_widths,
    optimizer_settings,
)
from deepgalaxy.core.errors import DeepGalaxyError, ShapeError
from deepgalaxy.core.interfaces import LOSS_TERMS, Distributed
from deepgalaxy.core.model import WEIGHTS_FILE
from deepgalaxy.core.plugins import get_plugin_manager
from deepgalaxy.core.specs import BackboneSpec, ModelSpec, TrainSpec, with_overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEAVY = ("efficientnet-b5", "efficientnet-b6", "efficientnet-b7")
"""Backbones whose build alone takes seconds: their cards run under the ``slow`` marker."""

STATISTICS = re.compile(r"running_|moving_")
"""Batch-norm statistics (torch, Keras): they change in any training-mode forward pass, gradient or not."""

FRAMEWORKS = [f for f in ("torch", "tensorflow") if importlib.util.find_spec(f)]


def _supports(framework: str, card: ModelSpec) -> bool:
    backbone = get_plugin_manager().backbones.get(card.backbone.name)
    return backbone is not None and framework in backbone.factories


def _cards() -> list[object]:
    """Every card some framework supports (each is tested in every framework that supports it); the heaviest
    first, so that parallel workers do not end on one of them."""
    names = [n for n in registry.list_models() if any(_supports(fw, registry.card(n)) for fw in FRAMEWORKS)]
    names.sort(key=lambda n: registry.card(n).backbone.name not in HEAVY)
    return [pytest.param(name, id=name, marks=[pytest.mark.slow] if registry.card(name).backbone.name in HEAVY else [])
            for name in names]


def small(card: ModelSpec) -> ModelSpec:
    """The card at the smallest size its backbone allows (>= 32 px)."""
    r = registry.reduction(card.backbone)
    return card.model_copy(update={"input_size": max(32, r)})


def test_every_builtin_backbone_has_a_factory_in_every_framework() -> None:
    pm = get_plugin_manager()
    expected = ["simple", "resnet18", "resnet34", "resnet50", *(f"efficientnet-b{i}" for i in range(8))]
    for fw in FRAMEWORKS:
        for name in expected:
            assert fw in pm.backbone(name).factories, (fw, name)
    assert len(_cards()) >= 4 * len(expected)  # four tasks over every backbone, each in every framework


@contextlib.contextmanager
def step_mode(framework: str, card: ModelSpec) -> Iterator[None]:
    """TensorFlow steps over backbones other than ``simple`` run eagerly here: the same Python step, not traced
    (tracing an EfficientNet step costs 30-40 s a card here; the traced step runs on every ``simple`` card and in
    every training test)."""
    if framework != "tensorflow" or card.backbone.name == "simple":
        yield
        return
    import tensorflow as tf

    tf.config.run_functions_eagerly(True)
    try:
        yield
    finally:
        tf.config.run_functions_eagerly(False)


def rebuilds_from_the_card(framework: str, card: ModelSpec) -> bool:
    """Every torch card and every ``simple`` card are saved and rebuilt from card.json (``registry.load``); the
    other TensorFlow cards reload their saved safetensors into the model itself (a second build of a large Keras
    backbone costs seconds and tests no other code)."""
    return framework == "torch" or card.backbone.name == "simple"


def forward(framework: str, native: Any, images: np.ndarray) -> dict[str, np.ndarray]:
    """The native model's training-mode outputs, keyed by the contract's output names, as NHWC numpy."""
    if framework == "torch":
        import torch

        out = native.train()(torch.from_numpy(images).permute(0, 3, 1, 2))
        return {k: v.detach().float().permute(0, 2, 3, 1).numpy() if v.ndim == 4 else v.detach().float().numpy()
                for k, v in out.items()}
    return {k: np.asarray(v) for k, v in native(images, training=True).items()}


@pytest.mark.parametrize("name", _cards())
def test_every_card_in_every_framework(name: str, tmp_path: Path, subtests: Any) -> None:
    """framework x card: the contract in each framework that supports the card (one subtest each), then both
    frameworks build the same architecture: the same parameter counts part by part, the same output shapes."""
    measured = {}
    for framework in FRAMEWORKS:
        if _supports(framework, registry.card(name)):
            with subtests.test(framework=framework):
                measured[framework] = builds_trains_and_round_trips(framework, name, tmp_path / framework)
    if set(measured) == {"torch", "tensorflow"}:
        with subtests.test("the same architecture in torch and tensorflow"):
            torch_r, tf_r = measured["torch"], measured["tensorflow"]
            for part in registry.card(name).parts:
                assert torch_r["trainable"][part] == tf_r["trainable"][part], f"{name}: trainable parameters of {part}"
                assert torch_r["all"][part] == tf_r["all"][part], f"{name}: all weights of {part}"
            assert torch_r["shapes"] == tf_r["shapes"], f"{name}: output shapes"


def builds_trains_and_round_trips(framework: str, name: str, tmp_path: Path) -> dict[str, Any]:
    """The contract for one card in one framework; returns what :func:`measure` saw (counts, output shapes)."""
    card = small(registry.card(name))
    model = registry.create(card, framework=framework, seed=0)
    fw = registry.get_framework(framework)
    s, c, n = card.input_size, card.channels, 2
    r = registry.reduction(card.backbone)
    assert model.native.reduction == r
    images = np.random.default_rng(0).random((n, s, s, c), dtype=np.float32)

    # documented shapes, under the contract's output names, and through the public Model
    out = forward(framework, model.native, images)
    f = model.native.feature_channels
    assert out[FEATURES].shape == (n, s // r, s // r, f)
    measured = measure(model, card, images)
    ops = measured.pop("outputs")
    if "decoder" in card.parts:
        assert out[RECONSTRUCTION].shape == (n, s, s, c)
        assert float(out[RECONSTRUCTION].min()) >= 0.0 and float(out[RECONSTRUCTION].max()) <= 1.0
        rec = ops["reconstruct"]
        assert rec.shape == images.shape and rec.dtype == np.float32
        assert rec.min() >= 0.0 and rec.max() <= 1.0
    if "head" in card.parts:
        assert out[LOGITS].shape == (n, card.num_classes)
        probabilities = ops["logits"]
        assert probabilities.shape == (n, card.num_classes)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    if "latent" in card.parts:
        assert out[MU].shape == out[LOGVAR].shape == (n, card.latent_dim)
        assert out[LATENT_RECONSTRUCTION].shape == out[FEATURES].shape
        assert ops["encode"].shape == (n, card.latent_dim)
        assert ops["decode"].shape == images.shape
    for part in ("encoder", "decoder", "head", "latent"):
        if part in card.parts:
            assert model.num_parameters(part) > 0
    assert model.num_parameters() == sum(model.num_parameters(p) for p in card.parts)
    assert model.num_parameters(trainable=False) > model.num_parameters()  # + batch-norm statistics
    before = model.get_weights()
    assert {k.split(".")[0] for k in before} == set(card.parts)  # exactly the task's parts

    # get/set: other values in, the same values out
    shifted = {k: v + 1 for k, v in before.items()}
    fw.set_weights(model.native, shifted)
    for key, value in fw.get_weights(model.native).items():
        assert np.array_equal(value, shifted[key]), key
    fw.set_weights(model.native, before)

    # bit-exact weights round trip through safetensors (rebuilt from card.json where rebuilds_from_the_card)
    model.save(tmp_path / "m")
    if rebuilds_from_the_card(framework, card):
        loaded = registry.load(tmp_path / "m")
        assert loaded.card == card and loaded.framework == framework
    else:
        fw.set_weights(model.native, shifted)
        model.load_weights(tmp_path / "m" / WEIGHTS_FILE)
        loaded = model
    after = loaded.get_weights()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and np.array_equal(after[key], value), key
    if "head" in card.parts:
        np.testing.assert_array_equal(probabilities, loaded.predict(images).probabilities)
    else:
        np.testing.assert_array_equal(rec, loaded.reconstruct(images))

    # one training step reports the contract's finite losses and updates every part (every part got a gradient).
    # A batch of four: on two 32 px images Keras' EfficientNet-B7 overflows its gradients in training mode (batch
    # norm over 1x1 maps of two images), and the trainer rightly skips a step whose gradients are not finite.
    trainer = fw.trainer(model.native, card, TrainSpec(optimizer="sgd", learning_rate=0.1), Distributed())
    n = 4
    batch = np.concatenate([images, images[:, ::-1]])
    with step_mode(framework, card):
        result = trainer.train_step(batch, np.array([0, card.num_classes - 1, 1, 2]))
    assert set(result.losses) <= set(LOSS_TERMS) and "loss" in result.losses
    assert all(np.isfinite(v) for v in result.losses.values()), result.losses
    if "head" in card.parts:
        assert result.predicted is not None and result.predicted.shape == (n,)
    stepped = fw.get_weights(model.native)
    for part in card.parts:
        changed = [k for k in before if k.startswith(f"{part}.") and not STATISTICS.search(k)
                   and not np.array_equal(before[k], stepped[k])]
        assert changed, f"{framework} {name}: one step changed no weight of {part}"
    return measured


def measure(model: Any, card: ModelSpec, images: np.ndarray) -> dict[str, Any]:
    """Parameter counts per part, and the outputs (and their shapes) of every public inference op the card has:
    ``reconstruct``, ``logits`` (as probabilities, through ``predict``), ``encode``, ``decode``."""
    outputs = {}
    if "decoder" in card.parts:
        outputs["reconstruct"] = model.reconstruct(images)
    if "head" in card.parts:
        outputs["logits"] = model.predict(images).probabilities
    if "latent" in card.parts:
        outputs["encode"] = model.encode(images)
        outputs["decode"] = model.decode(outputs["encode"])
    return {
        "trainable": {p: model.num_parameters(p) for p in card.parts},
        "all": {p: model.num_parameters(p, trainable=False) for p in card.parts},
        "shapes": {op: value.shape for op, value in outputs.items()},
        "outputs": outputs,
    }


@pytest.mark.skipif(FRAMEWORKS != ["torch", "tensorflow"], reason="needs torch and tensorflow")
def test_the_registry_has_cards_for_both_frameworks() -> None:
    both = {n for n in registry.list_models() if all(_supports(fw, registry.card(n)) for fw in FRAMEWORKS)}
    assert {"vae-simple", "classifier-b0", "full-b4", "fcae-r50"} <= both


@pytest.mark.skipif(FRAMEWORKS != ["torch", "tensorflow"], reason="needs torch and tensorflow")
@pytest.mark.parametrize("task", ["classifier", "fcae", "vae", "full"])
def test_each_task_builds_exactly_its_parts(task: str) -> None:
    card = with_overrides(registry.card(f"{task}-simple"), {"input_size": 32, "backbone.options.widths": [8, 16]})
    models = {fw: registry.create(card, framework=fw, seed=0) for fw in ("torch", "tensorflow")}
    counts = {fw: m.num_parameters() for fw, m in models.items()}
    assert counts["torch"] == counts["tensorflow"] == sum(models["torch"].num_parameters(p) for p in card.parts)
    assert set(models["tensorflow"].native.parts()) == set(card.parts)


# --- the shared pieces ----------------------------------------------------------------------------------------


def test_decoder_widths_take_the_last_entries_and_pad() -> None:
    def card(*channels: int) -> ModelSpec:
        return registry.card("fcae-simple").model_copy(update={"decoder_channels": list(channels)})

    assert decoder_widths(card(256, 128, 64, 32, 16), 32) == [256, 128, 64, 32, 16]
    assert decoder_widths(card(256, 128, 64, 32, 16), 16) == [128, 64, 32, 16]
    assert decoder_widths(card(32, 16), 32) == [32, 16, 16, 16, 16]
    with pytest.raises(ValueError, match="power-of-two"):
        decoder_widths(card(8), 24)


def test_batch_validation_is_the_same_in_every_framework() -> None:
    card = small(registry.card("classifier-simple"))
    s = card.input_size
    ok = np.zeros((2, s, s, card.channels), np.float32)
    images, labels, _ = check_batch(card, (ok * 255).astype(np.uint8), np.array([0, 1]))
    assert images.dtype == np.float32 and labels.dtype == np.int64
    bad = {
        "channels": (np.zeros((2, s, s, card.channels + 1), np.float32), np.array([0, 1]), r"\(N, H, W, 1\)"),
        "size": (np.zeros((2, s * 2, s * 2, card.channels), np.float32), np.array([0, 1]), f"{s} px"),
        "count": (ok, np.array([0]), "one per image"),
        "range": (ok, np.array([0, card.num_classes]), "must lie in"),
    }
    for framework in FRAMEWORKS:
        model = registry.create(card, framework=framework, seed=0)
        trainer = registry.get_framework(framework).trainer(model.native, card, TrainSpec(), Distributed())
        for what, (x, y, match) in bad.items():
            with pytest.raises(ShapeError, match=match):
                trainer.train_step(x, y)
            with pytest.raises(ShapeError, match=match):
                trainer.eval_step(x, y)
            assert trainer.step == 0, (framework, what)


def test_optimizers_take_the_contracts_hyper_parameters() -> None:
    if "torch" in FRAMEWORKS:
        import torch

        from deepgalaxy.plugins.torch.trainer import make_optimizer as torch_optimizer

        p = [torch.nn.Parameter(torch.zeros(1))]
        group = {name: torch_optimizer(name, p, 1.0).param_groups[0] for name in OPTIMIZERS}
        assert (group["adadelta"]["rho"], group["adadelta"]["eps"]) == (0.95, 1e-7)
        assert group["adamw"]["weight_decay"] == 0.01 and group["adam"]["eps"] == 1e-8
        assert group["sgd"]["momentum"] == 0.9 and group["rmsprop"]["alpha"] == 0.99
    if "tensorflow" in FRAMEWORKS:
        from deepgalaxy.plugins.tensorflow.trainer import make_optimizer as keras_optimizer

        opt = {name: keras_optimizer(TrainSpec(optimizer=name), 1.0) for name in OPTIMIZERS}
        assert (opt["adadelta"].rho, opt["adadelta"].epsilon) == (0.95, 1e-7)
        assert opt["adamw"].weight_decay == 0.01 and opt["adam"].epsilon == 1e-8
        assert opt["sgd"].momentum == 0.9 and opt["rmsprop"].rho == 0.99
    with pytest.raises(ValueError, match="unknown optimizer 'lion'; use adadelta, adam, adamw, sgd or rmsprop"):
        optimizer_settings("lion")


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_backbone_that_reduces_otherwise_than_declared_is_refused(framework: str) -> None:
    spec = BackboneSpec(name="simple", options={"widths": [8, 8]})
    builder = BackboneBuilder(framework, registry.backbone_factory(spec, framework), reduction=8)
    with pytest.raises(ShapeError, match=r"'simple' \(" + framework + r"\) reduces by 4, but its plugin declares 8"):
        builder(spec, 1)


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (BackboneSpec(name="simple", options={"width": [8]}), "no option.*'width'.*widths"),
        (BackboneSpec(name="simple", options={"widths": []}), "non-empty list"),
        (BackboneSpec(name="simple", options={"widths": [8, -1]}), "positive integers"),
        (BackboneSpec(name="resnet18", options={"depth": 3}), "no option.*'depth'"),
        (BackboneSpec(name="efficientnet-b0", options={"drop_connect_rate": 1.5}), r"\[0, 1\)"),
    ],
)
def test_bad_backbone_options_fail_with_one_error_type(framework: str, spec: BackboneSpec, match: str) -> None:
    factory = registry.backbone_factory(spec, framework)
    with pytest.raises(BackboneOptionError, match=match):
        factory(spec, 1)


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize(
    ("name", "options", "channels"),
    [("simple", {"widths": []}, 1), ("simple", {"depth": 3}, 1), ("resnet18", {"widths": [8]}, 1),
     ("efficientnet-b0", {"drop_connect_rate": 1.5}, 1), ("simple", {}, 0)],
)
def test_bad_options_and_channels_raise_clear_errors(framework: str, name: str, options: dict[str, Any],
                                                     channels: int) -> None:
    spec = BackboneSpec(name=name, options=options)
    factory = registry.backbone_factory(spec, framework)
    with pytest.raises(DeepGalaxyError, match=name if channels else "channel"):
        factory(spec, channels)
