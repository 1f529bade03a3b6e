"""deepgalaxy.core and the CLI's light commands must not import a deep-learning framework."""

import subprocess
import sys

import pytest

FRAMEWORKS = ("torch", "tensorflow", "keras", "horovod")
PROBE = """
import sys
{body}
bad = sorted({{m.split('.')[0] for m in sys.modules}} & set({frameworks!r}))
print("IMPORTED:" + ",".join(bad))
"""


def _imported(body: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(body=body, frameworks=FRAMEWORKS)],
                         capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("IMPORTED:"))
    return [m for m in line.removeprefix("IMPORTED:").split(",") if m]


def test_core_imports_no_framework() -> None:
    body = "import deepgalaxy.core, deepgalaxy.core.plugins, deepgalaxy.core.model, deepgalaxy.core.interfaces"
    assert _imported(body + "\nimport pkgutil, importlib, deepgalaxy.core as c\n"
                     "[importlib.import_module('deepgalaxy.core.' + m.name) for m in pkgutil.iter_modules(c.__path__)]"
                     ) == []


@pytest.mark.parametrize("args", [["--help"], ["plugins"], ["models"], ["models", "show", "vae-b4"]])
def test_light_cli_commands_import_no_framework(args: list[str]) -> None:
    body = ("from deepgalaxy.cli import app\nfrom deepgalaxy.cli.common import run_cli\n"
            f"rc = run_cli(app, {args!r})\nassert rc in (0, None), rc")
    assert _imported(body) == []


def test_framework_probe_can_fail() -> None:
    """The probe itself notices a framework import (so the tests above are able to fail)."""
    pytest.importorskip("torch")
    assert _imported("import torch") == ["torch"]
