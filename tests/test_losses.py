"""The loss terms (deepgalaxy.core.losses), written once: checked against hand-computed values, and every
framework's per-row arithmetic checked against numpy, so both frameworks train the same objective."""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest

from deepgalaxy import registry
from deepgalaxy.core.contract import FEATURES, LATENT_RECONSTRUCTION, LOGITS, LOGVAR, MU, RECONSTRUCTION
from deepgalaxy.core.losses import MMD_BANDWIDTHS, TERM_WEIGHT, compute_losses, mmd
from deepgalaxy.core.specs import LossWeights

FRAMEWORKS = [f for f in ("torch", "tensorflow") if importlib.util.find_spec(f)]

MU_ = np.array([[0.0, 1.0], [2.0, 0.0]], np.float32)
LOGVAR_ = np.array([[0.0, 0.0], [np.log(4.0), 0.0]], np.float32)
KL_ROWS = [0.5 * 1.0, 0.5 * (4.0 + 4.0 - 1 - np.log(4.0))]  # by hand


class NumpyOps:
    """The reference arithmetic."""

    float32 = staticmethod(lambda x: np.asarray(x, np.float32))
    stop_gradient = staticmethod(lambda x: x)
    mean = staticmethod(np.mean)

    @staticmethod
    def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return -log_p[np.arange(len(labels)), labels]

    @staticmethod
    def squared_error(prediction: np.ndarray, target: np.ndarray) -> np.ndarray:
        return np.square(prediction - target).reshape(len(prediction), -1).mean(axis=1)

    @staticmethod
    def kl_to_standard_normal(mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
        return -0.5 * (1 + logvar - mu**2 - np.exp(logvar)).sum(axis=1)

    sum = staticmethod(np.sum)
    exp = staticmethod(np.exp)
    outer = staticmethod(np.outer)
    maximum = staticmethod(np.maximum)
    is_labelled = staticmethod(lambda labels: (labels >= 0).astype(np.float32))
    clamp_labels = staticmethod(lambda labels: np.maximum(labels, 0))

    @staticmethod
    def pairwise_squared_distances(x: np.ndarray) -> np.ndarray:
        rows = x.reshape(len(x), -1)
        return ((rows[:, None, :] - rows[None, :, :]) ** 2).sum(axis=2)


def mmd_by_hand(source: np.ndarray, target: np.ndarray) -> float:
    """The biased multi-kernel MMD^2, written out with loops over the rows."""
    rows = np.concatenate([source, target]).reshape(len(source) + len(target), -1).astype(np.float64)
    n = len(rows)
    d = np.array([[np.sum((a - b) ** 2) for b in rows] for a in rows])
    scale = d.sum() / (n * n - n)
    k = sum(np.exp(-d / (scale * w)) for w in MMD_BANDWIDTHS)
    s, t = np.arange(len(source)), np.arange(len(source), n)
    return float(k[np.ix_(s, s)].mean() + k[np.ix_(t, t)].mean() - 2 * k[np.ix_(s, t)].mean())


def framework_ops(framework: str) -> Any:
    if framework == "torch":
        import torch

        from deepgalaxy.plugins.torch.net import TorchOps

        return TorchOps(), torch.from_numpy
    import tensorflow as tf

    from deepgalaxy.plugins.tensorflow.trainer import TensorFlowOps

    return TensorFlowOps(), tf.constant


def test_the_terms_by_hand_and_their_weights() -> None:
    card = registry.card("full-simple").model_copy(
        update={"loss_weights": LossWeights(classifier=2.0, reconstruction=3.0, latent=5.0, kl=7.0, domain=11.0),
                "domain_adaptation": "mmd"})
    images = np.zeros((2, 2, 2, 1), np.float32)
    out = {
        LOGITS: np.array([[0, 0, 0, 0], [9, 0, 0, 0]], np.float32),  # uniform for the labelled row: log(4)
        RECONSTRUCTION: np.full((2, 2, 2, 1), 0.5, np.float32),  # squared error 0.25
        FEATURES: np.ones((2, 1, 1, 3), np.float32),
        LATENT_RECONSTRUCTION: np.full((2, 1, 1, 3), 3.0, np.float32),  # squared error 4
        MU: MU_, LOGVAR: LOGVAR_,
    }
    losses = compute_losses(card, out, images, np.array([0, -1]), NumpyOps())  # one labelled, one not
    expected = {"loss_classifier": np.log(4.0), "loss_reconstruction": 0.25, "loss_latent": 4.0,
                "loss_kl": np.mean(KL_ROWS), "loss_domain": 0.0}  # identical features: no discrepancy
    for name, value in expected.items():
        assert losses[name] == pytest.approx(value, rel=1e-6), name
    weighted = sum(getattr(card.loss_weights, TERM_WEIGHT[k]) * v for k, v in expected.items())
    assert losses["loss"] == pytest.approx(weighted, rel=1e-6)
    assert set(TERM_WEIGHT.values()) == set(LossWeights.model_fields)  # every weight weights a term


def test_a_task_has_only_its_terms() -> None:
    card = registry.card("fcae-simple")
    images = np.ones((2, 2, 2, 1), np.float32)
    losses = compute_losses(card, {FEATURES: images, RECONSTRUCTION: images}, images, np.zeros(2, np.int64),
                            NumpyOps())
    assert set(losses) == {"loss", "loss_reconstruction"} and losses["loss"] == 0.0


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_every_frameworks_arithmetic_matches_numpy(framework: str) -> None:
    ops, tensor = framework_ops(framework)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5)).astype(np.float32)
    labels = np.array([0, 4, 2], np.int64)
    a, b = rng.random((3, 4, 4, 2), dtype=np.float32), rng.random((3, 4, 4, 2), dtype=np.float32)
    ref = NumpyOps()
    features = rng.normal(size=(6, 2, 2, 3)).astype(np.float32)
    source = np.array([1, 0, 1, 1, 0, 0], np.float32)
    unlabelled = np.array([3, -1, 0], np.int64)
    checks = {
        "cross_entropy": (ops.cross_entropy(tensor(logits), tensor(labels)), ref.cross_entropy(logits, labels)),
        "is_labelled": (ops.is_labelled(tensor(unlabelled)), [1.0, 0.0, 1.0]),
        "clamp_labels": (ops.clamp_labels(tensor(unlabelled)), [3, 0, 0]),
        "distances": (ops.pairwise_squared_distances(tensor(features)), ref.pairwise_squared_distances(features)),
        "mmd": (mmd(tensor(features), tensor(source), ops), mmd(features, source, ref)),
        "squared_error": (ops.squared_error(tensor(a), tensor(b)), ref.squared_error(a, b)),
        "kl": (ops.kl_to_standard_normal(tensor(MU_), tensor(LOGVAR_)), np.array(KL_ROWS)),
        "mean": (ops.mean(tensor(a[:, 0, 0, 0])), a[:, 0, 0, 0].mean()),
    }
    for name, (got, want) in checks.items():
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5, err_msg=name)
    assert np.asarray(ops.float32(tensor(np.ones(2, np.float64)))).dtype == np.float32


