"""The plugin manager: loads the ``deepgalaxy`` entry-point group, isolates failures, records provenance.

Built-in plugins are entry points of the ``deepgalaxy`` distribution itself, registered exactly like a
third-party package's. A plugin that fails to import, or raises inside a hook, is recorded with its error and
skipped; every other plugin keeps working. ``DEEPGALAXY_PLUGINS`` (comma-separated entry-point names) is an
allow-list: when set, only those plugins load; names no installed plugin has are warned about (:class:`PluginWarning`)
and "unknown name" errors say that the allow-list is set.
"""

from __future__ import annotations

import importlib
import os
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Generic, TypeVar

import pluggy

from deepgalaxy.core import hookspecs
from deepgalaxy.core.errors import PluginError, PluginWarning, UnknownNameError
from deepgalaxy.core.interfaces import BackboneInfo, DatasetSourceInfo, FrameworkInfo, LauncherInfo
from deepgalaxy.core.specs import BackboneSpec, ModelSpec

ENTRY_POINT_GROUP = "deepgalaxy"
ALLOW_ENV = "DEEPGALAXY_PLUGINS"

KINDS = ("backbones", "frameworks", "model_cards", "dataset_sources", "launchers")
T = TypeVar("T")


@dataclass
class PluginStatus:
    """One plugin as the manager saw it: where it came from, what it provides, what went wrong."""

    name: str
    module: str
    distribution: str = ""
    version: str = ""
    loaded: bool = False
    errors: list[str] = field(default_factory=list)
    provides: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})


@dataclass(frozen=True)
class Provided(Generic[T]):
    """An item a hook returned, with the plugin that provided it."""

    item: T
    plugin: str


class Catalog(Generic[T]):
    """Name -> item for one kind of thing, remembering which plugin provided each name and any clashes."""

    def __init__(self, kind: str, note: str = "") -> None:
        self.kind = kind
        self.note = note
        """Added to "unknown name" errors: why a name may be missing (the allow-list)."""
        self._items: dict[str, Provided[T]] = {}
        self._clashes: dict[str, list[str]] = {}

    def add(self, name: str, item: T, plugin: str) -> str | None:
        """Add ``name``; on a clash keep the first and return an error message naming both plugins."""
        if name in self._items and self._items[name].plugin != plugin:
            first = self._items[name].plugin
            self._clashes.setdefault(name, [first]).append(plugin)
            return f"{self.kind} {name!r} is provided by both plugin {first!r} and plugin {plugin!r}"
        self._items[name] = Provided(item, plugin)
        return None

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str) -> T:
        return self.provided(name).item

    def provided(self, name: str) -> Provided[T]:
        if name in self._clashes:
            raise PluginError(
                f"{self.kind} {name!r} is provided by several plugins ({', '.join(self._clashes[name])}); "
                f"uninstall one or restrict plugins with {ALLOW_ENV}=..."
            )
        if name not in self._items:
            raise unknown_name(self.kind.rstrip("s").replace("_", " "), name, self.names(), self.note)
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def items(self) -> list[tuple[str, Provided[T]]]:
        return sorted(self._items.items())


@dataclass(frozen=True)
class Backbone:
    """A backbone merged over plugins: one factory per framework, possibly from different plugins, and the
    ``weight_names`` correspondence and ``pretrained`` reader of whichever plugin declares one."""

    name: str
    description: str
    reduction: int | Callable[[BackboneSpec], int]
    factories: dict[str, Any]
    plugins: dict[str, str]
    weight_names: Mapping[str, str] = field(default_factory=dict)
    pretrained: Any = None
    """A lazy ``"module:attr"`` (or callable) reading other libraries' weight files: see ``BackboneInfo``."""

    def reduction_for(self, spec: BackboneSpec) -> int:
        return self.reduction(spec) if callable(self.reduction) else self.reduction


