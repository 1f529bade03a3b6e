"""``TorchTrainer``: one optimisation step at a time, checkpoints without pickle, Horovod when ``dist.size > 1``.

The epoch loop (batches, NaN checks naming epoch and step, metrics, checkpoints per epoch with the data position,
MLflow) lives in ``deepgalaxy.runs`` and is shared by every framework; this class is the torch step under it.

Optimizers (``TrainSpec.optimizer``), learning rate ``train.effective_lr(dist.size)``:

- ``adadelta`` (the paper's, lr 8.0): rho 0.95, eps 1e-7 — Keras' defaults, as the paper trained with Keras;
- ``adam`` / ``adamw`` / ``rmsprop``: torch's defaults apart from the learning rate;
- ``sgd``: momentum 0.9.

A step whose loss is not finite does not update the weights; its losses are returned as they are, so the loop can
stop with an error naming the epoch and step while the last checkpoint stays intact.

Checkpoint directory (written by rank 0 only):

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

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from deepgalaxy.core.errors import FrameworkUnavailableError, ShapeError, TrainingError
from deepgalaxy.core.interfaces import Distributed, StepResult
from deepgalaxy.core.specs import ModelSpec, TrainSpec
from deepgalaxy.plugins.torch.allocator import keep_freed_memory
from deepgalaxy.plugins.torch.framework import TorchFramework, autocast, to_nchw
from deepgalaxy.plugins.torch.net import DeepGalaxyNet, compute_losses

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer.json"


def make_optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    """The optimizer called ``name`` over ``params`` (see the module docstring for the settings)."""
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, rho=0.95, eps=1e-7)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; use adadelta, adam, adamw, sgd or rmsprop")


def _import_horovod() -> Any:
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        raise FrameworkUnavailableError(
            f"data-parallel training with torch needs Horovod built with PyTorch support ({exc}); "
            "install it (HOROVOD_WITH_PYTORCH=1 pip install horovod) or train with one worker"
        ) from None
    return hvd


class TorchTrainer:
    """Optimizer, precision and distribution around one :class:`DeepGalaxyNet` (implements ``Trainer``)."""

    def __init__(self, net: DeepGalaxyNet, card: ModelSpec, train: TrainSpec, dist: Distributed,
                 channels_last: bool = True) -> None:
        self.net, self.card, self.train, self.dist = net, card, train, dist
        self.channels_last = channels_last
        keep_freed_memory()
        self.step = 0
        self.lr = train.effective_lr(dist.size)
        torch.manual_seed(train.seed + dist.rank)
        self.named_params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        self.optimizer = make_optimizer(train.optimizer, [p for _, p in self.named_params], self.lr)
        self.hvd: Any = None
        if dist.size > 1:
            self._init_horovod()

    # -- distribution -------------------------------------------------------------------------------------------

    def _init_horovod(self) -> None:
        hvd = _import_horovod()
        if not hvd.is_initialized():
            hvd.init()
        if hvd.size() != self.dist.size or hvd.rank() != self.dist.rank:
            raise TrainingError(
                f"Horovod runs rank {hvd.rank()} of {hvd.size()} but the run expects rank {self.dist.rank} of "
                f"{self.dist.size}; start it with horovodrun -np {self.dist.size}"
            )
        self.hvd = hvd
        # Horovod only reduces/broadcasts tensors contiguous in the default layout: leave channels_last
        # (parameters keep their identity, so the optimizer still holds the right ones).
        self.net.to(memory_format=torch.contiguous_format)
        self.channels_last = False
        self.optimizer = hvd.DistributedOptimizer(self.optimizer, named_parameters=self.named_params)
        self._broadcast()

    def _broadcast(self) -> None:
        """Make every rank start from rank 0's weights and optimizer state."""
        if self.hvd is not None:
            self.hvd.broadcast_parameters(self.net.state_dict(), root_rank=0)
            self.hvd.broadcast_optimizer_state(self.optimizer, root_rank=0)

    # -- steps --------------------------------------------------------------------------------------------------

    def _inputs(self, images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != self.card.channels:
            raise ShapeError(
                f"training images must be (N, H, W, {self.card.channels}) for card {self.card.name!r}, "
                f"got {images.shape}"
            )
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 255.0
        x = to_nchw(images, self.channels_last)
        y = torch.from_numpy(np.asarray(labels).astype(np.int64, copy=False))
        return x, y

    def _result(self, losses: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> StepResult:
        values = {k: float(v.detach()) for k, v in losses.items()}
        predicted = out["logits"].detach().argmax(dim=1).numpy() if "logits" in out else None
        return StepResult(values, predicted, values.get("loss_reconstruction"))

    def train_step(self, images: np.ndarray, labels: np.ndarray) -> StepResult:
        """Forward, backward, optional gradient clipping and one optimizer update on a local batch."""
        x, y = self._inputs(images, labels)
        self.net.train()
        self.optimizer.zero_grad()  # set_to_none by default; Horovod's wrapper takes no arguments
        with autocast(self.train.precision):
            out = self.net(x)
        losses = compute_losses(self.card, out, x, y)
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
            self.optimizer.synchronize()  # clip the allreduced gradients, then step without reducing again
            nn.utils.clip_grad_norm_(params, clip)
            with self.optimizer.skip_synchronize():
                self.optimizer.step()
        else:
            nn.utils.clip_grad_norm_(params, clip)
            self.optimizer.step()

    def eval_step(self, images: np.ndarray, labels: np.ndarray) -> StepResult:
        """Losses and predictions in eval mode (no dropout, batch-norm statistics, VAE uses z = mu)."""
        x, y = self._inputs(images, labels)
        self.net.eval()
        with torch.inference_mode(), autocast(self.train.precision):
            out = self.net(x)
            losses = compute_losses(self.card, out, x, y)
        return self._result(losses, out)

    # -- checkpoints --------------------------------------------------------------------------------------------

    def save_checkpoint(self, directory: Path) -> None:
        """Write weights, optimizer state, RNG state and the step count (rank 0 only; others return)."""
        if not self.dist.is_root:
            return
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        fw = TorchFramework()
        weights = {k: torch.from_numpy(v) for k, v in fw.get_weights(self.net).items()}
        save_file(weights, str(directory / MODEL_FILE), metadata={"framework": "torch"})
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
        state = {"framework": "torch", "card": self.card.name, "step": self.step, "optimizer": self.train.optimizer,
                 "param_groups": groups, "scalar_state": scalars, "params": names}
        (directory / STATE_FILE).write_text(json.dumps(state, indent=2))

    def load_checkpoint(self, directory: Path) -> None:
        """Restore what :meth:`save_checkpoint` wrote; raise ``TrainingError`` naming what does not fit."""
        directory = Path(directory)
        if not (directory / STATE_FILE).is_file():
            if self.dist.is_root or self.hvd is None:
                raise TrainingError(f"no torch checkpoint in {directory} ({STATE_FILE} is missing)")
            self._broadcast()  # this rank cannot see the files: take rank 0's
            return
        state = json.loads((directory / STATE_FILE).read_text())
        if state.get("optimizer") != self.train.optimizer:
            raise TrainingError(
                f"checkpoint {directory} was written with optimizer {state.get('optimizer')!r} but this run uses "
                f"{self.train.optimizer!r}; resume with the same optimizer or start a new run"
            )
        names = [n for n, _ in self.named_params]
        if state["params"] != names:
            raise TrainingError(f"checkpoint {directory} holds a different model's optimizer state than card "
                                f"{self.card.name!r}")
        weights = load_file(str(directory / MODEL_FILE))
        TorchFramework().set_weights(self.net, {k: v.numpy() for k, v in weights.items()})
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
            g["lr"] = self.lr
            start += len(current["params"])
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        self.step = int(state["step"])
        if self.dist.is_root:
            torch.set_rng_state(load_file(str(directory / RNG_FILE))["torch_cpu"])
        else:
            torch.manual_seed(self.train.seed + self.dist.rank + 1_000_003 * self.step)
        self._broadcast()
