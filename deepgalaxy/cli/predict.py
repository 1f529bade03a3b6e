"""``deepgalaxy predict MODEL INPUT...``: merger stages for observed images, as a CSV and a sheet of images.

Thin: loads the model with ``registry.load`` and calls :mod:`deepgalaxy.runs.predict`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from deepgalaxy.cli.common import app, console, device_option, precision_option
from deepgalaxy.cli.data import HDU, MASK_STARS, MAX_PIXELS, PREPROCESS


@app.command("predict")
def predict(
    model: str = typer.Argument(..., help="registered model: NAME (newest version), NAME@ALIAS; or a saved model "
                                "directory given as a path (./DIR)"),
    inputs: list[str] = typer.Argument(..., help="image files (PNG, JPEG, FITS), folders of them, or a store (a "
                                       "folder, or its http(s)://, s3:// or file:// URL)"),
    out: Path = typer.Option(..., "--out", "-o", help="CSV file to write, one row per image"),
    index: str = typer.Option(None, "--index", help="simulated store (its latent index beside it is used, else it "
                               "is indexed in memory) or an index folder: add the k nearest simulated images"),
    k: int = typer.Option(5, "-k", "--k", min=1, help="nearest simulated images per image (with --index)"),
    sheet: Path = typer.Option(None, "--sheet", help="draw each image (preprocessed) with its prediction (PNG)"),
    preprocess: bool = PREPROCESS, mask_stars: bool = MASK_STARS, max_pixels: int = MAX_PIXELS, hdu: str = HDU,
    batch_size: int = typer.Option(64, "--batch-size", "-b", min=1, help="images per model call"),
    model_version: int = typer.Option(None, "--model-version", min=1, help="model version number (default: the "
                                      "newest)"),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, "
                                     "else mlflow.db)"),
    framework: str = typer.Option(None, "--framework", "-f", help="run the model in this framework (default: as "
                                  "trained)"),
    overwrite: bool = typer.Option(False, help="replace --out and --sheet when they are files predict wrote"),
    resume: bool = typer.Option(False, "--resume", help="continue the CSV of an interrupted predict (same model, "
                                "inputs and options): keep its rows and append the rest"),
    workers: int = typer.Option(1, "--workers", "-n", min=1, help="worker processes, each predicting its share of "
                                "the batches with cores/N threads (1: in this process)"),
    device: str = device_option("auto"), precision: str = precision_option("fp32"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bar"),
) -> None:
    """Predict the merger stage of every image: class, expected class with a 68% interval, entropy (and in Myr when
    the model knows its Myr per class); with property heads every physical property with its 68% interval; with
    --index the nearest simulated images. Unreadable files are listed and skipped. Rows are written batch by batch:
    an interrupted run continues with --resume."""
    from dataclasses import replace

    from deepgalaxy import registry
    from deepgalaxy.core.observation import RAW, PreprocessOptions
    from deepgalaxy.core.properties import PROPERTIES
    from deepgalaxy.runs.predict import (
        CLASS_MYR_COLUMNS,
        check_outputs,
        open_prediction_index,
        predict_csv,
        write_sheet,
    )

    check_outputs(out, sheet, overwrite, resume)
    trained = registry.load(model, version=model_version, framework=framework, tracking_uri=tracking_uri,
                            device=device, precision=precision)
    options = PreprocessOptions(mask_stars=mask_stars) if preprocess else replace(RAW, mask_stars=mask_stars)
    found = open_prediction_index(trained, index, progress) if index is not None else None
    result = predict_csv(trained, list(inputs), out, index=found, k=k, options=options, batch_size=batch_size,
                         max_pixels=max_pixels, hdu=hdu, progress=progress, resume=resume, overwrite=overwrite,
                         workers=workers, sheet=sheet is not None)
    resumed = f" (resumed after batch {result.resumed_at})" if result.resumed_at else ""
    console.print(f"predicted {result.rows} image(s) with {result.model}{resumed}: {result.csv}",
                  highlight=False, soft_wrap=True)
    if CLASS_MYR_COLUMNS[0] in result.extra:
        console.print(f"  classes also in Myr since the simulation's start ({trained.card.class_myr:.4g} Myr per "
                      f"class): {', '.join(CLASS_MYR_COLUMNS)}", highlight=False, soft_wrap=True)
    given = [f"{name} ({unit})" if unit else name for name, unit in PROPERTIES.items() if name in result.extra]
    if given:
        console.print(f"  properties, each with its 68% interval NAME_low, NAME_high: {', '.join(given)}",
                      highlight=False, soft_wrap=True)
    for file, why in result.skipped[:20]:
        console.print(f"  skipped {file}: {why}", highlight=False, soft_wrap=True)
    if len(result.skipped) > 20:
        console.print(f"  ... and {len(result.skipped) - 20} more skipped", highlight=False)
    if result.sheet is not None and sheet is not None:
        console.print(f"sheet: {write_sheet(result.sheet, sheet, result.rows)}", highlight=False, soft_wrap=True)
