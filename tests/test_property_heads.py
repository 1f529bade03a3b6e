"""Property heads: the Gaussian negative log-likelihood, the heads in both frameworks (same outputs, same loss, the
same metric names), the card option and the batch checks, and the metrics in physical units."""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import numpy as np
import pytest

from deepgalaxy import registry
from deepgalaxy.core.contract import PROPERTY_LOGVAR_BOUND, check_batch, with_targets
from deepgalaxy.core.errors import DeepGalaxyError, ShapeError
from deepgalaxy.core.interfaces import Distributed, StepResult
from deepgalaxy.core.properties import TARGETS, angle_between, target_columns
from deepgalaxy.core.specs import PropertyHeads, TrainSpec
from deepgalaxy.runs.worker import Sums

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FRAMEWORKS = [f for f in ("torch", "tensorflow") if importlib.util.find_spec(f)]
TINY = {"input_size": 32, "backbone.options.widths": [8, 16], "decoder_channels": [16, 8], "head_hidden": [16],
        "properties": {"hidden": [16]}}
K = len(target_columns(list(TARGETS)))


def batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Four images, their labels (one unlabelled) and targets (two unknown values)."""
    rng = np.random.default_rng(seed)
    targets = rng.normal(size=(4, K)).astype(np.float32)
    targets[0, 1] = targets[3, 4] = np.nan
    return rng.random((4, 32, 32, 1)).astype(np.float32), np.array([0, 5, -1, 70]), targets


def expected_nll(mean: np.ndarray, logvar: np.ndarray, targets: np.ndarray, beta: float = 0.0) -> float:
    """-log N(y; mean, exp(logvar)) averaged over the known targets, computed from the density itself, each
    weighted by variance**beta."""
    known = np.isfinite(targets)
    sigma = np.exp(0.5 * logvar.astype(np.float64))
    density = np.exp(-0.5 * ((targets - mean) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return float((-np.log(density) * sigma ** (2 * beta))[known].mean())


def ops_for(framework: str) -> Any:
    if framework == "torch":
        from deepgalaxy.plugins.torch.net import TorchOps

        return TorchOps(), __import__("torch").from_numpy
    from deepgalaxy.plugins.tensorflow.trainer import TensorFlowOps

    return TensorFlowOps(), __import__("tensorflow").convert_to_tensor


@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_gaussian_nll_is_the_mean_negative_log_density_of_the_known_targets(framework: str, beta: float) -> None:
    from deepgalaxy.core.losses import gaussian_nll

    ops, tensor = ops_for(framework)
    rng = np.random.default_rng(1)
    mean, logvar = rng.normal(size=(2, 5, 3)).astype(np.float32)
    targets = rng.normal(size=(5, 3)).astype(np.float32)
    targets[1, 2] = targets[4, 0] = np.nan
    got = float(np.asarray(gaussian_nll(tensor(mean), tensor(logvar), tensor(targets), ops, beta)))
    assert got == pytest.approx(expected_nll(mean, logvar, targets, beta), rel=1e-5)
    # a wider predicted spread around the same errors changes the likelihood the way the density does
    wider = float(np.asarray(gaussian_nll(tensor(mean), tensor(logvar + 1), tensor(targets), ops, beta)))
    assert wider == pytest.approx(expected_nll(mean, logvar + 1, targets, beta), rel=1e-5)


def test_beta_keeps_the_means_of_uncertain_values_learning() -> None:
    """The plain likelihood's gradient on a mean shrinks with 1/variance; beta = 0.5 restores it to 1/sigma."""
    import torch

    from deepgalaxy.core.losses import gaussian_nll
    from deepgalaxy.plugins.torch.net import TorchOps

    targets = torch.zeros(1, 2)
    logvar = torch.tensor([[0.0, 4.0]])  # sigma 1 and e^2
    grads = {}
    for beta in (0.0, 0.5):
        mean = torch.ones(1, 2, requires_grad=True)
        gaussian_nll(mean, logvar, targets, TorchOps(), beta).backward()
        assert mean.grad is not None
        grads[beta] = mean.grad[0].numpy()
    np.testing.assert_allclose(grads[0.0], [0.5, 0.5 * math.exp(-4)], rtol=1e-5)  # d/dmu = error / variance / 2
    np.testing.assert_allclose(grads[0.5], [0.5, 0.5 * math.exp(-2)], rtol=1e-5)


