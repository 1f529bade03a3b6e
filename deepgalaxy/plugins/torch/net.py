"""The composed model: a shared encoder E with the decoder, head and VAE the card's task asks for.

``DeepGalaxyNet`` is the ``nn.Module`` behind ``Model.native``. Its state-dict names are the part name followed by
the part's own names: ``encoder.*`` (the backbone, see :mod:`deepgalaxy.plugins.torch.backbones`), ``decoder.*``,
``head.*``, ``latent.*``, ``properties.*`` (see :mod:`deepgalaxy.plugins.torch.parts`). Tensors are NCHW inside.

The loss terms are :mod:`deepgalaxy.core.losses` over :class:`TorchOps`.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from deepgalaxy.core.contract import (
    FEATURES,
    LATENT_RECONSTRUCTION,
    LOGITS,
    LOGVAR,
    MU,
    PROPERTY_LOGVAR,
    PROPERTY_LOGVAR_BOUND,
    PROPERTY_MEAN,
    RECONSTRUCTION,
    decoder_widths,
)
from deepgalaxy.core.errors import ShapeError
from deepgalaxy.core.interfaces import PARTS
from deepgalaxy.core.specs import ModelSpec
from deepgalaxy.plugins.torch.parts import VAE, Decoder, Head


class DeepGalaxyNet(nn.Module):
    """E (+ D) (+ head) (+ VAE) (+ property heads) for one card; parts absent from ``card.parts`` are ``None``.

    The property heads are one :class:`Head` (pooled like the classifier head) with a mean and a raw log-variance
    per target column; the log-variance is bounded by :func:`bounded_logvar`."""

    def __init__(self, card: ModelSpec, encoder: nn.Module) -> None:
        super().__init__()
        self.card = card
        self.encoder = encoder
        r = int(cast(int, encoder.reduction))
        f = int(cast(int, encoder.out_channels))
        if card.input_size % r:
            raise ShapeError(
                f"card {card.name!r}: input_size {card.input_size} is not divisible by the backbone's reduction {r}; "
                f"use a multiple of {r}"
            )
        self.reduction, self.feature_channels = r, f
        self.feature_size = card.input_size // r
        parts = card.parts
        self.decoder = Decoder(f, decoder_widths(card, r), card.channels) if "decoder" in parts else None
        self.head = (
            Head(f, self.feature_size, card.head_pool, card.head_hidden, card.num_classes) if "head" in parts else None
        )
        self.latent = VAE(f, self.feature_size, card.latent_channels, card.latent_dim) if "latent" in parts else None
        props = card.properties
        self.properties = (
            None if props is None else Head(f, self.feature_size, card.head_pool, props.hidden, 2 * len(props.columns))
        )

    def part(self, name: str) -> nn.Module:
        """The sub-module for a part name (``encoder``, ``decoder``, ``head``, ``latent``)."""
        module: nn.Module | None = getattr(self, name, None) if name in PARTS else None
        if module is None:
            raise ValueError(f"card {self.card.name!r} (task {self.card.task}) has no part {name!r}; "
                             f"parts: {', '.join(self.card.parts)}")
        return module

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every output the task has, keyed by the contract's output names (``features``, ``reconstruction`` ...)."""
        m = self.encoder(x)
        out = {FEATURES: m}
        if self.decoder is not None:
            out[RECONSTRUCTION] = self.decoder(m)
        if self.head is not None:
            out[LOGITS] = self.head(m)
        if self.latent is not None:
            out[LATENT_RECONSTRUCTION], out[MU], out[LOGVAR] = self.latent(m)
        if self.properties is not None:
            out[PROPERTY_MEAN], out[PROPERTY_LOGVAR] = property_outputs(self.properties(m))
        return out


def property_outputs(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(means, bounded log-variances) from the property heads' raw ``(N, 2K)`` output (means first)."""
    mean, logvar = raw.float().chunk(2, dim=1)
    return mean, PROPERTY_LOGVAR_BOUND * torch.tanh(logvar / PROPERTY_LOGVAR_BOUND)


class TorchOps:
    """The per-row loss arithmetic of :mod:`deepgalaxy.core.losses` in torch (NCHW images: rows are dim 0)."""

    float32 = staticmethod(torch.Tensor.float)

    @staticmethod
    def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, reduction="none")

    @staticmethod
    def squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (prediction - target).square().mean(dim=tuple(range(1, prediction.ndim)))

    @staticmethod
    def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return -0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(dim=1)

    stop_gradient = staticmethod(torch.Tensor.detach)
    mean = staticmethod(torch.Tensor.mean)
    sum = staticmethod(torch.Tensor.sum)
    exp = staticmethod(torch.Tensor.exp)
    outer = staticmethod(torch.outer)

    @staticmethod
    def is_labelled(labels: torch.Tensor) -> torch.Tensor:
        return (labels >= 0).float()

    @staticmethod
    def clamp_labels(labels: torch.Tensor) -> torch.Tensor:
        return labels.clamp(min=0)

    @staticmethod
    def pairwise_squared_distances(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(len(x), -1)
        norms = rows.square().sum(dim=1)
        return (norms[:, None] + norms[None, :] - 2 * rows @ rows.T).clamp(min=0)

    @staticmethod
    def maximum(x: torch.Tensor, floor: float) -> torch.Tensor:
        return x.clamp(min=floor)

    @staticmethod
    def is_known(x: torch.Tensor) -> torch.Tensor:
        return torch.isfinite(x).float()

    @staticmethod
    def fill_unknown(x: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.isfinite(x), x, torch.zeros_like(x))
