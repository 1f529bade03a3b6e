"""The TensorFlow training step: the loss falls, every optimizer updates, NaN steps leave the weights alone,
eval changes nothing, checkpoints resume bit-exactly (optimizer slots and dropout/noise RNG included)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deepgalaxy import registry
from deepgalaxy.core.errors import ShapeError, TrainingError
from deepgalaxy.core.interfaces import LOSS_TERMS, Distributed
from deepgalaxy.core.specs import OPTIMIZERS, ModelSpec, TrainSpec, with_overrides

pytest.importorskip("tensorflow")

SMALL = {"input_size": 32, "backbone.options.widths": [8, 16], "head_hidden": [16], "decoder_channels": [16, 8],
         "num_classes": 5}


FULL_TERMS = set(LOSS_TERMS) - {"loss_domain", "loss_properties"}  # those two only with their card options
"""A full card's terms (``loss_domain`` only with ``card.domain_adaptation``)."""


def small(name: str = "full-simple") -> ModelSpec:
    return with_overrides(registry.card(name), SMALL)


def batch(n: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 5
    # images whose brightness pattern depends on the label, so the classifier has something to learn
    x = rng.random((n, 32, 32, 1)).astype(np.float32) * 0.3
    for i, y in enumerate(labels):
        x[i, :, y * 6:(y + 1) * 6, 0] += 0.6
    return x, labels.astype(np.int64)


def trainer(card: ModelSpec, seed: int = 0, **train: object):  # type: ignore[no-untyped-def]
    fw = registry.get_framework("tensorflow")
    native = registry.create(card, "tensorflow", seed=seed).native
    return fw, native, fw.trainer(native, card, TrainSpec(**train), Distributed())  # type: ignore[arg-type]


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.mark.slow
def test_loss_falls_with_the_papers_adadelta() -> None:
    _, _, tr = trainer(small(), batch_size=8)  # TrainSpec defaults: Adadelta, lr 8.0
    x, y = batch()
    first = tr.train_step(x, y)
    assert set(first.losses) == FULL_TERMS
    assert first.predicted is not None and first.predicted.shape == (8,)
    assert first.recon_mse == pytest.approx(first.losses["loss_reconstruction"])
    for _ in range(25):
        last = tr.train_step(x, y)
    assert last.losses["loss"] < 0.6 * first.losses["loss"]
    assert last.losses["loss_reconstruction"] < first.losses["loss_reconstruction"]
    assert tr.eval_step(x, y).losses["loss_classifier"] < first.losses["loss_classifier"]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_updates_and_clips(optimizer: str) -> None:
    card = small("classifier-simple")
    fw, native, tr = trainer(card, optimizer=optimizer, learning_rate=1e-2, grad_clip=1.0)
    before = fw.get_weights(native)
    res = tr.train_step(*batch())
    assert set(res.losses) == {"loss", "loss_classifier"} and res.recon_mse is None
    assert max_diff(before, fw.get_weights(native)) > 0


def test_learning_rate_scales_with_workers() -> None:
    card = small("fcae-simple")
    _, _, tr = trainer(card, optimizer="sgd", learning_rate=0.1)
    assert tr.learning_rate == pytest.approx(0.1)
    assert TrainSpec(learning_rate=0.1).effective_lr(4) == pytest.approx(0.4)  # what a 4-rank trainer uses


def test_eval_step_changes_nothing() -> None:
    fw, native, tr = trainer(small())
    before = fw.get_weights(native)
    res = tr.eval_step(*batch())
    assert max_diff(before, fw.get_weights(native)) == 0.0  # batch-norm statistics included
    assert res.predicted is not None and set(res.losses) == FULL_TERMS


def test_non_finite_step_does_not_update() -> None:
    fw, native, tr = trainer(small("fcae-simple"), optimizer="adam", learning_rate=1e-3)
    x, y = batch()
    tr.train_step(x, y)
    before = fw.get_weights(native)
    x[0, 0, 0, 0] = np.nan
    res = tr.train_step(x, y)
    assert not np.isfinite(res.losses["loss"])
    assert max_diff(before, fw.get_weights(native)) == 0.0


def test_bf16_training_step_is_finite_and_learns() -> None:
    _, _, tr = trainer(small("fcae-simple"), optimizer="adam", learning_rate=3e-3, precision="bf16")
    x, y = batch()
    first = tr.train_step(x, y).losses["loss"]
    for _ in range(8):
        last = tr.train_step(x, y).losses["loss"]
    assert np.isfinite(last) and last < first


def test_bad_batches_raise_shape_errors() -> None:
    _, _, tr = trainer(small("classifier-simple"))
    x, y = batch()
    with pytest.raises(ShapeError, match=r"labels must lie in \[0, 5\)"):
        tr.train_step(x, y + 10)
    with pytest.raises(ShapeError, match="32 px"):
        tr.train_step(np.zeros((2, 16, 16, 1), np.float32), y[:2])
    with pytest.raises(ShapeError, match="one per image"):
        tr.train_step(x, y[:3])


def test_checkpoint_resume_is_bit_exact(tmp_path: Path) -> None:
    card = small()  # dropout in the head and VAE sampling noise: the RNG state must be restored too
    batches = [batch(seed=s) for s in range(5)]
    fw, native, tr = trainer(card, optimizer="adam", learning_rate=1e-3)
    for x, y in batches[:3]:
        tr.train_step(x, y)
    tr.save_checkpoint(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer.json"]
    assert json.loads((tmp_path / "ckpt" / "trainer.json").read_text())["step"] == 3
    for x, y in batches[3:]:
        expected = tr.train_step(x, y)

    _, native2, tr2 = trainer(card, seed=99, optimizer="adam", learning_rate=1e-3)  # other initial weights
    tr2.load_checkpoint(tmp_path / "ckpt")
    assert tr2.step == 3
    for x, y in batches[3:]:
        got = tr2.train_step(x, y)
    assert got.losses == expected.losses
    assert max_diff(fw.get_weights(native), fw.get_weights(native2)) == 0.0


def test_checkpoint_of_another_optimizer_or_model_is_refused(tmp_path: Path) -> None:
    _, _, tr = trainer(small("fcae-simple"), optimizer="adam")
    tr.save_checkpoint(tmp_path / "c")
    _, _, other_opt = trainer(small("fcae-simple"), optimizer="sgd")
    with pytest.raises(TrainingError, match="optimizer 'adam'"):
        other_opt.load_checkpoint(tmp_path / "c")
    _, _, other_card = trainer(small("classifier-simple"), optimizer="adam")
    with pytest.raises(TrainingError, match="different model"):
        other_card.load_checkpoint(tmp_path / "c")
    with pytest.raises(TrainingError, match=r"trainer\.json is missing"):
        tr.load_checkpoint(tmp_path / "nothing")
