"""Shared CLI pieces: the root app, the console, a default-subcommand group, friendly errors."""

from __future__ import annotations

import sys
from typing import Any

import click
import typer
from rich.console import Console

from deepgalaxy import __version__
from deepgalaxy.core.errors import DeepGalaxyError

# Piped output (files, CI logs) gets a wide console instead of rich's 80 columns, so tables stay readable.
console = Console() if sys.stdout.isatty() else Console(width=160)
err_console = Console(stderr=True)


class DefaultGroup(typer.core.TyperGroup):
    """A group whose first argument runs the ``list`` command unless it names a subcommand.

    ``deepgalaxy models`` and ``deepgalaxy models 'vae-*'`` list cards; ``deepgalaxy models show X`` shows one.
    """

    default_command = "list"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


def _version(value: bool) -> None:
    if value:
        console.print(f"deepgalaxy {__version__}")
        raise typer.Exit()


app = typer.Typer(
    name="deepgalaxy",
    help="Learn the physics of colliding galaxies from images: simulate, train, register, search.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """deepgalaxy: merger-stage classification, latent similarity search and tracked experiments."""


def run_cli(application: typer.Typer, args: list[str] | None = None) -> Any:
    """Run the app; a DeepGalaxyError becomes one red line and exit code 2 instead of a traceback."""
    try:
        return application(args=args, standalone_mode=False)
    except DeepGalaxyError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        err_console.print("aborted")
        return 130
