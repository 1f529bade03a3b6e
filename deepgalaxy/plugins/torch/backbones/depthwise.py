"""Stride-1 depthwise convolution with a weight gradient computed folded where that measured faster on this machine.

oneDNN's weight gradient of a depthwise 5x5 convolution can be slow on CPU: on a 2-core AVX-512 Xeon at batch 16 it
took 2-4 ms for EfficientNet's 8x8 and 4x4 stages, ten times its forward pass. The same gradient is one *forward*
depthwise convolution with the batch folded into the channels::

    dW[c, i, j] = sum_{n, h, w} dY[n, c, h, w] * X_pad[n, c, h + i, w + j]
                = conv2d(X as (1, C*N, H, W), dY as (C*N, 1, Ho, Wo), groups=C*N)[c*N + n, i, j] summed over n

Which of the two wins depends on the CPU, the kernel size and the shape, so it is not assumed: the first time a
shape is met, both are timed (:func:`weight_gradient_times`) and the folded one is used only if it takes under
``WIN_FRACTION`` of the built-in one's time; the decision is kept per machine (:mod:`..capability`).
``DEEPGALAXY_FOLDED_GRADIENT=1`` forces it, ``0`` turns it off. The input gradient and the forward pass are torch's
own; under autocast the built-in path is used as well.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from deepgalaxy.plugins.torch.capability import measured, switch

SWITCH_ENV = "DEEPGALAXY_FOLDED_GRADIENT"
WIN_FRACTION = 0.9
"""The folded gradient is used where it takes under this fraction of the built-in one's time (noise margin)."""
TIMING_ROUNDS = 5


def _folded_weight_grad(x: torch.Tensor, grad: torch.Tensor, k: int, p: int) -> torch.Tensor:
    n, c, h, w = x.shape
    folded = F.conv2d(x.transpose(0, 1).reshape(1, c * n, h, w),
                      grad.transpose(0, 1).reshape(c * n, 1, grad.shape[2], grad.shape[3]), padding=p, groups=c * n)
    return folded.reshape(c, n, k, k).sum(1, keepdim=True)


def _builtin_grads(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, p: int,
                   mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], [p, p], [1, 1], False, [0, 0],
                                              x.shape[1], [*mask, False])
    return out[0], out[1]


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
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _builtin_grads(grad, x, weight, p, [True, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = _folded_weight_grad(x, grad, weight.shape[-1], p).contiguous(memory_format=_layout(weight))
        return grad_x, grad_w, None


def _layout(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def weight_gradient_times(shape: tuple[int, int, int, int], kernel: int, channels_last: bool) -> dict[str, float]:
    """Seconds of torch's own and of the folded depthwise weight gradient for input ``shape`` (N, C, H, W) and a
    ``kernel`` x ``kernel`` kernel, best of ``TIMING_ROUNDS`` alternating rounds after one warm-up of each."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.rand(shape).contiguous(memory_format=layout)
    grad = torch.rand(shape).contiguous(memory_format=layout)
    weight = torch.rand(shape[1], 1, kernel, kernel).contiguous(memory_format=layout)
    p = kernel // 2
    ways: dict[str, Callable[[], object]] = {"builtin": lambda: _builtin_grads(grad, x, weight, p, [False, True]),
                                              "folded": lambda: _folded_weight_grad(x, grad, kernel, p)}
    best = dict.fromkeys(ways, float("inf"))
    with torch.no_grad():
        for rnd in range(TIMING_ROUNDS + 1):
            for name, run in ways.items():
                start = time.perf_counter()
                run()
                if rnd:  # round 0 warms up
                    best[name] = min(best[name], time.perf_counter() - start)
    return best


def folded_gradient_wins(shape: tuple[int, int, int, int], kernel: int, channels_last: bool) -> bool:
    """Whether the folded weight gradient is used for this shape: ``DEEPGALAXY_FOLDED_GRADIENT`` 1/0, else (auto)
    whether it measured under ``WIN_FRACTION`` of the built-in one's time on this machine."""
    setting = switch(SWITCH_ENV)
    if setting != "auto":
        return setting == "1"
    case = f"{'x'.join(map(str, shape))} k{kernel} {'channels_last' if channels_last else 'contiguous'}"

    def measure() -> dict[str, Any]:
        times = weight_gradient_times(shape, kernel, channels_last)
        return {"builtin_ms": 1e3 * times["builtin"], "folded_ms": 1e3 * times["folded"],
                "folded": times["folded"] < WIN_FRACTION * times["builtin"]}

    return bool(measured("folded_depthwise_gradient", case, measure)["folded"])


def use_folded_gradient(conv: torch.nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether ``conv`` on ``x`` is a stride-1 depthwise convolution whose weight gradient is faster folded here."""
    k = conv.kernel_size[0]
    if not (conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels and conv.bias is None
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.kernel_size == (k, k)
            and conv.padding == (k // 2, k // 2) and x.device.type == "cpu" and x.dtype == torch.float32
            and torch.is_grad_enabled() and conv.weight.requires_grad and not torch.is_autocast_enabled("cpu")):
        return False
    n, c, h, w = x.shape
    return folded_gradient_wins((n, c, h, w), k, x.is_contiguous(memory_format=torch.channels_last))


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, padding: int) -> torch.Tensor:
    """``F.conv2d(x, weight, padding=padding, groups=C)`` at stride 1, with the folded weight gradient."""
    out: torch.Tensor = _DepthwiseConv2d.apply(x, weight, padding)  # type: ignore[no-untyped-call]
    return out
