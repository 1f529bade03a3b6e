"""``deepgalaxy scale CARD --data D --workers 1,2,4``: measured scaling (Fig. 7) and a ring-allreduce projection."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from deepgalaxy.cli import common
from deepgalaxy.cli.common import app, console, nic_option, ssh_key_option, ssh_port_option, use_host_access
from deepgalaxy.tracking import ui_hint

if TYPE_CHECKING:
    from deepgalaxy.runs.scale import ScaleResult


@app.command("scale")
def scale(
    card: str = typer.Argument(..., help="model card name (e.g. classifier-b0) or a card.json path"),
    data: str = typer.Option(..., "--data", "-d", help="deepgalaxy Zarr dataset (DATA.zarr, or its URL)"),
    workers: str = typer.Option("1,2", "--workers", "-n", help="worker counts to measure, e.g. 1,2,4"),
    framework: str = typer.Option("torch", "--framework", "-f", help="torch or tensorflow"),
    steps: int = typer.Option(20, "--steps", min=1, help="timed steps per worker count"),
    warmup: int = typer.Option(3, "--warmup", min=0, help="warm-up steps, excluded from the timing"),
    repeats: int = typer.Option(1, "--repeats", min=1, help="interleaved rounds over all worker counts; each N keeps "
                                "its fastest round (shared, noisy machines)"),
    batch: int = typer.Option(None, "--batch", "-b", min=1,
                              help="batch: per worker (--batch-policy local) or global; default train.batch_size"),
    batch_policy: str = typer.Option("local", "--batch-policy",
                                     help="local: per-worker batch fixed (weak scaling, as the paper); "
                                     "global: global batch fixed, divided by N"),
    threads: int = typer.Option(None, "--threads", min=1,
                                help="intra-op threads per worker (default: max(1, cores // workers on a machine))"),
    hosts: str = typer.Option(None, "--hosts", help="several machines for Horovod, e.g. h1:4,h2:4"),
    network_interface: str = nic_option(),
    ssh_port: int = ssh_port_option(),
    ssh_identity_file: str = ssh_key_option(),
    overrides: list[str] = typer.Option(None, "--set", "-s", help="KEY=VALUE override, repeatable "
                                        "(card.input_size=64, card.backbone.options.widths=[8,16])"),
    bandwidth: float = typer.Option(100.0, "--bandwidth", help="projection: network link bandwidth in Gbit/s"),
    latency: float = typer.Option(5.0, "--latency", help="projection: network latency per message in microseconds"),
    overlap: float = typer.Option(0.0, "--overlap", min=0.0, max=1.0,
                                  help="projection: fraction of compute time that can hide communication"),
    plot: Path = typer.Option(None, "--plot", "-o", help="where to save the figure "
                              "(default scaling-CARD-FRAMEWORK.png here)"),
    tracking_uri: str = typer.Option(None, "--tracking-uri",
                                     help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"),
    experiment: str = typer.Option("deepgalaxy-scale", "--experiment", help="MLflow experiment name"),
    run_dir: Path = typer.Option(None, "--run-dir", help="where the per-N files go (default deepgalaxy-runs/...)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bars"),
    device: str = common.device_option(keeps=" (default: the train spec's, auto)"),
    precision: str = common.precision_option(keeps=" (default: the train spec's, fp32)"),
) -> None:
    """Measure images/s at each worker count, speed-up and efficiency vs the smallest, project to 8..1024 workers."""
    from deepgalaxy.runs.scale import scale as run_scale
    use_host_access(network_interface, ssh_port, ssh_identity_file)

    result = run_scale(
        card, data, workers, framework=framework, steps=steps, warmup=warmup, batch=batch,
        batch_policy=batch_policy,  # type: ignore[arg-type]
        threads=threads, hosts=hosts, overrides=overrides or [], tracking_uri=tracking_uri, experiment=experiment,
        plot=plot, bandwidth_gbit=bandwidth, latency_us=latency, overlap=overlap, repeats=repeats, run_dir=run_dir,
        progress=progress, device=device, precision=precision,
    )
    console.print(render_table(result))
    for line in summary_lines(result):
        console.print(line, highlight=False, soft_wrap=True)


def render_table(result: ScaleResult) -> Table:
    """A rich table: measured rows (with the model check) then the projection, clearly labelled."""
    check = {int(c["workers"]): c for c in result.check}
    by_n = {int(pt["workers"]): pt for pt in result.points}
    table = Table(title=f"scaling of {result.params.get('card')} ({result.params.get('framework')}); "
                  f"batch policy {result.params.get('batch_policy')}")
    for col in ("N", "threads", "batch", "images/s", "speed-up", "effic.", "step ms", "compute ms",
                "allreduce ms", "model E"):
        table.add_column(col, justify="right")
    for r in result.measured:
        pt = by_n[r.workers]
        grad = [s for s in pt.get("allreduce", []) if int(s[1]) == int(pt["gradient_bytes"])]
        c = check.get(r.workers)
        table.add_row(str(r.workers), str(pt["threads_per_worker"]), str(pt["batch_per_worker"]),
                      f"{r.images_per_s:.1f}", f"{r.speedup:.3f}", f"{r.efficiency:.3f}", f"{pt['step_s'] * 1e3:.1f}",
                      f"{pt['compute_s'] * 1e3:.1f}", f"{grad[0][2] * 1e3:.2f}" if grad else "-",
                      f"{c['predicted_efficiency']:.3f}" if c else "-")
    table.add_section()
    for r in result.projected:
        table.add_row(f"{r.workers} proj.", "-", str(by_n[result.measured[0].workers]["batch_per_worker"]),
                      f"{r.images_per_s:.1f}", f"{r.speedup:.1f}", f"{r.efficiency:.3f}",
                      f"{(r.step_s or 0) * 1e3:.1f}", "-", f"{(r.allreduce_s or 0) * 1e3:.2f}", "-", style="italic")
    return table


def summary_lines(result: ScaleResult) -> list[str]:
    """What the table does not say: the projection's assumptions, the fitted network, the figure, the run."""
    lines = ["columns: N workers; threads and batch per worker; step = measured time per step (all ranks); compute ="
             " per-step time without communication measured at that N; allreduce = one allreduce of all gradients; "
             "model E = efficiency the cost model predicts from those two"]
    lines += [f"projected rows are a PROJECTION (ring-allreduce model, not measured): compute per step "
             f"{result.points[0]['compute_s'] * 1e3:.1f} ms measured at {result.measured[0].workers} worker(s), "
             f"gradients {result.points[0]['gradient_bytes'] / 1e6:.3g} MB, network {result.network.describe()}"]
    if result.fitted_network is not None:
        lines.append(f"allreduce measured here fits {result.fitted_network.describe()} (this machine's transport); "
                     "'model E' = that fit + compute measured at N under the same core sharing")
    elif result.check:
        lines.append("allreduce times measured here do not grow with message size (latency-bound), so no bandwidth "
                     "was fitted; 'model E' = compute measured at N + the measured allreduce of the gradients")
    lines.append(f"figure: {result.plot_path}")
    lines.append(f"MLflow parent run: {result.run_id} in {result.tracking_uri}  ({ui_hint(result.tracking_uri)})")
    return lines
