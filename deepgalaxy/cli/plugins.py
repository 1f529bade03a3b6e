"""``deepgalaxy plugins``: every plugin, where it comes from, what it provides, and any error."""

from __future__ import annotations

import dataclasses
import json

import typer
from rich.table import Table

from deepgalaxy.cli.common import console
from deepgalaxy.core.plugins import KINDS, get_plugin_manager


def plugins(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List plugins: source distribution, module, what each provides, and load errors."""
    pm = get_plugin_manager()
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(s) for s in pm.plugins()], indent=2))
        return
    table = Table(title="deepgalaxy plugins", show_lines=True)
    for column in ("plugin", "from", "provides", "status"):
        table.add_column(column, overflow="fold")
    for status in pm.plugins():
        provides = "\n".join(
            f"{kind.replace('_', ' ')}: {_short(names)}" for kind in KINDS if (names := status.provides[kind])
        )
        origin = f"{status.distribution} {status.version}".strip() or "registered in code"
        state = "[green]ok[/green]" if status.loaded and not status.errors else ""
        if status.errors:
            state = "[red]" + "\n".join(status.errors) + "[/red]"
        table.add_row(status.name, f"{origin}\n{status.module}", provides or "-", state)
    console.print(table)
    if pm.allowed is not None:
        console.print(f"allow-list DEEPGALAXY_PLUGINS={','.join(sorted(pm.allowed))}")


def _short(names: list[str], limit: int = 12) -> str:
    return ", ".join(names) if len(names) <= limit else ", ".join(names[:limit]) + f", ... ({len(names)} in all)"
