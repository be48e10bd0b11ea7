"""Rebuild a converted model from a checked ``.lowbit`` header and its tensors.

The float model is copied, given the file's batch-norm fold structure (no tracing, no use of
its float values), prepared with the file's recipe, and each quantized layer is put in the
exact state ``QModule.freeze()`` leaves it in. The caller's model is never modified.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import torch
from torch import nn

from lowbit.api import prepare, prepared_info, quantized_layers
from lowbit.config import Recipe, RecipeError
from lowbit.export.header import CheckpointError, Header, LayerInfo
from lowbit.fuse import FoldPair, apply_fold_structure
from lowbit.nn import QModule, Quantizer
from lowbit.primitives import qparam_shape, unpack_bits

__all__ = ["rebuild"]

_SAME_ARCH = "build the model with the same architecture and sizes as the one that was saved"


def _mismatch(header: Header, problem: str, fix: str = _SAME_ARCH) -> CheckpointError:
    return CheckpointError(f"cannot load {str(header.path)!r}: {problem}; {fix}")


def _recipes(header: Header) -> tuple[Recipe, Recipe, list[str]]:
    """The saved recipe (for PreparedInfo) and the one used to rebuild (no folding, no
    algorithm: the values come from the file), plus notes."""
    data = dict(header.recipe)
    notes: list[str] = []
    try:
        build = Recipe.from_dict({**data, "algorithm": None, "args": {}}, where="header.recipe")
    except RecipeError as err:
        raise _mismatch(header, f"its recipe is invalid ({err})", "re-save the model") from None
    try:
        saved = Recipe.from_dict(data, where="header.recipe")
    except RecipeError as err:
        saved = build
        notes.append(f"recipe algorithm not available here ({err}); kept the recipe without it")
    return saved, dataclasses.replace(build, fold_batchnorm=False), notes


def _skeleton(header: Header, model: nn.Module) -> nn.Module:
    """A prepared copy of ``model`` with the file's folds, its recipe and PreparedInfo."""
    if any(isinstance(m, QModule) for m in model.modules()):
        raise _mismatch(
            header,
            f"{type(model).__name__} already holds quantized layers",
            "pass a fresh float model of the same architecture",
        )
    saved, build, notes = _recipes(header)
    folds = [FoldPair(layer=a, bn=b) for a, b in header.folds]
    out = copy.deepcopy(model)
    try:
        apply_fold_structure(out, folds)
        prepare(out, build, inplace=True)
    except (ValueError, TypeError) as err:
        raise _mismatch(header, f"the model does not match the file ({err})") from None
    info = prepared_info(out)
    info.recipe, info.folds, info.notes = saved, folds, notes
    return out


def _match_layers(header: Header, layers: dict[str, QModule]) -> None:
    in_file = [layer.name for layer in header.layers]
    missing = [name for name in in_file if name not in layers]
    extra = [name for name in layers if name not in set(in_file)]
    if missing:
        raise _mismatch(
            header,
            f"the file has quantized layer {missing[0]!r} but the model has "
            "no quantizable layer of that name" + _more(missing),
        )
    if extra:
        raise _mismatch(
            header,
            f"the model's layer {extra[0]!r} would be quantized but the "
            "file has no data for it" + _more(extra),
        )


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more: {names[1:4]})" if len(names) > 1 else ""


