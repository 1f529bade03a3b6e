"""The loss terms every framework trains with, written once over a framework's tensor operations.

Which terms a task has, how they are reduced and how they are weighted into ``loss`` is defined here; a framework
plugin supplies only the per-row arithmetic (:class:`TensorOps`), so both frameworks train the same objective and
report the same metric names (:data:`deepgalaxy.core.interfaces.LOSS_TERMS`):

- ``loss_classifier``: cross-entropy of the head's logits, averaged over the labelled images of the batch (label
  -1 marks an unlabelled image, e.g. an ingested observation: it counts in every other term, never in this one);
- ``loss_reconstruction``: mean squared error of D(M) against the images;
- ``loss_latent``: mean squared error of the VAE's reconstruction M' against M (M held constant: the VAE learns to
  encode the feature maps, it does not pull them towards what it can reconstruct);
- ``loss_kl``: KL(N(mu, exp(logvar)) || N(0, I)), summed over latent dimensions, averaged over the batch;
- ``loss_domain`` (cards with ``domain_adaptation="mmd"``): the squared maximum mean discrepancy between the
  feature maps M of the batch's labelled and unlabelled images, with a sum of Gaussian kernels whose widths follow
  the batch's mean squared distance (Long et al. 2015's multi-kernel MMD, as DeepMerge II used to carry
  simulation-trained merger classifiers over to survey images); 0 for a batch without both kinds;
- ``loss_properties`` (cards with ``properties``): the Gaussian negative log-likelihood of the normalised target
  columns under the heads' predicted means and log-variances, 1/2 (log 2 pi + logvar + (y - mu)^2 / exp(logvar)),
  each value weighted by its predicted variance to the power ``properties.beta`` (held constant: the beta-NLL of
  Seitzer et al. 2022; beta = 0 is the plain likelihood, whose 1/variance factor lets the means of hard examples
  stop learning), averaged over the known targets of the batch (NaN: unknown, e.g. an observation's); a mean and a
  variance per column rather than quantiles, so one number per column says how sure the model is and the likelihood
  rewards variances that match the errors (calibration is measured by ``benchmarks/properties.py``);
- ``loss``: the terms weighted by the card's :class:`~deepgalaxy.core.specs.LossWeights`.
"""

from __future__ import annotations

import math
from typing import Any, Generic, Protocol, TypeVar

from deepgalaxy.core.contract import (
    FEATURES,
    LATENT_RECONSTRUCTION,
    LOGITS,
    LOGVAR,
    MU,
    PROPERTY_LOGVAR,
    PROPERTY_MEAN,
    RECONSTRUCTION,
)
from deepgalaxy.core.specs import ModelSpec


class Tensor(Protocol):
    """What the loss maths does with a framework's tensors: elementwise arithmetic with tensors and numbers."""

    def __add__(self, other: Any, /) -> Any: ...
    def __radd__(self, other: Any, /) -> Any: ...
    def __sub__(self, other: Any, /) -> Any: ...
    def __rsub__(self, other: Any, /) -> Any: ...
    def __mul__(self, other: Any, /) -> Any: ...
    def __rmul__(self, other: Any, /) -> Any: ...
    def __truediv__(self, other: Any, /) -> Any: ...
    def __neg__(self) -> Any: ...


T = TypeVar("T", bound=Tensor)

