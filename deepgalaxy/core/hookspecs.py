"""The hooks a deepgalaxy plugin implements (pluggy, project name ``deepgalaxy``).

A plugin is a module (or object) with functions marked ``@deepgalaxy.core.hookimpl`` and registered through the
``deepgalaxy`` entry-point group. Each hook returns *descriptions* of what the plugin provides; heavy imports
(torch, tensorflow) happen only when a description's loader or factory is used.
"""

from __future__ import annotations

import pluggy

from deepgalaxy.core.interfaces import BackboneInfo, DatasetSourceInfo, FrameworkInfo, LauncherInfo
from deepgalaxy.core.specs import ModelSpec

PROJECT = "deepgalaxy"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def deepgalaxy_backbones() -> list[BackboneInfo]:  # type: ignore[empty-body]
    """Named backbones, each with a factory per framework it supports."""


@hookspec
def deepgalaxy_frameworks() -> list[FrameworkInfo]:  # type: ignore[empty-body]
    """Framework implementations: build a card, train it, save/load weights, run inference."""


@hookspec
def deepgalaxy_model_cards() -> list[ModelSpec]:  # type: ignore[empty-body]
    """Named model cards such as ``vae-b4`` (a VAE over an EfficientNet-B4 encoder)."""


@hookspec
def deepgalaxy_dataset_sources() -> list[DatasetSourceInfo]:  # type: ignore[empty-body]
    """Things that write a deepgalaxy Zarr store (the merger simulator, an image-folder ingester)."""


@hookspec
def deepgalaxy_launchers() -> list[LauncherInfo]:  # type: ignore[empty-body]
    """Ways to run N training ranks (``local``, ``horovod``)."""
