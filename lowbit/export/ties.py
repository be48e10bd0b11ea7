"""Tied weights in ``.lowbit`` files: stored once, tied again on load.

A model can hold one tensor at several places: GPT-2's ``lm_head.weight`` is ``transformer.wte
.weight``, T5's encoder and decoder embeddings are ``shared``'s, one module can be registered
under two names. ``model.state_dict()`` lists such a tensor once per name, and safetensors refuses
tensors that share memory, so :func:`find_ties` picks one name to store and maps every other
prefix to it (the header's ``ties``: alias prefix -> stored prefix). Load copies the stored
entries to every alias (:func:`expand_ties`), then :func:`retie` makes the aliases the very same
object again (the same QTensor for quantized layers, the same Parameter for float ones).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lowbit.nn import QModule, QTensor

__all__ = ["find_ties", "drop_aliases", "expand_ties", "retie", "prefixes", "TieError"]


class TieError(ValueError):
    """A tie in a file that the model cannot take (the message names both prefixes)."""


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def prefixes(key: str) -> list[str]:
    """``key`` and every dotted prefix of it, shortest first.

    >>> prefixes("a.b.c")
    ['a', 'a.b', 'a.b.c']
    """
    parts = key.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _aliased(key: str, ties: Mapping[str, str]) -> bool:
    """Whether ``key`` is an alias or lies under one (one lookup per dotted prefix)."""
    return any(p in ties for p in prefixes(key))


def _module_ties(model: nn.Module) -> dict[str, str]:
    """Every extra name of a module registered under several names -> its first name."""
    first: dict[int, str] = {}
    ties: dict[str, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not name:
            continue
        if _aliased(name, ties):
            continue  # inside an aliased module: covered by its parent's tie
        if id(module) in first:
            ties[name] = first[id(module)]
        else:
            first[id(module)] = name
    return ties


def find_ties(model: nn.Module, state: Mapping[str, Any]) -> dict[str, str]:
    """Alias prefix -> stored prefix for everything ``model`` holds more than once.

    ``state`` is ``model.state_dict(keep_vars=True)``: a float tensor is tied when one object
    sits under two keys; a quantized weight when two layers hold the same QTensor.

    >>> lin = nn.Linear(4, 4)
    >>> net = nn.Sequential(lin, nn.Linear(4, 4))
    >>> net[1].weight = lin.weight
    >>> find_ties(net, net.state_dict(keep_vars=True))
    {'1.weight': '0.weight'}
    """
    ties = _module_ties(model)
    first: dict[int, str] = {}
    for name, layer in model.named_modules():
        weight = getattr(layer, "weight", None) if isinstance(layer, QModule) else None
        if isinstance(weight, QTensor) and not _aliased(name, ties):
            key = _prefix(name) + "weight"
            # by its scale: a kernel that re-packs a shared QTensor (the int4 one) gives its
            # layer a new QTensor of the same values, holding the same scale object
            if id(weight.scale) in first:
                ties[key] = first[id(weight.scale)]
            else:
                first[id(weight.scale)] = key
    held = {id(t) for _, t in model.named_parameters(remove_duplicate=False)}
    held |= {id(t) for _, t in model.named_buffers(remove_duplicate=False)}
    seen: dict[int, str] = {}
    for key, value in state.items():  # registered tensors only, not a layer's derived entries
        if id(value) not in held or _aliased(key, ties):
            continue
        if id(value) in seen:
            ties[key] = seen[id(value)]
        else:
            seen[id(value)] = key
    return ties


def drop_aliases(state: dict[str, Any], ties: Mapping[str, str]) -> dict[str, Any]:
    """``state`` without the entries of aliased prefixes (their data is stored once).

    >>> drop_aliases({"a.w": 1, "b.w": 1, "b.x": 2, "bb": 3}, {"b": "a"})
    {'a.w': 1, 'bb': 3}
    """
    return {k: v for k, v in state.items() if not _aliased(k, ties)}


def expand_ties(tensors: dict[str, torch.Tensor], ties: Mapping[str, str]) -> dict[str, Any]:
    """``tensors`` plus, for every alias, the stored prefix's entries under the alias's name
    (the same tensor objects: nothing is copied).

    >>> t = torch.zeros(2)
    >>> sorted(expand_ties({"a.w": t}, {"b": "a"}))
    ['a.w', 'b.w']
    """
    out: dict[str, Any] = dict(tensors)
    by_prefix: dict[str, list[str]] = {}  # every dotted prefix -> the keys under it
    for key in tensors:
        for prefix in prefixes(key):
            if prefix in ties.values():
                by_prefix.setdefault(prefix, []).append(key)
    for alias, source in ties.items():
        for key in by_prefix.get(source, []):
            out[alias + key[len(source) :]] = tensors[key]
    return out


def _owner(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, attr = path.rpartition(".")
    return model.get_submodule(parent), attr


def _retie_tensor(model: nn.Module, alias: str, source: str) -> None:
    owner, attr = _owner(model, alias)
    holder, source_attr = _owner(model, source)
    value = getattr(holder, source_attr)
    mine = getattr(owner, attr)
    if isinstance(mine, QTensor) or isinstance(value, QTensor):
        if not (isinstance(mine, QTensor) and isinstance(value, QTensor)):
            raise TieError(f"{alias!r} is tied to {source!r} but only one of them is quantized")
        if (mine.spec, mine.shape, mine.dtype) != (value.spec, value.shape, value.dtype):
            raise TieError(
                f"{alias!r} is tied to {source!r} but their layers quantize it differently "
                f"({mine.spec} vs {value.spec})"
            )
    elif (mine.shape, mine.dtype) != (value.shape, value.dtype):
        raise TieError(f"{alias!r} is tied to {source!r} but their shapes or dtypes differ")
    if attr in owner._parameters and isinstance(value, nn.Parameter):
        owner._parameters[attr] = value
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        return  # not a parameter or buffer: both were loaded from the same entries
    if isinstance(owner, QModule):
        owner._reset_runners()  # kernels prepared on the old object


def retie(model: nn.Module, ties: Mapping[str, str]) -> None:
    """Make every alias the same object as its stored prefix again, after loading.

    A module alias whose model holds one module at both names is tied already; one whose
    model holds two modules keeps both (loaded from the same data).

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    >>> retie(net, {"1.weight": "0.weight"})
    >>> net[1].weight is net[0].weight
    True
    """
    for alias, source in ties.items():
        try:
            model.get_submodule(alias)
            continue  # a whole module: nothing to re-point
        except AttributeError:
            pass
        try:
            _retie_tensor(model, alias, source)
        except AttributeError:
            continue  # no attribute of that name: both were loaded from the same entries
