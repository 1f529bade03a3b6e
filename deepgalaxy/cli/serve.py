"""``deepgalaxy serve MODEL --data STORE``: a web page and a JSON API for prediction and similarity search.

Thin: checks the store, loads the model version once (``registry.load``), opens the latent index of the store
(built in memory when there is none, as ``predict --index`` does) and runs :mod:`deepgalaxy.runs.serve`.
"""

from __future__ import annotations

import signal
import sys

import typer

from deepgalaxy.cli.common import app, console, device_option, precision_option, stop_on_sigterm
from deepgalaxy.cli.data import MASK_STARS, MAX_PIXELS, PREPROCESS
from deepgalaxy.cli.latent import DATA, FRAMEWORK, MODEL_VERSION, TRACKING


@app.command("serve")
def serve(
    model: str = typer.Argument(..., help="registered model: NAME (newest version), NAME@ALIAS; or a saved model "
                                "directory given as a path (./DIR); it needs a VAE latent space (vae-*, full-*)"),
    data: str = DATA,
    index: str = typer.Option(None, "--index", help="its latent index folder (default: the one beside the store, "
                              "else it is indexed in memory at start)"),
    model_version: int = MODEL_VERSION, tracking_uri: str = TRACKING, framework: str = FRAMEWORK,
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on; 0.0.0.0 for every host"),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port (0: any free port, printed)"),
    k: int = typer.Option(6, "-k", "--k", min=1, max=50, help="nearest simulated images per search (default)"),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", min=0.001, help="refuse request bodies above "
                                        "this many MB (413)"),
    max_pixels: int = MAX_PIXELS, preprocess: bool = PREPROCESS, mask_stars: bool = MASK_STARS,
    batch_wait_ms: float = typer.Option(0.0, "--batch-wait-ms", min=0.0, help="how long a model call waits for "
                                        "more requests than those already waiting (0: requests that arrive while "
                                        "the model runs share the next call)"),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="most images in one model call"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bar while indexing at start"),
    device: str = device_option("auto"),
    precision: str = precision_option("fp32"),
) -> None:
    """Serve a page (/) and a JSON API (/predict, /search, /models, /healthz; schema at /docs) that predict merger
    stages of uploaded images and find the most similar simulated ones. Ctrl-C stops it."""
    from dataclasses import replace

    from deepgalaxy import registry
    from deepgalaxy.core.dataset import open_dataset
    from deepgalaxy.core.device import parse_device, parse_precision
    from deepgalaxy.core.observation import RAW, PreprocessOptions
    from deepgalaxy.runs.serve import UploadLimits, open_service
    from deepgalaxy.runs.serve.app import create_app
    from deepgalaxy.runs.serve.server import bind, run

    parse_device(device, "--device")  # bad names, a missing store or a busy port: refused before loading
    parse_precision(precision, "--precision")
    open_dataset(data)
    sock = bind(host, port)
    try:
        trained = registry.load(model, version=model_version, framework=framework, tracking_uri=tracking_uri,
                                device=device, precision=precision)
        options = PreprocessOptions(mask_stars=mask_stars) if preprocess else replace(RAW, mask_stars=mask_stars)
        limits = UploadLimits(max_bytes=int(max_upload_mb * 1e6), max_pixels=max_pixels)
        service = open_service(trained, data, index, progress, k=k, options=options, limits=limits,
                               max_wait=batch_wait_ms / 1000.0, max_batch=max_batch)
    except BaseException:
        sock.close()
        raise
    version = "" if service.version is None else f" v{service.version}"

    def ready(url: str) -> None:
        console.print(f"serving {service.name}{version} at {url}", highlight=False, soft_wrap=True)
        sys.stdout.flush()

    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        run(create_app(service), sock, ready)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        service.close()
        sock.close()
    console.print("stopped", highlight=False)
