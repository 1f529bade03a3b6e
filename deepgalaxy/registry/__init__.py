"""The registry: model cards by name, models created from them, trained models loaded back.

>>> from deepgalaxy import registry
>>> registry.list_models("vae-*")[:2]
['vae-b0', 'vae-b1']
>>> registry.card("vae-b4").backbone.name
'efficientnet-b4'

``create(name, framework=...)`` builds an untrained model, with card fields overridden by keyword
(``create("vae-simple", input_size=32, **{"backbone.options.widths": [8, 16]})``); ``load("vae-b4")`` returns the
newest registered version from MLflow (``"vae-b4@champion"`` for an alias, ``version=3`` for a number,
``"models:/vae-b4/3"``), and ``load(Path("saved"))`` or ``load("./saved")`` a saved model directory: a bare name is
never taken for a folder. ``get_framework("torch")`` is the framework object a model runs in (``Model.backend``).

Renamed (the old names still work for one release and warn): ``list`` -> :func:`list_models`, ``framework`` ->
:func:`get_framework`.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from deepgalaxy.core.contract import BackboneBuilder
from deepgalaxy.core.device import parse_device, parse_precision
from deepgalaxy.core.errors import (
    DeepGalaxyError,
    FrameworkUnavailableError,
    UnknownNameError,
    WeightsConversionError,
)
from deepgalaxy.core.interfaces import Framework, resolve
from deepgalaxy.core.model import CARD_FILE, Model, read_card
from deepgalaxy.core.plugins import get_plugin_manager
from deepgalaxy.core.specs import BackboneSpec, ModelSpec, describe_errors, with_overrides

if TYPE_CHECKING:
    from deepgalaxy.registry.store import RegisteredVersion

__all__ = ["backbone_factory", "card", "create", "find_version", "frameworks", "get_framework", "is_path",
           "list_models", "load", "load_directory", "reduction"]

_frameworks: dict[str, Framework] = {}
MODELS_URI = "models:/"


def list_models(pattern: str = "*", exclude: str | Iterable[str] = ()) -> list[str]:
    """Card names matching the shell-style ``pattern`` (``"vae-*"``, ``"*-b[0-3]"``) and none of the ``exclude``
    patterns (one or several: ``exclude="*-simple"``), sorted."""
    excluded = [exclude] if isinstance(exclude, str) else list(exclude)
    return [n for n in get_plugin_manager().cards.names()
            if fnmatch.fnmatchcase(n, pattern) and not any(fnmatch.fnmatchcase(n, e) for e in excluded)]


def card(name: str) -> ModelSpec:
    """The card called ``name``; an unknown name raises ``UnknownNameError`` suggesting close names."""
    return get_plugin_manager().cards.get(name)


def frameworks() -> list[str]:
    """Names of the framework plugins that are installed and importable."""
    pm = get_plugin_manager()
    return [n for n, p in pm.frameworks.items() if all(importlib.util.find_spec(m) for m in p.item.requires)]


def get_framework(name: str) -> Framework:
    """The framework implementation called ``name`` (imports the framework on first use); one object per name."""
    if name not in _frameworks:
        info = get_plugin_manager().frameworks.get(name)
        missing = [m for m in info.requires if importlib.util.find_spec(m) is None]
        if missing:
            raise FrameworkUnavailableError(
                f"framework {name!r} needs {', '.join(missing)}, which is not installed; "
                f"install it with: pip install 'deepgalaxy[{name}]'"
            )
        _frameworks[name] = resolve(info.loader)()
    return _frameworks[name]


def backbone_factory(spec: BackboneSpec, framework: str) -> Any:
    """The factory that builds backbone ``spec.name`` in ``framework``: ``factory(spec, in_channels)``."""
    backbone = get_plugin_manager().backbone(spec.name)
    if framework not in backbone.factories:
        have = ", ".join(sorted(backbone.factories)) or "none"
        raise UnknownNameError(f"backbone for framework {framework!r} (this one has: {have}) named", spec.name,
                               [n for n, b in get_plugin_manager().backbones.items() if framework in b.factories])
    return resolve(backbone.factories[framework])


def reduction(spec: BackboneSpec) -> int:
    """Spatial reduction of backbone ``spec`` (input side / feature-map side)."""
    return get_plugin_manager().backbone(spec.name).reduction_for(spec)


def _as_card(card_or_name: ModelSpec | str, overrides: dict[str, Any]) -> ModelSpec:
    """The card (looked up by name) with ``overrides`` applied and validated again."""
    spec = card(card_or_name) if isinstance(card_or_name, str) else card_or_name
    if not overrides:
        return spec
    try:
        return with_overrides(spec, overrides)
    except ValidationError as exc:
        raise DeepGalaxyError(f"create({spec.name!r}): invalid card overrides: {describe_errors(exc)}") from None
    except KeyError as exc:  # a dotted key through a field that is not a section
        raise DeepGalaxyError(f"create({spec.name!r}): {exc.args[0]}") from None


def create(card_or_name: ModelSpec | str, /, framework: str = "torch", seed: int | None = None,
           **overrides: Any) -> Model:
    """Build an untrained model from a card (or card name) in ``framework``, seeded when ``seed`` is given.

    ``overrides`` go straight into the card, as timm's ``create_model`` does: a top-level field by keyword
    (``input_size=32``, ``latent_dim=16``), a nested one by its dotted key, the spelling of ``train --set``
    (``**{"backbone.options.widths": [8, 16]}``); a dotted key replaces one value, a keyword a whole section
    (``backbone={"name": "resnet18"}``). The result is validated again: a wrong key or value raises a
    :class:`~deepgalaxy.core.errors.DeepGalaxyError` naming it. The model's ``card`` is the overridden card.
    """
    spec = _as_card(card_or_name, overrides)
    # fails early, naming the backbone, if the framework lacks it; the framework is handed what it builds
    backbone = BackboneBuilder(framework, backbone_factory(spec.backbone, framework), reduction(spec.backbone))
    fw = get_framework(framework)
    return Model(spec, fw, fw.build(spec, backbone, seed=seed), backbone.reduction)


def load(name: str | Path, version: int | None = None, framework: str | None = None,
         tracking_uri: str | None = None, device: str = "auto", precision: str = "fp32") -> Model:
    """Load a trained model.

    ``name`` is a registered model (``"vae-b4"`` = newest version, ``"vae-b4@champion"`` = an alias, with an
    optional ``version``; or a ``"models:/vae-b4/3"`` / ``"models:/vae-b4@champion"`` URI), or a saved model
    directory (``card.json`` + ``weights.safetensors``) given as a :class:`~pathlib.Path` or as a string that is
    clearly a path (:func:`is_path`: ``"./vae-b4"``, ``"runs/x/model"``, ``"~/m"``). A bare name is always the
    registered model, even when a folder of that name is in the working directory.
    ``framework`` defaults to the one the weights were trained with; another converts the weights.
    ``device`` (``auto``: a GPU when one is visible, ``cpu``, ``cuda``, ``cuda:N``) and ``precision`` (``fp32``,
    ``bf16``, ``fp16``, ``auto``: bf16 where native) are where and how the model runs (:meth:`Model.to`); the weights
    are read on the CPU and then moved.
    """
    parse_device(device)  # refused before anything is downloaded
    parse_precision(precision)
    if isinstance(name, Path) or is_path(name):
        return load_directory(Path(name).expanduser(), framework).to(device, precision)
    from deepgalaxy.core.errors import ModelNotFoundError
    from deepgalaxy.registry.store import load_registered

    base, version = _from_models_uri(name, version)
    try:
        return load_registered(base, version=version, framework=framework, tracking_uri=tracking_uri).to(
            device, precision)
    except (ModelNotFoundError, UnknownNameError) as exc:
        if not (Path(base) / CARD_FILE).is_file():
            raise
        raise ModelNotFoundError(
            f"{exc} (A saved model folder {base!r} is in the working directory: load it with "
            f"registry.load(Path({base!r})) or registry.load('./{base}'); at the CLI give ./{base}.)"
        ) from None


def find_version(name: str, version: int | None = None, tracking_uri: str | None = None) -> RegisteredVersion:
    """The registered version ``name`` means as :func:`load` reads it (``NAME``, ``NAME@ALIAS``, ``models:/NAME/3``),
    without downloading it."""
    from deepgalaxy.registry.store import resolve_version

    base, version = _from_models_uri(name, version)
    return resolve_version(base, version, tracking_uri)


def is_path(name: str) -> bool:
    """Whether the string ``name`` names a directory rather than a registered model: it contains a path
    separator or starts with ``.``, ``~`` or ``/`` (``models:/`` URIs are names)."""
    if name.startswith(MODELS_URI):
        return False
    seps = [os.sep, *([os.altsep] if os.altsep else [])]
    return any(sep in name for sep in seps) or name.startswith((".", "~", "/"))


def _from_models_uri(name: str, version: int | None) -> tuple[str, int | None]:
    """``"models:/NAME/3"`` -> ``("NAME", 3)``, ``"models:/NAME@alias"`` -> ``("NAME@alias", None)``; else as is."""
    if not name.startswith(MODELS_URI):
        return name, version
    base, _, number = name[len(MODELS_URI):].partition("/")
    if not number:
        return base, version
    if not number.isdigit() or version is not None or "@" in base or "/" in number:
        raise DeepGalaxyError(f"{name!r} is not a model URI deepgalaxy reads: use models:/NAME/VERSION or "
                              "models:/NAME@ALIAS (or NAME with version=N)")
    return base, int(number)


def load_directory(directory: Path, framework: str | None = None, source: dict[str, Any] | None = None) -> Model:
    """Rebuild a model from a saved directory: the card gives the architecture, safetensors the weights."""
    from deepgalaxy.core.model import WEIGHTS_FILE, read_weights

    spec = read_card(directory)
    weights, trained_with = read_weights(directory / WEIGHTS_FILE)
    model = create(spec, framework=framework or trained_with or "torch")
    try:
        model.set_weights(weights, trained_with, directory / WEIGHTS_FILE)
    except WeightsConversionError as exc:  # name the model in the remedy: the version, else the folder
        named = f"{source['name']!r}, version={source['version']}" if source else f"Path({str(directory)!r})"
        raise exc.loading(named) from None
    model.source = dict(source or {}, path=str(directory))
    return model


_RENAMED: dict[str, Callable[..., Any]] = {"list": list_models, "framework": get_framework}
"""Old public names -> their new functions: kept one release as deprecated aliases."""


def __getattr__(name: str) -> Callable[..., Any]:
    """``registry.list`` and ``registry.framework`` (deprecated): the renamed function, with a DeprecationWarning.

    Resolved here rather than defined as module functions so that no name in this module shadows a builtin.
    """
    if name in _RENAMED:
        new = _RENAMED[name].__name__
        warnings.warn(f"deepgalaxy.registry.{name} is deprecated and will be removed in the next release; use "
                      f"deepgalaxy.registry.{new}", DeprecationWarning, stacklevel=2)
        return _RENAMED[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
