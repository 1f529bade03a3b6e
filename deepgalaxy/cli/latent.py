"""Latent-space commands, one group: ``deepgalaxy latent index|search|cluster|evaluate|interpolate``.

Thin: each parses its arguments, loads the model with ``registry.load`` and calls :mod:`deepgalaxy.runs.latent`.
The spellings before the group (``index build``, ``search``, ``cluster``, ``evaluate-search``, ``interpolate``, and
``--version``/``-V`` for the model version, ``-n`` for ``interpolate --steps``) still work for one release, hidden,
each warning in one line: ``--version``/``-V`` is the package version at the root, ``-n`` the worker count elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from deepgalaxy.cli.common import (
    app,
    console,
    deprecated_command,
    deprecated_option,
    device_option,
    given,
    precision_option,
)

if TYPE_CHECKING:
    from deepgalaxy.core.model import Model

latent_app = typer.Typer(help="The latent space of a trained model: index a dataset store (z of every image, with "
                         "the model version), search it, cluster it, evaluate the search, interpolate.",
                         no_args_is_help=True)
app.add_typer(latent_app, name="latent")

MODEL = typer.Argument(..., help="registered model: NAME (newest version), NAME@ALIAS; or a saved model "
                       "directory given as a path (./DIR)")
DATA = typer.Option(..., "--data", "-d", help="deepgalaxy Zarr dataset (DATA.zarr, or its http(s)://, s3:// or "
                    "file:// URL)")
MODEL_VERSION = typer.Option(None, "--model-version", min=1, help="model version number (default: the newest)")
OLD_VERSION = deprecated_option("--version", "-V", new="--model-version", meaning="model version", min=1)
TRACKING = typer.Option(None, "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else mlflow.db)")
EXPERIMENT = typer.Option("deepgalaxy-latent", "--experiment", help="MLflow experiment for the logged run")
FRAMEWORK = typer.Option(None, "--framework", "-f", help="run the model in this framework (default: as trained)")


def _load(model: str, version: int | None, old_version: int | None, tracking_uri: str | None,
          framework: str | None, device: str = "auto", precision: str = "fp32") -> Model:
    """``registry.load`` of MODEL; ``old_version``: the deprecated ``--version``/``-V``."""
    from deepgalaxy.runs.latent import load_model

    return load_model(model, given(version, old_version), tracking_uri, framework, device, precision)


@latent_app.command("index")
def index(
    model: str = MODEL, data: str = DATA, model_version: int = MODEL_VERSION, old_version: int = OLD_VERSION,
    tracking_uri: str = TRACKING, framework: str = FRAMEWORK,
    method: str = typer.Option("auto", "--method", help="auto (exact up to 20,000 vectors, HNSW above), exact, hnsw"),
    batch_size: int = typer.Option(64, "--batch-size", "-b", min=1, help="images per encoder call"),
    out: Path = typer.Option(None, "--out", help="index directory (default: DATA.zarr.index/MODEL-vVERSION)"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted build, refusing one made from "
                                "another model version, precision or store (a plain re-run continues a matching "
                                "one and starts another again)"),
    workers: int = typer.Option(1, "--workers", "-n", min=1, help="worker processes, each encoding its share of the "
                                "batches with cores/N threads (1: in this process)"),
    device: str = device_option("auto"), precision: str = precision_option("fp32"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bar"),
) -> None:
    """Encode every image of DATA with MODEL and save z (with the model version) beside the store. The vectors are
    written batch by batch: an interrupted build continues where it stopped."""
    from deepgalaxy.runs.latent import build_index

    trained = _load(model, model_version, old_version, tracking_uri, framework, device, precision)
    built = build_index(trained, data, out, batch_size, method, progress, resume, workers)
    console.print(built.summary(), highlight=False, soft_wrap=True)


@latent_app.command("search")
def search(
    model: str = MODEL,
    queries: list[Path] = typer.Argument(None, exists=True, dir_okay=False,
                                         help="query image files (PNG, JPEG); or use --index-of"),
    data: str = DATA,
    index_of: list[int] = typer.Option(None, "--index-of", "-i", help="query = this row of DATA (repeatable)"),
    k: int = typer.Option(6, "-k", "--k", min=1, help="recommendations per query"),
    out: Path = typer.Option(None, "--out", "-o", help="draw the query and its recommendations (Fig. 6) here"),
    cluster: bool = typer.Option(False, "--cluster", help="recommend only from the query's spectral cluster "
                                 "(run `deepgalaxy latent cluster` first)"),
    json_out: Path = typer.Option(None, "--json", help="also write the neighbours as JSON"),
    model_version: int = MODEL_VERSION, old_version: int = OLD_VERSION, tracking_uri: str = TRACKING,
    framework: str = FRAMEWORK,
) -> None:
    """The k nearest images to each query in z, with distance, SSIM to the query and metadata."""
    from deepgalaxy.runs.latent import search as run_search

    trained = _load(model, model_version, old_version, tracking_uri, framework)
    result = run_search(trained, data, rows=index_of or [], images=queries or [], k=k, within_cluster=cluster)
    for q in result.queries:
        table = Table(title=f"query {q.name}" + (f" (class {q.meta['label']})" if "label" in q.meta else "")
                      + ("" if q.cluster is None else f", cluster {q.cluster}"))
        for col in ("rank", "row", "distance", "SSIM", "class", "mass ratio", "camera", "sim"):
            table.add_column(col, justify="right")
        for rank, nb in enumerate(q.neighbours, 1):
            m = nb.meta
            table.add_row(str(rank), str(nb.row), f"{nb.distance:.4f}", f"{nb.ssim:.3f}", str(m.get("label", "-")),
                          f"{m['mass_ratio']:.3g}" if "mass_ratio" in m else "-", str(m.get("camera", "-")),
                          str(m.get("sim_id", "-")))
        console.print(table)
    console.print(f"{result.model}: {result.method} search, {len(result.queries)} quer"
                  f"{'y' if len(result.queries) == 1 else 'ies'} in {result.seconds * 1e3:.1f} ms (incl. SSIM)",
                  highlight=False)
    if out:
        from deepgalaxy.core.figures import search_figure

        console.print(f"figure: {search_figure(result, out)}", highlight=False)
    if json_out:
        json_out.write_text(json.dumps({"model": result.model.as_dict(), "data": str(data), "k": k,
                                        "method": result.method, "neighbours": result.rows()}, indent=2))


@latent_app.command("cluster")
def cluster(
    model: str = MODEL, data: str = DATA,
    n_clusters: int = typer.Option(None, "--n-clusters", "-c", min=1,
                                   help="clusters (default: the largest eigengap of the Laplacian, at least 2)"),
    k: int = typer.Option(10, "-k", "--k", min=1, help="neighbours per node of the kNN graph"),
    max_clusters: int = typer.Option(71, "--max-clusters", min=2, help="largest cluster count the eigengap considers"),
    sample: int = typer.Option(None, "--sample", min=0, help="images in the kNN graph (default: up to 6,000; 0: "
                               "all); the rest join the cluster of their nearest sampled neighbours"),
    seed: int = typer.Option(0, "--seed"),
    log: bool = typer.Option(True, "--log/--no-log", help="log the result to MLflow"),
    model_version: int = MODEL_VERSION, old_version: int = OLD_VERSION, tracking_uri: str = TRACKING,
    experiment: str = EXPERIMENT, framework: str = FRAMEWORK,
) -> None:
    """Spectral clusters of the kNN graph over z, scored against the known classes (ARI, purity); MLflow run."""
    from deepgalaxy.runs.latent import cluster_dataset

    trained = _load(model, model_version, old_version, tracking_uri, framework)
    result = cluster_dataset(trained, data, n_clusters, k, max_clusters, sample, seed, tracking_uri, experiment, log)
    rep = result.report
    console.print(f"{result.model}: {rep.n_clusters} spectral clusters of {result.sample:,} images "
                  f"(kNN graph k={k}: {rep.components} connected component(s), eigengap suggests "
                  f"{rep.suggested_clusters}) in {result.seconds:.1f} s", highlight=False, soft_wrap=True)
    ev = ", ".join(f"{v:.3f}" for v in rep.eigenvalues[: min(12, len(rep.eigenvalues))])
    console.print(f"smallest Laplacian eigenvalues: {ev}", highlight=False, soft_wrap=True)
    table = Table(title="clusters against known groupings")
    for col in ("grouping", "adjusted Rand index", "purity"):
        table.add_column(col, justify="right")
    names = {"label": "class (merger time)", "stage": "merger stage (5 spans of classes)", "mass_ratio": "mass ratio",
             "camera": "camera", "sim_id": "simulation"}
    for column, s in result.scores.items():
        table.add_row(names.get(column, column), f"{s['adjusted_rand']:.3f}", f"{s['purity']:.3f}")
    console.print(table)
    console.print(f"cluster sizes: {result.sizes}", highlight=False, soft_wrap=True)
    if result.path:
        console.print(f"saved beside the index: {result.path} (use `deepgalaxy latent search --cluster`)",
                      highlight=False)
    if result.run_id:
        console.print(f"MLflow run: {result.run_id}", highlight=False)


@latent_app.command("evaluate")
def evaluate_search(
    model: str = MODEL, data: str = DATA,
    k: int = typer.Option(6, "-k", "--k", min=1, help="recommendations per query"),
    queries: int = typer.Option(200, "--queries", "-q", min=0, help="sampled queries (0: every image)"),
    pool: int = typer.Option(1000, "--pool", min=0, help="candidates for the like-for-like comparison with the SSIM "
                             "oracle: the queries plus this many random images (0: every image; costs one SSIM "
                             "per query and candidate)"),
    cluster: bool = typer.Option(False, "--cluster", help="score recommendations from the query's spectral cluster"),
    seed: int = typer.Option(0, "--seed"),
    log: bool = typer.Option(True, "--log/--no-log", help="log the result to MLflow"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bar"),
    model_version: int = MODEL_VERSION, old_version: int = OLD_VERSION, tracking_uri: str = TRACKING,
    experiment: str = EXPERIMENT, framework: str = FRAMEWORK,
) -> None:
    """Mean SSIM of the top-k recommendations vs random pairs and an SSIM oracle; kNN class error. MLflow run."""
    from deepgalaxy.runs.latent import evaluate_search as run_evaluation

    trained = _load(model, model_version, old_version, tracking_uri, framework)
    ev = run_evaluation(trained, data, k, queries or None, pool or None, seed, cluster, tracking_uri, experiment, log,
                        progress)
    r, full = ev.report, ev.full
    among = f"{ev.candidates:,} of {ev.rows:,} images" if ev.pooled else f"all {ev.rows:,} images"
    table = Table(title=f"{ev.model}: top-{k} ({ev.method}), {r.queries:,} queries, candidates: {among}")
    for col in ("", "mean SSIM", "mean |class difference|"):
        table.add_column(col, justify="right")
    table.add_row("latent recommendations", f"{r.ssim_top_k:.4f}", _num(r.class_diff_top_k))
    table.add_row("random pairs (floor)", f"{r.ssim_random:.4f}", _num(r.class_diff_random))
    table.add_row("SSIM oracle (ceiling)", f"{r.ssim_oracle:.4f}", "-")
    if ev.pooled:
        table.add_row("latent recommendations, whole index", f"{full['ssim_top_k']:.4f}",
                      _num(full.get("class_diff_top_k")))
    console.print(table)
    console.print(f"relative position between random (0) and oracle (1): {r.relative:.3f}; kNN estimate of the class "
                  f"(mean class of the {k} neighbours in the whole index): mean absolute error "
                  f"{_num(full.get('knn_class_mae'))} classes", highlight=False, soft_wrap=True)
    console.print(f"search {ev.latency_ms:.3f} ms per query; evaluation took {ev.seconds:.1f} s", highlight=False)
    if ev.run_id:
        console.print(f"MLflow run: {ev.run_id}", highlight=False)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@latent_app.command("interpolate")
def interpolate(
    model: str = MODEL,
    start: str = typer.Option(..., "--from", help="A: a row of --data, or an image file"),
    end: str = typer.Option(..., "--to", help="B: a row of --data, or an image file"),
    steps: int = typer.Option(8, "--steps", min=2, help="decoded images from z(A) to z(B), both included"),
    old_steps: int = deprecated_option("-n", new="--steps", meaning="interpolation steps", min=2),
    out: Path = typer.Option(Path("interpolation.png"), "--out", "-o", help="figure of the line (Fig. 5)"),
    data: str = typer.Option(None, "--data", "-d", help="dataset store (for row numbers and the grid's direction)"),
    grid: Path = typer.Option(None, "--grid", help="also draw a 2-D grid over two latent directions here"),
    grid_rows: int = typer.Option(5, "--grid-rows", min=2, help="rows of the grid (odd: the middle row is A -> B)"),
    span: float = typer.Option(2.0, "--span", min=0.0, help="the grid's vertical extent, in standard deviations"),
    model_version: int = MODEL_VERSION, old_version: int = OLD_VERSION, tracking_uri: str = TRACKING,
    framework: str = FRAMEWORK,
) -> None:
    """Decode the straight line from z(A) to z(B) (and a 2-D grid) through the VAE decoder and D."""
    from deepgalaxy.core.figures import grid_figure, interpolation_figure
    from deepgalaxy.runs.latent import interpolate as run_interpolation
    from deepgalaxy.runs.latent import latent_grid, open_index, query_images

    m = _load(model, model_version, old_version, tracking_uri, framework)
    images, names = query_images(m, [start, end], data)
    interp = run_interpolation(m, images[0], images[1], given(steps, old_steps))
    interp.names = names
    console.print(f"figure: {interpolation_figure(interp, out)}  (|z(B) - z(A)| = "
                  f"{float(((interp.z[-1] - interp.z[0]) ** 2).sum() ** 0.5):.3f})", highlight=False)
    if grid:
        index_z = open_index(m, data).z if data is not None else None
        latent_grid(m, interp, index_z, grid_rows, span)
        console.print(f"grid: {grid_figure(interp, grid)}  (down: {interp.grid_axes['down']})", highlight=False)


# --- the spellings before the `latent` group: hidden, one release -------------------------------------------------

old_index_app = typer.Typer(help="Deprecated: use `deepgalaxy latent index`.", no_args_is_help=True)
app.add_typer(old_index_app, name="index", hidden=True)
old_index_app.command("build", hidden=True)(deprecated_command(index, "index build", "latent index"))
for _old, _new, _command in (("search", "search", search), ("cluster", "cluster", cluster),
                             ("evaluate-search", "evaluate", evaluate_search),
                             ("interpolate", "interpolate", interpolate)):
    app.command(_old, hidden=True)(deprecated_command(_command, _old, f"latent {_new}"))
