"""``deepgalaxy train CARD --data DATA.zarr [--data MORE.zarr:SHARE]``: train, track, register a version."""

from __future__ import annotations

from pathlib import Path

import typer

from deepgalaxy.cli import common
from deepgalaxy.cli.common import app, console, nic_option, ssh_key_option, ssh_port_option, use_host_access


@app.command("train")
def train(
    card: str = typer.Argument(None, help="model card name (e.g. vae-b4) or a card.json path; "
                               "optional with --resume"),
    data: list[str] = typer.Option(None, "--data", "-d", help="deepgalaxy Zarr store (DATA.zarr); repeat it to "
                                   "train on several, PATH:SHARE gives a store that fraction of every batch "
                                   "(--data sims.zarr --data obs.zarr:0.5)"),
    framework: str = typer.Option("torch", "--framework", "-f", help="torch or tensorflow"),
    workers: int = typer.Option(1, "--workers", "-n", min=1, help="data-parallel ranks (>1 runs horovodrun --gloo)"),
    hosts: str = typer.Option(None, "--hosts", help="several machines for Horovod, e.g. h1:4,h2:4 (with --resume: "
                              "where to continue, the same number of ranks)"),
    network_interface: str = nic_option(),
    ssh_port: int = ssh_port_option(),
    ssh_identity_file: str = ssh_key_option(),
    epochs: int = typer.Option(None, "--epochs", "-e", min=1, help="epochs (default: the train spec's, 12)"),
    overrides: list[str] = typer.Option(None, "--set", "-s",
                                        help="KEY=VALUE override, repeatable: train.batch_size=8, "
                                        "card.input_size=64, card.backbone.options.widths=[8,16]"),
    tracking_uri: str = typer.Option(None, "--tracking-uri",
                                     help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"),
    experiment: str = typer.Option("deepgalaxy", "--experiment", help="MLflow experiment name"),
    resume: bool = typer.Option(False, "--resume", help="continue the newest unfinished run of CARD (or --run-dir) "
                                "from its last checkpoint, into the same MLflow run"),
    run_dir: Path = typer.Option(None, "--run-dir", help="directory of the run (default deepgalaxy-runs/CARD-TIME)"),
    register: bool = typer.Option(True, "--register/--no-register", help="register a new model version at the end"),
    launcher: str = typer.Option(None, "--launcher", help="force a launcher plugin: local or horovod"),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", min=0,
                                         help="also checkpoint every N steps (0: after each epoch only)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bar per epoch"),
    init: str = typer.Option(None, "--init", help="start from these weights: a registered model (vae-b0@champion), "
                             "a saved model folder, or ImageNet weights of the backbone (Keras .h5 / .weights.h5, "
                             "timm .safetensors); what does not fit starts fresh and is listed. Not with --resume"),
    device: str = common.device_option(keeps=" (default: the train spec's, auto; with --resume the run's, or "
                                       "continue on this one)"),
    precision: str = common.precision_option(keeps=" (default: the train spec's, fp32; with --resume the run's)"),
) -> None:
    """Train CARD on DATA: one MLflow run (written by rank 0), then a new version of the registered model CARD."""
    from deepgalaxy.runs.training import train as run_training
    use_host_access(network_interface, ssh_port, ssh_identity_file)

    result = run_training(
        card, data or None, framework=framework, workers=workers, hosts=hosts, epochs=epochs, overrides=overrides or [],
        tracking_uri=tracking_uri, experiment=experiment, register=register, resume=resume, run_dir=run_dir,
        launcher=launcher, checkpoint_every=checkpoint_every, progress=progress, init=init, device=device,
        precision=precision,
    )
    console.print(result.summary(), highlight=False, soft_wrap=True)
