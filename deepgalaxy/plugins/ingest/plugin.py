"""Registers the ``ingest`` dataset source (lazy loader reference: nothing heavy is imported here)."""

from __future__ import annotations

from deepgalaxy.core.hookspecs import hookimpl
from deepgalaxy.core.interfaces import DatasetSourceInfo


@hookimpl
def deepgalaxy_dataset_sources() -> list[DatasetSourceInfo]:
    return [
        DatasetSourceInfo(
            "ingest",
            loader="deepgalaxy.plugins.ingest.source:IngestSource",
            description="a folder of real images (PNG/JPEG; FITS with astropy), unlabelled, cropped and resized",
        )
    ]
