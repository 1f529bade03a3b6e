"""Training step of the TensorFlow plugin: a custom ``tf.function`` step, Horovod-aware, checkpointable.

Keras 3's ``model.fit`` does not work under Horovod or ``tf.distribute`` here (FACTS.md), so the step is written
out: forward, the card's weighted loss terms, gradients (``hvd.DistributedGradientTape`` on several workers),
optional global-norm clipping, the optimizer update. The epoch loop, NaN checks, MLflow and checkpoint scheduling
live in :mod:`deepgalaxy.runs`, shared with the torch plugin; metric names are :data:`LOSS_TERMS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from safetensors.numpy import load_file, save_file

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
from deepgalaxy.core.device import batch_too_large, resolve_device, resolve_precision
from deepgalaxy.core.errors import TrainingError, WeightsMismatchError
from deepgalaxy.core.interfaces import Distributed, StepResult
from deepgalaxy.core.losses import compute_losses
from deepgalaxy.core.specs import ModelSpec, TrainSpec
from deepgalaxy.plugins.tensorflow import devices
from deepgalaxy.plugins.tensorflow.model import KerasDeepGalaxy, get_weights, set_weights
from deepgalaxy.plugins.tensorflow.precision import precision_policy

FRAMEWORK = "tensorflow"


def _import_horovod() -> Any:
    import horovod.tensorflow as hvd

    return hvd


def resolve(train: TrainSpec, local_rank: int = 0) -> tuple[str, str]:
    """``train.device`` and ``train.precision`` resolved against the GPUs TensorFlow sees (runs hand them resolved;
    ``auto`` from direct callers is resolved here as :meth:`deepgalaxy.core.model.Model.to` does)."""
    gpus = devices.accelerators()
    device = resolve_device(train.device, gpus, local_rank)
    return device, resolve_precision(train.precision, device, gpus, slowdown=devices.bf16_slowdown)


def make_optimizer(train: TrainSpec, learning_rate: float) -> keras.optimizers.Optimizer:
    """The optimizer ``train.optimizer`` at ``learning_rate`` with the contract's hyper-parameters (``OPTIMIZERS``),
    clipping the global gradient norm if asked."""
    settings = optimizer_settings(train.optimizer)
    clip = {"global_clipnorm": train.grad_clip} if train.grad_clip else {}
    lr = float(learning_rate)
    if train.optimizer == "adadelta":
        return keras.optimizers.Adadelta(lr, rho=settings["rho"], epsilon=settings["eps"], **clip)
    if train.optimizer == "adam":
        return keras.optimizers.Adam(lr, epsilon=settings["eps"], **clip)
    if train.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=settings["weight_decay"], epsilon=settings["eps"], **clip)
    if train.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=settings["momentum"], **clip)
    return keras.optimizers.RMSprop(lr, rho=settings["rho"], epsilon=settings["eps"], **clip)


class TensorFlowOps:
    """The per-row loss arithmetic of :mod:`deepgalaxy.core.losses` in TensorFlow (rows are axis 0)."""

    @staticmethod
    def float32(x: tf.Tensor) -> tf.Tensor:
        return tf.cast(x, tf.float32)

    @staticmethod
    def cross_entropy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)

    @staticmethod
    def squared_error(prediction: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
        return tf.reduce_mean(tf.square(prediction - target), axis=tf.range(1, tf.rank(prediction)))

    @staticmethod
    def kl_to_standard_normal(mu: tf.Tensor, logvar: tf.Tensor) -> tf.Tensor:
        return -0.5 * tf.reduce_sum(1.0 + logvar - tf.square(mu) - tf.exp(logvar), axis=1)

    stop_gradient = staticmethod(tf.stop_gradient)
    mean = staticmethod(tf.reduce_mean)
    sum = staticmethod(tf.reduce_sum)
    exp = staticmethod(tf.exp)

    @staticmethod
    def is_labelled(labels: tf.Tensor) -> tf.Tensor:
        return tf.cast(labels >= 0, tf.float32)

    @staticmethod
    def clamp_labels(labels: tf.Tensor) -> tf.Tensor:
        return tf.maximum(labels, tf.zeros_like(labels))

    @staticmethod
    def pairwise_squared_distances(x: tf.Tensor) -> tf.Tensor:
        rows = tf.reshape(x, (tf.shape(x)[0], -1))
        norms = tf.reduce_sum(tf.square(rows), axis=1)
        return tf.maximum(norms[:, None] + norms[None, :] - 2.0 * tf.matmul(rows, rows, transpose_b=True), 0.0)

    @staticmethod
    def outer(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
        return a[:, None] * b[None, :]

    @staticmethod
    def maximum(x: tf.Tensor, floor: float) -> tf.Tensor:
        return tf.maximum(x, floor)

    @staticmethod
    def is_known(x: tf.Tensor) -> tf.Tensor:
        return tf.cast(tf.math.is_finite(x), tf.float32)

    @staticmethod
    def fill_unknown(x: tf.Tensor) -> tf.Tensor:
        return tf.where(tf.math.is_finite(x), x, tf.zeros_like(x))


class TensorFlowTrainer:
    """:class:`deepgalaxy.core.interfaces.Trainer` for a :class:`KerasDeepGalaxy` model.

    With ``dist.size > 1`` it runs under Horovod: gradients are averaged by ``hvd.DistributedGradientTape``, the
    initial model and optimizer variables are broadcast from rank 0 (through ``v.value``, the workaround for
    Keras 3 variables, FACTS.md), the learning rate is ``train.effective_lr(size)`` and only rank 0 writes
    checkpoints.

    A step whose loss or gradients are not finite does not update anything; its losses are returned as they are,
    so the loop in :mod:`deepgalaxy.runs` stops with an error naming the step while the last checkpoint stays
    intact (the same behaviour as the torch trainer).

    Checkpoint directory (the layout of :mod:`deepgalaxy.core.contract`): ``model.safetensors`` (weights),
    ``optimizer.safetensors`` (optimizer variables in order), ``rng.safetensors`` (the states of the model's seed
    generators: dropout, drop-connect, VAE noise), ``trainer.json`` (step, optimizer, variable paths, the fp16 loss
    scale). On resume the learning rate is the current ``effective_lr``, so a run can resume with another number of
    workers, and in another precision.

    The model is placed on ``train.device`` and its steps run there in ``train.precision`` (fp16: Keras'
    ``LossScaleOptimizer`` around the optimizer, dynamic loss scaling).
    """

    def __init__(self, native: KerasDeepGalaxy, card: ModelSpec, train: TrainSpec, dist: Distributed) -> None:
        self.native, self.card, self.train, self.dist = native, card, train, dist
        self.device, self.precision = resolve(train, dist.local_rank)
        devices.place(native, self.device)
        self.step = 0
        self.learning_rate = train.effective_lr(dist.size)
        with devices.placed(native.run_device):  # its variables (step, learning rate, slots) next to the model's
            self.optimizer = make_optimizer(train, self.learning_rate)
            if self.precision == "fp16":  # dynamic loss scaling: fp16 gradients would underflow unscaled
                self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)
            self.optimizer.build(native.trainable_variables)
        self.reseed(0)
        self.hvd: Any = None
        if dist.size > 1:
            self.hvd = start_horovod(_import_horovod, FRAMEWORK, "TENSORFLOW", dist)
            self.broadcast()
        shape = (None, *(card.input_shape if card.task != "fcae" else (None, None, card.channels)))
        self._specs = [tf.TensorSpec(shape, tf.float32), tf.TensorSpec((None,), tf.int64)]
        if card.properties is not None:
            self._specs.append(tf.TensorSpec((None, len(card.properties.columns)), tf.float32))
        self._fns = {name: tf.function(step, input_signature=self._specs) for name, step in (
            ("train", self._train_step), ("eval", self._eval_step), ("probe", self._probe_step))}
        self._traced: set[str] = set()

    def run(self, name: str, images: np.ndarray, labels: np.ndarray, targets: np.ndarray | None = None
            ) -> dict[str, tf.Tensor]:
        """The step ``name`` (``train``, ``eval``, ``probe``) on one checked batch, on the model's device: its
        reported tensors as they come out of it. A batch too large for the device's memory is a
        :class:`DeviceError` naming a batch size whose forward and backward pass fit."""
        try:
            return self._call(name, images, labels, targets)
        except tf.errors.ResourceExhaustedError:
            pass  # out of the handler, so the failed batch's tensors are freed before the probes
        raise batch_too_large(len(images), self.device, lambda n: devices.fits(lambda: self._call(
            "probe", images[:n], labels[:n], None if targets is None else targets[:n])["grad_norm"].numpy()),
            f"a {name} step")

    def _call(self, name: str, *batch: np.ndarray | None) -> dict[str, tf.Tensor]:
        fn = self._fns[name]
        inputs = [b for b in batch if b is not None]  # (images, labels[, targets]), as the signature has them
        with devices.placed(self.native.run_device):
            if tf.config.functions_run_eagerly():  # debugging: the same step, run as Python, under the policy
                with precision_policy(self.native, self.precision):
                    return fn(*inputs)  # type: ignore[no-any-return]
            if name not in self._traced:  # trace under the policy, so 16-bit compute is baked into the graph
                with precision_policy(self.native, self.precision):
                    fn.get_concrete_function()
                self._traced.add(name)
            return fn(*inputs)  # type: ignore[no-any-return]

    # -- Horovod ------------------------------------------------------------------------------------------------

    def broadcast(self) -> None:
        """Make every rank start from rank 0's model and optimizer variables (not the per-rank RNG states)."""
        rng = {id(v) for v in self._rng_variables().values()}
        variables = [v.value for v in self.native.variables if id(v) not in rng]
        variables += [v.value for v in self.optimizer.variables]
        self.hvd.broadcast_variables(variables, root_rank=0)

    def reseed(self, step: int) -> None:
        """Seed dropout / drop-connect / VAE noise from ``(train.seed, rank, step)``: ranks draw different masks."""
        for i, var in enumerate(self._rng_variables().values()):
            seed = (self.train.seed * 1_000_003 + self.dist.rank * 7919 + step * 104_729 + i) % (2**31 - 1)
            state = np.zeros(tuple(var.shape), dtype=var.dtype)
            state.flat[0] = seed
            var.assign(state)

    # -- steps --------------------------------------------------------------------------------------------------

    def _gradients(self, images: tf.Tensor, labels: tf.Tensor, targets: tf.Tensor | None
                   ) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor], list[tf.Tensor]]:
        """Outputs, losses and the (loss-scaled under fp16) gradients of the training forward pass."""
        with tf.GradientTape() as tape:
            out = self.native(images, training=True)
            losses = compute_losses(self.card, out, images, labels, TensorFlowOps(), targets)
            scaled = self.optimizer.scale_loss(losses["loss"])  # the loss itself but under fp16's loss scaler
        if self.hvd is not None:
            tape = self.hvd.DistributedGradientTape(tape)
        variables = self.native.trainable_variables
        # Horovod's tape keys gradients by tf.Variable.ref(): hand it the backing tf.Variables (FACTS.md)
        sources = [v.value for v in variables] if self.hvd is not None else variables
        return out, losses, tape.gradient(scaled, sources)

    def _probe_step(self, images: tf.Tensor, labels: tf.Tensor, targets: tf.Tensor | None = None
                    ) -> dict[str, tf.Tensor]:
        """A training step's forward and backward pass without the update: what an out-of-memory probe runs
        (batch-norm statistics still move; the run stops with the error anyway)."""
        _, losses, grads = self._gradients(images, labels, targets)
        return {"loss": losses["loss"], "grad_norm": tf.linalg.global_norm(grads)}

    def _train_step(self, images: tf.Tensor, labels: tf.Tensor, targets: tf.Tensor | None = None
                    ) -> dict[str, tf.Tensor]:
        out, losses, grads = self._gradients(images, labels, targets)
        variables = self.native.trainable_variables
        # the loss scaler skips non-finite gradients itself (lowering its scale); otherwise they skip the update,
        # judged on allreduced gradients, so identically on every rank
        finite = tf.constant(True) if self.precision == "fp16" else tf.math.is_finite(tf.linalg.global_norm(grads))
        if self.hvd is None:
            finite = tf.logical_and(finite, tf.math.is_finite(losses["loss"]))

        def update() -> tf.Tensor:
            self.optimizer.apply_gradients(zip(grads, variables, strict=True))
            return tf.constant(True)

        tf.cond(finite, update, lambda: tf.constant(False))
        return self._report(out, losses)

    def _eval_step(self, images: tf.Tensor, labels: tf.Tensor, targets: tf.Tensor | None = None
                   ) -> dict[str, tf.Tensor]:
        out = self.native(images, training=False)
        return self._report(out, compute_losses(self.card, out, images, labels, TensorFlowOps(), targets))

    @staticmethod
    def _report(out: dict[str, tf.Tensor], losses: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        report = dict(losses)
        if LOGITS in out:
            report["predicted"] = tf.argmax(out[LOGITS], axis=1)
        if PROPERTY_MEAN in out:
            report["properties"] = tf.concat([out[PROPERTY_MEAN], out[PROPERTY_LOGVAR]], axis=1)
        return report

    def _result(self, report: dict[str, tf.Tensor]) -> StepResult:
        values = {k: v.numpy() for k, v in report.items()}
        predicted = values.pop("predicted", None)
        properties = values.pop("properties", None)
        losses = {k: float(v) for k, v in values.items()}
        return StepResult(losses, predicted=None if predicted is None else predicted.astype(np.int64),
                          recon_mse=losses.get("loss_reconstruction"),
                          properties=None if properties is None else np.asarray(properties, np.float32))

    def train_step(self, images: np.ndarray, labels: np.ndarray) -> StepResult:
        """One optimisation step; returns this rank's batch losses, predicted classes and reconstruction MSE."""
        result = self._result(self.run("train", *check_batch(self.card, images, labels)))
        self.step += 1
        return result

    def eval_step(self, images: np.ndarray, labels: np.ndarray) -> StepResult:
        """Losses and predictions in inference mode (no dropout, batch-norm moving statistics, z = mu)."""
        return self._result(self.run("eval", *check_batch(self.card, images, labels)))

    # -- checkpoints --------------------------------------------------------------------------------------------

    def _rng_variables(self) -> dict[str, Any]:
        """The model's seed-generator states (dropout, drop-connect, VAE noise) by index, in model order.

        Keys are indices, not paths: Keras numbers unnamed seed generators per process (``seed_generator_7``).
        """
        found = [v for v in self.native.variables if "seed_generator" in v.path]
        return {f"{i:04d}": v for i, v in enumerate(found)}

    def _slots(self) -> list[Any]:
        """The optimizer's own variables (under fp16 those of the optimizer inside the loss scaler, so a checkpoint
        resumes in any precision; the scaler's state goes into ``trainer.json``)."""
        scaler = self._scaler()
        return list((scaler.inner_optimizer if scaler is not None else self.optimizer).variables)

    def _scaler(self) -> keras.optimizers.LossScaleOptimizer | None:
        return self.optimizer if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer) else None

    def _optimizer_paths(self) -> list[str]:
        """Optimizer variable paths without the optimizer's own, per-process numbered prefix (``adam_3/``)."""
        return [v.path.split("/", 1)[-1] for v in self._slots()]

    def save_checkpoint(self, directory: Path) -> None:
        """Weights, optimizer variables, RNG states (safetensors) and the step count (JSON); rank 0 only."""
        if not self.dist.is_root:
            return
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(get_weights(self.native), str(directory / MODEL_FILE),
                  metadata=weights_metadata(FRAMEWORK, self.card))
        save_file({f"{i:05d}": np.asarray(v.numpy()) for i, v in enumerate(self._slots())},
                  str(directory / OPTIMIZER_FILE))
        save_file({path: np.asarray(v.numpy()) for path, v in self._rng_variables().items()},
                  str(directory / RNG_FILE))
        write_checkpoint_state(directory, checkpoint_state(
            FRAMEWORK, self.card, self.step, self.train.optimizer, learning_rate=self.learning_rate,
            optimizer_variables=self._optimizer_paths(), **self._loss_scale()))

    def _loss_scale(self) -> dict[str, Any]:
        """The fp16 loss scaler's state as ``trainer.json`` keeps it (nothing in fp32 and bf16)."""
        scaler = self._scaler()
        if scaler is None:
            return {}
        return {"loss_scale": {"scale": float(scaler.dynamic_scale.numpy()),
                               "steps_since_change": int(scaler.step_counter.numpy())}}

    def load_checkpoint(self, directory: Path) -> None:
        """Restore what :meth:`save_checkpoint` wrote; raise ``TrainingError`` naming what does not fit."""
        directory = Path(directory)
        state = read_checkpoint_state(directory, FRAMEWORK, self.train.optimizer, self.dist, self.hvd is not None)
        if state is None:
            self.broadcast()  # this rank cannot see the files: take rank 0's
            return
        check_same_model(directory, self.card, state.get("optimizer_variables", []), self._optimizer_paths())
        try:
            set_weights(self.native, load_file(str(directory / MODEL_FILE)))
        except WeightsMismatchError as exc:
            raise TrainingError(f"checkpoint {directory}: {exc}") from None
        saved = load_file(str(directory / OPTIMIZER_FILE))
        for i, var in enumerate(self._slots()):
            var.assign(saved[f"{i:05d}"])
        scaler = self._scaler()
        if scaler is not None and "loss_scale" in state:  # else (a checkpoint from fp32 or bf16) its initial scale
            scaler.dynamic_scale.assign(state["loss_scale"]["scale"])
            scaler.step_counter.assign(state["loss_scale"]["steps_since_change"])
        self.optimizer.learning_rate.assign(self.learning_rate)
        self.step = int(state["step"])
        if self.dist.is_root:
            rng = load_file(str(directory / RNG_FILE))
            for key, var in self._rng_variables().items():
                if key in rng and tuple(rng[key].shape) == tuple(var.shape):
                    var.assign(rng[key])
        else:
            self.reseed(self.step)
        if self.hvd is not None:
            self.broadcast()