TERM_WEIGHT = {
    "loss_classifier": "classifier",
    "loss_reconstruction": "reconstruction",
    "loss_latent": "latent",
    "loss_kl": "kl",
    "loss_domain": "domain",
    "loss_properties": "properties",
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
        """The mean of every element (a scalar)."""
        ...

    def sum(self, x: T) -> T:
        """The sum of every element (a scalar)."""
        ...

    def is_labelled(self, labels: T) -> T:
        """Per row: 1.0 where ``labels >= 0``, else 0.0 (float32)."""
        ...

    def clamp_labels(self, labels: T) -> T:
        """``labels`` with -1 (unlabelled) replaced by 0, so every row has a valid class index."""
        ...

    def pairwise_squared_distances(self, x: T) -> T:
        """``(N, N)``: the squared Euclidean distance between every two rows of ``x`` flattened to ``(N, -1)``."""
        ...

    def outer(self, a: T, b: T) -> T:
        """``(N, N)``: ``a[i] * b[j]``."""
        ...

    def exp(self, x: T) -> T:
        ...

    def maximum(self, x: T, floor: float) -> T:
        ...

    def is_known(self, x: T) -> T:
        """1.0 where ``x`` is finite, else 0.0 (float32, the shape of ``x``)."""
        ...

    def fill_unknown(self, x: T) -> T:
        """``x`` with its non-finite values replaced by 0 (so they carry no gradient through the masked terms)."""
        ...


def compute_losses(card: ModelSpec, out: dict[str, T], images: T, labels: T, ops: TensorOps[T],
                   targets: T | None = None) -> dict[str, T]:
    """The loss terms the outputs ``out`` of ``card``'s net have (names from ``LOSS_TERMS``), and ``loss``;
    ``targets``: the normalised property targets ``(N, K)`` of a card with property heads."""
    f = ops.float32
    terms: dict[str, T] = {}
    labelled = ops.is_labelled(labels)
    if LOGITS in out:
        per_row = ops.cross_entropy(f(out[LOGITS]), ops.clamp_labels(labels))
        terms["loss_classifier"] = ops.sum(per_row * labelled) / ops.maximum(ops.sum(labelled), 1.0)
    if RECONSTRUCTION in out:
        terms["loss_reconstruction"] = ops.mean(ops.squared_error(f(out[RECONSTRUCTION]), f(images)))
    if LATENT_RECONSTRUCTION in out:
        target = ops.stop_gradient(f(out[FEATURES]))
        terms["loss_latent"] = ops.mean(ops.squared_error(f(out[LATENT_RECONSTRUCTION]), target))
        terms["loss_kl"] = ops.mean(ops.kl_to_standard_normal(f(out[MU]), f(out[LOGVAR])))
    if PROPERTY_MEAN in out and targets is not None:
        terms["loss_properties"] = gaussian_nll(f(out[PROPERTY_MEAN]), f(out[PROPERTY_LOGVAR]), targets, ops,
                                                beta=card.properties.beta if card.properties else 0.0)
    if card.domain_adaptation == "mmd":
        terms["loss_domain"] = mmd(f(out[FEATURES]), labelled, ops)
    weights = card.loss_weights
    total = sum(getattr(weights, TERM_WEIGHT[name]) * term for name, term in terms.items())
    return {"loss": total, **terms}


MMD_BANDWIDTHS = (0.25, 1.0, 4.0)
"""Kernel widths as multiples of the batch's mean squared distance (the kernels' bandwidth follows the features)."""


def mmd(features: T, source: T, ops: TensorOps[T]) -> T:
    """Squared multi-kernel MMD between the rows where ``source`` is 1 and those where it is 0 (biased estimate,
    computed with masks so the batch's shape never changes); 0 unless the batch holds both kinds."""
    target = 1.0 - source
    distances = ops.pairwise_squared_distances(features)
    ns, nt = ops.sum(source), ops.sum(target)
    n = ns + nt
    scale = ops.stop_gradient(ops.sum(distances) / ops.maximum(n * n - n, 1.0))
    kernel = sum(ops.exp(-distances / ops.maximum(scale * w, 1e-12)) for w in MMD_BANDWIDTHS)
    within_s = ops.sum(kernel * ops.outer(source, source)) / ops.maximum(ns * ns, 1.0)
    within_t = ops.sum(kernel * ops.outer(target, target)) / ops.maximum(nt * nt, 1.0)
    across = ops.sum(kernel * ops.outer(source, target)) / ops.maximum(ns * nt, 1.0)
    both = ns * nt / ops.maximum(ns * nt, 1.0)
    result: T = both * (within_s + within_t - 2.0 * across)
    return result


HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_nll(mean: T, logvar: T, targets: T, ops: TensorOps[T], beta: float = 0.0) -> T:
    """Mean negative log-likelihood of the finite ``targets`` under N(mean, exp(logvar)), element by element, each
    weighted by the constant variance**beta (beta-NLL; 0: the plain likelihood)."""
    known = ops.is_known(targets)
    error = ops.fill_unknown(targets) - mean
    per_value = HALF_LOG_2PI + 0.5 * (logvar + error * error * ops.exp(-logvar))
    if beta:
        known = known * ops.stop_gradient(ops.exp(beta * logvar))
    result: T = ops.sum(per_value * known) / ops.maximum(ops.sum(ops.is_known(targets)), 1.0)
    return result
