"""The card registry: built-in names, fnmatch listing, close-name suggestions, create() overrides, the public
names (no builtin shadowed; the old spellings warn for one release)."""

import pytest

from deepgalaxy import registry
from deepgalaxy.core.errors import DeepGalaxyError, UnknownNameError
from deepgalaxy.core.specs import BACKBONE_ALIASES, TASKS


def test_every_task_backbone_pair_is_a_card() -> None:
    names = set(registry.list_models())
    expected = {f"{t}-{b}" for t in TASKS for b in BACKBONE_ALIASES}
    assert expected <= names
    assert len(expected) == 48


def test_list_uses_shell_patterns() -> None:
    assert registry.list_models("vae-b[0-2]") == ["vae-b0", "vae-b1", "vae-b2"]
    assert registry.list_models("nothing-*") == []
    assert all(n.startswith("vae-") for n in registry.list_models("vae-*"))


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


def test_list_models_excludes_patterns() -> None:
    """timm's list_models(filter, exclude_filters): one exclude pattern or several."""
    assert registry.list_models("vae-b[0-3]", exclude="*-b[12]") == ["vae-b0", "vae-b3"]
    assert registry.list_models("vae-*", exclude=["*-b*", "*-r*"]) == ["vae-simple"]


def test_no_public_name_shadows_a_builtin() -> None:
    """issue 13 item 4: registry.list shadowed the builtin (hence builtins.list inside the module)."""
    import builtins

    shadowing = [n for n in vars(registry) if not n.startswith("__") and hasattr(builtins, n)]
    assert shadowing == [], shadowing


@pytest.mark.parametrize(("old", "new"), [("list", "list_models"), ("framework", "get_framework")])
def test_old_names_are_deprecated_aliases(old: str, new: str) -> None:
    """The renamed functions keep their old spelling one release, warning with the new one."""
    with pytest.warns(DeprecationWarning, match=rf"registry\.{old} is deprecated.*registry\.{new}"):
        alias = getattr(registry, old)
    assert alias is getattr(registry, new)
    with pytest.warns(DeprecationWarning, match=new):
        exec(f"from deepgalaxy.registry import {old}", {})
    with pytest.raises(AttributeError, match="no_such_name"):
        registry.no_such_name  # noqa: B018


def test_create_puts_overrides_into_the_card() -> None:
    """timm's create_model(name, **kwargs): a keyword sets a field, a dotted key (the --set spelling) a nested one."""
    pytest.importorskip("torch")
    model = registry.create("vae-simple", seed=0, input_size=32, latent_dim=16,
                            **{"backbone.options.widths": [8, 16]})
    assert (model.card.input_size, model.card.latent_dim, model.card.backbone.options) == (32, 16, {"widths": [8, 16]})
    assert model.card.name == "vae-simple" and registry.card("vae-simple").input_size == 128
    assert registry.create("vae-simple", name="renamed", input_size=32).card.name == "renamed"
    assert model.backend is registry.get_framework("torch") and model.framework == "torch"


@pytest.mark.parametrize(("overrides", "named"), [
    ({"input_size": 8}, "input_size"), ({"bogus": 1}, "bogus"), ({"latent_dim.x": 1}, "latent_dim"),
])
def test_create_names_a_wrong_override(overrides: dict[str, object], named: str) -> None:
    with pytest.raises(DeepGalaxyError, match=rf"create\('vae-simple'\).*{named}"):
        registry.create("vae-simple", **overrides)
