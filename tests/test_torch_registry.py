"""Every registered card whose backbone has a torch factory: builds small, trains a step, has the documented
shapes, and round-trips its weights bit-exactly through ``Model.save`` / ``registry.load(directory)``.

Parametrised over the registry itself (timm style): a card added by any plugin is tested without being listed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from deepgalaxy import registry  # noqa: E402
from deepgalaxy.core.plugins import get_plugin_manager  # noqa: E402
from deepgalaxy.core.specs import ModelSpec  # noqa: E402
from deepgalaxy.plugins.torch.net import compute_losses  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


BIG = ("efficientnet-b5", "efficientnet-b6", "efficientnet-b7")


def _torch_cards() -> list[object]:
    pm = get_plugin_manager()
    params = []
    for name in registry.list_models():
        backbone = registry.card(name).backbone.name
        if backbone in pm.backbones and "torch" in pm.backbone(backbone).factories:
            marks = [pytest.mark.slow] if backbone in BIG else []
            params.append(pytest.param(name, marks=marks, id=name))
    return params


def small(card: ModelSpec) -> ModelSpec:
    """The card at the smallest size its backbone allows (>= 32 px)."""
    r = registry.reduction(card.backbone)
    return card.model_copy(update={"input_size": max(32, r)})


def test_every_builtin_backbone_has_a_torch_factory() -> None:
    pm = get_plugin_manager()
    expected = ["simple", "resnet18", "resnet34", "resnet50", *(f"efficientnet-b{i}" for i in range(8))]
    for name in expected:
        assert "torch" in pm.backbone(name).factories, name
    assert len(_torch_cards()) >= 4 * len(expected)


@pytest.mark.parametrize("name", _torch_cards())
def test_card_builds_trains_and_round_trips(name: str, tmp_path: Path) -> None:
    card = small(registry.card(name))
    model = registry.create(card, framework="torch", seed=0)
    net = model.native
    s, c, n = card.input_size, card.channels, 2
    r = registry.reduction(card.backbone)
    assert net.reduction == r

    # forward + backward in training mode, documented shapes
    net.train()
    x = torch.rand(n, c, s, s)
    y = torch.tensor([0, card.num_classes - 1])
    out = net(x)
    f = net.encoder.out_channels
    assert out["features"].shape == (n, f, s // r, s // r)
    if "decoder" in card.parts:
        assert out["recon"].shape == (n, c, s, s)
        assert float(out["recon"].detach().min()) >= 0.0 and float(out["recon"].detach().max()) <= 1.0
    if "head" in card.parts:
        assert out["logits"].shape == (n, card.num_classes)
    if "latent" in card.parts:
        assert out["mu"].shape == out["logvar"].shape == (n, card.latent_dim)
        assert out["latent_recon"].shape == out["features"].shape
    losses = compute_losses(card, out, x, y)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    for part in card.parts:
        grads = [p.grad for p in net.part(part).parameters()]
        assert all(g is not None for g in grads), f"{part} has parameters without gradient"
        assert any(float(g.abs().sum()) > 0 for g in grads), f"{part} got only zero gradients"
    for part in ("encoder", "decoder", "head", "latent"):
        if part in card.parts:
            assert model.num_parameters(part) > 0
    assert model.num_parameters() == sum(model.num_parameters(p) for p in card.parts)

    # bit-exact weights round trip, rebuilt from card.json
    model.save(tmp_path / "m")
    loaded = registry.load(tmp_path / "m")
    assert loaded.card == card and loaded.framework == "torch"
    before, after = model.get_weights(), loaded.get_weights()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and np.array_equal(after[key], value), key
    images = np.random.default_rng(0).random((n, s, s, c), dtype=np.float32)
    if "head" in card.parts:
        np.testing.assert_array_equal(model.predict(images).probabilities, loaded.predict(images).probabilities)
    else:
        np.testing.assert_array_equal(model.reconstruct(images), loaded.reconstruct(images))
