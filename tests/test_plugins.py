"""Plugins: a third-party package really plugs in; broken plugins are isolated; clashes and allow-lists."""

from __future__ import annotations

import json
import re
import shutil
import textwrap
from pathlib import Path

import pytest

from deepgalaxy.core import BackboneInfo, BackboneSpec, ModelSpec, hookimpl
from deepgalaxy.core.errors import PluginError
from deepgalaxy.core.plugins import PluginManager
from tests.conftest import REPO, run_cli

EXAMPLE = REPO / "examples" / "deepgalaxy-tinycnn"


def make_package(root: Path, name: str, module_source: str, entry_points: dict[str, str]) -> Path:
    """Write a minimal pip-installable package with entry points in group ``deepgalaxy``."""
    pkg = root / name
    pkg.mkdir(parents=True)
    module = name.replace("-", "_")
    eps = "\n".join(f'{k} = "{v}"' for k, v in entry_points.items())
    (pkg / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=69"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{name}"
        version = "0.0.1"
        [project.entry-points.deepgalaxy]
        """) + eps + f'\n[tool.setuptools]\npy-modules = ["{module}"]\n')
    (pkg / f"{module}.py").write_text(textwrap.dedent(module_source))
    return pkg


def readme_plugin_files() -> dict[str, str]:
    """The files the README's "Write a backbone plugin" section shows: a line ```name`:`` then a fenced block."""
    readme = (REPO / "README.md").read_text()
    section = readme.partition("\n## Write a backbone plugin\n")[2].partition("\n## ")[0]
    blocks = re.finditer(r"^`(?P<name>[^`\n]+)`:\n\n```[a-z]*\n(?P<text>.*?)^```$", section, re.MULTILINE | re.DOTALL)
    return {block["name"]: block["text"] for block in blocks}


def test_readme_plugin_example_is_the_tested_package() -> None:
    """The README's 'write a backbone plugin' section shows exactly the files this test module installs."""
    readme = (REPO / "README.md").read_text()
    for name in ("pyproject.toml", "deepgalaxy_tinycnn.py"):
        assert (EXAMPLE / name).read_text().strip() in readme, f"README is out of date with examples/{name}"
    files = {path.name: path.read_text() for path in sorted(EXAMPLE.iterdir()) if path.is_file()}
    assert readme_plugin_files() == files, "the README's plugin section must show every file of the example, verbatim"


@pytest.mark.slow
def test_third_party_plugin_plugs_in(tmp_path, install_package) -> None:
    shutil.copytree(EXAMPLE, tmp_path / "pkg")
    env = install_package(tmp_path / "pkg")

    plugins = run_cli("plugins", env=env)
    assert plugins.returncode == 0, plugins.stderr
    assert "tinycnn" in plugins.stdout and "deepgalaxy-tinycnn" in plugins.stdout
    assert "classifier-tinycnn" in plugins.stdout

    models = run_cli("models", "*tinycnn", env=env)
    assert models.returncode == 0, models.stderr
    assert "classifier-tinycnn" in models.stdout and "tinycnn" in models.stdout

    shown = run_cli("models", "show", "classifier-tinycnn", env=env)
    assert json.loads(shown.stdout)["backbone"]["name"] == "tinycnn"

    # Through the registry: the card builds and predicts with the plugin's torch backbone.
    pytest.importorskip("torch")
    probe = run_cli_python(
        "from deepgalaxy import registry; import numpy as np\n"
        "m = registry.create('classifier-tinycnn', framework='torch', seed=0)\n"
        "p = m.predict(np.zeros((2, 32, 32, 1), np.uint8))\n"
        "print(p.probabilities.shape, m.num_parameters('encoder'))",
        env,
    )
    assert probe.strip().splitlines()[-1] == "(2, 71) 1248"  # 8*(1*9+1) + 16*(8*9+1) conv parameters


CROSS_FRAMEWORK = """\
import numpy as np, torch
from deepgalaxy import registry
from deepgalaxy.core.interfaces import Distributed
from deepgalaxy.core.specs import TrainSpec

out = {out!r}
x = np.random.default_rng(0).random((4, 32, 32, 1), dtype=np.float32)
trained = registry.create("classifier-tinycnn", framework="tensorflow", seed=0)
trainer = registry.get_framework("tensorflow").trainer(
    trained.native, trained.card, TrainSpec(optimizer="adam", learning_rate=1e-2), Distributed())
for _ in range(2):
    trainer.train_step(x, np.array([0, 1, 2, 3]))
trained.save(out + "/tf")
loaded = registry.load(out + "/tf", framework="torch")
with torch.no_grad():
    m_torch = loaded.native.encoder(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
m_keras = np.asarray(trained.native.encoder(x, training=False))
scale = float(np.abs(m_keras).max())
print("features", m_torch.shape, float(np.abs(m_torch - m_keras).max()) / scale < 1e-5, scale > 0)
probabilities = loaded.predict(x).probabilities, trained.predict(x).probabilities
print("probabilities", probabilities[0].shape, np.allclose(*probabilities, rtol=1e-4, atol=1e-7))
loaded.save(out + "/torch")
back = registry.load(out + "/torch", framework="tensorflow").get_weights()
print("back", all(np.array_equal(back[k], v) for k, v in trained.get_weights().items()))
"""


@pytest.mark.slow
def test_example_plugin_trained_in_tensorflow_loads_in_torch(tmp_path, install_package) -> None:
    """The README's example backbone (a torch and a Keras factory whose layers are named differently) trained in
    TensorFlow, saved, and loaded in torch: the same feature maps and predictions, and back bit-exactly."""
    pytest.importorskip("torch")
    pytest.importorskip("tensorflow")
    shutil.copytree(EXAMPLE, tmp_path / "pkg")
    env = install_package(tmp_path / "pkg")
    code = CROSS_FRAMEWORK.format(out=str(tmp_path))
    lines = run_cli_python(code, env).strip().splitlines()[-3:]
    assert lines == ["features (4, 8, 8, 16) True True", "probabilities (4, 71) True", "back True"]


def run_cli_python(code: str, env: dict[str, str]) -> str:
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
def test_broken_plugins_are_reported_and_do_not_take_others_down(tmp_path, install_package) -> None:
    pkg = make_package(tmp_path, "deepgalaxy-broken", """\
        from deepgalaxy.core import hookimpl
        raise RuntimeError("this plugin is broken on purpose")
        """, {"broken-import": "deepgalaxy_broken"})
    env = install_package(pkg)
    pkg2 = make_package(tmp_path, "deepgalaxy-raises", """\
        from deepgalaxy.core import hookimpl

        @hookimpl
        def deepgalaxy_model_cards():
            raise ValueError("cards are not ready")
        """, {"raises-in-hook": "deepgalaxy_raises"})
    env = install_package(pkg2)

    out = run_cli("plugins", "--json", env=env)
    assert out.returncode == 0, out.stderr
    status = {p["name"]: p for p in json.loads(out.stdout)}
    assert not status["broken-import"]["loaded"]
    assert "this plugin is broken on purpose" in status["broken-import"]["errors"][0]
    assert "cards are not ready" in status["raises-in-hook"]["errors"][0]
    assert status["cards"]["errors"] == [] and "vae-b4" in status["cards"]["provides"]["model_cards"]
    table = run_cli("plugins", env=env)  # the human table names them too
    assert table.returncode == 0 and "broken-import" in table.stdout and "raises-in-hook" in table.stdout
    models = run_cli("models", "vae-b4", env=env)
    assert models.returncode == 0 and "vae-b4" in models.stdout


class _Cards:
    def __init__(self, *names: str) -> None:
        self.names = names

    @hookimpl
    def deepgalaxy_model_cards(self) -> list[ModelSpec]:
        return [ModelSpec(name=n, task="fcae", backbone=BackboneSpec(name="simple")) for n in self.names]


def test_name_clash_is_an_error_naming_both_plugins() -> None:
    pm = PluginManager(load_entry_points=False, extra=[("first", _Cards("fcae-x", "fcae-y")),
                                                        ("second", _Cards("fcae-x"))])
    assert pm.cards.get("fcae-y").name == "fcae-y"  # the rest keeps working
    with pytest.raises(PluginError) as err:
        pm.cards.get("fcae-x")
    assert "first" in str(err.value) and "second" in str(err.value)
    assert any("first" in e and "second" in e for e in pm.status["second"].errors)


def test_backbone_factories_merge_per_framework_and_clash_per_framework() -> None:
    class Torchy:
        @hookimpl
        def deepgalaxy_backbones(self):
            return [BackboneInfo("b", factories={"torch": "m:f"})]

    class Tfy:
        @hookimpl
        def deepgalaxy_backbones(self):
            return [BackboneInfo("b", factories={"tensorflow": "m:g"})]

    pm = PluginManager(load_entry_points=False, extra=[("t", Torchy()), ("k", Tfy()), ("t2", Torchy())])
    backbone = pm.backbone("b")
    assert backbone.plugins == {"torch": "t", "tensorflow": "k"}
    assert any("'t'" in e and "'t2'" in e for e in pm.status["t2"].errors)


def test_hook_returning_garbage_is_reported() -> None:
    class Garbage:
        @hookimpl
        def deepgalaxy_model_cards(self):
            return ["not a card"]

    pm = PluginManager(load_entry_points=False, extra=[("garbage", Garbage())])
    assert pm.cards.names() == []
    assert "not a ModelSpec" in pm.status["garbage"].errors[0]


def test_allow_list_environment_variable(monkeypatch) -> None:
    monkeypatch.setenv("DEEPGALAXY_PLUGINS", "cards,local")
    pm = PluginManager()
    assert set(pm.status) == {"cards", "local"}
    assert "vae-b4" in pm.cards and pm.launchers.provided("local").plugin == "local"
    assert pm.frameworks.names() == []


def test_provenance_of_builtins() -> None:
    pm = PluginManager()
    assert pm.cards.provided("vae-b4").plugin == "cards"
    assert pm.status["cards"].distribution == "deepgalaxy"