def _take(header: Header, tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise _mismatch(
            header,
            f"missing key {key!r} in the file's tensors",
            "the file is incomplete; re-save the model with lowbit.save",
        )
    return tensors[key]


def _zero_point(
    header: Header,
    quantizer: Quantizer,
    tensors: dict[str, torch.Tensor],
    key: str,
    scale: torch.Tensor,
) -> torch.Tensor:
    """The int32 zero point: stored as is, packed at the dtype's width (uint8), or left out
    of the file when the spec is symmetric (all zeros)."""
    zkey = f"{key}.zero_point"
    if zkey not in tensors and quantizer.spec.symmetric:
        return torch.zeros(scale.shape, dtype=torch.int32)
    zero = _take(header, tensors, zkey)
    if zero.dtype == torch.uint8:
        try:
            flat = unpack_bits(zero, quantizer.spec.qdtype, scale.numel())
        except ValueError as err:
            raise _mismatch(header, f"{zkey}: {err}", "re-save the model") from None
        zero = flat.reshape(scale.shape).to(torch.int32)
    return zero


def _set_qparams(
    header: Header,
    quantizer: Quantizer,
    tensors: dict[str, torch.Tensor],
    key: str,
    shape: tuple[int, ...] | None,
) -> None:
    """Fixed qparams from the file (``shape`` None: no shape check), observing switched off."""
    if not quantizer.spec.dynamic:
        scale = _take(header, tensors, f"{key}.scale")
        zero = _zero_point(header, quantizer, tensors, key, scale)
        if shape is not None and (tuple(scale.shape) != shape or tuple(zero.shape) != shape):
            raise _mismatch(
                header,
                f"{key}: qparams of shape {tuple(scale.shape)} do not fit "
                f"the weight (expected {shape})",
                "the file is corrupted; re-save it",
            )
        quantizer.set_qparams(scale, zero)
    quantizer.observer = None
    quantizer.observing = False


def _freeze(
    header: Header, name: str, layer: QModule, info: LayerInfo, tensors: dict[str, torch.Tensor]
) -> None:
    """Put ``layer`` in the state ``freeze()`` leaves it in, from the file's tensors."""
    pre = f"{name}." if name else ""
    wq, iq = layer.weight_quantizer, layer.input_quantizer
    if type(layer).__name__ != info.layer_class:
        raise _mismatch(
            header,
            f"layer {name!r} is a {type(layer).__name__} in the model but a "
            f"{info.layer_class} in the file",
        )
    shape = tuple(layer.weight.shape)
    if shape != info.weight_shape:
        raise _mismatch(
            header,
            f"layer {name!r} has weight shape {list(shape)} in the model but "
            f"{list(info.weight_shape)} in the file",
        )
    specs = (wq.spec.to_dict() if wq else None, iq.spec.to_dict() if iq else None)
    if specs != (info.weight_spec, info.input_spec):
        raise _mismatch(
            header,
            f"layer {name!r}: the recipe gives it specs {specs} but the file "
            f"holds {(info.weight_spec, info.input_spec)}",
            "re-save the model",
        )
    if iq is not None:
        _set_qparams(header, iq, tensors, pre + "input_quantizer", None)
    if wq is None:
        return
    packed = _take(header, tensors, pre + "qweight")
    try:
        flat = unpack_bits(packed, wq.spec.qdtype, math.prod(shape))
    except ValueError as err:
        raise _mismatch(header, f"{pre}qweight: {err}", "re-save the model") from None
    _set_qparams(header, wq, tensors, pre + "weight_quantizer", qparam_shape(shape, wq.spec.gran))
    device = layer.weight.device
    del layer.weight
    layer.register_buffer("qweight", flat.reshape(shape).to(device))  # (out, in/groups, *k)
    if info.qbias:
        del layer.bias
        layer.bias = None
        qbias = _take(header, tensors, pre + "qbias").to(device=device, dtype=torch.int32)
        layer.register_buffer("qbias", qbias)
    layer.frozen = True


def _load_rest(header: Header, model: nn.Module, state: dict[str, Any]) -> None:
    """Strict key, shape and dtype checks, then load every entry (float leftovers included)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing:
        raise _mismatch(
            header,
            f"missing key {missing[0]!r}: the model has it but the file does not" + _more(missing),
        )
    if extra:
        raise _mismatch(
            header, f"the file has key {extra[0]!r} that the model lacks" + _more(extra)
        )
    for key, mine in own.items():
        theirs = state[key]
        if mine.shape != theirs.shape:
            raise _mismatch(
                header,
                f"{key!r} has shape {list(mine.shape)} in the model but "
                f"{list(theirs.shape)} in the file",
            )
        if mine.dtype != theirs.dtype:
            raise _mismatch(
                header,
                f"{key!r} is {mine.dtype} in the model but {theirs.dtype} in the file",
                f"convert the model to {theirs.dtype} before load",
            )
    model.load_state_dict(state, strict=True)


def rebuild(header: Header, tensors: dict[str, torch.Tensor], model: nn.Module) -> nn.Module:
    """The converted model described by ``header`` and ``tensors``, built on a copy of ``model``.

    >>> import tempfile
    >>> from lowbit.api import quantize
    >>> from lowbit.export import read_header, save
    >>> from safetensors.torch import load_file
    >>> q = quantize(nn.Sequential(nn.Linear(8, 4)), "w4a16")
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = save(q, f"{d}/m")
    ...     back = rebuild(read_header(p), load_file(p), nn.Sequential(nn.Linear(8, 4)))
    >>> torch.equal(back[0].qweight, q[0].qweight)
    True
    """
    out = _skeleton(header, model)
    layers = quantized_layers(out)
    _match_layers(header, layers)
    for info in header.layers:
        _freeze(header, info.name, layers[info.name], info, tensors)
    state = dict(tensors)
    for name, layer in layers.items():
        pre = f"{name}." if name else ""
        if layer.frozen:
            state[pre + "qweight"] = layer.qweight
        wq = layer.weight_quantizer
        if wq is not None and wq.zero_point is not None:
            state[pre + "weight_quantizer.zero_point"] = wq.zero_point
    _load_rest(header, out, state)
    return out
