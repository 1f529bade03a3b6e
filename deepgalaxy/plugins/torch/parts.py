"""The parts around the encoder: decoder D, classifier head, and the VAE (LatentModel) over the feature maps.

State-dict names (relative to the part; the composed model prefixes ``decoder.``, ``head.``, ``latent.``):

- :class:`Decoder`: ``stages.{i}.conv`` (3x3, no bias) / ``stages.{i}.bn``, then ``out`` (3x3 conv with bias).
- :class:`Head`: ``hidden.{i}`` (Linear, one per ``card.head_hidden``), ``out`` (Linear to ``num_classes``).
  With ``head_pool="flatten"`` the feature maps are flattened in **NHWC order** (permuted before flattening), so
  ``hidden.0.weight`` (torch ``(out, in)``) is Keras' ``Dense`` kernel transposed, with no further permutation.
- :class:`VAE`: ``reduce`` (1x1 conv F -> latent_channels, bias), ``mu`` and ``logvar`` (Linear, flattened NHWC ->
  latent_dim), ``expand`` (Linear latent_dim -> h*w*latent_channels, reshaped as NHWC), ``restore`` (1x1 conv
  latent_channels -> F, bias).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class DecoderStage(nn.Module):
    """Nearest-neighbour upsampling x2, then Conv3x3 (no bias) + BN + ReLU."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.act(self.bn(self.conv(self.up(x))))
        return y


class Decoder(nn.Module):
    """D: feature maps ``(N, F, h, w)`` -> images ``(N, C, h*r, w*r)`` in [0, 1]; fully convolutional."""

    def __init__(self, in_channels: int, widths: Sequence[int], out_channels: int) -> None:
        """``widths``: the stages' channels (:func:`deepgalaxy.core.contract.decoder_widths`)."""
        super().__init__()
        ins = [in_channels, *widths[:-1]]
        self.stages = nn.Sequential(*(DecoderStage(a, b) for a, b in zip(ins, widths, strict=True)))
        self.out = nn.Conv2d(widths[-1] if widths else in_channels, out_channels, 3, padding=1, bias=True)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.out(self.stages(m)))


def flatten_nhwc(x: torch.Tensor) -> torch.Tensor:
    """Flatten ``(N, C, H, W)`` in NHWC order (as Keras' Flatten does), so dense weights match Keras'."""
    return x.permute(0, 2, 3, 1).flatten(1)


class Head(nn.Module):
    """Classifier: M -> flatten (NHWC) or global average pool -> [Linear + ReLU + Dropout(0.2)]* -> logits."""

    def __init__(self, channels: int, spatial: int, pool: str, hidden: Sequence[int], num_classes: int,
                 dropout: float = 0.2) -> None:
        super().__init__()
        if pool not in ("flatten", "avg"):
            raise ValueError(f"head_pool must be 'flatten' or 'avg', got {pool!r}")
        self.pool = pool
        width = channels * spatial * spatial if pool == "flatten" else channels
        layers: list[nn.Module] = []
        for h in hidden:
            layers.append(nn.Linear(width, h))
            width = h
        self.hidden = nn.ModuleList(layers)
        self.out = nn.Linear(width, num_classes)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(dropout)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        x = flatten_nhwc(m) if self.pool == "flatten" else m.mean(dim=(2, 3))
        for layer in self.hidden:
            x = self.drop(self.act(layer(x)))
        y: torch.Tensor = self.out(x)
        return y


class VAE(nn.Module):
    """LatentModel: M -> (mu, logvar) -> z -> M'; ``h = w = spatial`` is the card's feature-map side."""

    def __init__(self, channels: int, spatial: int, latent_channels: int, latent_dim: int) -> None:
        super().__init__()
        self.spatial, self.latent_channels = spatial, latent_channels
        flat = spatial * spatial * latent_channels
        self.reduce = nn.Conv2d(channels, latent_channels, 1)
        self.mu = nn.Linear(flat, latent_dim)
        self.logvar = nn.Linear(flat, latent_dim)
        self.expand = nn.Linear(latent_dim, flat)
        self.restore = nn.Conv2d(latent_channels, channels, 1)
        self.act = nn.ReLU()

    def encode(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance, each ``(N, latent_dim)``."""
        x = flatten_nhwc(self.act(self.reduce(m)))
        return self.mu(x), self.logvar(x)

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """z = mu + exp(0.5 logvar) * eps, eps ~ N(0, I) from torch's global generator."""
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z ``(N, latent_dim)`` -> feature maps ``(N, F, h, w)``."""
        s, c = self.spatial, self.latent_channels
        x = self.act(self.expand(z)).reshape(-1, s, s, c).permute(0, 3, 1, 2)
        y: torch.Tensor = self.restore(x)
        return y

    def forward(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstructed M', mu, logvar); samples z in training mode, uses z = mu in eval mode."""
        mu, logvar = self.encode(m)
        z = self.reparameterize(mu, logvar) if self.training else mu
        return self.decode(z), mu, logvar
