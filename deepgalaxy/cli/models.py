"""``deepgalaxy models``: the model cards (and, with MLflow, their trained versions)."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from deepgalaxy import registry
from deepgalaxy.cli.common import DefaultGroup, console
from deepgalaxy.core.plugins import get_plugin_manager

app = typer.Typer(cls=DefaultGroup, help="Model cards and their registered versions.", no_args_is_help=False)


@app.command("list")
def list_cards(pattern: str = typer.Argument("*", help="shell-style pattern, e.g. 'vae-*'")) -> None:
    """List model cards matching PATTERN as a table."""
    pm = get_plugin_manager()
    names = registry.list_models(pattern)
    table = Table(title=f"model cards matching {pattern!r} ({len(names)})")
    for column in ("name", "task", "backbone", "latent", "input", "frameworks", "plugin"):
        table.add_column(column)
    for name in names:
        provided = pm.cards.provided(name)
        card = provided.item
        backbone = pm.backbones.get(card.backbone.name)
        fws = ", ".join(sorted(backbone.factories)) if backbone else "[red]unknown backbone[/red]"
        table.add_row(
            name, card.task, card.backbone.name, str(card.latent_dim) if "latent" in card.parts else "-",
            f"{card.input_size}x{card.input_size}x{card.channels}", fws, provided.plugin,
        )
    console.print(table)


@app.command("show")
def show(name: str) -> None:
    """Print the full card NAME as JSON."""
    card = registry.card(name)
    console.print_json(json.dumps(card.model_dump(mode="json")))
