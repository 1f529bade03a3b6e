"""``TorchTrainer``: one optimisation step at a time, checkpoints without pickle, Horovod when ``dist.size > 1``.

The epoch loop (batches, NaN checks naming epoch and step, metrics, checkpoints per epoch with the data position,
MLflow) lives in ``deepgalaxy.runs`` and is shared by every framework; this class is the torch step under it.

Optimizers (``TrainSpec.optimizer``): the contract's table (:data:`deepgalaxy.core.contract.OPTIMIZERS`), learning
rate ``train.effective_lr(dist.size)`` (``learning_rate``).

A step whose loss is not finite does not update the weights; its losses are returned as they are, so the loop can
stop with an error naming the epoch and step while the last checkpoint stays intact.

Checkpoint directory (written by rank 0 only; file names and the ``trainer.json`` schema from
:mod:`deepgalaxy.core.contract`):

- ``model.safetensors``: the weights (``TorchFramework.get_weights`` naming);
- ``optimizer.safetensors``: optimizer state tensors as ``{param name}/{state key}``;
- ``rng.safetensors``: torch's CPU generator state;
- ``trainer.json``: step count, optimizer name, hyper-parameters of the parameter groups, non-tensor state.

Creating a trainer raises glibc's mmap threshold for the process (``allocator.keep_freed_memory``: 10-13% faster
steps; ``DEEPGALAXY_MALLOPT=0`` opts out).

Under Horovod the model leaves ``channels_last`` (Horovod needs tensors contiguous in the default layout).

On resume every rank restores the weights and optimizer state (then rank 0's are broadcast); rank 0 restores its
RNG state exactly, other ranks reseed from ``(seed, rank, step)``. The learning rate is the current
``effective_lr`` (not the checkpoint's), so a run can resume with another number of workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from deepgalaxy.core.contract import (
    LOGITS,
    MODEL_FILE,
    OPTIMIZER_FILE,
    PROPERTY_LOGVAR,
    PROPERTY_MEAN,
    RNG_FILE,
    check_batch,
    check_same_model,
    checkpoint_state,
    optimizer_settings,
    read_checkpoint_state,
    start_horovod,
    weights_metadata,
    write_checkpoint_state,
)
from deepgalaxy.core.interfaces import Distributed, StepResult
from deepgalaxy.core.losses import compute_losses
from deepgalaxy.core.specs import ModelSpec, TrainSpec
from deepgalaxy.plugins.torch.allocator import keep_freed_memory
from deepgalaxy.plugins.torch.net import DeepGalaxyNet, TorchOps
from deepgalaxy.plugins.torch.tensors import autocast, get_weights, set_weights, to_nchw

FRAMEWORK = "torch"


def make_optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    """The optimizer called ``name`` over ``params``, with the contract's hyper-parameters (``OPTIMIZERS``)."""
    settings = optimizer_settings(name)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, rho=settings["rho"], eps=settings["eps"])
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, eps=settings["eps"])
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, eps=settings["eps"], weight_decay=settings["weight_decay"])
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=settings["momentum"])
    return torch.optim.RMSprop(params, lr=lr, alpha=settings["rho"], eps=settings["eps"])


def _import_horovod() -> Any:
    import horovod.torch as hvd

    return hvd


