"""The package's layers only point down: core <- tracking <- registry <- runs <- cli, and plugins depend on core and
their own package only (README "Architecture"). Read from the source with ast, so an import inside a function
counts as much as one at the top of a module."""

from __future__ import annotations

import ast
from collections.abc import Collection, Mapping
from pathlib import Path

import pytest

import deepgalaxy

LAYERS = ("core", "tracking", "registry", "runs", "cli")
"""Lowest first: a module may import its own layer and those before it."""
ENTRY = {"deepgalaxy.__main__"}
"""``python -m deepgalaxy``: above every layer (the package root holds only ``__version__``, below every layer)."""
PLUGIN_SUPPORT = {"deepgalaxy.plugins.backbones", "deepgalaxy.plugins.convert"}
"""Framework-free helpers the built-in plugins share (backbone tables, weight conversion); core-only themselves."""
FRAMEWORKS = ("torch", "tensorflow", "keras", "horovod")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_sources() -> dict[str, str]:
    root = Path(deepgalaxy.__file__).parent
    return {module_name(p, root): p.read_text() for p in sorted(root.rglob("*.py"))}


def imports_of(name: str, source: str, is_package: bool = False) -> set[str]:
    """Every module ``name`` imports (absolute names; ``from a import b`` counts as ``a.b`` and ``a``)."""
    found: set[str] = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def layer_of(module: str) -> str | None:
    """``core`` ... ``cli``, ``plugins:<name>`` for a plugin, ``support`` for plugin support, ``entry``, or None
    for a module outside the package."""
    if module in ENTRY:
        return "entry"
    parts = module.split(".")
    if parts[0] != "deepgalaxy" or len(parts) < 2:  # outside, or the root (it holds only __version__)
        return None
    if parts[1] == "plugins":
        if module in PLUGIN_SUPPORT or any(module.startswith(s + ".") for s in PLUGIN_SUPPORT):
            return "support"
        return "plugins" if len(parts) == 2 else f"plugins:{parts[2]}"
    return parts[1] if parts[1] in LAYERS else None


def allowed(importer: str, imported: str) -> bool:
    """May a module of layer ``importer`` import one of layer ``imported``?"""
    if importer == "entry" or imported == "plugins":  # the namespace package deepgalaxy.plugins itself
        return True
    if importer == "support":
        return imported == "core"
    if importer.startswith("plugins:"):
        return imported in ("core", "support", importer)
    if importer in LAYERS:
        return imported in LAYERS and LAYERS.index(imported) <= LAYERS.index(importer)
    return imported == "core"  # deepgalaxy.plugins itself


def upward_imports(sources: Mapping[str, str], packages: Collection[str] = ()) -> list[str]:
    """``"importer -> imported"`` for every import that points up, or from outside plugins/ into a framework."""
    bad = []
    for name, source in sources.items():
        own = layer_of(name)
        if own is None:
            continue
        for target in sorted(imports_of(name, source, name in packages)):
            if own in LAYERS and target.split(".")[0] in FRAMEWORKS:
                bad.append(f"{name} -> {target} (a framework outside plugins/)")
                continue
            theirs = layer_of(target)
            if theirs is None:
                continue
            if not allowed(own, theirs):
                bad.append(f"{name} -> {target}")
    return bad


def _packages(sources: Mapping[str, str]) -> set[str]:
    root = Path(deepgalaxy.__file__).parent
    return {module_name(p, root) for p in root.rglob("__init__.py")} & set(sources)


def test_layers_only_point_down() -> None:
    sources = package_sources()
    assert upward_imports(sources, _packages(sources)) == []


@pytest.mark.parametrize(("importer", "line"), [
    ("deepgalaxy.registry.store", "from deepgalaxy.runs.training import train"),
    ("deepgalaxy.core.model", "def f():\n    import deepgalaxy.tracking"),
    ("deepgalaxy.tracking.runs", "from deepgalaxy.registry import load"),
    ("deepgalaxy.runs.worker", "from deepgalaxy.plugins.horovod.worker import collective"),
    ("deepgalaxy.runs.scale_worker", "import torch"),
    ("deepgalaxy.plugins.horovod.launcher", "from deepgalaxy.runs import train"),
    ("deepgalaxy.plugins.horovod.worker", "from deepgalaxy.plugins.torch import runtime"),
    ("deepgalaxy.plugins.backbones", "from deepgalaxy.plugins.torch import net"),
    ("deepgalaxy.registry.pyfunc", "from ..cli import app"),
])
def test_an_upward_import_fails(importer: str, line: str) -> None:
    """The check notices each kind of upward import (so the test above is able to fail)."""
    sources = {importer: line}
    assert upward_imports(sources) != []


@pytest.mark.parametrize(("importer", "line"), [
    ("deepgalaxy.cli.train", "from deepgalaxy.runs import train"),
    ("deepgalaxy.runs.scale", "from deepgalaxy.tracking import new_run"),
    ("deepgalaxy.registry.store", "from deepgalaxy.tracking import active_run"),
    ("deepgalaxy.plugins.torch.plugin", "from deepgalaxy.plugins.backbones import builtin_backbones"),
    ("deepgalaxy.plugins.torch.runtime", "import torch\nfrom deepgalaxy.plugins.torch import net"),
    ("deepgalaxy.plugins.local.launcher", "from ...core.collective import LocalCollective"),
])
def test_a_downward_import_passes(importer: str, line: str) -> None:
    assert upward_imports({importer: line}) == []



def test_readme_architecture_matches_the_code() -> None:
    """README "Architecture" names every layer, every core and tracking module and runs/registry module, and
    every file it names exists (so the picture cannot drift from the code)."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Architecture\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    root = Path(deepgalaxy.__file__).parent
    named = set(re.findall(r"\b(\w+)\.py\b", block))
    existing = {p.stem for p in root.rglob("*.py")}
    assert named <= existing, f"README names modules that do not exist: {sorted(named - existing)}"
    for layer in ("core", "tracking", "registry", "runs"):
        modules = {p.stem for p in (root / layer).glob("*.py") if p.stem != "__init__"}
        assert modules <= named, f"README Architecture does not mention {layer}/{sorted(modules - named)}"
    for package in ("core/", "tracking/", "registry/", "runs/", "cli/", "plugins/", "latent/", "local/", "horovod/"):
        assert package in block, package
