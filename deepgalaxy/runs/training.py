"""Training, :func:`deepgalaxy.runs.train`: resolve the card and overrides, write ``run.json``, launch, report.

A run lives in its own directory (``deepgalaxy-runs/<card>-<time>`` under the working directory unless
``run_dir`` says otherwise): ``run.json`` (the :class:`RunSpec`), the checkpoint, the saved model, ``result.json``.
``resume=True`` continues the newest unfinished run of the card (or ``run_dir``) from its last checkpoint, into the
same MLflow run, and says which directory it picked and why. While a process trains a run its directory is locked
(:class:`~deepgalaxy.runs.rundir.RunLock`), and the workers end with the process that launched them.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from deepgalaxy.core.errors import DatasetError, DeepGalaxyError
from deepgalaxy.core.specs import (
    TASK_PARTS,
    DataSpec,
    ModelSpec,
    RunSpec,
    StoreSpec,
    TrainSpec,
    describe_errors,
    with_overrides,
)
from deepgalaxy.runs.init_weights import check_init
from deepgalaxy.runs.launch import check_framework, launch, launcher_for
from deepgalaxy.runs.placement import check_device, with_device
from deepgalaxy.runs.rundir import (
    LAUNCHER_SLOT,
    RESULT_FILE,
    RUN_FILE,
    RunLock,
    read_run_spec,
    read_state,
)

RUNS_DIR_ENV = "DEEPGALAXY_RUNS_DIR"
DEFAULT_RUNS_DIR = "deepgalaxy-runs"


@dataclass
class TrainResult:
    """What a finished training reports: where the run and model version are, best metrics, throughput."""

    run_id: str
    tracking_uri: str
    run_dir: Path
    model_name: str | None
    model_version: int | None
    best: dict[str, float] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)
    images_per_s: float = 0.0
    epochs: int = 0
    workers: int = 1
    framework: str = "torch"
    experiment_id: str | None = None
    wall_s: float = 0.0
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def model_uri(self) -> str | None:
        return f"models:/{self.model_name}/{self.model_version}" if self.model_version else None

    def summary(self) -> str:
        """A few lines for the terminal."""
        from deepgalaxy.tracking import ui_hint

        lines = [f"trained {self.raw.get('card', self.model_name)} with {self.framework} on {self.workers} worker(s), "
                 f"{self.epochs} epoch(s) in {self.wall_s:.1f} s"]
        if self.best:
            lines.append("best validation: " + ", ".join(f"{k[4:]}={v:.4g}" for k, v in sorted(self.best.items())))
        lines.append(f"throughput: {self.images_per_s:.1f} images/s total, "
                     f"{self.images_per_s / max(self.workers, 1):.1f} per worker")
        lines.append(f"MLflow run: {self.run_id} in {self.tracking_uri}")
        if self.model_version:
            lines.append(f"model version: {self.model_name} v{self.model_version} ({self.model_uri}); "
                         f"load it with registry.load({self.model_name!r})")
        lines.append(f"run directory: {self.run_dir}")
        lines.append(f"see it: {ui_hint(self.tracking_uri)}")
        return "\n".join(lines)


# --- resolving what to train ----------------------------------------------------------------------------------


def resolve_card(card: ModelSpec | str | Path) -> ModelSpec:
    """A card object, a card name (``"vae-b4"``) or the path of a ``card.json``."""
    if isinstance(card, ModelSpec):
        return card
    path = Path(card)
    if path.suffix == ".json" and path.is_file():
        try:
            return ModelSpec.model_validate_json(path.read_text())
        except ValidationError as exc:
            raise DeepGalaxyError(f"{path}: not a valid model card: {exc}") from None
    from deepgalaxy import registry

    return registry.card(str(card))


def parse_overrides(items: Sequence[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """``["train.batch_size=8", "card.backbone.options.widths=[8,16]"]`` -> a dict; values are JSON if they parse.

    A key without a section is looked up in the train spec, then the card, then the data spec
    (``batch_size=8`` means ``train.batch_size``; ``input_size=64`` means ``card.input_size``).
    """
    if items is None:
        return {}
    pairs: list[tuple[str, Any]]
    if isinstance(items, Mapping):
        pairs = list(items.items())
    else:
        pairs = []
        for item in items:
            key, sep, text = item.partition("=")
            if not sep or not key.strip():
                raise DeepGalaxyError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.batch_size=8")
            try:
                value: Any = json.loads(text)
            except json.JSONDecodeError:
                value = text
            pairs.append((key.strip(), value))
    out: dict[str, Any] = {}
    for key, value in pairs:
        out[_qualify(key)] = value
    return out


_SECTIONS: dict[str, type[Any]] = {"train": TrainSpec, "card": ModelSpec, "data": DataSpec}


def _qualify(key: str) -> str:
    parts = key.split(".")
    if parts[0] in _SECTIONS and len(parts) > 1 and parts[1] in _SECTIONS[parts[0]].model_fields:
        return key
    if parts[0] in RunSpec.model_fields and parts[0] not in _SECTIONS:
        return key
    for section, model in _SECTIONS.items():
        if parts[0] in model.model_fields:
            return f"{section}.{key}"
    known = sorted({*RunSpec.model_fields, *(f"train.{k}" for k in TrainSpec.model_fields),
                    *(f"card.{k}" for k in ModelSpec.model_fields), *(f"data.{k}" for k in DataSpec.model_fields)})
    import difflib

    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise DeepGalaxyError(f"--set {key}: no such setting.{hint} Settings live under card., train., data.")


DataArgument = str | Path | Sequence[str | Path]
"""One store (``"sims.zarr"``) or several, each ``PATH`` or ``PATH:SHARE`` (``"obs.zarr:0.5"``)."""


def store_specs(data: DataArgument) -> list[dict[str, Any]]:
    """The ``data.stores`` entries of ``data``, paths made absolute (URLs are left as they are)."""
    items = [data] if isinstance(data, str | Path) else list(data)
    out = []
    for item in items:
        try:
            store = StoreSpec.from_argument(str(item))
        except ValueError as exc:
            raise DeepGalaxyError(str(exc)) from None
        path = store.path if "://" in store.path else str(Path(store.path).expanduser().resolve())
        out.append({"path": path, "share": store.share})
    return out


def build_spec(card: ModelSpec | str | Path, data: DataArgument, *, framework: str = "torch", workers: int = 1,
               hosts: str | None = None, epochs: int | None = None,
               overrides: Sequence[str] | Mapping[str, Any] | None = None, tracking_uri: str | None = None,
               experiment: str = "deepgalaxy", register: bool = True, run_dir: Path | None = None,
               device: str | None = None, precision: str | None = None) -> RunSpec:
    """The validated :class:`RunSpec` of a training (``--set`` overrides applied, then ``device`` and
    ``precision`` when given)."""
    from deepgalaxy.tracking import resolve_tracking_uri

    if hosts and workers == 1:
        from deepgalaxy.core.workers import parse_hosts

        workers = sum(parse_hosts(hosts).values())
    base: dict[str, Any] = {
        "card": resolve_card(card).model_dump(mode="json"),
        "data": {"stores": store_specs(data)},
        "framework": framework,
        "workers": workers,
        "hosts": hosts,
        "tracking_uri": resolve_tracking_uri(tracking_uri),
        "experiment": experiment,
        "register_model": register,
        "checkpoint_dir": str(run_dir) if run_dir else None,
    }
    if epochs is not None:
        base["train"] = {"epochs": epochs}
    try:
        spec = RunSpec.model_validate(base)
        return with_device(with_overrides(spec, parse_overrides(overrides)), device, precision)
    except ValidationError as exc:
        raise DeepGalaxyError(f"invalid training settings: {describe_errors(exc)}") from None
    except KeyError as exc:
        raise DeepGalaxyError(str(exc.args[0])) from None


# --- run directories ------------------------------------------------------------------------------------------


def runs_root() -> Path:
    return Path(os.environ.get(RUNS_DIR_ENV) or DEFAULT_RUNS_DIR).resolve()


def new_run_dir(card_name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = runs_root() / f"{card_name}-{stamp}-{secrets.token_hex(2)}"
    path.mkdir(parents=True)
    return path


GIVEN = "given with --run-dir"
"""Why ``--resume`` continues a run directory that ``--run-dir`` named."""


def find_resumable(card_name: str | None) -> tuple[Path, str]:
    """The run ``--resume`` continues: the newest run directory (of ``card_name``) without a result, and why it
    was picked. A run whose ``run.json`` cannot be read counts for the card its directory is named after."""
    root = runs_root()
    candidates = []
    for d in root.glob("*/") if root.is_dir() else []:
        run_json = d / RUN_FILE
        if not run_json.is_file() or (d / RESULT_FILE).is_file():
            continue
        name = _card_name_of(run_json)
        if card_name and name != card_name and not (name is None and d.name.startswith(f"{card_name}-")):
            continue
        candidates.append((run_json.stat().st_mtime, d))
    which = f" of card {card_name!r}" if card_name else ""
    if not candidates:
        raise DeepGalaxyError(f"--resume: no unfinished run{which} under {root}; give its directory with --run-dir")
    return max(candidates)[1], f"the newest unfinished run{which} under {root}"


def _card_name_of(run_json: Path) -> str | None:
    """The card name in a ``run.json``, read leniently (None when the file is not a run spec at all)."""
    try:
        name = json.loads(run_json.read_text())["card"]["name"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return name if isinstance(name, str) else None


def resumable_spec(directory: Path, card_name: str | None, why: str) -> RunSpec:
    """The spec of the run ``--resume`` picked (``why``); a :class:`DeepGalaxyError` naming the directory and
    what to do when that run cannot be continued (finished, not a run, invalid settings, another card)."""
    picked = f"--resume picked {directory} ({why})"
    if not (directory / RUN_FILE).is_file():
        raise DeepGalaxyError(f"{picked}: it has no {RUN_FILE}, so it is not a deepgalaxy run directory")
    if (directory / RESULT_FILE).is_file():
        raise DeepGalaxyError(f"{picked}: the run already finished; start a new one without --resume")
    try:
        spec = read_run_spec(directory)
    except DeepGalaxyError as exc:
        away = "" if why == GIVEN else f", move {directory} out of {directory.parent} (then --resume picks the next)"
        raise DeepGalaxyError(
            f"{picked}, but it cannot be resumed: {exc}. Start a new training without --resume{away}, or give "
            "another run with --run-dir"
        ) from None
    if card_name and spec.card.name != card_name:
        raise DeepGalaxyError(
            f"{picked}: it trains {spec.card.name!r}, not {card_name!r}; resume it with "
            f"`deepgalaxy train {spec.card.name} --resume --run-dir {directory}`, or give a run of {card_name!r}"
        )
    return spec


def moved_to(spec: RunSpec, hosts: str, directory: Path) -> RunSpec:
    """The resumed run on other ``hosts`` (a new allocation after a host died), recorded in its ``run.json``; the
    ranks stay as many as before (their data shards and the checkpoint depend on it)."""
    from deepgalaxy.core.workers import parse_hosts

    if sum(parse_hosts(hosts).values()) < spec.workers:
        raise DeepGalaxyError(f"--resume --hosts {hosts!r}: the run has {spec.workers} ranks, more than the "
                              f"{sum(parse_hosts(hosts).values())} slots given; give at least {spec.workers} slots")
    moved = spec.model_copy(update={"hosts": hosts})
    (directory / RUN_FILE).write_text(moved.model_dump_json(indent=2))
    return moved


# --- launching ------------------------------------------------------------------------------------------------


def worker_argv(run_json: Path, launcher: str, checkpoint_every: int = 0, progress: bool = True) -> list[str]:
    """The command line of one training rank started by ``launcher``."""
    argv = [sys.executable, "-m", "deepgalaxy.runs.worker", str(run_json), "--launcher", launcher]
    if checkpoint_every:
        argv += ["--checkpoint-every", str(checkpoint_every)]
    if not progress:
        argv.append("--no-progress")
    return argv


def train(card: ModelSpec | str | Path | None = None, data: DataArgument | None = None, *, framework: str = "torch",
          workers: int = 1, hosts: str | None = None, epochs: int | None = None,
          overrides: Sequence[str] | Mapping[str, Any] | None = None, tracking_uri: str | None = None,
          experiment: str = "deepgalaxy", register: bool = True, resume: bool = False,
          run_dir: str | Path | None = None, launcher: str | None = None, checkpoint_every: int = 0,
          progress: bool = True, init: str | None = None, device: str | None = None,
          precision: str | None = None) -> TrainResult:
    """Train a card on a dataset, tracked in MLflow, and register the result as a new model version.

    Args:
        card: a card name (``"vae-b4"``), a :class:`ModelSpec`, or a ``card.json`` path.
        data: a deepgalaxy Zarr store, or several (``["sims.zarr", "obs.zarr:0.5"]``: the second gives half of
            every batch; the first leads, an epoch being one pass over it). Images labelled -1 (ingested
            observations) count in every loss term but the classifier's.
        framework: ``"torch"`` or ``"tensorflow"`` (any installed framework plugin).
        workers: data-parallel ranks; more than 1 runs ``horovodrun --gloo``.
        hosts: ``"h1:4,h2:4"`` to run on several machines through Horovod; with ``resume``, the hosts to continue
            on (the same number of ranks).
        epochs: shortcut for ``overrides={"train.epochs": epochs}``.
        overrides: ``["train.batch_size=8", "card.backbone.options.widths=[8,16]"]`` or a dict.
        tracking_uri: MLflow store; default ``MLFLOW_TRACKING_URI`` or MLflow's ``sqlite:///mlflow.db``.
        resume: continue the newest unfinished run of ``card`` (or ``run_dir``) from its last checkpoint.
        run_dir: where the run's files go (default ``deepgalaxy-runs/<card>-<time>``).
        launcher: force a launcher plugin (``local``, ``horovod``).
        checkpoint_every: checkpoint every N steps as well as every epoch (0: per epoch only).
        init: start from these weights (:mod:`deepgalaxy.runs.init_weights`); not with ``resume``, whose
            checkpoint holds the weights already.
        device: ``auto`` (the local rank's GPU when one is visible, else the CPU), ``cpu``, ``cuda``, ``cuda:N``;
            None keeps the train spec's (``train.device``, ``auto``). With ``resume``: continue on this device.
        precision: ``auto`` (bf16 where the device does it natively, else fp32), ``fp32``, ``bf16``, ``fp16``
            (GPU only); None keeps the train spec's (``train.precision``, ``fp32``). With ``resume`` likewise.
    """
    t0 = time.perf_counter()
    from deepgalaxy.tracking import prepare_store, resolve_tracking_uri

    lock: RunLock | None = None
    if resume and init:
        raise DeepGalaxyError(f"--init {init} with --resume: a resumed run continues from its checkpoint's weights "
                              "(and its own --init, if it had one); drop --init, or start a new run without --resume")
    if resume:
        card_name = resolve_card(card).name if card is not None else None
        directory, why = (Path(run_dir).resolve(), GIVEN) if run_dir else find_resumable(card_name)
        spec = resumable_spec(directory, card_name, why)
        replaced = device is not None or precision is not None  # the checkpoint is device-independent
        if replaced:
            spec = with_device(spec, device, precision)
        check_device(spec)  # a run from a GPU machine resumed where there is none: say so, use --device
        lock = RunLock(directory, LAUNCHER_SLOT).acquire(check_workers=True)
        if hosts:
            spec = moved_to(spec, hosts, directory)
        elif replaced:
            (directory / RUN_FILE).write_text(spec.model_dump_json(indent=2))
        state = read_state(directory)
        where = f"epoch {state['epoch'] + 1}, step {state['next_batch'] + 1}" if state else "the start (no checkpoint)"
        print(f"resuming {directory} ({why}) from {where}", file=sys.stderr)
    else:
        if card is None or data is None:
            raise DeepGalaxyError("train needs a card and --data (or --resume to continue an unfinished run)")
        spec = build_spec(card, data, framework=framework, workers=workers, hosts=hosts, epochs=epochs,
                          overrides=overrides, tracking_uri=tracking_uri, experiment=experiment, register=register,
                          device=device, precision=precision)
        check_framework(spec.framework)
        check_device(spec)
        check_data(spec)
        if init:
            spec = spec.model_copy(update={"init": check_init(init, spec.card, spec.tracking_uri)})
    try:
        chosen = launcher_for(launcher, spec.workers, spec.hosts)
        prepare_store(resolve_tracking_uri(spec.tracking_uri), spec.experiment)  # before any run directory
        if lock is None:
            directory, lock = _start_run_dir(spec, run_dir)
            spec = spec.model_copy(update={"checkpoint_dir": str(directory)})
            (directory / RUN_FILE).write_text(spec.model_dump_json(indent=2))
        launch(chosen, worker_argv(directory / RUN_FILE, chosen.name, checkpoint_every, progress), spec.workers,
               spec.hosts, {}, directory, failed="{message} (run directory {directory})",
               no_result="training exited with code {code} and no result; continue it from its last checkpoint "
               f"with: deepgalaxy train {spec.card.name} --resume --run-dir {{directory}}")
    finally:
        if lock is not None:
            lock.release()
    return read_result(directory, wall_s=time.perf_counter() - t0)


def _start_run_dir(spec: RunSpec, run_dir: str | Path | None) -> tuple[Path, RunLock]:
    """The new run's directory (``run_dir`` or a fresh one), locked; refused when it already holds a run."""
    directory = Path(run_dir).resolve() if run_dir else new_run_dir(spec.card.name)
    directory.mkdir(parents=True, exist_ok=True)
    lock = RunLock(directory, LAUNCHER_SLOT).acquire(check_workers=True)
    if (directory / RUN_FILE).is_file():
        lock.release()
        raise DeepGalaxyError(f"{directory} already holds a run; use --resume to continue it or another --run-dir")
    return directory, lock


def read_result(directory: str | Path, wall_s: float = 0.0) -> TrainResult:
    """The :class:`TrainResult` of a finished run directory (``result.json`` + ``run.json``)."""
    directory = Path(directory).resolve()
    if not (directory / RESULT_FILE).is_file():
        raise DeepGalaxyError(f"{directory} holds no finished training ({RESULT_FILE} is missing)")
    spec = read_run_spec(directory)
    raw = json.loads((directory / RESULT_FILE).read_text())
    return TrainResult(
        run_id=raw["run_id"], tracking_uri=raw["tracking_uri"], run_dir=directory, model_name=raw.get("model_name"),
        model_version=raw.get("model_version"), best=raw.get("best", {}), final=raw.get("final", {}),
        images_per_s=raw.get("images_per_s", 0.0), epochs=raw.get("epochs", 0), workers=spec.workers,
        framework=spec.framework, experiment_id=raw.get("experiment_id"), wall_s=wall_s, raw=raw,
    )


def open_stores(spec: RunSpec) -> list[Any]:
    """Every store of the run, opened and checked: the card's image shape, labels a card with a head can use, and
    label ranges within the card's classes."""
    from deepgalaxy.core.dataset import open_dataset

    stores = [open_dataset(s.path) for s in spec.data.stores]
    for ds in stores:
        ds.check_shape(spec.card.input_shape, model=f"card {spec.card.name!r}")
        if ds.num_classes > spec.card.num_classes:
            raise DatasetError(
                f"{ds.path}: labels have {ds.num_classes} classes but card {spec.card.name!r} has "
                f"num_classes={spec.card.num_classes}; use --set card.num_classes={ds.num_classes}"
            )
    check_labels(spec.card, stores)
    return stores


def check_data(spec: RunSpec) -> None:
    """Fail before launching anything when a store is missing, broken, of another image shape, or lacks a property
    the card's property heads learn."""
    from deepgalaxy.runs.property_targets import raw_targets

    raw_targets(spec.card, open_stores(spec))


def check_labels(card: ModelSpec, stores: Sequence[Any]) -> None:
    """A card with a classifier head needs labelled images (-1 marks an unlabelled one, e.g. ingested): in a store
    of its own, or beside unlabelled stores, whose images then count in every loss but the classifier's."""
    if "head" not in card.parts or any((ds.labels >= 0).any() for ds in stores):
        return
    headless = ", ".join(f"{task}-*" for task, parts in TASK_PARTS.items() if "head" not in parts)
    paths = " and ".join(str(ds.path) for ds in stores)
    raise DatasetError(
        f"{paths}: no labels (all images are unlabelled, as ingested images are), and card {card.name!r} (task "
        f"{card.task}) trains a classifier head, which needs labelled images. Cards without a head can train on "
        f"it: {headless} (see `deepgalaxy models`); or add a labelled store (--data sims.zarr --data "
        f"{stores[0].path}, deepgalaxy data simulate)"
    )


__all__ = ["TrainResult", "build_spec", "parse_overrides", "resolve_card", "train"]
