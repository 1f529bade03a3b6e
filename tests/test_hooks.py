"""Every hookspec has a test and is documented in the README (datasette's test_plugin_hooks_have_tests and
test_plugin_hooks_are_documented): a new hook without either fails the suite.

The per-hook tests register a plugin object that implements the hook, as a third-party package would, and check
that the plugin manager collects what it returns and records which plugin gave it.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from deepgalaxy.core import BackboneInfo, BackboneSpec, ModelSpec, hookimpl, hookspecs
from deepgalaxy.core.interfaces import DatasetSourceInfo, FrameworkInfo, LauncherInfo
from deepgalaxy.core.plugins import PluginManager

TESTS = Path(__file__).parent
README = TESTS.parent / "README.md"


def hook_names() -> list[str]:
    """The hookspecs of :mod:`deepgalaxy.core.hookspecs` (functions marked with ``@hookspec``)."""
    return [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(fn, f"{hookspecs.PROJECT}_spec")]


def test_names_are_read_from_the_hookspecs() -> None:
    assert {"deepgalaxy_backbones", "deepgalaxy_frameworks", "deepgalaxy_model_cards", "deepgalaxy_dataset_sources",
            "deepgalaxy_launchers"} <= set(hook_names())


def _manager(plugin: object) -> PluginManager:
    return PluginManager(load_entry_points=False, extra=[("third-party", plugin)])


def test_hook_deepgalaxy_backbones() -> None:
    class Plugin:
        @hookimpl
        def deepgalaxy_backbones(self) -> list[BackboneInfo]:
            return [BackboneInfo("tiny", factories={"torch": "m:f", "tensorflow": "m:g"}, reduction=4)]

    pm = _manager(Plugin())
    backbone = pm.backbone("tiny")
    assert backbone.plugins == {"torch": "third-party", "tensorflow": "third-party"}
    assert backbone.reduction_for(BackboneSpec(name="tiny")) == 4


def test_hook_deepgalaxy_frameworks() -> None:
    class Plugin:
        @hookimpl
        def deepgalaxy_frameworks(self) -> list[FrameworkInfo]:
            return [FrameworkInfo("jax", loader="m:Jax", requires=("jax",))]

    pm = _manager(Plugin())
    assert pm.frameworks.get("jax").requires == ("jax",)
    assert pm.frameworks.provided("jax").plugin == "third-party"


def test_hook_deepgalaxy_model_cards() -> None:
    class Plugin:
        @hookimpl
        def deepgalaxy_model_cards(self) -> list[ModelSpec]:
            return [ModelSpec(name="fcae-tiny", task="fcae", backbone=BackboneSpec(name="simple"))]

    pm = _manager(Plugin())
    assert pm.cards.get("fcae-tiny").task == "fcae"
    assert pm.cards.provided("fcae-tiny").plugin == "third-party"


def test_hook_deepgalaxy_dataset_sources() -> None:
    class Plugin:
        @hookimpl
        def deepgalaxy_dataset_sources(self) -> list[DatasetSourceInfo]:
            return [DatasetSourceInfo("survey", loader="m:Survey")]

    pm = _manager(Plugin())
    assert pm.dataset_sources.get("survey").loader == "m:Survey"
    assert pm.dataset_sources.provided("survey").plugin == "third-party"


def test_hook_deepgalaxy_launchers() -> None:
    class Plugin:
        @hookimpl
        def deepgalaxy_launchers(self) -> list[LauncherInfo]:
            return [LauncherInfo("slurm", loader="m:Slurm")]

    pm = _manager(Plugin())
    assert pm.launchers.get("slurm").loader == "m:Slurm"
    assert pm.launchers.provided("slurm").plugin == "third-party"


def _test_names() -> set[str]:
    """Names of the test functions in tests/ (read from the source, nothing imported)."""
    names = set()
    for path in TESTS.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_"):
                names.add(node.name)
    return names


@pytest.mark.parametrize("hook", hook_names())
def test_plugin_hooks_have_tests(hook: str) -> None:
    """Every hookspec has a test whose name mentions it (``test_hook_<hook name>``)."""
    assert any(hook in name for name in _test_names()), f"hook {hook} has no test named test_hook_{hook}"


@pytest.mark.parametrize("hook", hook_names())
def test_plugin_hooks_are_documented(hook: str) -> None:
    """Every hookspec is named in the README's plugin section."""
    assert hook in README.read_text(), f"hook {hook} is not documented in README.md"


def test_the_hook_checks_can_fail() -> None:
    """The probes notice a hook without a test or documentation (so the tests above are able to fail)."""
    assert not any("deepgalaxy_no_such_hook" in name for name in _test_names())
    assert "deepgalaxy_no_such_hook" not in README.read_text()
