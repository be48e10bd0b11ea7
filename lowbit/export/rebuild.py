"""Rebuild a converted model from a checked ``.lowbit`` header and its tensors.

The float model is copied onto the meta device (nothing allocated for its weights), given the
file's batch-norm fold structure (no tracing, no use of its float values) and prepared with
the file's recipe; then ``load_state_dict`` hands every layer its tensors and each quantized
layer restores its own frozen form (:mod:`lowbit.nn.state`). The caller's model is never
modified. The recipe is parsed and the model prepared with tensors made on the meta device, so
observers a recipe names (however large a histogram it asks for) allocate nothing: a loaded
model never observes, its ranges come from the file. Tied weights are tied again
(:mod:`lowbit.export.ties`).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from lowbit.api import prepare, prepared_info, quantized_layers
from lowbit.config import Recipe, RecipeError
from lowbit.export.header import CheckpointError, Header, LayerInfo
from lowbit.export.ties import TieError, expand_ties, retie
from lowbit.fuse import FoldPair, apply_fold_structure
from lowbit.nn import QModule
from lowbit.spec import SpecError

__all__ = ["rebuild"]

_SAME_ARCH = "build the model with the same architecture and sizes as the one that was saved"


def _mismatch(header: Header, problem: str, fix: str = _SAME_ARCH) -> CheckpointError:
    return CheckpointError(f"cannot load {str(header.path)!r}: {problem}; {fix}")


_BAD_RECIPE = (RecipeError, SpecError, TypeError, ValueError, KeyError, OverflowError)


def _recipes(header: Header) -> tuple[Recipe, Recipe, list[str]]:
    """The saved recipe (for PreparedInfo) and the one used to rebuild (no folding, no
    algorithm: the values come from the file), plus notes. Parsed on the meta device: the
    observers it validates allocate nothing."""
    data = dict(header.recipe)
    notes: list[str] = []
    with torch.device("meta"):
        try:
            build = Recipe.from_dict({**data, "algorithm": None, "args": {}}, where="recipe")
        except _BAD_RECIPE as err:
            raise _mismatch(
                header, f"its recipe is invalid ({str(err)[:300]})", "re-save the model"
            ) from None
        try:
            saved = Recipe.from_dict(data, where="recipe")
        except _BAD_RECIPE as err:
            saved = build
            notes.append(
                f"recipe algorithm not available here ({str(err)[:300]}); kept the recipe "
                "without it"
            )
    return saved, dataclasses.replace(build, fold_batchnorm=False), notes


def _meta_memo(model: nn.Module) -> dict[int, Any]:
    """A deepcopy memo that turns every tensor of ``model``'s state_dict into a meta tensor of
    the same shape and dtype: the copy allocates nothing for what the file will provide.
    Non-persistent buffers (computed constants such as rotary frequencies) are copied."""
    memo: dict[int, Any] = {}
    persistent = {id(t) for t in model.state_dict(keep_vars=True).values()}
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in persistent or id(tensor) in memo:
            continue
        meta = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, nn.Parameter):
            meta = nn.Parameter(meta, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = meta
    return memo


def _skeleton(header: Header, model: nn.Module) -> nn.Module:
    """A prepared copy of ``model`` on the meta device (weights allocated by the file alone),
    with the file's folds, its recipe and PreparedInfo."""
    if any(isinstance(m, QModule) for m in model.modules()):
        raise _mismatch(
            header,
            f"{type(model).__name__} already holds quantized layers",
            "pass a fresh float model of the same architecture",
        )
    saved, build, notes = _recipes(header)
    folds = [FoldPair(layer=a, bn=b) for a, b in header.folds]
    out = copy.deepcopy(model, _meta_memo(model))
    try:
        apply_fold_structure(out, folds)
        with torch.device("meta"):  # observers built by prepare allocate nothing
            prepare(out, build, inplace=True)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise _mismatch(header, f"the model does not match the file ({str(err)[:300]})") from None
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


