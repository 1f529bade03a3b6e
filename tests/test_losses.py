"""The loss terms (deepgalaxy.core.losses), written once: checked against hand-computed values, and every
framework's per-row arithmetic checked against numpy, so both frameworks train the same objective."""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest

from deepgalaxy import registry
from deepgalaxy.core.contract import FEATURES, LATENT_RECONSTRUCTION, LOGITS, LOGVAR, MU, RECONSTRUCTION
from deepgalaxy.core.losses import TERM_WEIGHT, compute_losses
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
        update={"loss_weights": LossWeights(classifier=2.0, reconstruction=3.0, latent=5.0, kl=7.0)})
    images = np.zeros((2, 2, 2, 1), np.float32)
    out = {
        LOGITS: np.zeros((2, 4), np.float32),  # uniform: cross-entropy log(4)
        RECONSTRUCTION: np.full((2, 2, 2, 1), 0.5, np.float32),  # squared error 0.25
        FEATURES: np.ones((2, 1, 1, 3), np.float32),
        LATENT_RECONSTRUCTION: np.full((2, 1, 1, 3), 3.0, np.float32),  # squared error 4
        MU: MU_, LOGVAR: LOGVAR_,
    }
    losses = compute_losses(card, out, images, np.array([0, 3]), NumpyOps())
    expected = {"loss_classifier": np.log(4.0), "loss_reconstruction": 0.25, "loss_latent": 4.0,
                "loss_kl": np.mean(KL_ROWS)}
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
    checks = {
        "cross_entropy": (ops.cross_entropy(tensor(logits), tensor(labels)), ref.cross_entropy(logits, labels)),
        "squared_error": (ops.squared_error(tensor(a), tensor(b)), ref.squared_error(a, b)),
        "kl": (ops.kl_to_standard_normal(tensor(MU_), tensor(LOGVAR_)), np.array(KL_ROWS)),
        "mean": (ops.mean(tensor(a[:, 0, 0, 0])), a[:, 0, 0, 0].mean()),
    }
    for name, (got, want) in checks.items():
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.asarray(ops.float32(tensor(np.ones(2, np.float64)))).dtype == np.float32
