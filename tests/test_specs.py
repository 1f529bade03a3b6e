"""Specs validate and say which field was wrong and what is allowed."""

import pytest
from pydantic import ValidationError

from deepgalaxy.core.specs import BackboneSpec, DataSpec, ModelSpec, RunSpec, TrainSpec, flatten, with_overrides


def card(**kw):
    return ModelSpec(name="t", task="vae", backbone=BackboneSpec(name="simple"), **kw)


def test_defaults_follow_the_paper() -> None:
    train = TrainSpec()
    assert (train.optimizer, train.learning_rate) == ("adadelta", 8.0)
    c = card()
    assert (c.num_classes, c.latent_dim, c.parts) == (71, 32, ("encoder", "decoder", "latent"))


@pytest.mark.parametrize(
    ("kwargs", "field", "allowed"),
    [
        ({"task": "gan"}, "task", ["classifier", "fcae", "vae", "full"]),
        ({"latent_dim": 64}, "latent_dim", ["16", "32"]),
        ({"head_pool": "max"}, "head_pool", ["flatten", "avg"]),
    ],
)
def test_model_spec_errors_name_field_and_allowed_values(kwargs, field, allowed) -> None:
    base = {"name": "t", "task": "vae", "backbone": {"name": "simple"}}
    with pytest.raises(ValidationError) as err:
        ModelSpec.model_validate({**base, **kwargs})
    text = str(err.value)
    assert field in text
    for value in allowed:
        assert value in text


def test_train_spec_rejects_unknown_optimizer_listing_known() -> None:
    with pytest.raises(ValidationError, match=r"adadelta.*adam"):
        TrainSpec(optimizer="lion")


def test_unknown_fields_are_errors() -> None:
    with pytest.raises(ValidationError, match="lattent_dim"):
        ModelSpec.model_validate({"name": "t", "task": "vae", "backbone": {"name": "simple"}, "lattent_dim": 16})


def test_run_spec_within_k_must_be_below_class_count() -> None:
    with pytest.raises(ValidationError, match="within_k"):
        RunSpec(card=card(num_classes=3), data=DataSpec(path="x.zarr"), train=TrainSpec(within_k=3))


def test_flatten_and_overrides_round_trip() -> None:
    c = card()
    flat = flatten(c, "card.")
    assert flat["card.backbone.name"] == "simple"
    assert flat["card.loss_weights.kl"] == pytest.approx(1e-3)
    changed = with_overrides(c, {"backbone.options.widths": [8, 16], "latent_dim": 16})
    assert changed.backbone.options == {"widths": [8, 16]} and changed.latent_dim == 16
    assert c.latent_dim == 32  # the original is untouched (specs are frozen)
    with pytest.raises(ValidationError, match="latent_dim"):
        with_overrides(c, {"latent_dim": 7})
    with pytest.raises(KeyError, match="task"):
        with_overrides(c, {"task.x": 1})


def test_effective_lr_scales_with_workers_when_asked() -> None:
    assert TrainSpec(learning_rate=2.0).effective_lr(4) == 8.0
    assert TrainSpec(learning_rate=2.0, scale_lr_with_workers=False).effective_lr(4) == 2.0