def _check_layer(header: Header, layer: QModule, info: LayerInfo) -> None:
    """The layer the model builds must be the one the file describes."""
    name = info.name
    if layer.kind != info.kind:
        raise _mismatch(
            header,
            f"layer {name!r} is a {layer.kind} layer in the model but a {info.kind} layer in "
            "the file",
        )
    shape = tuple(layer.weight.shape)
    if shape != info.weight_shape:
        raise _mismatch(
            header,
            f"layer {name!r} has weight shape {list(shape)} in the model but "
            f"{list(info.weight_shape)} in the file",
        )
    dtype = str(layer.weight.dtype).removeprefix("torch.")
    if dtype != info.weight_dtype:
        raise _mismatch(
            header,
            f"layer {name!r} has {dtype} weights in the model but {info.weight_dtype} in the file",
            f"convert the model to {info.weight_dtype} before load (model.to(torch."
            f"{info.weight_dtype}))",
        )
    wq, iq = layer.weight_quantizer, layer.input_quantizer
    specs = (wq.spec.to_dict() if wq else None, iq.spec.to_dict() if iq else None)
    if specs != (info.weight_spec, info.input_spec):
        raise _mismatch(
            header,
            f"layer {name!r}: the recipe gives it specs {specs} but the file "
            f"holds {(info.weight_spec, info.input_spec)}",
            "re-save the model",
        )


def _check_float_entries(header: Header, model: nn.Module, state: dict[str, Any]) -> None:
    """Float leftovers must have the model's shapes and dtypes (load_state_dict with assign
    would silently take the file's dtype)."""
    for key, mine in model.state_dict().items():
        theirs = state.get(key)
        if not isinstance(theirs, torch.Tensor):
            continue
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


def _first_problem(text: str) -> str:
    """The first line of torch's load_state_dict report, without its preamble."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    body = lines[1:] if len(lines) > 1 else lines
    return body[0].rstrip(".") if body else text


def rebuild(header: Header, tensors: dict[str, torch.Tensor], model: nn.Module) -> nn.Module:
    """The converted model described by ``header`` and ``tensors``, built on a copy of ``model``.

    The copy holds only what the file provides: its weights are never allocated from the
    float model, and every layer restores its own frozen form from the tensors.

    >>> import tempfile
    >>> from lowbit.api import quantize
    >>> from lowbit.export import read_header, save
    >>> from safetensors.torch import load_file
    >>> q = quantize(nn.Sequential(nn.Linear(8, 4)), "w4a16")
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = save(q, f"{d}/m")
    ...     back = rebuild(read_header(p), load_file(p), nn.Sequential(nn.Linear(8, 4)))
    >>> torch.equal(back[0].weight.int_repr(), q[0].weight.int_repr())
    True
    """
    out = _skeleton(header, model)
    layers = quantized_layers(out)
    _match_layers(header, layers)
    for info in header.layers:
        _check_layer(header, layers[info.name], info)
    state = expand_ties(tensors, header.ties)
    _check_float_entries(header, out, state)
    try:
        result = out.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:
        raise _mismatch(header, _first_problem(str(err)), "re-save the model") from None
    if result.unexpected_keys:
        keys = list(result.unexpected_keys)
        raise _mismatch(header, f"the file has key {keys[0]!r} that the model lacks" + _more(keys))
    if result.missing_keys:
        keys = list(result.missing_keys)
        raise _mismatch(
            header,
            f"missing key {keys[0]!r}: the model has it but the file does not" + _more(keys),
        )
    for name, layer in layers.items():
        if layer.weight_quantizer is not None and not layer.frozen:
            raise _mismatch(
                header, f"layer {name!r} has no quantized weight in the file", "re-save the model"
            )
        iq = layer.input_quantizer
        if iq is not None and not iq.spec.dynamic and iq.scale is None:
            raise _mismatch(
                header,
                f"layer {name!r} has a static input but the file holds no input scale",
                "re-save the model",
            )
        layer.freeze()  # an input-only layer: its input grid came from the file
    try:
        retie(out, header.ties)
    except TieError as err:
        raise _mismatch(header, str(err), "re-save the model") from None
    return out
