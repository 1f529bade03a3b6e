"""``deepgalaxy tune CARD --data D --trials N``: a resumable Optuna study, every trial a nested MLflow run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from deepgalaxy.cli import common
from deepgalaxy.cli.common import app, console, nic_option, ssh_key_option, ssh_port_option, use_host_access

if TYPE_CHECKING:
    from deepgalaxy.runs.tune import TuneResult


@app.command("tune")
def tune(
    card: str = typer.Argument(..., help="model card name (e.g. classifier-b0) or a card.json path"),
    data: str = typer.Option(..., "--data", "-d", help="deepgalaxy Zarr dataset (DATA.zarr, or its URL)"),
    trials: int = typer.Option(20, "--trials", "-t", min=1,
                               help="finished trials the study should hold (a resumed study runs the rest)"),
    timeout: float = typer.Option(None, "--timeout", min=0, help="stop starting trials after this many seconds"),
    storage: str = typer.Option("sqlite:///optuna.db", "--storage", help="Optuna storage URL (keeps the study)"),
    study: str = typer.Option(None, "--study", help="study name (default CARD-FRAMEWORK); same name = resume"),
    space: str = typer.Option("lr", "--space", help="what to search, comma-separated: lr (always), optimizer, "
                              "batch, latent, loss-weights"),
    pruner: str = typer.Option("median", "--pruner", help="median[:STARTUP_TRIALS[:WARMUP_EPOCHS]] (default "
                               "median:3:1), threshold:UPPER or none; on the validation loss after each epoch"),
    framework: str = typer.Option("torch", "--framework", "-f", help="torch or tensorflow"),
    workers: int = typer.Option(1, "--workers", "-n", min=1, help="ranks per trial (>1 runs each under horovodrun)"),
    hosts: str = typer.Option(None, "--hosts", help="several machines for Horovod, e.g. h1:4,h2:4"),
    network_interface: str = nic_option(),
    ssh_port: int = ssh_port_option(),
    ssh_identity_file: str = ssh_key_option(),
    epochs: int = typer.Option(None, "--epochs", "-e", min=1, help="epochs per trial (default: the train spec's)"),
    overrides: list[str] = typer.Option(None, "--set", "-s", help="KEY=VALUE base setting, repeatable "
                                        "(train.batch_size=8, card.input_size=64)"),
    tracking_uri: str = typer.Option(None, "--tracking-uri",
                                     help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"),
    experiment: str = typer.Option("deepgalaxy-tune", "--experiment", help="MLflow experiment name"),
    seed: int = typer.Option(0, "--seed", help="TPE sampler seed"),
    run_dir: Path = typer.Option(None, "--run-dir", help="where trial directories go "
                                 "(default deepgalaxy-runs/tune-STUDY)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bar per epoch"),
    device: str = common.device_option(keeps=" (default: the train spec's, auto)"),
    precision: str = common.precision_option(keeps=" (default: the train spec's, fp32)"),
) -> None:
    """Search the learning rate (and more) with Optuna TPE + median pruning; best parameters on the parent run."""
    from deepgalaxy.runs.tune import tune as run_tune
    use_host_access(network_interface, ssh_port, ssh_identity_file)

    result = run_tune(
        card, data, trials, timeout=timeout, storage=storage, study=study, framework=framework, workers=workers,
        hosts=hosts, epochs=epochs, overrides=overrides or [], space=space, pruner=pruner, tracking_uri=tracking_uri,
        experiment=experiment, seed=seed, run_dir=run_dir, progress=progress, device=device, precision=precision,
    )
    console.print(render_trials(result))
    console.print(result.summary(), highlight=False, soft_wrap=True)


def render_trials(result: TuneResult) -> Table:
    """A rich table of the study's trials (newest last)."""
    from deepgalaxy.runs.tune import METRIC, fmt

    table = Table(title=f"study {result.study}")
    for col in ("trial", "state", METRIC, "parameters", "epochs"):
        table.add_column(col, justify="right" if col != "parameters" else "left")
    for row in result.trials:
        params = ", ".join(f"{k}={fmt(v)}" for k, v in row["params"].items())
        value = "-" if row["value"] is None else f"{row['value']:.4g}"
        epochs = "-" if row["last_epoch"] is None else str(row["last_epoch"] + 1)
        style = "bold" if row["number"] == result.best_trial else None
        table.add_row(str(row["number"]), row["state"].lower(), value, params, epochs, style=style)
    return table
