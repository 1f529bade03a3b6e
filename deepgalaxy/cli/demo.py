"""``deepgalaxy demo``: the README walk-through in one command.

Simulates a small merger dataset, trains a small card for a couple of epochs (tracked in MLflow, registered as a
model version), loads it back with ``registry.load``, predicts merger stages of a few validation images and finds
the images nearest to one of them in latent space. Runs in
a few minutes on 2 cores; everything lands in the working directory (``mlflow.db``, ``mlruns/``, the dataset).
"""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from deepgalaxy.cli.common import app, console

DEMO_CARD = "full-simple"
"""Autoencoder + classifier + VAE over the plain conv stack: predict, encode, reconstruct and decode all work."""


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("deepgalaxy-demo"), "--out", help="folder for the dataset and the runs"),
    framework: str = typer.Option("torch", "--framework", "-f", help="torch or tensorflow"),
    epochs: int = typer.Option(2, "--epochs", min=1),
    sims: int = typer.Option(6, "--sims", min=2, help="simulated mergers (x cameras x snapshots images)"),
    size: int = typer.Option(64, "--size", min=32, help="image side in pixels"),
    workers: int = typer.Option(1, "--workers", "-n", min=1, help="training ranks (>1 needs Horovod)"),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow store (default: mlflow.db here)"),
) -> None:
    """Simulate a small dataset, train a small card, register it, load it back, predict and search."""
    import numpy as np

    from deepgalaxy import registry
    from deepgalaxy.cli.data import _source
    from deepgalaxy.core.dataset import open_dataset
    from deepgalaxy.core.specs import DataSpec
    from deepgalaxy.runs.latent import build_index, search
    from deepgalaxy.runs.training import train

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"mergers-{size}px.zarr"
    console.rule("1. simulate")
    _source("simulation").create(data, sims=sims, particles=1500, size=size, cameras=4, snapshots=12, seed=0)
    ds = open_dataset(data)
    console.print(f"{data}: {len(ds)} images of {ds.image_shape}, {sims} mergers x 4 cameras x 12 snapshots "
                  f"(labels: 71 merger-stage classes)", highlight=False)

    console.rule(f"2. train {DEMO_CARD} ({framework}, {epochs} epochs)")
    widths = [16, 32, 64] if size >= 64 else [8, 16]
    overrides = {
        "card.input_size": size, "card.backbone.options.widths": widths, "card.decoder_channels": [64, 32, 16],
        "card.head_hidden": [64], "train.batch_size": 16, "train.learning_rate": 1.0, "train.epochs": epochs,
    }
    result = train(DEMO_CARD, data, framework=framework, workers=workers, overrides=overrides,
                   tracking_uri=tracking_uri, run_dir=None)
    console.print(result.summary(), highlight=False, soft_wrap=True)

    console.rule("3. load the registered model and predict")
    model = registry.load(DEMO_CARD, tracking_uri=result.tracking_uri)
    _, val = ds.split(DataSpec.model_fields["split"].default, 0.2, 0)
    positions = np.linspace(0, len(val) - 1, num=min(6, len(val))).astype(int)
    images = val.images(positions)
    labels = val.labels[positions]
    pred = model.predict(images)
    z = model.encode(images)
    table = Table(title=f"registry.load({DEMO_CARD!r}) -> version {model.source.get('version')} "
                        f"({model.framework}); predictions on validation images")
    for column in ("image", "true class", "predicted", "p(predicted)", "expected class", "|z|"):
        table.add_column(column, justify="right")
    for i, pos in enumerate(positions):
        top = int(pred.top1[i])
        table.add_row(str(int(val.indices[pos])), str(int(labels[i])), str(top),
                      f"{pred.probabilities[i, top]:.3f}", f"{pred.expected_class[i]:.1f}",
                      f"{float(np.linalg.norm(z[i])):.2f}")
    console.print(table)
    console.print(f"latent vectors: {z.shape}; reconstructions: {model.reconstruct(images[:2]).shape}",
                  highlight=False)

    console.rule("4. search: images most similar in latent space")
    built = build_index(model, data, progress=False)
    query = int(val.indices[positions[len(positions) // 2]])
    found = search(model, data, rows=[query], k=5, index=built.index).queries[0]
    table = Table(title=f"the 5 nearest neighbours of image {query} (class {found.meta.get('label')}) by distance in z")
    for column in ("image", "distance", "SSIM to query", "class", "camera", "simulation"):
        table.add_column(column, justify="right")
    for nb in found.neighbours:
        table.add_row(str(nb.row), f"{nb.distance:.3f}", f"{nb.ssim:.3f}", str(nb.meta.get("label")),
                      str(nb.meta.get("camera")), str(nb.meta.get("sim_id")))
    console.print(table)
    console.print(f"index: {built.path}", highlight=False)

    console.rule("done")
    console.print(
        f"In {time.perf_counter() - t0:.0f} s: simulated {len(ds)} images into {data}, trained {DEMO_CARD} for "
        f"{epochs} epoch(s) (MLflow run {result.run_id}), registered it as {DEMO_CARD} "
        f"v{result.model_version}, loaded it with registry.load({DEMO_CARD!r}), predicted {len(images)} "
        f"validation images and searched {len(ds)} images by latent distance.",
        highlight=False, soft_wrap=True,
    )
    console.print(closing_hints(result.tracking_uri, data, query), highlight=False, soft_wrap=True)


def closing_hints(tracking_uri: str, data: Path | None = None, query: int | None = None) -> str:
    """What to do next, as commands that run from the user's shell even when the environment deepgalaxy is
    installed in is not activated (``nox -s demo``): full paths where PATH would not find them, absolute stores."""
    import shlex

    from deepgalaxy.core.shell import deepgalaxy_command, python_command
    from deepgalaxy.tracking import ui_hint

    dg = deepgalaxy_command()
    code = (f'from deepgalaxy import registry; model = registry.load("{DEMO_CARD}", tracking_uri="{tracking_uri}"); '
            f"print(model.card.name, model.source)")
    lines = [f"See the runs, metrics, figures and model versions: {ui_hint(tracking_uri)}",
             f"Every command and its options: {dg} --help"]
    if data is not None and query is not None:
        lines.append(f"Search again: {dg} latent search {DEMO_CARD} --index-of {query} --data "
                     f"{shlex.quote(str(data.resolve()))} -k 5 --tracking-uri {shlex.quote(tracking_uri)}")
    lines.append(f"Load the model from Python: {python_command()} -c {shlex.quote(code)}")
    return "\n".join(lines)
