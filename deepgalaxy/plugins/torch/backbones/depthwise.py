"""Stride-1 depthwise convolution with a faster weight gradient for large kernels on CPU.

oneDNN's weight gradient of a depthwise 5x5 convolution is slow on CPU: at batch 16 it takes 2-4 ms for EfficientNet's
8x8 and 4x4 stages, ten times its forward pass, and 14% of a whole EfficientNet-B0 training step at 128 px. The same
gradient is one *forward* depthwise convolution with the batch folded into the channels::

    dW[c, i, j] = sum_{n, h, w} dY[n, c, h, w] * X_pad[n, c, h + i, w + j]
                = conv2d(X as (1, C*N, H, W), dY as (C*N, 1, Ho, Wo), groups=C*N)[c*N + n, i, j] summed over n

which oneDNN runs 1.4-3x faster for 5x5 kernels up to ``MAX_ELEMENTS`` output values per image (measured on this
2-core AVX-512 machine; above that, and for 3x3 kernels, the built-in gradient is faster and is used). The input
gradient and the forward pass are torch's own. Under autocast the built-in path is used as well.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

MIN_KERNEL = 5
MAX_ELEMENTS = 200_000
"""Largest C*Ho*Wo for which the folded gradient wins (EfficientNet-B0..B4 at 128 px all qualify)."""


class _DepthwiseConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, padding: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        return F.conv2d(x, weight, None, 1, padding, 1, x.shape[1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight = ctx.saved_tensors
        p = ctx.padding
        n, c, h, w = x.shape
        k = weight.shape[-1]
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1, 1], [p, p], [1, 1], False, [0, 0], c, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            folded = F.conv2d(x.transpose(0, 1).reshape(1, c * n, h, w),
                              grad.transpose(0, 1).reshape(c * n, 1, grad.shape[2], grad.shape[3]),
                              padding=p, groups=c * n)
            grad_w = folded.reshape(c, n, k, k).sum(1, keepdim=True).contiguous(memory_format=_layout(weight))
        return grad_x, grad_w, None


def _layout(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def use_folded_gradient(conv: torch.nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether ``conv`` on ``x`` is a stride-1 depthwise convolution whose weight gradient is faster folded."""
    k = conv.kernel_size[0]
    return (conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels and conv.bias is None
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.kernel_size == (k, k) and k >= MIN_KERNEL
            and conv.padding == (k // 2, k // 2) and x.device.type == "cpu" and torch.is_grad_enabled()
            and conv.weight.requires_grad and not torch.is_autocast_enabled("cpu")
            and x.shape[1] * x.shape[2] * x.shape[3] <= MAX_ELEMENTS)


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, padding: int) -> torch.Tensor:
    """``F.conv2d(x, weight, padding=padding, groups=C)`` at stride 1, with the folded weight gradient."""
    out: torch.Tensor = _DepthwiseConv2d.apply(x, weight, padding)  # type: ignore[no-untyped-call]
    return out
