"""The life cycle: prepare -> calibrate -> (algorithm) -> convert, and quantize() for all of it."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.config import ALGORITHMS, Recipe, RecipeError, load_recipe
from lowbit.fuse import FoldPair, find_foldable, fold_batchnorm
from lowbit.nn import (
    QMODULES,
    QModule,
    disable_fused_path,
    kept_float_by_parent,
    qmodule_class,
)

__all__ = [
    "PreparedInfo",
    "prepare",
    "calibrate",
    "convert",
    "quantize",
    "run_batch",
    "quantized_layers",
    "prepared_info",
]

logger = logging.getLogger(__name__)
M = TypeVar("M", bound=nn.Module)
RecipeLike = str | Path | Recipe
INFO_ATTR = "_lowbit_info"


@dataclass
class PreparedInfo:
    """What prepare() did to a model: the recipe, the batch norms folded, what it skipped.

    ``kept_float`` maps the qualified name of every weight-bearing layer that stays in float
    to the reason (a parent that reads its weight directly, an overridden ``forward``, a recipe
    rule, ...); ``notes`` are the same and other remarks as lines for logs.
    """

    recipe: Recipe
    folds: list[FoldPair] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    kept_float: dict[str, str] = field(default_factory=dict)


def prepared_info(model: nn.Module) -> PreparedInfo:
    """The :class:`PreparedInfo` of a model that went through :func:`prepare`.

    >>> m = prepare(torch.nn.Sequential(torch.nn.Linear(2, 2)), "w8a16")
    >>> prepared_info(m).recipe.name
    'w8a16'
    """
    info = getattr(model, INFO_ATTR, None)
    if not isinstance(info, PreparedInfo):
        raise ValueError(
            "this model was not prepared by lowbit: call lowbit.prepare(model, recipe) or "
            "lowbit.quantize(model, recipe, data=...) first"
        )
    return info


def quantized_layers(model: nn.Module) -> dict[str, QModule]:
    """Qualified name -> quantized layer, in module order.

    >>> m = prepare(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()), "w8a16")
    >>> list(quantized_layers(m))
    ['0']
    """
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, QModule)}


def _check_rules(recipe: Recipe, names: list[str]) -> None:
    for rule in recipe.rules:
        if not any(rule.matches(name) for name in names):
            shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
            raise RecipeError(
                f"rule match={rule.match!r} matches no quantizable layer; the layers are: {shown}"
            )


def prepare(model: M, recipe: RecipeLike, inplace: bool = False) -> M:
    """Fold batch norms and swap every supported layer for its quantized twin.

    Layers are found by module type (no tracing), so any model works; batch-norm folding
    uses torch.fx when it can and says what it skipped when it cannot.

    >>> m = prepare(torch.nn.Sequential(torch.nn.Linear(4, 4)), "w8a8")
    >>> type(m[0]).__name__
    'QLinear'
    """
    recipe = load_recipe(recipe)
    if not inplace:
        model = copy.deepcopy(model)
    info = PreparedInfo(recipe)
    if recipe.fold_batchnorm:
        pairs, info.notes = find_foldable(model)
        info.folds = fold_batchnorm(model, pairs)
        for note in info.notes:
            logger.info("batch-norm folding: %s", note)
    kept_float = kept_float_by_parent(model)
    candidates = [
        (n, m)
        for n, m in model.named_modules()
        if qmodule_class(m) is not None and n not in kept_float
    ]
    for name, reason in kept_float.items():
        if qmodule_class(model.get_submodule(name)) is not None:
            info.kept_float[name] = reason
            info.notes.append(f"{name}: kept in float ({reason})")
    if not candidates:
        supported = ", ".join(sorted(cls.__name__ for cls in QMODULES))
        why_not = f"; {info.notes[0]}" if info.notes else ""
        raise TypeError(
            f"{type(model).__name__} has no layer lowbit can quantize (supported: {supported})"
            + why_not
        )
    _check_rules(recipe, [n for n, _ in candidates])
    for name, module in candidates:
        config = recipe.config_for(name)
        if config is None:
            info.kept_float[name] = "a recipe rule keeps it in float (config: null)"
            continue
        qcls = qmodule_class(module)
        assert qcls is not None
        model.set_submodule(name, qcls.from_float(module, config.weight, config.input, name))
    info.notes += disable_fused_path(model, set(quantized_layers(model)))
    setattr(model, INFO_ATTR, info)
    return model


def run_batch(model: nn.Module, batch: Any) -> Any:
    """Run one batch the usual way: tensor -> model(x), dict -> model(**d), tuple -> model(b[0]).

    >>> run_batch(torch.nn.Identity(), (torch.ones(1), torch.zeros(1)))
    tensor([1.])
    """
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    raise TypeError(
        f"cannot feed a batch of type {type(batch).__name__} to the model: give tensors, "
        "dicts of keyword inputs, or (inputs, labels) tuples"
    )


def calibrate(
    model: M,
    data: Iterable[Any] | None,
    num_batches: int | None = None,
    progress: bool = False,
) -> M:
    """Run calibration batches through a prepared model, then fix every range.

    The model runs in eval mode under no_grad; weights get their qparams too. Every
    submodule gets back the train/eval mode it had (a frozen batch norm stays in eval).

    >>> m = prepare(torch.nn.Sequential(torch.nn.Linear(4, 4)), "w8a8")
    >>> m = calibrate(m, [torch.randn(8, 4)])
    >>> m[0].input_quantizer.observing
    False
    """
    layers = quantized_layers(model)
    watching = {
        n: m.input_quantizer
        for n, m in layers.items()
        if m.input_quantizer is not None and m.input_quantizer.observing
    }
    if watching and data is None:
        raise ValueError(
            "this recipe quantizes activations statically: pass calibration data "
            "(an iterable of batches) to calibrate/quantize, or use a weight-only or dynamic recipe"
        )
    for layer in layers.values():  # before eval(): new observers take the layer's own mode
        layer.update_weight_qparams()
    modes = [(module, module.training) for module in model.modules()]  # restored in finally
    model.eval()
    try:
        if watching and data is not None:
            with torch.no_grad():
                for i, batch in enumerate(tqdm(data, desc="calibrating", disable=not progress)):
                    if num_batches is not None and i >= num_batches:
                        break
                    run_batch(model, batch)
        for name, quantizer in watching.items():
            assert quantizer.observer is not None
            if quantizer.observer.batches == 0:
                raise RuntimeError(
                    f"layer {name!r} saw no calibration data (is it used in forward?); keep it "
                    f"in float with a rule {{match: {name!r}, config: null}}"
                )
            quantizer.finish_observing()
    finally:
        for module, was_training in modes:
            module.training = was_training
    return model


def convert(model: M, inplace: bool = False) -> M:
    """Freeze every quantized layer: integer weights, fixed scales, int32 biases.

    >>> m = prepare(torch.nn.Sequential(torch.nn.Linear(4, 4)), "w8a8")
    >>> m = calibrate(m, [torch.randn(2, 4)])
    >>> convert(m)[0].weight.qdata.dtype
    torch.int8
    """
    if not inplace:
        model = copy.deepcopy(model)
    for layer in quantized_layers(model).values():
        layer.freeze()
    return model


def quantize(
    model: M,
    recipe: RecipeLike = "w8a8",
    data: Iterable[Any] | None = None,
    num_batches: int | None = None,
    progress: bool = False,
) -> M:
    """Prepare, calibrate, run the recipe's algorithm and convert, on a copy of ``model``.

    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> q = quantize(net, "w8a8", data=[torch.randn(16, 8)])
    >>> q(torch.randn(3, 8)).shape
    torch.Size([3, 2])
    """
    recipe = load_recipe(recipe)
    prepared = prepare(model, recipe)
    calibrate(prepared, data, num_batches=num_batches, progress=progress)
    if recipe.algorithm is not None:
        algorithm = ALGORITHMS[recipe.algorithm](**dict(recipe.args))
        algorithm.apply(prepared, data)
    return convert(prepared, inplace=True)
