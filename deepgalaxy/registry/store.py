"""The MLflow Model Registry binding: register trained versions, list them, promote aliases, load them back.

A model version is an MLflow *pyfunc* model whose data is ``card.json`` + ``weights.safetensors``. The flavour's
``loader_module`` is :mod:`deepgalaxy.registry.pyfunc`, a module of the installed package: the artifact holds no
Python file and no pickle, so ``mlflow.pyfunc.load_model("models:/vae-b4@champion").predict(images)`` runs only
installed code, and :func:`load_registered` (behind ``registry.load``) reads nothing but the card and the weights.

Versions registered before that (MLflow "models from code": a script in the artifact imports
:class:`DeepGalaxyPythonModel`) still load with :func:`load_registered`, which never runs that script;
``mlflow.pyfunc.load_model`` does run it, so re-register them (:func:`register_directory` of a saved copy).
"""

from __future__ import annotations

import builtins
import contextlib
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.pyfunc.model import PythonModel
from mlflow.tracking import MlflowClient

from deepgalaxy.core.errors import (
    DeepGalaxyError,
    ModelFileError,
    ModelNotFoundError,
    UnknownNameError,
    WeightsMismatchError,
)
from deepgalaxy.core.model import CARD_FILE, WEIGHTS_FILE, Model, read_card
from deepgalaxy.registry.pyfunc import default_op, run_op

MODEL_ARTIFACT = "model"
PYFUNC_LOADER = "deepgalaxy.registry.pyfunc"
"""The pyfunc flavour's loader_module: MLflow imports it from the installed package."""
DATA_DIR = "deepgalaxy-model"
"""The directory (under the artifact's ``data/``) holding card.json and weights.safetensors."""
_NAME_RE = re.compile(r"^[^@/]+$")
_LOGGED_MODEL_URI = re.compile(r"^models:/(m-[0-9a-f]+)$")
"""The URI of a model logged in a run (MLflow 3's logged models), as ``log_model`` returns it."""
PROGRESS_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


# --- the pyfunc model -----------------------------------------------------------------------------------------


class DeepGalaxyPythonModel(PythonModel):
    """The pyfunc wrapper of versions registered as "models from code" before the loader-module artifacts.

    Kept so that their stored script (``from deepgalaxy.registry.store import DeepGalaxyPythonModel``) still
    serves; new versions never reference it. Ops as :class:`deepgalaxy.registry.pyfunc.PyfuncModel`.
    """

    # Inputs are validated by deepgalaxy (shape, channels, dtype, range), not by MLflow's type-hint machinery,
    # which would otherwise wrap predict() and warn that it has no usable type hints.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from deepgalaxy.registry import load_directory

        self.model = load_directory(Path(context.artifacts["card"]).parent)

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]  # no hints: see above
        return run_op(self.model, model_input, params)


# --- registering ----------------------------------------------------------------------------------------------


@dataclass
class RegisteredVersion:
    """A model version as the registry reports it."""

    name: str
    version: int
    run_id: str | None
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    description: str = ""
    created: float = 0.0
    status: str = ""
    source: str = ""


def _client(tracking_uri: str | None, looking_up: str | None = None) -> MlflowClient:
    """A client of the store. Looking up model ``looking_up`` in a SQLite file that does not exist is refused
    (MLflow would create the file: a read never leaves a new mlflow.db behind)."""
    uri = tracking_uri or mlflow.get_tracking_uri()
    if looking_up and uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise ModelNotFoundError(
            f"model {looking_up!r}: there is no MLflow store at {uri[len('sqlite:///'):]} (nothing was tracked "
            f"there, and none was created now): train it there first with `deepgalaxy train {looking_up} --data "
            "DATA.zarr`, or point --tracking-uri / MLFLOW_TRACKING_URI at the store that holds your models"
        )
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _retry(what: str, fn: Any, attempts: int = 8) -> Any:
    """Call ``fn``; retry SQLite 'database is locked' and concurrent-creation clashes with a short backoff."""
    for i in range(attempts):
        try:
            return fn()
        except MlflowException as exc:
            text = str(exc).lower()
            transient = "locked" in text or "unique constraint" in text or "already exists" in text or "busy" in text
            if not transient or i == attempts - 1:
                raise
            time.sleep(0.05 * 2**i)
    raise AssertionError(what)  # pragma: no cover


