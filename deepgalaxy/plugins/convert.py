"""Cross-framework weights: torch state dicts <-> Keras weights, numpy only (imports neither torch nor tensorflow).

Both framework plugins build the same architecture from a card and name their layers alike, so a weight maps by
name plus a layout change:

==========================  ===========================================  ====================================
what                        torch (``module.param``)                     tensorflow (``part.layer.variable``)
==========================  ===========================================  ====================================
convolution kernel          ``weight`` (out, in, kh, kw)                 ``kernel`` (kh, kw, in, out)
depthwise kernel            ``weight`` (C, 1, kh, kw) of a ``*dwconv``   ``kernel`` (kh, kw, C, 1)
dense kernel                ``weight`` (out, in)                         ``kernel`` (in, out)
bias                        ``bias``                                     ``bias``
batch norm                  ``weight, bias, running_mean, running_var``  ``gamma, beta, moving_mean,
                                                                         moving_variance``
                            ``num_batches_tracked``                      (none: dropped)
==========================  ===========================================  ====================================

Module paths are identical except EfficientNet blocks: torch ``encoder.blocks.block2a.expand_conv`` is Keras'
``encoder.block2a_expand_conv`` (keras.applications' layer names). Images are NHWC in Keras and NCHW in torch, but
the torch plugin flattens feature maps in NHWC order before its dense layers (and reshapes the VAE's dense output
the same way), so dense kernels only transpose.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from deepgalaxy.core.errors import WeightsMismatchError

FRAMEWORKS = ("torch", "tensorflow")

_BN_TORCH_TO_TF = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
_BN_TF_TO_TORCH = {v: k for k, v in _BN_TORCH_TO_TF.items()}
_EFFNET_TORCH = re.compile(r"^(?P<part>[^.]+)\.blocks\.(?P<block>block\d+[a-z])\.(?P<layer>.+)$")
_EFFNET_TF = re.compile(r"^(?P<part>[^.]+)\.(?P<block>block\d+[a-z])_(?P<layer>.+)$")


def convert(weights: Mapping[str, np.ndarray], source: str, target: str, card: Any = None) -> dict[str, np.ndarray]:
    """Weights saved by framework ``source`` in framework ``target``'s naming and layout.

    ``card`` (the :class:`~deepgalaxy.core.specs.ModelSpec` both models are built from) only names the model in
    errors; the receiving framework's ``set_weights`` checks every name and shape against the model it built.
    """
    for fw in (source, target):
        if fw not in FRAMEWORKS:
            raise WeightsMismatchError(
                f"cannot convert weights from {source!r} to {target!r}: only {' and '.join(FRAMEWORKS)} are known"
            )
    if source == target:
        return {k: np.asarray(v) for k, v in weights.items()}
    what = f" of card {card.name!r}" if getattr(card, "name", None) else ""
    try:
        return torch_to_tf(weights) if source == "torch" else tf_to_torch(weights)
    except (ValueError, KeyError) as exc:
        raise WeightsMismatchError(f"converting {source} weights{what} to {target}: {exc}") from None


# --- torch -> tensorflow ---------------------------------------------------------------------------------------


def _split(name: str) -> tuple[str, str]:
    module, _, param = name.rpartition(".")
    if not module:
        raise ValueError(f"weight name {name!r} has no module path")
    return module, param


def _tf_module(torch_module: str) -> str:
    m = _EFFNET_TORCH.match(torch_module)
    return f"{m['part']}.{m['block']}_{m['layer']}" if m else torch_module


def _torch_module(tf_layer: str) -> str:
    m = _EFFNET_TF.match(tf_layer)
    return f"{m['part']}.blocks.{m['block']}.{m['layer']}" if m else tf_layer


def _is_depthwise(module: str) -> bool:
    return module.endswith("dwconv")


def torch_to_tf(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A torch state dict (numpy arrays) -> ``{part.layer.variable: array}`` in Keras layouts."""
    bn_modules = {_split(k)[0] for k in weights if k.endswith(".running_mean")}
    out: dict[str, np.ndarray] = {}
    for name, value in weights.items():
        module, param = _split(name)
        if param == "num_batches_tracked":
            continue
        arr = np.asarray(value)
        layer = _tf_module(module)
        if module in bn_modules:
            if param not in _BN_TORCH_TO_TF:
                raise ValueError(f"unexpected batch-norm entry {name!r}")
            out[f"{layer}.{_BN_TORCH_TO_TF[param]}"] = arr.astype(np.float32)
        elif param == "bias":
            out[f"{layer}.bias"] = arr.astype(np.float32)
        elif param == "weight":
            out[f"{layer}.kernel"] = _kernel_to_tf(name, arr, _is_depthwise(module))
        else:
            raise ValueError(f"unexpected torch weight {name!r} (parameter {param!r})")
    return out


def _kernel_to_tf(name: str, w: np.ndarray, depthwise: bool) -> np.ndarray:
    if w.ndim == 4 and depthwise:
        if w.shape[1] != 1:
            raise ValueError(f"depthwise kernel {name!r} should be (C, 1, kh, kw), got {w.shape}")
        return np.ascontiguousarray(w.transpose(2, 3, 0, 1), dtype=np.float32)  # (kh, kw, C, 1)
    if w.ndim == 4:
        return np.ascontiguousarray(w.transpose(2, 3, 1, 0), dtype=np.float32)  # OIHW -> HWIO
    if w.ndim == 2:
        return np.ascontiguousarray(w.T, dtype=np.float32)  # (out, in) -> (in, out)
    raise ValueError(f"weight {name!r} has shape {w.shape}; expected a conv (4-D) or dense (2-D) kernel")


# --- tensorflow -> torch ---------------------------------------------------------------------------------------


def tf_to_torch(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keras weights ``{part.layer.variable: array}`` -> a torch state dict (numpy arrays).

    Without ``num_batches_tracked``: the torch plugin leaves those counters out of its weights (they are only used
    with ``momentum=None``).
    """
    out: dict[str, np.ndarray] = {}
    for name, value in weights.items():
        layer, var = _split(name)
        arr = np.asarray(value)
        module = _torch_module(layer)
        if var in _BN_TF_TO_TORCH:
            out[f"{module}.{_BN_TF_TO_TORCH[var]}"] = arr.astype(np.float32)
        elif var == "bias":
            out[f"{module}.bias"] = arr.astype(np.float32)
        elif var == "kernel":
            out[f"{module}.weight"] = _kernel_to_torch(name, arr, _is_depthwise(layer))
        else:
            raise ValueError(f"unexpected tensorflow weight {name!r} (variable {var!r})")
    return out


def _kernel_to_torch(name: str, k: np.ndarray, depthwise: bool) -> np.ndarray:
    if k.ndim == 4 and depthwise:
        if k.shape[3] != 1:
            raise ValueError(f"depthwise kernel {name!r} should have depth multiplier 1, got {k.shape}")
        return np.ascontiguousarray(k.transpose(2, 3, 0, 1), dtype=np.float32)  # (kh, kw, C, 1) -> (C, 1, kh, kw)
    if k.ndim == 4:
        return np.ascontiguousarray(k.transpose(3, 2, 0, 1), dtype=np.float32)  # HWIO -> OIHW
    if k.ndim == 2:
        return np.ascontiguousarray(k.T, dtype=np.float32)
    raise ValueError(f"kernel {name!r} has shape {k.shape}; expected a conv (4-D) or dense (2-D) kernel")