class PluginManager:
    """Loads plugins and answers 'which plugin provides X', isolating broken plugins."""

    def __init__(self, load_entry_points: bool = True, extra: Iterable[tuple[str, Any]] = ()) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.status: dict[str, PluginStatus] = {}
        allow = os.environ.get(ALLOW_ENV)
        self.allowed = {n.strip() for n in allow.split(",") if n.strip()} if allow else None
        self.note = "" if self.allowed is None else (
            f"Only the plugins named in {ALLOW_ENV}={allow!r} are loaded: add the one that provides it, or unset "
            f"{ALLOW_ENV}.")
        if load_entry_points:
            self._load_entry_points()
        for name, plugin in extra:
            self.register(plugin, name)
        self._collect()

    # -- loading ------------------------------------------------------------------------------------------------

    def _load_entry_points(self) -> None:
        seen: set[str] = set()
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add(ep.name)
            if self.allowed is not None and ep.name not in self.allowed:
                continue
            dist = ep.dist
            status = PluginStatus(
                ep.name, ep.value, dist.metadata["Name"] if dist else "", dist.version if dist else ""
            )
            self.status[ep.name] = status
            try:
                plugin = ep.load()
            except Exception as exc:
                status.errors.append(f"import failed: {_describe(exc)}")
                continue
            self._register(plugin, status)
        self._warn_unknown_allowed(seen)

    def _warn_unknown_allowed(self, installed: set[str]) -> None:
        """Warn when the allow-list names plugins that are not installed: a typo would otherwise load nothing."""
        unknown = sorted((self.allowed or set()) - installed)
        if unknown:
            warnings.warn(
                f"{ALLOW_ENV} names {', '.join(map(repr, unknown))}, which no installed plugin is called; "
                f"installed plugins: {', '.join(sorted(installed)) or 'none'}. Fix or unset {ALLOW_ENV}.",
                PluginWarning, stacklevel=4,
            )

    def register(self, plugin: Any, name: str) -> None:
        """Register a plugin object or module programmatically (tests, notebooks)."""
        module = getattr(plugin, "__name__", type(plugin).__name__)
        self.status[name] = status = PluginStatus(name, module)
        self._register(plugin, status)

    def _register(self, plugin: Any, status: PluginStatus) -> None:
        try:
            self.pm.register(plugin, name=status.name)
            status.loaded = True
        except Exception as exc:
            status.errors.append(f"registration failed: {_describe(exc)}")

    # -- collecting ---------------------------------------------------------------------------------------------

    def _call(self, hook: str) -> list[tuple[str, Any]]:
        """Call one hook on every plugin separately, so one plugin raising does not hide the others' results."""
        results: list[tuple[str, Any]] = []
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            try:
                value = impl.function()
            except Exception as exc:
                self.status[impl.plugin_name].errors.append(f"{hook}() raised {_describe(exc)}")
                continue
            for item in value or []:
                results.append((impl.plugin_name, item))
        return results

    def _collect(self) -> None:
        self.frameworks: Catalog[FrameworkInfo] = Catalog("frameworks", self.note)
        self.launchers: Catalog[LauncherInfo] = Catalog("launchers", self.note)
        self.dataset_sources: Catalog[DatasetSourceInfo] = Catalog("dataset_sources", self.note)
        self.cards: Catalog[ModelSpec] = Catalog("model_cards", self.note)
        simple: list[tuple[str, Catalog[Any], type[Any]]] = [
            ("deepgalaxy_frameworks", self.frameworks, FrameworkInfo),
            ("deepgalaxy_launchers", self.launchers, LauncherInfo),
            ("deepgalaxy_dataset_sources", self.dataset_sources, DatasetSourceInfo),
            ("deepgalaxy_model_cards", self.cards, ModelSpec),
        ]
        for hook, catalog, kind in simple:
            for plugin, item in self._call(hook):
                if not isinstance(item, kind):
                    self.status[plugin].errors.append(f"{hook}() returned {item!r}, not a {kind.__name__}")
                    continue
                self._record(catalog, item.name, item, plugin)

        merged: dict[str, dict[str, Any]] = {}
        for plugin, info in self._call("deepgalaxy_backbones"):
            if not isinstance(info, BackboneInfo):
                self.status[plugin].errors.append(f"deepgalaxy_backbones() returned {info!r}, not a BackboneInfo")
                continue
            self.status[plugin].provides["backbones"].append(info.name)
            entry = merged.setdefault(
                info.name, {"description": info.description, "reduction": info.reduction, "f": {}, "p": {}, "w": {},
                            "r": None}
            )
            entry["w"] = entry["w"] or dict(info.weight_names)
            entry["r"] = entry["r"] or info.pretrained
            for fw, factory in info.factories.items():
                if fw in entry["f"] and entry["p"][fw] != plugin:
                    msg = (
                        f"backbone {info.name!r} for framework {fw!r} is provided by both plugin "
                        f"{entry['p'][fw]!r} and plugin {plugin!r}"
                    )
                    self.status[plugin].errors.append(msg)
                    continue
                entry["f"][fw], entry["p"][fw] = factory, plugin
                entry["description"] = entry["description"] or info.description
        self.backbones = {
            name: Backbone(name, e["description"], e["reduction"], e["f"], e["p"], e["w"], e["r"])
            for name, e in merged.items()
        }

    def _record(self, catalog: Catalog[Any], name: str, item: Any, plugin: str) -> None:
        clash = catalog.add(name, item, plugin)
        if clash:
            self.status[plugin].errors.append(clash)
        else:
            self.status[plugin].provides[catalog.kind].append(name)

    # -- queries ------------------------------------------------------------------------------------------------

    def backbone(self, name: str) -> Backbone:
        if name not in self.backbones:
            raise unknown_name("backbone", name, sorted(self.backbones), self.note)
        return self.backbones[name]

    def plugins(self) -> list[PluginStatus]:
        return [self.status[k] for k in sorted(self.status)]


def unknown_name(kind: str, name: str, known: list[str], note: str = "") -> UnknownNameError:
    """:class:`UnknownNameError` for ``name``, with ``note`` (e.g. that an allow-list is set) after its message."""
    error = UnknownNameError(kind, name, known)
    if note:
        error.args = (f"{error.args[0]} {note}",)
    return error


def _describe(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"


_manager: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, loaded on first use."""
    global _manager
    if _manager is None:
        _manager = PluginManager()
    return _manager


def reset_plugin_manager(factory: Callable[[], PluginManager] | None = None) -> PluginManager:
    """Forget the loaded plugins and load them again (after installing a plugin, or in tests)."""
    global _manager
    importlib.invalidate_caches()  # see distributions installed since the last load
    _manager = factory() if factory else PluginManager()
    return _manager
