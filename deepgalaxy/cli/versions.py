"""``deepgalaxy models versions NAME`` and ``deepgalaxy models promote NAME VERSION --alias A``.

Attached to the ``models`` group of :mod:`deepgalaxy.cli.models`; mlflow is imported only inside the commands.
"""

from __future__ import annotations

import time

import typer
from rich.table import Table

from deepgalaxy.cli.common import console
from deepgalaxy.cli.models import app

TRACKING = typer.Option(None, "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or mlflow.db)")


@app.command("versions")
def versions(name: str = typer.Argument(..., help="registered model (a card name, e.g. vae-b4)"),
             tracking_uri: str = TRACKING) -> None:
    """List the registered versions of NAME: aliases, framework, best validation metrics, run."""
    from deepgalaxy.registry.store import versions as list_versions

    found = list_versions(name, tracking_uri)
    table = Table(title=f"versions of {name} ({len(found)})")
    for column in ("version", "aliases", "created", "framework", "workers", "epochs", "val loss", "val accuracy",
                   "run"):
        table.add_column(column)
    for v in found:
        acc = v.tags.get("val/accuracy", "-")
        table.add_row(str(v.version), ", ".join(v.aliases) or "-",
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(v.created)) if v.created else "-",
                      v.tags.get("framework", "-"), v.tags.get("workers", "-"), v.tags.get("epochs", "-"),
                      v.tags.get("val/loss", "-"), acc, v.run_id or "-")
    console.print(table)


@app.command("promote")
def promote(name: str = typer.Argument(..., help="registered model, e.g. vae-b4"),
            version: int = typer.Argument(..., help="version number to point the alias at"),
            alias: str = typer.Option("champion", "--alias", "-a", help="alias to set (moved if it exists)"),
            tracking_uri: str = TRACKING) -> None:
    """Point ALIAS of NAME at VERSION; load it with registry.load("NAME@ALIAS")."""
    from deepgalaxy.registry.store import promote as set_alias

    v = set_alias(name, version, alias, tracking_uri)
    console.print(f"{name}@{alias} -> version {v.version}; load it with registry.load({f'{name}@{alias}'!r}) "
                  f"or mlflow.pyfunc.load_model('models:/{name}@{alias}')", highlight=False)
