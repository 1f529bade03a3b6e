"""Where a training runs: the device and precision a run asks for (``--device``, ``--precision``, the train spec),
refused before anything is written when this machine cannot give them, resolved in each rank (under Horovod the GPU
of its local rank) and recorded as the MLflow run's ``hardware.*`` tags.

The run spec keeps what was asked (``auto``), so a run resumed on other hardware resolves again; weights and
checkpoints are device-independent.
"""

from __future__ import annotations

import warnings
from typing import Any

from deepgalaxy.core.device import gpu_of, parse_device, parse_precision, resolve_device, resolve_precision
from deepgalaxy.core.hardware import hardware_tags
from deepgalaxy.core.model import Model
from deepgalaxy.core.specs import RunSpec, TrainSpec


def with_device(spec: RunSpec, device: str | None, precision: str | None) -> RunSpec:
    """``spec`` with ``--device`` / ``--precision`` (None keeps the spec's), checked by name."""
    update: dict[str, Any] = {}
    if device is not None:
        update["device"] = parse_device(device, "--device")
    if precision is not None:
        update["precision"] = parse_precision(precision, "--precision")
    if not update:
        return spec
    return spec.model_copy(update={"train": spec.train.model_copy(update=update)})


def check_device(spec: RunSpec) -> None:
    """Refuse a device or precision the ranks on this machine cannot use (a GPU where none is visible, an index
    beyond those visible, fp16 on a CPU) before anything is written; ranks on other hosts (``--hosts``) resolve
    their own."""
    if spec.hosts:
        return
    train = spec.train
    gpus = []
    if train.device != "cpu":
        from deepgalaxy import registry

        gpus = registry.get_framework(spec.framework).accelerators()
    device = resolve_device(train.device, gpus)
    if train.precision == "fp16":  # the only precision a device can refuse (bf16 emulated only warns, in the ranks)
        resolve_precision(train.precision, device, gpus)


def placed(model: Model, train: TrainSpec, local_rank: int = 0, warn: bool = True) -> TrainSpec:
    """Move ``model`` to ``train.device`` for this rank in ``train.precision`` (:meth:`Model.to`); return the spec
    with both resolved (``cuda:1``, ``bf16``), which the trainer is given. ``warn=False`` keeps a rank quiet about
    emulated bf16 (rank 0 says it once for the run)."""
    with warnings.catch_warnings():
        if not warn:
            warnings.simplefilter("ignore")
        model.to(train.device, train.precision, local_rank)
    return train.model_copy(update={"device": model.device, "precision": model.precision})


def run_hardware_tags(model: Model) -> dict[str, str]:
    """The ``hardware.*`` MLflow tags of a placed model: the CPU, the device, its GPU's name, the precision."""
    gpu = gpu_of(model.device, model.backend.accelerators())
    return hardware_tags(model.device, model.precision, gpu.name if gpu is not None else None)
