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

A backbone from another plugin need not name its layers alike in both frameworks. Given the shapes of the model the
weights go into, its weights (``encoder.*``) convert by the correspondence its plugin declares
(:attr:`~deepgalaxy.core.interfaces.BackboneInfo.weight_names`: torch module -> Keras layer), else by layer order: the
n-th weighted layer in one framework is the n-th in the other, each variable found by its role (the table above, plus
layer norms' ``weight, bias`` <-> ``gamma, beta``) and laid out to fit the receiving shape (a 4-D kernel as a
convolution or, where only that fits, a depthwise one). Where neither fits, :class:`WeightsConversionError` says that
the conversion is not available for the backbone and where the weights load: in the framework that trained them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from deepgalaxy.core.errors import WeightsConversionError, WeightsMismatchError

FRAMEWORKS = ("torch", "tensorflow")
ENCODER = "encoder."
"""Prefix of the backbone's weights in both frameworks' naming."""

OIHW_TO_HWIO = (2, 3, 1, 0)
HWIO_TO_OIHW = (3, 2, 0, 1)
DEPTHWISE = (2, 3, 0, 1)
"""torch's (C, 1, kh, kw) <-> Keras' (kh, kw, C, 1): the permutation is its own inverse."""

_BN_TORCH_TO_TF = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
_BN_TF_TO_TORCH = {v: k for k, v in _BN_TORCH_TO_TF.items()}
_ROLES: dict[str, dict[str, tuple[str, ...]]] = {
    "torch": {"weight": ("kernel", "gamma"), "bias": ("bias", "beta"), "running_mean": ("moving_mean",),
              "running_var": ("moving_variance",)},
    "tensorflow": {"kernel": ("weight",), "gamma": ("weight",), "bias": ("bias",), "beta": ("bias",),
                   "moving_mean": ("running_mean",), "moving_variance": ("running_var",)},
}
"""A source framework's variable name -> the names it may have in the other framework (by layer kind)."""
_KERNEL_LAYOUTS: dict[str, tuple[tuple[int, ...], ...]] = {
    "torch": (OIHW_TO_HWIO, DEPTHWISE), "tensorflow": (HWIO_TO_OIHW, DEPTHWISE),
}
"""A source framework's 4-D kernel layouts, in the order they are tried: a convolution's, then a depthwise one's."""
_EFFNET_TORCH = re.compile(r"^(?P<part>[^.]+)\.blocks\.(?P<block>block\d+[a-z])\.(?P<layer>.+)$")
_EFFNET_TF = re.compile(r"^(?P<part>[^.]+)\.(?P<block>block\d+[a-z])_(?P<layer>.+)$")