def _models() -> dict[str, Any]:
    torch_model = registry.create("full-simple", framework="torch", seed=3, **TINY)
    models = {"torch": torch_model}
    for fw in FRAMEWORKS[1:]:
        models[fw] = registry.create("full-simple", framework=fw, seed=3, **TINY)
        models[fw].set_weights(torch_model.backend.get_weights(torch_model.native), "torch", "torch model")
    return models


def test_both_frameworks_predict_the_same_properties_and_loss_from_the_same_weights() -> None:
    images, labels, targets = batch()
    outputs, losses = {}, {}
    for fw, model in _models().items():
        raw = model.backend.infer(model.native, "properties", images)
        assert raw.shape == (4, 2 * K)
        assert np.abs(raw[:, K:]).max() <= PROPERTY_LOGVAR_BOUND
        trainer = model.backend.trainer(model.native, model.card, TrainSpec(optimizer="sgd", learning_rate=0.01),
                                        Distributed())
        result = trainer.eval_step(images, with_targets(labels, targets))
        assert result.properties is not None
        np.testing.assert_allclose(result.properties, raw, atol=1e-5)
        assert result.losses["loss_properties"] == pytest.approx(
            expected_nll(raw[:, :K], raw[:, K:], targets, model.card.properties.beta), rel=1e-4)
        outputs[fw], losses[fw] = raw, result.losses
    for fw in FRAMEWORKS[1:]:
        np.testing.assert_allclose(outputs[fw], outputs["torch"], atol=1e-5)
        assert set(losses[fw]) == set(losses["torch"])
        for term, value in losses["torch"].items():
            assert losses[fw][term] == pytest.approx(value, rel=1e-4, abs=1e-6), term


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_training_lowers_the_property_loss_and_unknown_targets_carry_no_gradient(framework: str) -> None:
    images, labels, targets = batch()
    model = registry.create("full-simple", framework=framework, seed=4, **TINY)
    trainer = model.backend.trainer(model.native, model.card, TrainSpec(optimizer="adam", learning_rate=3e-3),
                                    Distributed())
    records = with_targets(labels, targets)
    losses = [trainer.train_step(images, records).losses["loss_properties"] for _ in range(20)]
    assert losses[-1] < losses[0] - 0.2
    # every target unknown: the term is 0 and the weights' update comes from the other terms alone
    unknown = with_targets(labels, np.full_like(targets, np.nan))
    assert trainer.eval_step(images, unknown).losses["loss_properties"] == 0.0
    assert math.isfinite(trainer.train_step(images, unknown).losses["loss"])


def test_a_property_card_needs_targets_with_one_column_per_property_column() -> None:
    card = registry.create("full-simple", framework="torch", **TINY).card
    images, labels, targets = batch()
    with pytest.raises(ShapeError, match=r"property heads: a batch needs targets \(4, 7\) for time_since_peri"):
        check_batch(card, images, labels)
    with pytest.raises(ShapeError, match=r"got shape \(4, 3\)"):
        check_batch(card, images, with_targets(labels, targets[:, :3]))
    _, got_labels, got_targets = check_batch(card, images, with_targets(labels, targets))
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_array_equal(got_targets, targets)


