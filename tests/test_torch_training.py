"""The torch trainer and inference: documented shapes, FCAE at two resolutions, the KL term, exact resume from a
checkpoint, NaN steps, gradient clipping, bf16, weights errors, and a short training whose loss falls."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from deepgalaxy import registry  # noqa: E402
from deepgalaxy.core.errors import ShapeError, TrainingError, WeightsMismatchError  # noqa: E402
from deepgalaxy.core.interfaces import LOSS_TERMS, Distributed  # noqa: E402
from deepgalaxy.core.model import Model  # noqa: E402
from deepgalaxy.core.specs import OPTIMIZERS, BackboneSpec, LossWeights, ModelSpec, TrainSpec  # noqa: E402
from deepgalaxy.plugins.torch.trainer import TorchTrainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = BackboneSpec(name="simple", options={"widths": [8, 16]})  # reduction 4


FULL_TERMS = set(LOSS_TERMS) - {"loss_domain", "loss_properties"}  # those two only with their card options
"""A full card's terms (``loss_domain`` only with ``card.domain_adaptation``)."""


def tiny_card(task: str = "full", **update: object) -> ModelSpec:
    card = ModelSpec(name=f"tiny-{task}", task=task, backbone=TINY, input_size=16, head_hidden=(16,),  # type: ignore[arg-type]
                     latent_dim=16, latent_channels=4, decoder_channels=(16, 8))
    return card.model_copy(update=update)


def images(n: int, size: int = 16, channels: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, size, size, channels), dtype=np.float32)


def trainer_for(model: Model, **train: object) -> TorchTrainer:
    return model.backend.trainer(model.native, model.card, TrainSpec(**train), Distributed())  # type: ignore[arg-type]


