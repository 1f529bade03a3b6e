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
- ``rng.safetensors``: torch's CPU generator state (and the GPU's, ``torch_cuda``, when training on one);
- ``trainer.json``: step count, optimizer name, hyper-parameters of the parameter groups, non-tensor state, and
  for fp16 the loss scaler's state (``scaler``: its scale and growth counter, plain numbers).

Devices: the trainer runs where its model's parameters are (the run placed it); batches are copied there from
pinned memory without blocking, and a GPU rank makes its device the current one before Horovod starts. Checkpoints
stay device-independent: tensors are saved from CPU copies and loaded onto the model's device, so a run can resume
on another device. Precision: ``fp32``, ``bf16`` autocast (CPU or GPU) or ``fp16`` autocast with a loss scaler
(``torch.amp.GradScaler``, GPU only). A step that runs out of GPU memory is a ``DeviceError`` naming a batch size
that fits (tried with the same forward and backward, without updating anything).

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
from deepgalaxy.core.device import batch_too_large, resolve_precision
from deepgalaxy.core.interfaces import Distributed, StepResult
from deepgalaxy.core.losses import compute_losses
from deepgalaxy.core.specs import ModelSpec, TrainSpec
from deepgalaxy.plugins.torch import devices
from deepgalaxy.plugins.torch.allocator import keep_freed_memory
from deepgalaxy.plugins.torch.net import DeepGalaxyNet, TorchOps
from deepgalaxy.plugins.torch.tensors import autocast, get_weights, set_weights, to_device, to_nchw, to_numpy

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
        self.device = devices.device_of(net)
        self.precision = resolve_precision(train.precision, str(self.device), devices.accelerators(),
                                           slowdown=devices.bf16_slowdown)
        """The resolved precision (the run resolves ``auto`` already; a trainer made directly resolves it here)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # this rank's GPU is the current one, before Horovod starts
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
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
        return (to_nchw(images, self.channels_last, self.device), to_device(torch.from_numpy(labels), self.device),
                None if targets is None else to_device(torch.from_numpy(targets), self.device))

    def _result(self, losses: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> StepResult:
        values = {k: float(v.detach()) for k, v in losses.items()}
        predicted = out[LOGITS].detach().argmax(dim=1).cpu().numpy() if LOGITS in out else None
        properties = (to_numpy(torch.cat([out[PROPERTY_MEAN], out[PROPERTY_LOGVAR]], dim=1))
                      if PROPERTY_MEAN in out else None)
        return StepResult(values, predicted, values.get("loss_reconstruction"), properties)

    def _losses(self, images: np.ndarray, labels: np.ndarray
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The losses and outputs of a training-mode forward pass on a local batch."""
        x, y, targets = self._inputs(images, labels)
        self.net.train()
        with autocast(self.precision, self.device.type):
            out = self.net(x)
        return compute_losses(self.card, out, x, y, TorchOps(), targets), out

    def train_step(self, images: np.ndarray, labels: np.ndarray) -> StepResult:
        """Forward, backward, optional gradient clipping and one optimizer update on a local batch; a batch too
        large for the GPU's memory is a ``DeviceError`` naming a batch size that fits."""
        try:
            return self._train_step(images, labels)
        except torch.cuda.OutOfMemoryError:
            pass  # leave the handler first: its traceback holds the failed step's GPU memory
        self.optimizer.zero_grad()
        raise batch_too_large(len(images), str(self.device),
                              lambda n: devices.fits(lambda: self._probe(images[:n], labels[:n])), "a training step")

    def _train_step(self, images: np.ndarray, labels: np.ndarray) -> StepResult:
        self.optimizer.zero_grad()  # set_to_none by default; Horovod's wrapper takes no arguments
        losses, out = self._losses(images, labels)
        loss = losses["loss"]
        scaled = loss if self.scaler is None else self.scaler.scale(loss)
        scaled.backward()  # type: ignore[no-untyped-call]  # torch.Tensor.backward is untyped
        if torch.isfinite(loss):
            self._update()
        self.step += 1
        return self._result(losses, out)

    def _probe(self, images: np.ndarray, labels: np.ndarray) -> None:
        """A training step's forward and backward at this batch, changing nothing: gradients are computed with
        ``torch.autograd.grad`` (not accumulated into ``.grad``, so Horovod's hooks do not fire) and batch-norm
        statistics are put back."""
        buffers = {n: b.clone() for n, b in self.net.named_buffers()}
        try:
            losses, _ = self._losses(images, labels)
            torch.autograd.grad(losses["loss"], [p for _, p in self.named_params], allow_unused=True)
        finally:
            with torch.no_grad():
                for n, b in self.net.named_buffers():
                    b.copy_(buffers[n])

    def _update(self) -> None:
        clip = self.train.grad_clip
        params = [p for _, p in self.named_params]
        if self.hvd is not None and (clip is not None or self.scaler is not None):
            # clip / unscale the allreduced gradients, then step without reducing again
            self.optimizer.synchronize()  # type: ignore[attr-defined]  # Horovod's DistributedOptimizer
            self._unscale_and_clip(params, clip)
            with self.optimizer.skip_synchronize():  # type: ignore[attr-defined]
                self._optimizer_step()
        else:
            self._unscale_and_clip(params, clip)
            self._optimizer_step()

    def _unscale_and_clip(self, params: list[nn.Parameter], clip: float | None) -> None:
        if clip is None:
            return
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        nn.utils.clip_grad_norm_(params, clip)

    def _optimizer_step(self) -> None:
        if self.scaler is None:
            self.optimizer.step()
            return
        self.scaler.step(self.optimizer)  # skipped when the scaled gradients overflowed
        self.scaler.update()

    def eval_step(self, images: np.ndarray, labels: np.ndarray) -> StepResult:
        """Losses and predictions in eval mode (no dropout, batch-norm statistics, VAE uses z = mu)."""
        x, y, targets = self._inputs(images, labels)
        self.net.eval()
        with torch.inference_mode(), autocast(self.precision, self.device.type):
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
        rng = {"torch_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        save_file(rng, str(directory / RNG_FILE))
        groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
        scaler = {} if self.scaler is None else {"scaler": self.scaler.state_dict()}
        write_checkpoint_state(directory, checkpoint_state(FRAMEWORK, self.card, self.step, self.train.optimizer,
                                                           param_groups=groups, scalar_state=scalars, params=names,
                                                           **scaler))

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
        if self.scaler is not None and state.get("scaler"):  # a run resumed in fp16 from fp32/bf16 starts afresh
            self.scaler.load_state_dict(state["scaler"])
        if self.dist.is_root:
            rng = load_file(str(directory / RNG_FILE))
            torch.set_rng_state(rng["torch_cpu"])
            if self.device.type == "cuda" and "torch_cuda" in rng:
                torch.cuda.set_rng_state(rng["torch_cuda"], self.device)
        else:
            torch.manual_seed(self.train.seed + self.dist.rank + 1_000_003 * self.step)
        self.broadcast()
