"""The ``deepgalaxy`` command: thin; parses arguments and calls core, registry and runs.

Each command group lives in its own module and is added to :data:`app` here. Heavy imports (torch,
tensorflow, mlflow) happen inside commands, never at import time, so ``deepgalaxy --help`` stays fast.
"""

from __future__ import annotations

import sys

import typer

from deepgalaxy.cli import data, models, plugins
from deepgalaxy.cli.common import app, console, run_cli

app.add_typer(models.app, name="models")
app.add_typer(data.app, name="data")
app.command("plugins")(plugins.plugins)
from deepgalaxy.cli import demo, latent, predict, scale, serve, server, train, tune, versions  # noqa: E402, F401  (they register their commands)


def main() -> None:
    """Console-script entry point."""
    sys.exit(run_cli(app))


__all__ = ["app", "console", "main", "typer"]