def test_inference_methods_have_documented_shapes() -> None:
    model = registry.create(tiny_card(), framework="torch", seed=0)
    assert model.framework == "torch" and isinstance(model.native, torch.nn.Module)
    x = images(5)
    pred = model.predict(x, batch_size=2)
    assert pred.probabilities.shape == (5, 71) and pred.top1.shape == pred.expected_class.shape == (5,)
    np.testing.assert_allclose(pred.probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert ((pred.expected_class >= 0) & (pred.expected_class <= 70)).all()
    z = model.encode(x, batch_size=3)
    assert z.shape == (5, 16) and z.dtype == np.float32
    rec = model.reconstruct(x)
    assert rec.shape == x.shape and rec.min() >= 0 and rec.max() <= 1
    assert model.decode(z).shape == x.shape
    # batching does not change results (eval mode, z = mu)
    np.testing.assert_allclose(model.encode(x, batch_size=5), z, rtol=1e-5, atol=1e-6)
    assert model.reconstruct((x * 255).astype(np.uint8)).shape == x.shape
    with pytest.raises(ShapeError, match="expects 16x16"):
        model.predict(images(2, size=32))


def test_parameter_counts_per_part() -> None:
    model = registry.create(tiny_card(), framework="torch")
    parts = {p: model.num_parameters(p) for p in ("encoder", "decoder", "head", "latent")}
    assert sum(parts.values()) == model.num_parameters()
    # head: flatten 4x4x16 -> 16 -> 71
    assert parts["head"] == (4 * 4 * 16 * 16 + 16) + (16 * 71 + 71)
    # latent: 1x1 conv 16->4, mu/logvar 64->16 each, expand 16->64, 1x1 conv 4->16
    assert parts["latent"] == (16 * 4 + 4) + 2 * (64 * 16 + 16) + (16 * 64 + 64) + (4 * 16 + 16)
    # non-trainable included: BN running mean and var
    bn_channels = 8 + 8 + 16 + 16
    assert model.num_parameters("encoder", trainable=False) == parts["encoder"] + 2 * bn_channels
    avg = registry.create(tiny_card(head_pool="avg"), framework="torch")
    assert avg.num_parameters("head") == (16 * 16 + 16) + (16 * 71 + 71)
    with pytest.raises(ValueError, match="has no 'head'"):
        registry.create(tiny_card("fcae"), framework="torch").num_parameters("head")


def test_fcae_reconstructs_at_two_resolutions_with_the_same_weights() -> None:
    model = registry.create(tiny_card("fcae"), framework="torch", seed=1)
    before = model.get_weights()
    small, large = model.reconstruct(images(2, 16)), model.reconstruct(images(2, 48))
    assert small.shape == (2, 16, 16, 1) and large.shape == (2, 48, 48, 1)
    after = model.get_weights()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    with pytest.raises(ShapeError, match="divisible by 4"):
        model.reconstruct(images(1, 18))


def test_head_flattens_in_nhwc_order() -> None:
    """The first dense layer sees M flattened as (h, w, c) - the order Keras' Flatten uses."""
    model = registry.create(tiny_card("classifier"), framework="torch", seed=0)
    head = model.native.head.eval()
    m = torch.rand(1, 16, 4, 4)
    x = m.permute(0, 2, 3, 1).reshape(1, -1)
    expected = head.out(torch.relu(head.hidden[0](x)))
    torch.testing.assert_close(head(m), expected)


def test_kl_term_is_in_the_vae_loss() -> None:
    """Same weights, same noise: the totals differ by exactly the weighted KL."""
    results = {}
    for w in (0.0, 0.5):
        card = tiny_card("vae", loss_weights=LossWeights(kl=w))
        model = registry.create(card, framework="torch", seed=3)
        results[w] = trainer_for(model, optimizer="adam", learning_rate=1e-3, seed=7).train_step(images(4), np.zeros(4))
    r0, r5 = results[0.0].losses, results[0.5].losses
    assert set(r0) == {"loss", "loss_reconstruction", "loss_latent", "loss_kl"} <= set(LOSS_TERMS)
    assert r0["loss_kl"] == r5["loss_kl"] > 0
    assert r5["loss"] - r0["loss"] == pytest.approx(0.5 * r0["loss_kl"], rel=1e-5)
    assert r0["loss"] == pytest.approx(r0["loss_reconstruction"] + r0["loss_latent"], rel=1e-6)
    assert results[0.0].recon_mse == r0["loss_reconstruction"] and results[0.0].predicted is None


def test_full_step_reports_every_term_and_predictions() -> None:
    model = registry.create(tiny_card(), framework="torch", seed=0)
    result = trainer_for(model).train_step(images(4), np.array([0, 1, 2, 70]))
    assert set(result.losses) == FULL_TERMS
    assert result.predicted is not None and result.predicted.shape == (4,) and result.predicted.dtype == np.int64
    w = model.card.loss_weights
    total = (w.classifier * result.losses["loss_classifier"] + w.reconstruction * result.losses["loss_reconstruction"]
             + w.latent * result.losses["loss_latent"] + w.kl * result.losses["loss_kl"])
    assert result.losses["loss"] == pytest.approx(total, rel=1e-5)
    assert trainer_for(model).learning_rate == 8.0  # the paper's Adadelta default


@pytest.mark.parametrize("optimizer", ["adadelta", "adam"])
def test_resume_from_checkpoint_equals_uninterrupted_run(optimizer: str, tmp_path: Path) -> None:
    card = tiny_card()
    x, y = images(4), np.array([3, 1, 4, 1])
    lr = 1.0 if optimizer == "adadelta" else 1e-3

    straight = registry.create(card, framework="torch", seed=0)
    t1 = trainer_for(straight, optimizer=optimizer, learning_rate=lr, seed=5)
    for _ in range(2):
        t1.train_step(x, y)
    t1.save_checkpoint(tmp_path / "ckpt")
    expected = t1.train_step(x, y)  # dropout + VAE noise drawn from the RNG state saved above

    resumed = registry.create(card, framework="torch", seed=99)  # different initial weights
    t2 = trainer_for(resumed, optimizer=optimizer, learning_rate=lr, seed=123)
    t2.load_checkpoint(tmp_path / "ckpt")
    assert t2.step == 2
    got = t2.train_step(x, y)
    assert got.losses == expected.losses
    w1, w2 = straight.get_weights(), resumed.get_weights()
    assert all(np.array_equal(w1[k], w2[k]) for k in w1)
    names = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert names == {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer.json"}
    assert json.loads((tmp_path / "ckpt" / "trainer.json").read_text())["step"] == 2


def test_checkpoint_errors_name_the_problem(tmp_path: Path) -> None:
    model = registry.create(tiny_card(), framework="torch", seed=0)
    with pytest.raises(TrainingError, match="no torch checkpoint"):
        trainer_for(model).load_checkpoint(tmp_path / "nothing")
    t = trainer_for(model, optimizer="adam", learning_rate=1e-3)
    t.train_step(images(2), np.zeros(2))
    t.save_checkpoint(tmp_path / "c")
    with pytest.raises(TrainingError, match=r"optimizer 'adam'.*'sgd'"):
        trainer_for(model, optimizer="sgd", learning_rate=0.1).load_checkpoint(tmp_path / "c")


def test_non_finite_loss_does_not_update_weights() -> None:
    model = registry.create(tiny_card(), framework="torch", seed=0)
    t = trainer_for(model)
    before = model.get_weights()
    x = images(2)
    x[0, 0, 0, 0] = np.nan
    result = t.train_step(x, np.zeros(2))
    assert np.isnan(result.losses["loss"])
    after = model.get_weights()
    assert all(np.array_equal(before[k], after[k], equal_nan=True) for k in before if "running" not in k)


def test_gradient_clipping_bounds_the_update() -> None:
    model = registry.create(tiny_card("classifier"), framework="torch", seed=0)
    t = trainer_for(model, optimizer="sgd", learning_rate=1.0, grad_clip=1e-3)
    before = {n: p.detach().clone() for n, p in model.native.named_parameters()}
    t.train_step(images(4), np.array([0, 5, 9, 70]))
    delta = torch.cat([(p.detach() - before[n]).flatten() for n, p in model.native.named_parameters()])
    assert float(delta.norm()) == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_steps(optimizer: str) -> None:
    model = registry.create(tiny_card("fcae"), framework="torch", seed=0)
    before = model.get_weights()
    result = trainer_for(model, optimizer=optimizer, learning_rate=1e-2).train_step(images(2), np.zeros(2))
    assert np.isfinite(result.losses["loss"])
    after = model.get_weights()
    assert any(not np.array_equal(before[k], after[k]) for k in before)


def test_bf16_training_and_inference() -> None:
    model = registry.create(tiny_card(), framework="torch", seed=0)
    x = images(4)
    fp32 = model.reconstruct(x)
    bf16 = model.reconstruct(x, precision="bf16")
    assert bf16.dtype == np.float32 and np.abs(bf16 - fp32).max() < 0.05
    assert model.encode(x, precision="bf16").shape == (4, 16)
    result = trainer_for(model, precision="bf16", optimizer="adam", learning_rate=1e-3).train_step(x, np.zeros(4))
    assert all(np.isfinite(v) for v in result.losses.values())
    assert next(model.native.parameters()).dtype == torch.float32


def test_eval_step_is_deterministic_and_does_not_train() -> None:
    model = registry.create(tiny_card(), framework="torch", seed=0)
    t = trainer_for(model)
    before = model.get_weights()
    a, b = t.eval_step(images(3), np.zeros(3)), t.eval_step(images(3), np.zeros(3))
    assert a.losses == b.losses
    after = model.get_weights()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_training_images_with_wrong_channels_fail_clearly() -> None:
    t = trainer_for(registry.create(tiny_card(), framework="torch"))
    with pytest.raises(ShapeError, match=r"\(N, H, W, 1\)"):
        t.train_step(images(2, channels=3), np.zeros(2))


def test_set_weights_names_missing_and_misshapen(tmp_path: Path) -> None:
    model = registry.create(tiny_card(), framework="torch")
    weights = model.get_weights()
    weights.pop("head.out.bias")
    weights["decoder.out.weight"] = np.zeros((1, 1, 3, 3), np.float32)
    with pytest.raises(WeightsMismatchError, match=r"missing 1 \(head.out.bias\).*decoder.out.weight"):
        model.backend.set_weights(model.native, weights)
    other = registry.create(tiny_card(latent_dim=32), framework="torch")
    other.save(tmp_path / "other")
    with pytest.raises(WeightsMismatchError, match=r"latent\.mu\.weight"):
        model.load_weights(tmp_path / "other" / "weights.safetensors")
    assert "num_batches_tracked" not in " ".join(weights)


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = registry.create(tiny_card(), framework="torch", seed=11).get_weights()
    assert torch.equal(torch.get_rng_state(), state)
    b = registry.create(tiny_card(), framework="torch", seed=11).get_weights()
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_loss_falls_on_a_tiny_simulated_dataset(tmp_path: Path) -> None:
    from deepgalaxy.core.dataset import open_dataset
    from deepgalaxy.plugins.simulation.source import simulate

    store = simulate(tmp_path / "tiny.zarr", progress=False, workers=1, sims=2, particles=400, size=32, cameras=2,
                     snapshots=8)
    data = open_dataset(store)
    card = tiny_card(input_size=32)
    model = registry.create(card, framework="torch", seed=0)
    t = trainer_for(model, optimizer="adam", learning_rate=2e-3, seed=0)
    first, last = [], []
    for epoch in range(8):
        losses = [t.train_step(x, y).losses["loss"] for x, y in data.batches(8, epoch=epoch)]
        (first if epoch == 0 else last).append(np.mean(losses))
    print('mean loss per epoch', first + last)
    assert last[-1] < 0.7 * first[0], (first, last)