def convert(weights: Mapping[str, np.ndarray], source: str, target: str, card: Any = None,
            expected: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """Weights saved by framework ``source`` in framework ``target``'s naming and layout.

    ``card`` (the :class:`~deepgalaxy.core.specs.ModelSpec` both models are built from) names the model and its
    backbone; ``expected`` (the receiving model's weight shapes by name) lets a backbone whose layers are named
    differently in the two frameworks convert (see the module docstring). The receiving framework's ``set_weights``
    checks every name and shape against the model it built.
    """
    for fw in (source, target):
        if fw not in FRAMEWORKS:
            raise WeightsMismatchError(
                f"cannot convert weights from {source!r} to {target!r}: only {' and '.join(FRAMEWORKS)} are known"
            )
    if source == target:
        return {k: np.asarray(v) for k, v in weights.items()}
    what = f" of card {card.name!r}" if getattr(card, "name", None) else ""
    encoder = {k: v for k, v in weights.items() if k.startswith(ENCODER)}
    rest = {k: v for k, v in weights.items() if not k.startswith(ENCODER)}
    try:
        named = by_name(rest, source)
        if expected is None:
            return {**by_name(encoder, source), **named}
    except (ValueError, KeyError) as exc:
        raise WeightsMismatchError(f"converting {source} weights{what} to {target}: {exc}") from None
    wanted = {k: tuple(shape) for k, shape in expected.items() if k.startswith(ENCODER)}
    return {**convert_backbone(encoder, source, target, wanted, card), **named}


def by_name(weights: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Convert by the built-in naming (the table in the module docstring)."""
    return torch_to_tf(weights) if source == "torch" else tf_to_torch(weights)


# --- a backbone's weights: by name, by declared correspondence, or by layer order ------------------------------


def convert_backbone(weights: Mapping[str, np.ndarray], source: str, target: str,
                     wanted: Mapping[str, tuple[int, ...]], card: Any) -> dict[str, np.ndarray]:
    """The backbone's ``encoder.*`` weights in ``target``'s naming, fitting ``wanted`` (name -> shape).

    By name when that fits; else by the plugin's declared correspondence or, without one, by layer order. When
    neither fits and the layer names correspond (one framework's are a subset of the other's), the named weights
    are returned for ``set_weights`` to report what does not fit the card; else :class:`WeightsConversionError`.
    """
    try:
        named: dict[str, np.ndarray] | None = by_name(weights, source)
    except (ValueError, KeyError):
        named = None
    if named is not None and {k: v.shape for k, v in named.items()} == wanted:
        return named
    declared = declared_names(card, source)
    try:
        return by_layers(weights, source, target, wanted, declared)
    except ValueError as exc:
        reason = str(exc)
    if named is not None and not declared:
        ours, theirs = set(layers(named)), set(layers(wanted))
        if ours <= theirs or theirs <= ours:
            return named
    backbone = f"backbone {card.backbone.name!r} (card {card.name!r})" if card is not None else "the backbone"
    why = (f"the correspondence its plugin declares (BackboneInfo.weight_names) does not fit: {reason}" if declared
           else f"its layers are named differently in the two frameworks and do not correspond in order ({reason}), "
                "and its plugin declares no correspondence (BackboneInfo.weight_names)")
    raise WeightsConversionError(f"converting the {source} weights of {backbone} to {target} is not available: {why}",
                                 trained_with=source)


def declared_names(card: Any, source: str) -> dict[str, str]:
    """The backbone plugin's declared correspondence, as ``source`` layer -> target layer (empty when none)."""
    if card is None:
        return {}
    from deepgalaxy.core.plugins import get_plugin_manager

    names = get_plugin_manager().backbone(card.backbone.name).weight_names
    return dict(names) if source == "torch" else {keras: torch for torch, keras in names.items()}


def layers(weights: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{part.layer.variable: x}`` -> ``{layer: {variable: x}}`` (the part prefix dropped), in order.

    Skips torch's ``num_batches_tracked``, which neither plugin saves.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, value in weights.items():
        layer, var = _split(name.removeprefix(ENCODER))
        if var != "num_batches_tracked":
            out.setdefault(layer, {})[var] = value
    return out


def by_layers(weights: Mapping[str, np.ndarray], source: str, target: str, wanted: Mapping[str, tuple[int, ...]],
              declared: Mapping[str, str]) -> dict[str, np.ndarray]:
    """Pair the backbone's layers by ``declared`` (source -> target layer; same name when absent) or, without a
    declaration, in order; fit every variable to ``wanted``. A ``ValueError`` names the first thing that differs."""
    ours, theirs = layers(weights), layers(wanted)
    if declared:
        pairs = [(layer, declared.get(layer, layer)) for layer in ours]
    elif len(ours) != len(theirs):
        raise ValueError(f"{source} has {len(ours)} layer(s) with weights, {target} {len(theirs)}")
    else:
        pairs = list(zip(ours, theirs, strict=True))
    unknown = [f"{a} -> {b}" for a, b in pairs if b not in theirs]
    left = sorted(set(theirs) - {b for _, b in pairs})
    if unknown or left:
        raise ValueError(f"{target} has no layer for {', '.join(unknown)}" if unknown
                         else f"no {source} layer for {target} layer(s) {', '.join(left)}")
    out: dict[str, np.ndarray] = {}
    for a, b in pairs:
        out.update(_layer(a, ours[a], b, theirs[b], source, target))
    return out


def _layer(a: str, variables: Mapping[str, np.ndarray], b: str, shapes: Mapping[str, tuple[int, ...]],
           source: str, target: str) -> dict[str, np.ndarray]:
    """One layer's variables, renamed by role and laid out to fit ``shapes``."""
    out: dict[str, np.ndarray] = {}
    for var, value in variables.items():
        names = [n for n in _ROLES[source].get(var, (var,)) if n in shapes]
        if len(names) != 1:
            raise ValueError(f"{source} {a}.{var} has no counterpart in {target} layer {b!r} "
                             f"(variables {', '.join(shapes)})")
        out[f"{ENCODER}{b}.{names[0]}"] = _fit(np.asarray(value), shapes[names[0]], source,
                                               f"{source} {a}.{var} -> {target} {b}.{names[0]}")
    if len(out) != len(shapes):
        raise ValueError(f"{target} layer {b!r} has variables {', '.join(shapes)}, {source} layer {a!r} "
                         f"{', '.join(variables)}")
    return out


def _fit(value: np.ndarray, shape: tuple[int, ...], source: str, what: str) -> np.ndarray:
    """``value`` in the first layout of its kind that has ``shape``: a kernel transposed, anything else as is."""
    layouts = {4: _KERNEL_LAYOUTS[source], 2: ((1, 0),)}.get(value.ndim, (tuple(range(value.ndim)),))
    for axes in layouts:
        if tuple(value.shape[i] for i in axes) == tuple(shape):
            return np.ascontiguousarray(value.transpose(axes), dtype=np.float32)
    raise ValueError(f"{what}: shape {tuple(value.shape)} does not fit {tuple(shape)}")


# --- torch -> tensorflow, by name ------------------------------------------------------------------------------


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
        return np.ascontiguousarray(w.transpose(DEPTHWISE), dtype=np.float32)  # (kh, kw, C, 1)
    if w.ndim == 4:
        return np.ascontiguousarray(w.transpose(OIHW_TO_HWIO), dtype=np.float32)
    if w.ndim == 2:
        return np.ascontiguousarray(w.T, dtype=np.float32)  # (out, in) -> (in, out)
    raise ValueError(f"weight {name!r} has shape {w.shape}; expected a conv (4-D) or dense (2-D) kernel")


# --- tensorflow -> torch, by name ------------------------------------------------------------------------------


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
        return np.ascontiguousarray(k.transpose(DEPTHWISE), dtype=np.float32)  # (kh, kw, C, 1) -> (C, 1, kh, kw)
    if k.ndim == 4:
        return np.ascontiguousarray(k.transpose(HWIO_TO_OIHW), dtype=np.float32)
    if k.ndim == 2:
        return np.ascontiguousarray(k.T, dtype=np.float32)
    raise ValueError(f"kernel {name!r} has shape {k.shape}; expected a conv (4-D) or dense (2-D) kernel")
