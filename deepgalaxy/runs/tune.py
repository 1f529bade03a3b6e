"""``deepgalaxy tune``: an Optuna study over training settings, every trial a nested MLflow run.

- Sampler: TPE (seeded; the seed is offset by the trials already in the study, so a resumed study does not
  repeat its first random proposals). Pruner: median of the validation loss reported after each epoch
  (``median:3:1``: from the 4th trial on, from the 2nd epoch on), or ``threshold:UPPER`` / ``none``.
- Objective: the lowest validation loss (``val/loss``) over the trial's epochs (``train/loss`` when the data has no
  validation split for the worker count).
- Search space (``--space``, comma-separated; the learning rate is always searched):
  ``lr``: log-uniform over ``[ref / 8, ref x 8]``, ``ref`` = the paper's 8.0 for Adadelta (1e-3 for Adam/AdamW/
  RMSprop, 0.05 for SGD), or the ``--set train.learning_rate`` given; ``optimizer``: one of the optimizers, with the
  learning rate as a log-uniform factor ``lr_factor`` in ``[1/8, 8]`` of that optimizer's reference;
  ``batch``: half, equal to or twice the per-worker batch; ``latent``: latent size 16 or 32 (cards with a VAE);
  ``loss-weights``: the card's loss-term weights, log-uniform (``[0.1, 10]``; KL ``[1e-5, 0.1]``).
- Resumable: the study lives in ``--storage`` (default ``sqlite:///optuna.db`` here). Running the same command
  again continues it until ``--trials`` trials have finished (completed or pruned); trials left running by an
  interrupted invocation are marked failed (one ``deepgalaxy tune`` process per study at a time).
- MLflow: one parent run per study (its id is kept in the study), reopened on resume; each trial is a child run
  (``mlflow.parentRunId``), created here before the trial starts and filled by the training worker itself.
  The parent holds the settings as params, the best value and parameters (tags ``best.*``, metrics ``best_*`` at
  step = finished trials), ``best.json``, ``trials.json`` and the parameter-importance plot. (Written here:
  optuna-integration's ``MLflowCallback`` is deprecated and makes flat runs.)
- ``--workers N`` runs every trial under Horovod; rank 0 reports to the Optuna storage and all ranks stop together.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepgalaxy.core.errors import DatasetError, DeepGalaxyError, TrainingError
from deepgalaxy.core.specs import OPTIMIZERS, RunSpec, with_overrides

SPACES: tuple[str, ...] = ("lr", "optimizer", "batch", "latent", "loss-weights")
LR_REFERENCE: dict[str, float] = {"adadelta": 8.0, "adam": 1e-3, "adamw": 1e-3, "sgd": 0.05, "rmsprop": 1e-3}
"""Centre of the learning-rate search per optimizer (Adadelta: the paper's Optuna result, 8.0)."""
LR_SPAN = 8.0
METRIC = "val/loss"
DEFAULT_EXPERIMENT = "deepgalaxy-tune"
DEFAULT_STORAGE = "sqlite:///optuna.db"
_ATTR = "deepgalaxy."
_LOSS_TERMS = {"classifier": ("classifier",), "fcae": ("reconstruction",), "vae": ("reconstruction", "latent", "kl"),
               "full": ("classifier", "reconstruction", "latent", "kl")}


@dataclass
class TuneResult:
    """A study after this invocation: best trial, counts, where it is stored and tracked."""

    study: str
    storage: str
    best_value: float | None
    best_params: dict[str, Any]
    best_trial: int | None
    finished: int
    pruned: int
    failed: int
    run_id: str
    tracking_uri: str
    importances: dict[str, float] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        from deepgalaxy.tracking import ui_hint

        lines = [f"study {self.study!r} in {self.storage}: {self.finished} finished trial(s) "
                 f"({self.pruned} pruned), {self.failed} failed"]
        if self.best_trial is not None and self.best_value is not None:
            shown = ", ".join(f"{k}={fmt(v)}" for k, v in self.best_params.items())
            lines.append(f"best: trial {self.best_trial}, {METRIC}={self.best_value:.4g}: {shown}")
        if self.importances:
            lines.append("parameter importance: " + ", ".join(f"{k} {v:.2f}" for k, v in self.importances.items()))
        lines.append(f"MLflow parent run: {self.run_id} in {self.tracking_uri}  ({ui_hint(self.tracking_uri)})")
        return "\n".join(lines)


def fmt(v: Any) -> str:
    """A parameter value as shown: floats to 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# --- the search space ---------------------------------------------------------------------------------------------


def parse_space(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"lr,batch"`` -> ``("lr", "batch")``; the learning rate is always part of the space."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [t for t in items if t not in SPACES]
    if unknown:
        raise DeepGalaxyError(f"--space {','.join(unknown)}: unknown; choose from {', '.join(SPACES)}")
    return tuple(s for s in SPACES if s in items or s == "lr")


def check_space(space: Sequence[str], base: RunSpec) -> None:
    """Refuse dimensions the card does not have (a latent size without a VAE, weights of a single loss term)."""
    if "latent" in space and "latent" not in base.card.parts:
        raise DeepGalaxyError(f"--space latent: card {base.card.name!r} ({base.card.task}) has no VAE; "
                              "use a vae-* or full-* card or leave latent out")
    if "loss-weights" in space and len(_LOSS_TERMS[base.card.task]) < 2:
        raise DeepGalaxyError(f"--space loss-weights: card {base.card.name!r} ({base.card.task}) has a single loss "
                              "term; use a vae-* or full-* card or leave loss-weights out")


def lr_reference(base: RunSpec, explicit_lr: bool) -> float:
    return base.train.learning_rate if explicit_lr else LR_REFERENCE[base.train.optimizer]


def suggest(trial: Any, space: Sequence[str], base: RunSpec, explicit_lr: bool = False) -> dict[str, Any]:
    """Ask the trial for this study's parameters; return the ``--set``-style overrides they mean."""
    out: dict[str, Any] = {}
    if "optimizer" in space:
        opt = trial.suggest_categorical("optimizer", list(OPTIMIZERS))
        factor = trial.suggest_float("lr_factor", 1 / LR_SPAN, LR_SPAN, log=True)
        out["train.optimizer"] = opt
        out["train.learning_rate"] = LR_REFERENCE[opt] * factor
    else:
        ref = lr_reference(base, explicit_lr)
        out["train.learning_rate"] = trial.suggest_float("learning_rate", ref / LR_SPAN, ref * LR_SPAN, log=True)
    if "batch" in space:
        b = base.train.batch_size
        out["train.batch_size"] = trial.suggest_categorical("batch_size", sorted({max(1, b // 2), b, 2 * b}))
    if "latent" in space:
        out["card.latent_dim"] = trial.suggest_categorical("latent_dim", [16, 32])
    if "loss-weights" in space:
        for term in _LOSS_TERMS[base.card.task]:
            low, high = (1e-5, 1e-1) if term == "kl" else (0.1, 10.0)
            out[f"card.loss_weights.{term}"] = trial.suggest_float(f"weight_{term}", low, high, log=True)
    return out


# --- study and MLflow parent --------------------------------------------------------------------------------------


def resolve_storage(storage: str | None) -> str:
    """The Optuna storage URL; a relative ``sqlite:///file`` is made absolute (workers may run elsewhere)."""
    url = storage or DEFAULT_STORAGE
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        url = f"sqlite:///{Path(url[len('sqlite:///'):]).resolve()}"
    return url


def spec_fingerprint(spec: RunSpec) -> str:
    """The base settings a resumed study must share: all but where runs are stored and the device they train on
    (a study may continue on other hardware)."""
    data = spec.model_dump(mode="json")
    for key in ("tracking_uri", "checkpoint_dir", "experiment"):
        data.pop(key, None)
    data["train"].pop("device", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def open_study(name: str, storage: str, space: Sequence[str], base: RunSpec, pruner: str, seed: int) -> Any:
    """Create the study or load it; refuse a study of another card, framework, space or base settings."""
    import optuna

    from deepgalaxy.runs.tune_worker import make_pruner

    identity = {"card": base.card.name, "framework": base.framework, "space": ",".join(space),
                "settings": spec_fingerprint(base), "metric": METRIC}
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True,
                                pruner=make_pruner(pruner))
    attrs = study.user_attrs
    if not any(k.startswith(_ATTR) for k in attrs):
        for key, value in identity.items():
            study.set_user_attr(_ATTR + key, value)
        study.set_user_attr(_ATTR + "base_spec", base.model_dump(mode="json"))
    else:
        differs = [k for k, v in identity.items() if attrs.get(_ATTR + k) != v]
        if differs:
            was = ", ".join(f"{k}={attrs.get(_ATTR + k)!r}" for k in differs)
            now = ", ".join(f"{k}={identity[k]!r}" for k in differs)
            raise DeepGalaxyError(
                f"study {name!r} in {storage} was made with {was}, this command has {now} (settings = the card, "
                "data, epochs and --set values); run the same command to resume it, or give a new --study name"
            )
    # a resumed study must not replay its first random proposals: offset the seed by the trials it holds
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    return study


def _parent_run(study: Any, tracking_uri: str, experiment: str, params: Mapping[str, Any]) -> str:
    """The study's MLflow parent run: reopened when the study names one that still exists, else created."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from deepgalaxy.tracking import new_run, prepare_store

    known = study.user_attrs.get(_ATTR + "mlflow_parent_run_id")
    if known and study.user_attrs.get(_ATTR + "mlflow_tracking_uri") == tracking_uri:
        prepare_store(tracking_uri, experiment)
        client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        try:
            run = client.get_run(known)
            if run.info.lifecycle_stage == "active":
                client.update_run(known, status="RUNNING")
                client.set_tag(known, "resumed", "true")
                return str(known)
        except MlflowException:
            pass
    tags = {"mlflow.runName": f"tune-{study.study_name}", "deepgalaxy.kind": "tune", "optuna.study": study.study_name}
    run_id = new_run(tracking_uri, experiment, tags, params)
    study.set_user_attr(_ATTR + "mlflow_parent_run_id", run_id)
    study.set_user_attr(_ATTR + "mlflow_tracking_uri", tracking_uri)
    return run_id


def _close_stale_trials(study: Any, tracking_uri: str, experiment: str) -> list[int]:
    """Trials still RUNNING from an interrupted invocation: mark them failed, their MLflow runs killed."""
    import mlflow
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        runs = [] if exp is None else client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`optuna.study` = '{study.study_name}' and "
            f"tags.`optuna.trial` = '{t.number}' and attributes.status = 'RUNNING'")
        for run in runs:
            client.set_tag(run.info.run_id, "optuna.state", "FAIL (interrupted)")
            client.set_terminated(run.info.run_id, "KILLED")
        print(f"trial {t.number} was left running by an interrupted invocation: marked failed", file=sys.stderr)
    return [t.number for t in stale]


def _finished(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return list(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


# --- one trial ----------------------------------------------------------------------------------------------------


class Objective:
    """Optuna objective: train one trial (in this process, or under Horovod) and return its best validation loss."""

    def __init__(self, base: RunSpec, space: Sequence[str], explicit_lr: bool, study_dir: Path, storage: str,
                 study_name: str, parent_run_id: str, pruner: str, progress: bool) -> None:
        self.base, self.space, self.explicit_lr = base, tuple(space), explicit_lr
        self.study_dir, self.storage, self.study_name = study_dir, storage, study_name
        self.parent_run_id, self.pruner, self.progress = parent_run_id, pruner, progress

    def __call__(self, trial: Any) -> float:
        import optuna

        from deepgalaxy.runs.rundir import RESULT_FILE, RUN_FILE
        from deepgalaxy.runs.tune_worker import TRIAL_FILE, TUNE_FILE, run_in_process

        overrides = suggest(trial, self.space, self.base, self.explicit_lr)
        try:
            spec = with_overrides(self.base, overrides)
        except Exception as exc:  # pydantic: a suggested value the spec refuses
            raise TrainingError(f"trial {trial.number}: settings {overrides} are invalid: {exc}") from None
        run_dir = self.study_dir / f"trial-{trial.number:04d}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        text = spec.model_copy(update={"checkpoint_dir": str(run_dir)}).model_dump_json(indent=2)
        (run_dir / RUN_FILE).write_text(text)
        spec = RunSpec.model_validate_json(text)  # as the worker reads it: the params both log must be equal
        run_id = self.child_run(trial.number, spec, trial.params)
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("overrides", {k: v for k, v in overrides.items()})
        (run_dir / TUNE_FILE).write_text(json.dumps({
            "storage": self.storage, "study": self.study_name, "trial_id": trial._trial_id,  # Optuna's own id
            "trial_number": trial.number, "parent_run_id": self.parent_run_id, "run_id": run_id, "metric": METRIC,
            "pruner": self.pruner, "params": trial.params,
        }, indent=2))
        shown = ", ".join(f"{k}={fmt(v)}" for k, v in trial.params.items())
        print(f"trial {trial.number}: {shown}", file=sys.stderr, flush=True)
        try:
            if spec.workers == 1 and not spec.hosts:
                run_in_process(run_dir, trial, progress=self.progress)
            else:
                self.launch(spec, run_dir, trial.number)
        except KeyboardInterrupt:
            self.end_child(run_id, "KILLED", "interrupted")
            raise
        except Exception as exc:
            self.end_child(run_id, "FAILED", f"{type(exc).__name__}: {exc}")
            raise
        result = json.loads((run_dir / RESULT_FILE).read_text())
        info = json.loads((run_dir / TRIAL_FILE).read_text())
        if info.get("pruned_epoch") is not None:
            raise optuna.TrialPruned(f"pruned after epoch {info['pruned_epoch'] + 1}")
        best = result.get("best", {})
        value = best.get(METRIC, result.get("final", {}).get("train/loss"))
        if value is None or not math.isfinite(float(value)):
            raise TrainingError(f"trial {trial.number}: no finite {METRIC} in {run_dir / RESULT_FILE}")
        return float(value)


    def child_run(self, number: int, spec: RunSpec, suggested: Mapping[str, Any]) -> str:
        """Create the trial's MLflow run, nested under the study's parent and with the trial's settings as params
        from its first moment (an interrupted trial's run still says what it tried; the worker logs the same)."""
        from deepgalaxy.tracking import new_run, run_params

        tags = {"mlflow.runName": f"trial-{number}", "deepgalaxy.kind": "tune-trial", "optuna.study": self.study_name,
                "optuna.trial": str(number)}
        params = {**run_params(spec), **{f"optuna.{k}": str(v) for k, v in suggested.items()}}
        return new_run(self.base.tracking_uri or "", self.base.experiment, tags, params,
                       parent_run_id=self.parent_run_id)

    def end_child(self, run_id: str, status: str, message: str) -> None:
        """Close a trial's run that its worker could not close (failed before or while training)."""
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=self.base.tracking_uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "error", message[:5000])
            client.set_terminated(run_id, status)

    def launch(self, spec: RunSpec, run_dir: Path, number: int) -> None:
        """Run the trial's ranks through the launcher plugin (horovodrun for several workers or hosts)."""
        from deepgalaxy.runs.launch import launch, launcher_for
        from deepgalaxy.runs.rundir import RUN_FILE

        launcher = launcher_for(None, spec.workers, spec.hosts)
        argv = [sys.executable, "-m", "deepgalaxy.runs.tune_worker", str(run_dir / RUN_FILE), "--launcher",
                launcher.name]
        if not self.progress:
            argv.append("--no-progress")
        launch(launcher, argv, spec.workers, spec.hosts, {}, run_dir,
               failed=f"trial {number}: {{message}} (run directory {{directory}})",
               no_result=f"trial {number}: training exited with code {{code}} and no result "
               "(run directory {directory})")


# --- reporting to the parent run ------------------------------------------------------------------------------------


class ParentLogger:
    """After every trial: state on the trial's child run, best value and parameters on the parent run."""

    def __init__(self, tracking_uri: str, parent_run_id: str, target: int) -> None:
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        self.parent = parent_run_id
        self.target = target

    def __call__(self, study: Any, trial: Any) -> None:
        from mlflow.entities import Metric
        from optuna.trial import TrialState

        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            self.client.set_tag(run_id, "optuna.state", trial.state.name)
            if trial.value is not None:
                self.client.log_metric(run_id, "objective", float(trial.value))
        finished = _finished(study)
        now = int(time.time() * 1000)
        state = trial.state.name.lower()
        value = f"{METRIC}={trial.value:.4g}" if trial.value is not None else state
        print(f"trial {trial.number} {state}: {value} ({len(finished)}/{self.target} finished)", file=sys.stderr,
              flush=True)
        metrics = [Metric("finished_trials", len(finished), now, trial.number)]
        if trial.value is not None:
            metrics.append(Metric("trial_value", float(trial.value), now, trial.number))
        completed = [t for t in finished if t.state == TrialState.COMPLETE]
        if completed:
            best = min(completed, key=lambda t: t.value)
            metrics.append(Metric("best_value", float(best.value), now, len(finished)))
            metrics += [Metric(f"best_{k}", float(v), now, len(finished)) for k, v in best.params.items()
                        if isinstance(v, int | float) and not isinstance(v, bool)]
            tags = {"best.trial": str(best.number), "best.value": f"{best.value:.6g}",
                    **{f"best.{k}": fmt(v) for k, v in best.params.items()}}
            if best.user_attrs.get("mlflow_run_id"):
                tags["best.mlflow_run_id"] = best.user_attrs["mlflow_run_id"]
            for key, text in tags.items():
                self.client.set_tag(self.parent, key, text)
        self.client.log_batch(self.parent, metrics=metrics)


def importances(study: Any) -> dict[str, float]:
    """Optuna's fANOVA parameter importances over the completed trials ({} when there are too few)."""
    import optuna

    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError):
        return {}


def trial_rows(study: Any) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                     "last_epoch": t.last_step, "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
                     "run_dir": t.user_attrs.get("run_dir")})
    return rows


def _log_study_artifacts(client: Any, parent: str, study: Any, imp: Mapping[str, float]) -> None:
    from optuna.trial import TrialState

    from deepgalaxy.core.figures import plot_importances

    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "trials.json").write_text(json.dumps(trial_rows(study), indent=2, default=str))
        client.log_artifact(parent, str(out / "trials.json"))
        if completed:
            best = min(completed, key=lambda t: t.value)
            (out / "best.json").write_text(json.dumps({
                "trial": best.number, "value": best.value, "metric": METRIC, "params": best.params,
                "overrides": best.user_attrs.get("overrides"), "mlflow_run_id": best.user_attrs.get("mlflow_run_id"),
            }, indent=2))
            client.log_artifact(parent, str(out / "best.json"))
        if imp:
            (out / "param_importances.json").write_text(json.dumps(imp, indent=2))
            client.log_artifact(parent, str(out / "param_importances.json"))
            plot_importances(imp, out / "param_importances.png",
                             f"study {study.study_name}: {len(completed)} completed trials", METRIC)
            client.log_artifact(parent, str(out / "param_importances.png"), artifact_path="figures")


# --- the command --------------------------------------------------------------------------------------------------


def tune(card: Any, data: str | Path, trials: int = 20, *, timeout: float | None = None, storage: str | None = None,
         study: str | None = None, framework: str = "torch", workers: int = 1, hosts: str | None = None,
         epochs: int | None = None, overrides: Sequence[str] | Mapping[str, Any] | None = None,
         space: str | Sequence[str] = "lr", pruner: str = "median", tracking_uri: str | None = None,
         experiment: str = DEFAULT_EXPERIMENT, seed: int = 0, run_dir: str | Path | None = None,
         progress: bool = True, device: str | None = None, precision: str | None = None) -> TuneResult:
    """Run (or continue) an Optuna study until ``trials`` trials have finished or ``timeout`` seconds passed.

    Args:
        card, data, framework, workers, hosts, epochs, overrides, device, precision: as for
            :func:`deepgalaxy.runs.train`; they make the base settings every trial starts from (the study refuses
            to resume with other ones, but for the device).
        trials: finished (completed or pruned) trials the study should hold; a resumed study runs the rest.
        timeout: stop starting new trials after this many seconds (this invocation).
        storage / study: Optuna storage URL (default ``sqlite:///optuna.db``) and study name (default
            ``<card>-<framework>``).
        space: ``lr`` plus any of ``optimizer``, ``batch``, ``latent``, ``loss-weights`` (module docstring).
        pruner: ``median[:STARTUP[:WARMUP]]`` (default ``median:3:1``), ``threshold:UPPER`` or ``none``.
        run_dir: where trial directories go (default ``deepgalaxy-runs/tune-<study>``).
    """
    import optuna
    from optuna.trial import TrialState

    from deepgalaxy.runs.launch import check_framework, launcher_for
    from deepgalaxy.runs.placement import check_device
    from deepgalaxy.runs.training import build_spec, check_data, parse_overrides, runs_root
    from deepgalaxy.runs.tune_worker import make_pruner

    if trials < 1:
        raise DeepGalaxyError(f"--trials must be >= 1, got {trials}")
    make_pruner(pruner)  # validate early
    dims = parse_space(space)
    explicit_lr = "train.learning_rate" in parse_overrides(overrides)
    base = build_spec(card, data, framework=framework, workers=workers, hosts=hosts, epochs=epochs,
                      overrides=overrides, tracking_uri=tracking_uri, experiment=experiment, register=False,
                      device=device, precision=precision)
    check_framework(base.framework)
    check_device(base)
    check_space(dims, base)
    check_data(base)
    if base.workers > 1 or base.hosts:
        launcher_for(None, base.workers, base.hosts)  # fail now if Horovod is missing
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = resolve_storage(storage)
    name = study or f"{base.card.name}-{base.framework}"
    st = open_study(name, url, dims, base, pruner, seed)
    tracking = base.tracking_uri or ""
    params = {"card": base.card.name, "framework": base.framework, "workers": base.workers, "space": ",".join(dims),
              "metric": METRIC, "direction": "minimize", "sampler": f"TPE(seed={seed})", "pruner": pruner,
              "storage": url, "study": name, "epochs": base.train.epochs, "optimizer": base.train.optimizer,
              "batch_size": base.train.batch_size, "data": base.data.path,
              "lr_range": "" if "optimizer" in dims else
              f"{lr_reference(base, explicit_lr) / LR_SPAN:g}..{lr_reference(base, explicit_lr) * LR_SPAN:g}"}
    parent = _parent_run(st, tracking, experiment, params)
    _close_stale_trials(st, tracking, experiment)
    done = len(_finished(st))
    remaining = trials - done
    study_dir = Path(run_dir).resolve() if run_dir else runs_root() / f"tune-{name}"
    study_dir.mkdir(parents=True, exist_ok=True)
    status = "FINISHED"
    logger = ParentLogger(tracking, parent, trials)
    try:
        if remaining > 0:
            print(f"study {name!r}: {done} finished trial(s) in {url}; running until {trials} "
                  f"(search space: {', '.join(dims)})", file=sys.stderr, flush=True)
            objective = Objective(base, dims, explicit_lr, study_dir, url, name, parent, pruner, progress)
            st.optimize(
                objective, n_trials=2 * remaining, timeout=timeout, catch=(TrainingError, DatasetError),
                callbacks=[logger, optuna.study.MaxTrialsCallback(trials, states=(TrialState.COMPLETE,
                                                                                   TrialState.PRUNED))],
            )
        else:
            print(f"study {name!r} already has {done} finished trial(s) (asked for {trials}); nothing to run",
                  file=sys.stderr)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        imp = importances(st)
        _log_study_artifacts(logger.client, parent, st, imp)
        logger.client.set_terminated(parent, status)
    finished = _finished(st)
    completed = [t for t in finished if t.state == TrialState.COMPLETE]
    best = min(completed, key=lambda t: t.value) if completed else None
    return TuneResult(
        study=name, storage=url, best_value=None if best is None else float(best.value),
        best_params=dict(best.params) if best else {}, best_trial=best.number if best else None,
        finished=len(finished), pruned=sum(t.state == TrialState.PRUNED for t in finished),
        failed=len(st.get_trials(deepcopy=False, states=(TrialState.FAIL,))), run_id=parent, tracking_uri=tracking,
        importances=imp, trials=trial_rows(st),
    )


__all__ = ["SPACES", "TuneResult", "parse_space", "suggest", "tune"]
