"""torch and tensorflow build the same architecture: parametrised over the registry, every card both frameworks
support gives identical output shapes for the same input and identical parameter counts, part by part.

Parts do not depend on the task (a ``vae`` card's decoder is the ``full`` card's decoder), so each backbone is
built once per framework as the card's ``full`` variant and every card's own parts are compared on it;
``test_each_task_builds_exactly_its_parts`` checks that shortcut on real task cards.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import numpy as np
import pytest

from deepgalaxy import registry
from deepgalaxy.core.plugins import get_plugin_manager
from deepgalaxy.core.specs import ModelSpec, with_overrides

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torch", "tensorflow")), reason="needs torch and tensorflow"
)

FRAMEWORKS = ("torch", "tensorflow")
HEAVY = {"efficientnet-b5", "efficientnet-b6", "efficientnet-b7"}
SIZE = 32  # every built-in reduction (16, 32) divides it; feature maps 1x1 or 2x2


def _both_support(card: ModelSpec) -> bool:
    backbone = get_plugin_manager().backbones.get(card.backbone.name)
    return backbone is not None and all(fw in backbone.factories for fw in FRAMEWORKS)


CARDS = sorted((c for c in (registry.card(n) for n in registry.list_models()) if _both_support(c)),
               key=lambda c: (c.backbone.name, c.name))  # grouped by backbone, so the build cache is reused


def _small(card: ModelSpec) -> ModelSpec:
    return with_overrides(card, {"input_size": SIZE})


@functools.cache
def _report(framework: str, card_json: str) -> dict[str, Any]:
    """Parameter counts per part and output shapes per inference op of one ``full`` model (the model is freed)."""
    card = ModelSpec.model_validate_json(card_json)
    model = registry.create(card, framework=framework, seed=0)
    fw = registry.get_framework(framework)
    x = np.random.default_rng(0).random((1, SIZE, SIZE, card.channels)).astype(np.float32)
    z = np.zeros((1, card.latent_dim), np.float32)
    return {
        "trainable": {p: model.num_parameters(p) for p in card.parts},
        "all": {p: model.num_parameters(p, trainable=False) for p in card.parts},
        "shapes": {op: fw.infer(model.native, op, inp).shape  # type: ignore[arg-type]
                   for op, inp in [("logits", x), ("encode", x), ("reconstruct", x), ("decode", z)]},
    }


def _full_variant(card: ModelSpec, framework: str) -> dict[str, Any]:
    full = with_overrides(_small(card), {"task": "full", "name": f"parity-{card.backbone.name}", "description": ""})
    return _report(framework, full.model_dump_json())


def test_the_registry_has_cards_for_both_frameworks() -> None:
    names = {c.name for c in CARDS}
    assert {"vae-simple", "classifier-b0", "full-b4", "fcae-r50"} <= names


@pytest.mark.parametrize(
    "card", [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.backbone.name in HEAVY else []) for c in CARDS]
)
def test_same_shapes_and_parameter_counts(card: ModelSpec) -> None:
    reports = {fw: _full_variant(card, fw) for fw in FRAMEWORKS}
    torch_r, tf_r = reports["torch"], reports["tensorflow"]
    for part in card.parts:
        assert torch_r["trainable"][part] == tf_r["trainable"][part], f"{card.name}: trainable parameters of {part}"
        assert torch_r["all"][part] == tf_r["all"][part], f"{card.name}: all weights of {part}"
    needs = {"logits": "head", "encode": "latent", "reconstruct": "decoder", "decode": "latent"}
    for op, part in needs.items():
        if part in card.parts:
            assert torch_r["shapes"][op] == tf_r["shapes"][op], f"{card.name}: {op} output shapes"


@pytest.mark.parametrize("task", ["classifier", "fcae", "vae", "full"])
def test_each_task_builds_exactly_its_parts(task: str) -> None:
    card = with_overrides(registry.card(f"{task}-simple"), {"input_size": 32, "backbone.options.widths": [8, 16]})
    models = {fw: registry.create(card, framework=fw, seed=0) for fw in FRAMEWORKS}
    counts = {fw: m.num_parameters() for fw, m in models.items()}
    assert counts["torch"] == counts["tensorflow"] == sum(models["torch"].num_parameters(p) for p in card.parts)
    assert set(models["tensorflow"].native.parts()) == set(card.parts)
