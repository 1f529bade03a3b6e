"""``deepgalaxy server --backend-store-uri postgresql://USER:PW@HOST:5432/DB --artifacts-destination DIR``: one
MLflow tracking server (with its artifact proxy) for the trainings, tunes and registry loads of every host.

A thin wrapper of ``mlflow server`` (:mod:`deepgalaxy.tracking.server` says what it adds): it checks the database
first, waits until the server answers, prints the tracking URI every host sets, and stops the server on Ctrl-C.
"""

from __future__ import annotations

import signal
import sys

import typer

from deepgalaxy.cli.common import app, console, stop_on_sigterm
from deepgalaxy.core.errors import DeepGalaxyError


@app.command("server")
def server(
    backend_store_uri: str = typer.Option(
        "sqlite:///mlflow.db", "--backend-store-uri",
        help="where runs and model versions are kept: postgresql://USER:PASSWORD@HOST:5432/DATABASE (any SQLAlchemy "
        "URI; default: the embedded store of the working directory)"),
    artifacts_destination: str = typer.Option(
        "mlartifacts", "--artifacts-destination",
        help="where the server keeps artifacts (models, figures): a folder on this machine or an s3:// URI; clients "
        "send and fetch them through the server"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on; 0.0.0.0 for every host"),
    port: int = typer.Option(5000, "--port", min=1, max=65535, help="TCP port"),
    workers: int = typer.Option(2, "--workers", min=1, help="web server worker processes"),
    wait: float = typer.Option(120.0, "--wait", min=1.0,
                               help="seconds to wait for the server to answer (a new database migrates first)"),
) -> None:
    """Run the MLflow tracking server every host logs into; set MLFLOW_TRACKING_URI to the URI it prints."""
    from deepgalaxy.tracking.server import ServerSpec, hide_password, running_server
    from deepgalaxy.tracking.server import artifacts_destination as destination

    spec = ServerSpec(backend_store_uri, destination(artifacts_destination), host, port, workers)
    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)  # running_server's cleanup stops it
    try:
        with running_server(spec, wait) as process:
            console.print(
                f"MLflow tracking server ready at {spec.tracking_uri} (runs and model versions in "
                f"{hide_password(spec.backend_store_uri)}, artifacts in {spec.artifacts_destination}, served "
                f"through the server)\non every host: export MLFLOW_TRACKING_URI={spec.tracking_uri}   "
                f"(or --tracking-uri {spec.tracking_uri}); Ctrl-C stops the server",
                highlight=False, soft_wrap=True)
            sys.stdout.flush()
            code = process.wait()
            raise DeepGalaxyError(f"mlflow server stopped on its own (exit code {code}; its messages are above)")
    except KeyboardInterrupt:
        console.print("MLflow tracking server stopped", highlight=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
