"""The loss terms every framework trains with, written once over a framework's tensor operations.

Which terms a task has, how they are reduced and how they are weighted into ``loss`` is defined here; a framework
plugin supplies only the per-row arithmetic (:class:`TensorOps`), so both frameworks train the same objective and
report the same metric names (:data:`deepgalaxy.core.interfaces.LOSS_TERMS`):

- ``loss_classifier``: cross-entropy of the head's logits, averaged over the batch;
- ``loss_reconstruction``: mean squared error of D(M) against the images;
- ``loss_latent``: mean squared error of the VAE's reconstruction M' against M (M held constant: the VAE learns to
  encode the feature maps, it does not pull them towards what it can reconstruct);
- ``loss_kl``: KL(N(mu, exp(logvar)) || N(0, I)), summed over latent dimensions, averaged over the batch;
- ``loss``: the terms weighted by the card's :class:`~deepgalaxy.core.specs.LossWeights`.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

from deepgalaxy.core.contract import FEATURES, LATENT_RECONSTRUCTION, LOGITS, LOGVAR, MU, RECONSTRUCTION
from deepgalaxy.core.specs import ModelSpec

T = TypeVar("T")

TERM_WEIGHT = {
    "loss_classifier": "classifier",
    "loss_reconstruction": "reconstruction",
    "loss_latent": "latent",
    "loss_kl": "kl",
}
"""Loss term -> the field of :class:`~deepgalaxy.core.specs.LossWeights` that weights it."""


class TensorOps(Protocol, Generic[T]):
    """A framework's tensor arithmetic for the loss terms; every per-row result has shape ``(N,)`` in float32."""

    def float32(self, x: T) -> T:
        """``x`` in float32 (outputs may be bf16 or fp16 under mixed precision)."""
        ...

    def cross_entropy(self, logits: T, labels: T) -> T:
        """Per row: -log softmax(logits)[label]."""
        ...

    def squared_error(self, prediction: T, target: T) -> T:
        """Per row: the mean of (prediction - target)^2 over every axis but the first."""
        ...

    def kl_to_standard_normal(self, mu: T, logvar: T) -> T:
        """Per row: -1/2 sum(1 + logvar - mu^2 - exp(logvar)) over the latent dimensions."""
        ...

    def stop_gradient(self, x: T) -> T:
        """``x`` as a constant for differentiation."""
        ...

    def mean(self, x: T) -> T:
        """The mean of a per-row vector (a scalar)."""
        ...


def compute_losses(card: ModelSpec, out: dict[str, T], images: T, labels: T, ops: TensorOps[T]) -> dict[str, T]:
    """The loss terms the outputs ``out`` of ``card``'s net have (names from ``LOSS_TERMS``), and ``loss``."""
    f = ops.float32
    terms: dict[str, T] = {}
    if LOGITS in out:
        terms["loss_classifier"] = ops.mean(ops.cross_entropy(f(out[LOGITS]), labels))
    if RECONSTRUCTION in out:
        terms["loss_reconstruction"] = ops.mean(ops.squared_error(f(out[RECONSTRUCTION]), f(images)))
    if LATENT_RECONSTRUCTION in out:
        target = ops.stop_gradient(f(out[FEATURES]))
        terms["loss_latent"] = ops.mean(ops.squared_error(f(out[LATENT_RECONSTRUCTION]), target))
        terms["loss_kl"] = ops.mean(ops.kl_to_standard_normal(f(out[MU]), f(out[LOGVAR])))
    weights = card.loss_weights
    total = sum(getattr(weights, TERM_WEIGHT[name]) * term for name, term in terms.items())
    return {"loss": total, **terms}