def log_pyfunc_model(model_dir: Path, pip_requirements: list[str] | None = None) -> str:
    """Log ``model_dir`` (card.json + weights.safetensors) as a pyfunc model in the active run; return its URI.

    The flavour's loader is :data:`PYFUNC_LOADER` (installed code) and its data a copy of the two files only.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    card = read_card(model_dir)
    if not (model_dir / WEIGHTS_FILE).is_file():
        raise WeightsMismatchError(f"{model_dir} has no {WEIGHTS_FILE}")
    # No input schema: the ops take images (N, H, W, C) of any dtype deepgalaxy accepts, or latent vectors (decode).
    # The params schema lets the scoring server pass {"op": ...}; it drops params a signature does not declare.
    signature = ModelSignature(inputs=None, params=ParamSchema([ParamSpec("op", "string", default_op(card))]))
    with tempfile.TemporaryDirectory() as tmp, quiet_mlflow():
        data = Path(tmp) / DATA_DIR
        data.mkdir()
        for name in (CARD_FILE, WEIGHTS_FILE):
            shutil.copyfile(model_dir / name, data / name)
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            loader_module=PYFUNC_LOADER,
            data_path=str(data),
            signature=signature,
            pip_requirements=pip_requirements or _requirements(),
            metadata={"deepgalaxy_card": card.name, "task": card.task},
        )
    return str(info.model_uri)


@contextlib.contextmanager
def quiet_mlflow() -> Iterator[None]:
    """No artifact-download progress bars and no 'input example' advice while logging/loading our own models."""
    old = os.environ.get(PROGRESS_ENV)
    os.environ[PROGRESS_ENV] = "false"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            yield
    finally:
        if old is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = old


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("deepgalaxy", "mlflow", "numpy", "safetensors", "pydantic"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs


def register_version(model_uri: str, name: str, run_id: str | None = None, tags: Mapping[str, Any] | None = None,
                     description: str = "", tracking_uri: str | None = None) -> int:
    """Create a new version of registered model ``name`` from ``model_uri``; safe when several finish at once."""
    client = _client(tracking_uri)

    def create_model() -> None:
        try:
            client.create_registered_model(name, description=f"deepgalaxy model card {name!r}")
        except MlflowException as exc:
            if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
                raise

    _retry("create registered model", create_model)
    str_tags = {k: str(v) for k, v in (tags or {}).items()}
    logged = _LOGGED_MODEL_URI.match(model_uri)  # a tracking server accepts models:/m-... only with its model_id
    mv = _retry("create model version", lambda: client.create_model_version(
        name, source=model_uri, run_id=run_id, tags=str_tags, description=description or None,
        model_id=logged.group(1) if logged else None))
    return int(mv.version)


def register_directory(model_dir: Path, name: str | None = None, tags: Mapping[str, Any] | None = None,
                       description: str = "", tracking_uri: str | None = None, experiment: str = "deepgalaxy") -> int:
    """Register a saved model directory as a new version outside a training (benchmarks, imports).

    Opens a short MLflow run in ``experiment`` to hold the artifact, since a model version needs a source.
    """
    from deepgalaxy.tracking import active_run, resolve_tracking_uri

    card = read_card(model_dir)
    name = name or card.name
    with active_run(resolve_tracking_uri(tracking_uri), experiment, f"register-{name}") as run:
        uri = log_pyfunc_model(Path(model_dir))
        return register_version(uri, name, run.info.run_id, tags, description, tracking_uri)


# --- listing, promoting ---------------------------------------------------------------------------------------


def _as_version(mv: Any) -> RegisteredVersion:
    return RegisteredVersion(
        name=mv.name, version=int(mv.version), run_id=mv.run_id,
        aliases=builtins.list(getattr(mv, "aliases", []) or []),
        tags=dict(mv.tags or {}), description=mv.description or "", created=(mv.creation_timestamp or 0) / 1000,
        status=str(mv.status or ""), source=mv.source or "",
    )


def _require_model(client: MlflowClient, name: str, tracking_uri: str | None) -> Any:
    """The registered model ``name``, or an error naming close names and how to train one."""
    if not _NAME_RE.match(name):
        raise DeepGalaxyError(f"{name!r} is not a model name; use NAME, NAME@ALIAS, or NAME with version=N")
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" not in str(exc) and "not found" not in str(exc).lower():
            raise
    where = tracking_uri or mlflow.get_tracking_uri()
    registered = [m.name for m in client.search_registered_models(max_results=1000)]
    from deepgalaxy import registry

    cards = registry.list_models()
    if name in cards:
        raise ModelNotFoundError(_no_version_text(name, where))
    raise UnknownNameError(f"model (no registered model or card of that name in {where})", name,
                           sorted(set(registered) | set(cards)))


def _no_version_text(name: str, where: str) -> str:
    return (f"model {name!r} has no trained version in {where}; train one with: "
            f"deepgalaxy train {name} --data DATA.zarr  (or registry.create({name!r}) for an untrained model)")


def versions(name: str, tracking_uri: str | None = None) -> builtins.list[RegisteredVersion]:
    """Every version of registered model ``name``, newest first."""
    client = _client(tracking_uri, looking_up=name)
    _require_model(client, name, tracking_uri)
    found = client.search_model_versions(f"name = '{name}'", max_results=10000)
    # search results may omit aliases; read them from the registered model
    aliases: dict[str, builtins.list[str]] = {}
    for alias, ver in (getattr(client.get_registered_model(name), "aliases", {}) or {}).items():
        aliases.setdefault(str(ver), []).append(alias)
    out = [_as_version(mv) for mv in found]
    for v in out:
        v.aliases = sorted(set(v.aliases) | set(aliases.get(str(v.version), [])))
    return sorted(out, key=lambda v: v.version, reverse=True)


def promote(name: str, version: int, alias: str = "champion", tracking_uri: str | None = None) -> RegisteredVersion:
    """Point ``alias`` of model ``name`` at ``version`` (moving it from any other version)."""
    client = _client(tracking_uri, looking_up=name)
    _require_model(client, name, tracking_uri)
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_-]*$", alias) or alias.lower() == "latest" or re.match(r"^v\d+$", alias):
        raise DeepGalaxyError(f"alias {alias!r} is not allowed: use letters, digits, '_' or '-', not 'latest' or 'vN'")
    _get_version(client, name, int(version), tracking_uri)
    _retry("set alias", lambda: client.set_registered_model_alias(name, alias, str(int(version))))
    return _as_version(client.get_model_version(name, str(int(version))))


def _get_version(client: MlflowClient, name: str, version: int, tracking_uri: str | None) -> Any:
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        have = sorted(int(mv.version) for mv in client.search_model_versions(f"name = '{name}'", max_results=10000))
        where = tracking_uri or mlflow.get_tracking_uri()
        if not have:
            raise ModelNotFoundError(_no_version_text(name, where)) from None
        raise ModelNotFoundError(
            f"model {name!r} has no version {version} in {where}; versions: {', '.join(map(str, have))}"
        ) from None


# --- loading --------------------------------------------------------------------------------------------------


def parse_name(name: str, version: int | None = None) -> tuple[str, str | None, int | None]:
    """``"vae-b4@champion"`` -> ``("vae-b4", "champion", None)``; a version and an alias together are an error."""
    base, _, alias = name.partition("@")
    if alias and version is not None:
        raise DeepGalaxyError(f"give either an alias ({name!r}) or version={version}, not both")
    if not base or (_ and not alias):
        raise DeepGalaxyError(f"{name!r} is not a model name; use NAME, NAME@ALIAS, or NAME with version=N")
    return base, alias or None, version


def resolve_version(name: str, version: int | None = None, tracking_uri: str | None = None) -> RegisteredVersion:
    """Which version ``name`` (``NAME``, ``NAME@ALIAS``) and ``version`` mean: an alias, a number, or the newest."""
    base, alias, version = parse_name(name, version)
    client = _client(tracking_uri, looking_up=base)
    model = _require_model(client, base, tracking_uri)
    where = tracking_uri or mlflow.get_tracking_uri()
    if alias:
        try:
            return _as_version(client.get_model_version_by_alias(base, alias))
        except MlflowException:
            have = sorted((getattr(model, "aliases", {}) or {}).items())
            listing = ", ".join(f"{a} -> v{v}" for a, v in have) or "none"
            raise ModelNotFoundError(
                f"model {base!r} has no alias {alias!r} in {where} (aliases: {listing}); set it with: "
                f"deepgalaxy models promote {base} VERSION --alias {alias}"
            ) from None
    if version is not None:
        return _as_version(_get_version(client, base, int(version), tracking_uri))
    ready = [v for v in versions(base, tracking_uri) if v.status in ("READY", "")]
    if not ready:
        raise ModelNotFoundError(_no_version_text(base, where))
    return ready[0]


def load_registered(name: str, version: int | None = None, framework: str | None = None,
                    tracking_uri: str | None = None) -> Model:
    """Load a registered version (``NAME``: newest, ``NAME@ALIAS``, or ``version=N``) as a :class:`Model`.

    Reads only the card and the weights (of versions logged either way: loader module or "models from code"); no
    file of the artifact is executed or unpickled.
    """
    from deepgalaxy.registry import load_directory

    mv = resolve_version(name, version, tracking_uri)
    uri = f"models:/{mv.name}/{mv.version}"
    store_uri = tracking_uri or mlflow.get_tracking_uri()
    # resolve the artifact location with our own client: a models:/ URI would be resolved against the global
    # registry URI, not the one asked for
    location = _client(tracking_uri).get_model_version_download_uri(mv.name, str(mv.version))
    with tempfile.TemporaryDirectory(prefix="deepgalaxy-model-") as tmp, quiet_mlflow():
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp,
                                                         tracking_uri=store_uri))
        found = sorted(local.rglob(CARD_FILE))
        if not found:
            raise WeightsMismatchError(f"{uri} holds no {CARD_FILE}: it was not registered by deepgalaxy")
        source = {"name": mv.name, "version": mv.version, "run_id": mv.run_id, "aliases": mv.aliases,
                  "tracking_uri": store_uri, "uri": uri}
        try:
            model = load_directory(found[0].parent, framework, source=source)
        except WeightsMismatchError as exc:
            text = str(exc).replace(str(local), location.rstrip("/"))  # name the file in the store, not in tmp
            raise type(exc)(_unusable_version_text(mv, store_uri, text, isinstance(exc, ModelFileError))) from None
    model.source.pop("path", None)
    return model


def _unusable_version_text(mv: RegisteredVersion, store_uri: str, problem: str, unreadable: bool) -> str:
    """One line: which version of which model in which store, what is wrong with its files, and what to do."""
    what = problem if unreadable else f"its weights do not match its card ({problem})"
    return (f"model {mv.name!r} version {mv.version}: {what} (registered in {store_uri}); register a new version "
            f"from a good training, or load another one (list them: deepgalaxy models versions {mv.name})")
