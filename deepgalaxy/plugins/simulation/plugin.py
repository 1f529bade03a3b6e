"""Registers the ``simulation`` dataset source (imports nothing heavy: the loader is a lazy reference)."""

from __future__ import annotations

from deepgalaxy.core.hookspecs import hookimpl
from deepgalaxy.core.interfaces import DatasetSourceInfo


@hookimpl
def deepgalaxy_dataset_sources() -> list[DatasetSourceInfo]:
    return [
        DatasetSourceInfo(
            "simulation",
            loader="deepgalaxy.plugins.simulation.source:SimulationSource",
            description="restricted N-body galaxy mergers rendered from 14 cameras at 71 time steps",
        )
    ]