class TorchTrainer:
    """Optimizer, precision and distribution around one :class:`DeepGalaxyNet` (implements ``Trainer``)."""

    def __init__(self, net: DeepGalaxyNet, card: ModelSpec, train: TrainSpec, dist: Distributed,
                 channels_last: bool = True) -> None:
        self.net, self.card, self.train, self.dist = net, card, train, dist
        self.channels_last = channels_last
        keep_freed_memory()
        self.step = 0
        self.learning_rate = train.effective_lr(dist.size)
        torch.manual_seed(train.seed + dist.rank)
        self.named_params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        self.optimizer = make_optimizer(train.optimizer, [p for _, p in self.named_params], self.learning_rate)
        self.hvd: Any = None
        if dist.size > 1:
            self._init_horovod()

    # -- distribution -------------------------------------------------------------------------------------------

    def _init_horovod(self) -> None:
        hvd = self.hvd = start_horovod(_import_horovod, FRAMEWORK, "PYTORCH", self.dist)
        # Horovod only reduces/broadcasts tensors contiguous in the default layout: leave channels_last
        # (parameters keep their identity, so the optimizer still holds the right ones).
        self.net.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]  # torch's stubs lack it
        self.channels_last = False
        self.optimizer = hvd.DistributedOptimizer(self.optimizer, named_parameters=self.named_params)
        self.broadcast()

    def broadcast(self) -> None:
        """Make every rank start from rank 0's weights and optimizer state."""
        if self.hvd is not None:
            self.hvd.broadcast_parameters(self.net.state_dict(), root_rank=0)
            self.hvd.broadcast_optimizer_state(self.optimizer, root_rank=0)

    # -- steps --------------------------------------------------------------------------------------------------

    def _inputs(self, images: np.ndarray, labels: np.ndarray
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        images, labels, targets = check_batch(self.card, images, labels)
        return (to_nchw(images, self.channels_last), torch.from_numpy(labels),
                None if targets is None else torch.from_numpy(targets))

    def _result(self, losses: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> StepResult:
        values = {k: float(v.detach()) for k, v in losses.items()}
        predicted = out[LOGITS].detach().argmax(dim=1).numpy() if LOGITS in out else None
        properties = (torch.cat([out[PROPERTY_MEAN], out[PROPERTY_LOGVAR]], dim=1).detach().float().numpy()
                      if PROPERTY_MEAN in out else None)
        return StepResult(values, predicted, values.get("loss_reconstruction"), properties)

    def train_step(self, images: np.ndarray, labels: np.ndarray) -> StepResult:
        """Forward, backward, optional gradient clipping and one optimizer update on a local batch."""
        x, y, targets = self._inputs(images, labels)
        self.net.train()
        self.optimizer.zero_grad()  # set_to_none by default; Horovod's wrapper takes no arguments
        with autocast(self.train.precision):
            out = self.net(x)
        losses = compute_losses(self.card, out, x, y, TorchOps(), targets)
        losses["loss"].backward()
        if torch.isfinite(losses["loss"]):
            self._update()
        self.step += 1
        return self._result(losses, out)

    def _update(self) -> None:
        clip = self.train.grad_clip
        params = [p for _, p in self.named_params]
        if clip is None:
            self.optimizer.step()
        elif self.hvd is not None:
            self.optimizer.synchronize()  # type: ignore[attr-defined]  # Horovod's DistributedOptimizer  # clip the allreduced gradients, then step without reducing again
            nn.utils.clip_grad_norm_(params, clip)
            with self.optimizer.skip_synchronize():  # type: ignore[attr-defined]
                self.optimizer.step()
        else:
            nn.utils.clip_grad_norm_(params, clip)
            self.optimizer.step()

    def eval_step(self, images: np.ndarray, labels: np.ndarray) -> StepResult:
        """Losses and predictions in eval mode (no dropout, batch-norm statistics, VAE uses z = mu)."""
        x, y, targets = self._inputs(images, labels)
        self.net.eval()
        with torch.inference_mode(), autocast(self.train.precision):
            out = self.net(x)
            losses = compute_losses(self.card, out, x, y, TorchOps(), targets)
        return self._result(losses, out)

    # -- checkpoints --------------------------------------------------------------------------------------------

    def save_checkpoint(self, directory: Path) -> None:
        """Write weights, optimizer state, RNG state and the step count (rank 0 only; others return)."""
        if not self.dist.is_root:
            return
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = {k: torch.from_numpy(v) for k, v in get_weights(self.net).items()}
        save_file(weights, str(directory / MODEL_FILE), metadata=weights_metadata(FRAMEWORK, self.card))
        sd = self.optimizer.state_dict()
        names = [n for n, _ in self.named_params]
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, dict[str, Any]] = {}
        for idx, state in sd["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{names[idx]}/{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(names[idx], {})[key] = value
        save_file(tensors, str(directory / OPTIMIZER_FILE))
        save_file({"torch_cpu": torch.get_rng_state()}, str(directory / RNG_FILE))
        groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
        write_checkpoint_state(directory, checkpoint_state(FRAMEWORK, self.card, self.step, self.train.optimizer,
                                                           param_groups=groups, scalar_state=scalars, params=names))

    def load_checkpoint(self, directory: Path) -> None:
        """Restore what :meth:`save_checkpoint` wrote; raise ``TrainingError`` naming what does not fit."""
        directory = Path(directory)
        state = read_checkpoint_state(directory, FRAMEWORK, self.train.optimizer, self.dist, self.hvd is not None)
        if state is None:
            self.broadcast()  # this rank cannot see the files: take rank 0's
            return
        names = [n for n, _ in self.named_params]
        check_same_model(directory, self.card, state["params"], names)
        weights = load_file(str(directory / MODEL_FILE))
        set_weights(self.net, {k: v.numpy() for k, v in weights.items()})
        tensors = load_file(str(directory / OPTIMIZER_FILE))
        index = {n: i for i, n in enumerate(names)}
        opt_state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            name, _, sub = key.rpartition("/")
            opt_state.setdefault(index[name], {})[sub] = value
        for name, values in state["scalar_state"].items():
            opt_state.setdefault(index[name], {}).update(values)
        groups = state["param_groups"]
        start = 0
        for g, current in zip(groups, self.optimizer.param_groups, strict=True):
            g["params"] = list(range(start, start + len(current["params"])))
            g["lr"] = self.learning_rate
            start += len(current["params"])
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        self.step = int(state["step"])
        if self.dist.is_root:
            torch.set_rng_state(load_file(str(directory / RNG_FILE))["torch_cpu"])
        else:
            torch.manual_seed(self.train.seed + self.dist.rank + 1_000_003 * self.step)
        self.broadcast()
