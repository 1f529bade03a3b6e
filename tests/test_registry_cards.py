"""The card registry: built-in names, fnmatch listing, close-name suggestions."""

import pytest

from deepgalaxy import registry
from deepgalaxy.core.errors import UnknownNameError
from deepgalaxy.core.specs import BACKBONE_ALIASES, TASKS


def test_every_task_backbone_pair_is_a_card() -> None:
    names = set(registry.list())
    expected = {f"{t}-{b}" for t in TASKS for b in BACKBONE_ALIASES}
    assert expected <= names
    assert len(expected) == 48


def test_list_uses_shell_patterns() -> None:
    assert registry.list("vae-b[0-2]") == ["vae-b0", "vae-b1", "vae-b2"]
    assert registry.list("nothing-*") == []
    assert all(n.startswith("vae-") for n in registry.list("vae-*"))


def test_card_contents() -> None:
    c = registry.card("vae-b4")
    assert (c.task, c.backbone.name, c.latent_dim) == ("vae", "efficientnet-b4", 32)
    assert registry.card("classifier-simple").backbone.name == "simple"
    assert registry.card("full-r50").parts == ("encoder", "decoder", "head", "latent")


def test_unknown_card_suggests_close_names() -> None:
    with pytest.raises(UnknownNameError) as err:
        registry.card("vea-b4")
    assert "vae-b4" in str(err.value)


def test_unknown_backbone_lists_known_ones() -> None:
    bad = registry.card("vae-b4").model_copy(update={"backbone": registry.card("vae-b4").backbone.model_copy(
        update={"name": "efficientnet-b9"})})
    with pytest.raises(UnknownNameError) as err:
        registry.create(bad, framework="torch")
    assert "efficientnet-b9" in str(err.value) and "efficientnet-b7" in str(err.value)