def test_the_card_option_names_unknown_targets_and_misfit_normalisation() -> None:
    with pytest.raises(DeepGalaxyError, match="unknown: redshift"):
        registry.create("full-simple", properties={"targets": ["mass_ratio", "redshift"]})
    with pytest.raises(ValueError, match=r"normalisation has 1 .* for 3 columns"):
        PropertyHeads(targets=("viewing_direction",), normalisation=((0.0, 1.0),))
    heads = PropertyHeads(targets=("mass_ratio", "viewing_direction"))
    assert heads.columns == ["log10_mass_ratio", "view_x", "view_y", "view_z"]
    assert "properties" in registry.card("full-simple").model_copy(update={"properties": heads}).parts


def test_metrics_are_errors_in_physical_units_with_the_coverage_of_one_sigma() -> None:
    heads = PropertyHeads(targets=("time_since_pericentre", "viewing_direction"),
                          normalisation=((100.0, 50.0), (0.0, 1.0), (0.0, 1.0), (0.0, 1.0)))
    truth = np.array([[-1.0, 1, 0, 0], [0.5, 0, 0, 1], [np.nan, 0, 1, 0]], np.float32)  # normalised
    mean = np.array([[-1.2, 1, 0, 0], [1.5, 0, 1, 1], [0.0, 0, 1, 0]], np.float32)
    sigma = np.array([[0.5, 1, 1, 1], [0.5, 1, 1, 1], [1.0, 1, 1, 1]], np.float32)  # normalised sigmas
    result = StepResult({}, properties=np.concatenate([mean, 2 * np.log(sigma)], axis=1))
    sums = Sums(3, heads)
    sums.add(result, with_targets(np.zeros(3, int), truth))
    metrics = sums.metrics("val")
    # time: errors 0.2 and 1.0 normalised = 10 and 50 Myr; 0.2 <= 0.5 inside, 1.0 > 0.5 outside; row 3 unknown
    assert metrics["val/time_since_pericentre_mae"] == pytest.approx(30.0)
    assert metrics["val/time_since_pericentre_coverage68"] == pytest.approx(0.5)
    # lines of sight: 0 degrees, 45 degrees (predicted (0, 1, 1) for (0, 0, 1)), 0 degrees
    assert metrics["val/viewing_angle_error"] == pytest.approx(15.0)
    assert float(angle_between(mean[1, 1:], truth[1, 1:])) == pytest.approx(45.0)
    assert "val/log10_mass_ratio_mae" not in metrics


def test_recalibration_scales_sigmas_so_that_68_percent_of_the_truth_lies_within_one_sigma() -> None:
    from deepgalaxy.runs.property_targets import ONE_SIGMA, recalibrated

    card = registry.card("full-simple").model_copy(
        update={"properties": PropertyHeads(targets=("mass_ratio", "pericentre"))})
    rng = np.random.default_rng(5)
    truth = rng.normal(size=(4000, 2))
    mean = truth + rng.normal(scale=[[0.5, 2.0]], size=(4000, 2))  # errors of sigma 0.5 and 2
    logvar = np.full_like(mean, 2 * np.log(0.25))  # claimed sigma 0.25: overconfident by 2x and 8x
    truth[::10, 1] = np.nan  # unknown values do not count
    fitted = recalibrated(card, np.concatenate([mean, logvar], axis=1), truth)
    assert fitted.properties is not None
    scale = np.asarray(fitted.properties.sigma_scale)
    np.testing.assert_allclose(scale, [2.0, 8.0], rtol=0.06)
    z = np.abs(truth - mean) / (0.25 * scale)
    inside = [float(np.mean(col[np.isfinite(col)] <= 1)) for col in z.T]
    assert inside == pytest.approx([ONE_SIGMA, ONE_SIGMA], abs=0.002)


def test_setting_a_field_of_the_unset_properties_section_creates_it() -> None:
    from deepgalaxy.core.specs import with_overrides

    card = with_overrides(registry.card("full-simple"), {"properties.targets": ["pericentre"]})
    assert card.properties == PropertyHeads(targets=("pericentre",))
    with pytest.raises(KeyError, match="'head_pool' is not a section"):
        with_overrides(card, {"head_pool.x": 1})
