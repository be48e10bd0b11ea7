"""The life cycle: prepare -> calibrate -> (algorithm) -> convert, and quantize() for all of it."""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.config import QuantConfig, Recipe, RecipeError, load_recipe
from lowbit.fuse import FoldPair, find_foldable, fold_batchnorm, fold_into
from lowbit.nn import (
    QMODULES,
    QModule,
    QParent,
    QTensor,
    Quantizer,
    adopt_subclass,
    disable_fused_path,
    fold_weight_norm,
    kept_float_by_parent,
    qmodule_class,
    twin_class,
    unswappable_layers,
)
from lowbit.nn.rank_sync import average_ranges, exactly_merged, merge_observers
from lowbit.nn.tied import WeightTies
from lowbit.observers import make_observer
from lowbit.recipe_qat import QatConfig
from lowbit.recipe_steps import build as build_algorithms

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
    # layer name -> (mean, std) per output channel of its pre-activation output, from the
    # batch norm folded into it (analytical bias correction reads them)
    bn_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    qat: QatConfig | None = None  # set when prepared for quantization-aware training


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


def _names_by_module(model: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every qualified name it is registered under (a shared layer has several)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def _shared_config(
    recipe: Recipe, names: list[str], kind: str = "", position: str = ""
) -> QuantConfig | None:
    """The one config of a layer registered under ``names``: every name must agree."""
    configs = [recipe.config_for(name, kind, position) for name in names]
    for name, config in zip(names[1:], configs[1:], strict=True):
        if config != configs[0]:
            raise RecipeError(
                f"{names[0]!r} and {name!r} are the same module used at two places, but the "
                "recipe gives them different configs; one module has one quantization: give "
                f"every name of it the same rule (e.g. rules matching both {names})"
            )
    return configs[0]


def _why_float(recipe: Recipe, name: str, kind: str) -> str:
    """Why the recipe gives layer ``name`` of ``kind`` no config."""
    if kind == "embedding" and not any(rule.matches(name) for rule in recipe.rules):
        return "the recipe has no embedding: section (add one to quantize embeddings weight-only)"
    return "a recipe rule keeps it in float (config: null)"


def _bn_stats(
    model: nn.Module, pairs: list[FoldPair]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per folded layer, the mean (beta) and spread (|gamma|) its batch norm gave its output."""
    stats = {}
    for pair in pairs:
        bn = model.get_submodule(pair.bn)
        weight, bias = getattr(bn, "weight", None), getattr(bn, "bias", None)
        if isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor):
            stats[pair.layer] = (bias.detach().clone(), weight.detach().abs().clone())
    return stats


def _edge_positions(candidates: list[tuple[str, nn.Module]]) -> dict[str, str]:
    """``{name: "first" | "last"}`` for the first and last non-embedding layers (module order)."""
    layers = [n for n, m in candidates if getattr(qmodule_class(m), "kind", "") != "embedding"]
    if not layers:
        return {}
    return {layers[-1]: "last", layers[0]: "first"}  # one layer alone is "first"


def _copy(model: M) -> M:
    """A deep copy of ``model``. torch cannot deep-copy a layer under the deprecated
    ``torch.nn.utils.weight_norm`` hook while its computed weight carries an autograd graph;
    the weight is recomputed without one first (the values its next forward would give)."""
    try:
        return copy.deepcopy(model)
    except RuntimeError as err:
        if "deepcopy protocol" not in str(err):
            raise
    from torch.nn.utils.weight_norm import WeightNorm

    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm):
                with torch.no_grad():
                    setattr(module, hook.name, hook.compute_weight(module))
    return copy.deepcopy(model)


_QAT_BN_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # weights with out-channels first


def _hold_bns_for_qat(model: nn.Module, pairs: list[FoldPair]) -> dict[str, nn.Module]:
    """Take each foldable batch norm out of the model (an Identity in its place) to train it
    folded inside its layer; layers whose weight is not out-channels-first (transposed
    convolutions) are folded now instead. Returns layer name -> its batch norm."""
    held, fold_now = {}, []
    for pair in pairs:
        layer = model.get_submodule(pair.layer)
        if isinstance(layer, _QAT_BN_LAYERS):
            held[pair.layer] = model.get_submodule(pair.bn)
            model.set_submodule(pair.bn, nn.Identity())
        else:
            fold_now.append(pair)
    fold_batchnorm(model, fold_now)
    return held


def _setup_qat(model: nn.Module, qat: QatConfig, bns: Mapping[str, nn.Module]) -> None:
    """Give every quantizer its training range and every held batch norm to its layer (a
    layer that stayed float gets its batch norm folded now)."""
    layers = quantized_layers(model)
    for name, held in bns.items():
        if name not in layers:
            fold_into(model.get_submodule(name), held)  # type: ignore[arg-type]
    for name, layer in layers.items():
        wq, iq = layer.weight_quantizer, layer.input_quantizer
        if wq is not None:
            wq.set_range(qat.weight_range, qat.freeze_ranges_after)
        if iq is not None and not iq.spec.dynamic:
            iq.set_range(
                qat.input_range,
                qat.freeze_ranges_after,
                qat.averaging_constant,
                qat.learned_offset,
            )
        bn = bns.get(name)
        if bn is not None:
            layer.qat_bn = bn  # type: ignore[assignment]
            layer.bn_freeze_after = qat.freeze_bn_after


def prepare(model: M, recipe: RecipeLike, inplace: bool = False, qat: bool = False) -> M:
    """Fold batch norms and swap every supported layer for its quantized twin; the model
    comes back in eval mode.

    ``qat=True`` prepares for quantization-aware training (the model comes back in train
    mode): ranges move or learn as the recipe's ``qat:`` section says (LSQ by default, see
    :class:`~lowbit.recipe_qat.QatConfig`), and each Conv/Linear+BatchNorm pair trains with
    the batch norm folded into the quantized weight. Calibrate it (``calibrate(model,
    data)``) to initialise the ranges, train it in your own loop with any optimizer, then
    ``convert`` and ``save`` as after post-training quantization.

    Layers are found by module type (no tracing), so any model works; batch-norm folding
    uses torch.fx when it can and says what it skipped when it cannot. A layer registered
    under several names (``model.a = model.b = nn.Linear(...)``) becomes one quantized
    layer at every one of them, so calibration sees all its uses.

    >>> m = prepare(torch.nn.Sequential(torch.nn.Linear(4, 4)), "w8a8")
    >>> type(m[0]).__name__
    'QLinear'
    """
    recipe = load_recipe(recipe)
    if not inplace:
        model = _copy(model)
    info = PreparedInfo(recipe)
    qat_bns: dict[str, nn.Module] = {}
    if recipe.fold_batchnorm:
        pairs, info.notes = find_foldable(model)
        info.bn_stats = _bn_stats(model, pairs)
        if qat:
            qat_bns = _hold_bns_for_qat(model, pairs)
            info.folds = list(pairs)
        else:
            info.folds = fold_batchnorm(model, pairs)
        for note in info.notes:
            logger.info("batch-norm folding: %s", note)
    for name, what in fold_weight_norm(model).items():
        info.notes.append(f"{name}: {what}")
    unswappable = unswappable_layers(model)

    def swapped(name: str, parent: nn.Module) -> bool:  # a twin calls its children
        return (
            qmodule_class(parent) is not None
            and name not in unswappable
            and recipe.config_for(name) is not None
        )

    kept_float = {**unswappable, **kept_float_by_parent(model, swapped)}
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
    aliases, placed = _names_by_module(model), set[str]()
    _check_rules(recipe, [alias for _, m in candidates for alias in aliases[id(m)]])
    positions = _edge_positions(candidates)
    for name, module in candidates:
        names = aliases[id(module)]
        held = next((kept_float[n] for n in names if n in kept_float), None)
        qcls = qmodule_class(module)
        assert qcls is not None
        where = positions.get(name, "")
        config = _shared_config(recipe, names, qcls.kind, where) if held is None else None
        if config is None:
            info.kept_float[name] = held or _why_float(recipe, name, qcls.kind)
            continue
        qmod = qcls.from_float(module, config.weight, config.input, name)
        if config.gradient is not None:
            for part in qmod.modules():
                if isinstance(part, QModule):
                    part.gradient_spec = config.gradient
        if isinstance(qmod, QModule):  # a subclass extending forward keeps its forward
            qmod = adopt_subclass(qmod, module, twin_class(module, type(qmod)))
        if isinstance(qmod, QParent):  # e.g. an LSTM's static input spec made dynamic
            info.notes += qmod.notes
        for alias in names:  # the same quantized object wherever the float one was
            model.set_submodule(alias, qmod)
            placed.add(alias)
        if len(names) > 1:
            info.notes.append(f"{name}: one layer used as {', '.join(names)}, quantized once")
    info.notes += disable_fused_path(model, placed)
    setattr(model, INFO_ATTR, info)
    if qat:
        info.qat = recipe.qat or QatConfig()
        _setup_qat(model, info.qat, qat_bns)
        return model.train()
    return model.eval()


def run_batch(model: nn.Module, batch: Any) -> Any:
    """Run one batch the usual way: tensor -> model(x), any mapping (a dict, a tokenizer's
    ``BatchEncoding``, a ``UserDict``) -> model(**batch), tuple or list -> model(batch[0]).

    >>> run_batch(torch.nn.Identity(), (torch.ones(1), torch.zeros(1)))
    tensor([1.])
    >>> from collections import UserDict
    >>> run_batch(torch.nn.Identity(), UserDict(input=torch.zeros(1)))
    tensor([0.])
    """
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    raise TypeError(
        f"cannot feed a batch of type {type(batch).__name__} to the model: give tensors, "
        "dicts of keyword inputs, or (inputs, labels) tuples"
    )


def _restart_observer(name: str, quantizer: Quantizer, accumulate: bool) -> None:
    """Make a calibrated static quantizer observe again: from scratch, or (``accumulate``)
    adding to the statistics it already holds."""
    if quantizer.observing:
        return
    if not accumulate:
        observer = make_observer(quantizer.spec).train(quantizer.training)
        if quantizer.scale is not None:
            observer.to(quantizer.scale.device)
        quantizer.observer = observer
    elif quantizer.observer is None:
        raise RuntimeError(
            f"layer {name!r}: accumulate=True, but its input range was set without observed "
            "statistics (loaded from a file or set by an algorithm); calibrate with "
            "accumulate=False to compute the range from the new data alone"
        )
    quantizer.observing = True


def calibrate(
    model: M,
    data: Iterable[Any] | None,
    num_batches: int | None = None,
    progress: bool = False,
    accumulate: bool = False,
    sync_ranks: bool = False,
) -> M:
    """Run calibration batches through a prepared model, then fix every range.

    The model runs in eval mode under no_grad; weights get their qparams too. Every
    submodule gets back the train/eval mode it had (a frozen batch norm stays in eval).
    Calibrating again with new data computes the ranges from that data alone; with
    ``accumulate=True`` it adds the new data to what the observers already saw.
    ``progress=True`` shows a progress bar over the batches. ``sync_ranks=True`` (every
    process of a ``torch.distributed`` job calibrating on its own data) merges the
    statistics over all ranks first, so every rank fixes the same ranges
    (:mod:`lowbit.nn.rank_sync`).

    >>> m = prepare(torch.nn.Sequential(torch.nn.Linear(4, 4)), "w8a8")
    >>> m = calibrate(m, [torch.randn(8, 4)])
    >>> m[0].input_quantizer.observing
    False
    """
    layers = quantized_layers(model)
    frozen = [name for name, layer in layers.items() if layer.frozen]
    if frozen and data is not None:
        raise RuntimeError(
            f"calibrate() on a converted model: layer {frozen[0]!r} is frozen, its ranges are "
            "fixed in its integers; calibrate the prepared model before convert() (or "
            "prepare the float model again)"
        )
    static = {
        n: m.input_quantizer
        for n, m in layers.items()
        if m.input_quantizer is not None and not m.input_quantizer.spec.dynamic
    }
    if data is not None:
        for name, quantizer in static.items():
            _restart_observer(name, quantizer, accumulate)
    watching = {n: q for n, q in static.items() if q.observing}
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
        inexact = [q for q in watching.values() if not exactly_merged(q)]
        if sync_ranks:
            merge_observers(watching.values())
        for quantizer in watching.values():
            quantizer.finish_observing()
        if sync_ranks:
            average_ranges(inexact, fixed=True)
    finally:
        for module, was_training in modes:
            module.training = was_training
    return model


def _bias_kept_float(layer: QModule) -> bool:
    """Whether a frozen layer could have had an int32 bias but keeps it float (a value of
    ``round(b / (s_w * s_x))`` did not fit int32)."""
    return layer._int_bias_possible() and not isinstance(layer.bias, QTensor)


def convert(model: M, inplace: bool = False, generator: torch.Generator | None = None) -> M:
    """Freeze every quantized layer: integer weights, fixed scales, int32 biases.

    A bias whose ``round(b / (s_w * s_x))`` leaves int32 (a weight row near zero after
    pruning, a batch norm with a tiny gamma) stays float: convert logs it and adds a line
    naming the layer to ``prepared_info(model).notes``. Weights whose spec says
    ``rounding: stochastic`` are rounded stochastically, drawing from ``generator``.

    >>> m = prepare(torch.nn.Sequential(torch.nn.Linear(4, 4)), "w8a8")
    >>> m = calibrate(m, [torch.randn(2, 4)])
    >>> convert(m)[0].weight.qdata.dtype
    torch.int8
    """
    if not inplace:
        model = copy.deepcopy(model)
    info = getattr(model, INFO_ATTR, None)
    ties = WeightTies.of(model)  # layers sharing a float weight share its QTensor
    for name, layer in quantized_layers(model).items():
        was_frozen = layer.frozen
        layer.freeze(generator, ties)
        if not was_frozen and _bias_kept_float(layer):
            note = (
                f"{name}: bias kept in float: round(b / (s_w * s_x)) does not fit int32 (a "
                "weight row near zero, e.g. pruned, or a batch norm with a tiny gamma)"
            )
            logger.info("convert: %s", note)
            if isinstance(info, PreparedInfo):
                info.notes.append(note)
    if isinstance(info, PreparedInfo):
        info.notes += ties.notes
    return model


def _nbytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as held (packed integers for QTensors)."""
    total, seen = 0, set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if isinstance(tensor, QTensor):
            total += tensor.storage_nbytes()
        else:
            total += tensor.numel() * tensor.element_size()
    return total


def _human(nbytes: int) -> str:
    if nbytes >= 1 << 20:
        return f"{nbytes / (1 << 20):.1f} MiB"
    return f"{nbytes / 1024:.1f} KiB"


def _summary(model: nn.Module, info: PreparedInfo, before: int) -> str:
    """One line: layers quantized and kept float, bytes before and after."""
    done, kept = len(quantized_layers(model)), sorted(info.kept_float)
    shown = ", ".join(kept[:4]) + (" ..." if len(kept) > 4 else "")
    why = f" ({len(kept)} kept float: {shown})" if kept else ""
    return (
        f"quantized {done} of {done + len(kept)} layers{why} with {info.recipe.name}, "
        f"{_human(before)} -> {_human(_nbytes(model))}"
    )


def _materialise(data: Iterable[Any] | None, num_batches: int | None) -> list[Any] | None:
    """The calibration batches as a list read once, so calibration and every algorithm see
    the same batches (a generator would be used up by the first reader)."""
    if data is None:
        return None
    if isinstance(data, torch.Tensor):
        return [data]
    if isinstance(data, Mapping):
        return [data]
    return list(itertools.islice(data, num_batches))


def quantize(
    model: M,
    recipe: RecipeLike = "w8a8",
    data: Iterable[Any] | None = None,
    num_batches: int | None = None,
    progress: bool = False,
) -> M:
    """Prepare, run the recipe's algorithms, calibrate and convert, on a copy of ``model``.

    The quantized copy comes back in eval mode, ready for inference; ``model`` is left as it
    was. ``data`` is an iterable of calibration batches (see :func:`run_batch`), read once
    into a list (``num_batches`` caps it) that calibration and every algorithm share;
    ``progress=True`` shows progress bars. The recipe's algorithms that reshape float
    weights (CLE, SmoothQuant, AWQ) run before calibration, those that choose roundings
    (AdaRound, GPTQ, bias correction) after it. One summary line is logged
    (``logging.INFO`` on ``lowbit.api``): layers quantized and kept float, bytes before and
    after.

    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> q = quantize(net, "w8a8", data=[torch.randn(16, 8)])
    >>> q(torch.randn(3, 8)).shape, q.training
    (torch.Size([3, 2]), False)
    """
    recipe = load_recipe(recipe)
    before = _nbytes(model)
    batches = _materialise(data, num_batches)
    algorithms = build_algorithms(recipe.steps)  # resolved now, from the registry
    for algorithm in algorithms:
        algorithm.progress = progress or getattr(algorithm, "progress", False)
    prepared = prepare(model, recipe)
    for algorithm in algorithms:
        if algorithm.stage == "float":
            algorithm.apply(prepared, batches)
    calibrate(prepared, batches, progress=progress)
    for algorithm in algorithms:
        if algorithm.stage != "float":
            algorithm.apply(prepared, batches)
    converted = convert(prepared, inplace=True)
    logger.info("%s", _summary(converted, prepared_info(converted), before))
    return converted