def test_unlabelled_rows_count_in_every_term_but_the_classifiers() -> None:
    card = registry.card("full-simple")
    rng = np.random.default_rng(1)
    images = rng.random((4, 2, 2, 1), dtype=np.float32)
    out = {LOGITS: rng.normal(size=(4, 5)).astype(np.float32), RECONSTRUCTION: rng.random((4, 2, 2, 1)),
           FEATURES: rng.random((4, 1, 1, 3)), LATENT_RECONSTRUCTION: rng.random((4, 1, 1, 3)),
           MU: rng.normal(size=(4, 2)), LOGVAR: rng.normal(size=(4, 2))}
    ops = NumpyOps()
    mixed = compute_losses(card, out, images, np.array([2, -1, 4, -1]), ops)
    labelled_only = compute_losses(card, {k: v[[0, 2]] for k, v in out.items()}, images[[0, 2]], np.array([2, 4]), ops)
    assert mixed["loss_classifier"] == pytest.approx(labelled_only["loss_classifier"], rel=1e-6)
    assert mixed["loss_reconstruction"] == pytest.approx(ops.squared_error(out[RECONSTRUCTION], images).mean())
    none = compute_losses(card, out, images, np.full(4, -1), ops)
    assert none["loss_classifier"] == 0.0 and none["loss_reconstruction"] == mixed["loss_reconstruction"]


def test_mmd_by_hand_and_only_between_both_kinds() -> None:
    rng = np.random.default_rng(2)
    near, far = rng.normal(size=(3, 2, 2, 4)), rng.normal(loc=3.0, size=(3, 2, 2, 4))
    both = np.concatenate([near, far])
    source = np.array([1, 1, 1, 0, 0, 0], np.float64)
    assert mmd(both, source, NumpyOps()) == pytest.approx(mmd_by_hand(near, far), rel=1e-9)
    same = np.concatenate([near, near])
    assert mmd(same, source, NumpyOps()) < mmd(both, source, NumpyOps()) / 10
    assert mmd(both, np.ones(6), NumpyOps()) == 0.0 and mmd(both, np.zeros(6), NumpyOps()) == 0.0
