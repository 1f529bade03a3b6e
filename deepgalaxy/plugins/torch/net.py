"""The composed model: a shared encoder E with the decoder, head and VAE the card's task asks for.

``DeepGalaxyNet`` is the ``nn.Module`` behind ``Model.native``. Its state-dict names are the part name followed by
the part's own names: ``encoder.*`` (the backbone, see :mod:`deepgalaxy.plugins.torch.backbones`), ``decoder.*``,
``head.*``, ``latent.*`` (see :mod:`deepgalaxy.plugins.torch.parts`). Tensors are NCHW inside.

Losses (names from ``deepgalaxy.core.interfaces.LOSS_TERMS``), each a batch mean, unweighted:

- ``loss_classifier``: cross-entropy of the head's logits (tasks with a head);
- ``loss_reconstruction``: MSE(D(M), X) (tasks with a decoder);
- ``loss_latent``: MSE(VAE reconstruction of M, M detached) (tasks with a VAE);
- ``loss_kl``: mean over the batch of ``-0.5 * sum(1 + logvar - mu^2 - exp(logvar))`` (tasks with a VAE);
- ``loss``: the sum of ``card.loss_weights`` times the terms above.
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
    RECONSTRUCTION,
    decoder_widths,
)
from deepgalaxy.core.errors import ShapeError
from deepgalaxy.core.interfaces import PARTS
from deepgalaxy.core.specs import ModelSpec
from deepgalaxy.plugins.torch.parts import VAE, Decoder, Head

TERM_WEIGHT = {
    "loss_classifier": "classifier",
    "loss_reconstruction": "reconstruction",
    "loss_latent": "latent",
    "loss_kl": "kl",
}


class DeepGalaxyNet(nn.Module):
    """E (+ D) (+ head) (+ VAE) for one card; parts absent from ``card.parts`` are ``None``."""

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
        return out


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over latent dimensions, averaged over the batch."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)).mean()


def compute_losses(card: ModelSpec, out: dict[str, torch.Tensor], x: torch.Tensor,
                   y: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The task's loss terms (fp32) and their weighted total ``loss`` (see the module docstring)."""
    terms: dict[str, torch.Tensor] = {}
    if LOGITS in out:
        if y is None:
            raise ValueError(f"card {card.name!r} has a classifier head: labels are required")
        terms["loss_classifier"] = F.cross_entropy(out[LOGITS].float(), y)
    if RECONSTRUCTION in out:
        terms["loss_reconstruction"] = F.mse_loss(out[RECONSTRUCTION].float(), x.float())
    if LATENT_RECONSTRUCTION in out:
        terms["loss_latent"] = F.mse_loss(out[LATENT_RECONSTRUCTION].float(), out[FEATURES].detach().float())
        terms["loss_kl"] = kl_divergence(out[MU].float(), out[LOGVAR].float())
    weights = card.loss_weights
    total = sum(getattr(weights, TERM_WEIGHT[k]) * v for k, v in terms.items())
    return {"loss": total, **terms}
