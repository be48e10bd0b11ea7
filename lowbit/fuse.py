"""Batch-norm folding before quantization, in place on the user's own model.

A batch norm in eval mode is a per-channel affine map, so when it directly follows a conv or
linear layer it can be folded into that layer's weight and bias::

    scale = gamma / sqrt(running_var + eps)              # (out,)
    W'    = W * scale                                    # per output channel (dim 0 of W)
    b'    = (b - running_mean) * scale + beta

The batch norm is then replaced by ``nn.Identity()``. Folding always edits the model object it
is given: the model keeps its class, nothing is re-generated from a ``torch.fx`` graph, so later
module swapping works even on models that ``torch.fx`` cannot trace. ``torch.fx`` is only used to
*find* the (layer, batch norm) pairs; when it cannot trace the model, only pairs that sit next to
each other inside a plain ``nn.Sequential`` are folded.

Known limit: a ``Linear`` feeding a ``BatchNorm1d`` is folded on the assumption that the linear
output is ``(N, features)``; on a ``(N, L, features)`` output ``BatchNorm1d`` would normalize
dim 1 instead, which no shape-free analysis can see.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import fx, nn

__all__ = ["FoldPair", "apply_fold_structure", "find_foldable", "fold_batchnorm", "fold_into"]

logger = logging.getLogger(__name__)

# Each foldable layer type and the batch-norm type that must follow it.
_LAYER_TO_BN: tuple[tuple[type[nn.Module], type[nn.Module]], ...] = (
    (nn.Conv1d, nn.BatchNorm1d),
    (nn.Conv2d, nn.BatchNorm2d),
    (nn.Conv3d, nn.BatchNorm3d),
    (nn.Linear, nn.BatchNorm1d),
)
_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_LAYER_NAMES = "Conv1d/Conv2d/Conv3d/Linear"
_NOT_IN_SEQUENTIAL = (
    "it does not directly follow a conv/linear inside a plain nn.Sequential "
    "(one that keeps nn.Sequential.forward)"
)


@dataclass(frozen=True)
class FoldPair:
    """A conv/linear layer and the batch norm that directly follows it, by qualified name.

    Names are those of ``dict(model.named_modules())``.

    >>> FoldPair(layer="features.0", bn="features.1")
    FoldPair(layer='features.0', bn='features.1')
    """

    layer: str
    bn: str


class _FoldTracer(fx.Tracer):
    """Keeps every conv/linear/batch-norm call a ``call_module`` node, subclasses included."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, _LAYER_TYPES + _NORM_TYPES):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _alias_counts(model: nn.Module) -> Counter[int]:
    """How many qualified names reach each module and parameter (by ``id``)."""
    counts = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    counts.update(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return counts


def _is_lazy(module: nn.Module) -> bool:
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return any(nn.parameter.is_lazy(t) for t in tensors)


def _layer_problem(name: str, layer: nn.Module) -> str | None:
    """Why ``layer`` cannot take a folded batch norm, or None."""
    if not isinstance(layer, _LAYER_TYPES):
        return f"'{name}' is a {type(layer).__name__}, not a {_LAYER_NAMES}"
    base = next(cls for cls, _ in _LAYER_TO_BN if isinstance(layer, cls))
    if type(layer).forward is not base.forward:
        return (
            f"'{name}' is a {type(layer).__name__} with its own forward(); lowbit cannot tell "
            "how it uses its weight, so it does not fold into it"
        )
    if _is_lazy(layer):
        return f"'{name}' is a lazy module that is not initialized yet; run one forward pass first"
    return None


def _bn_problem(name: str, bn: nn.Module, layer: nn.Module, need_stats: bool) -> str | None:
    """Why ``bn`` cannot be folded into ``layer`` (already checked), or None."""
    expected = next(bn_cls for cls, bn_cls in _LAYER_TO_BN if isinstance(layer, cls))
    if isinstance(bn, nn.Identity):
        return (
            f"'{name}' is already an Identity, so the pair looks already folded; "
            "fold each pair once"
        )
    if not isinstance(bn, expected) or type(bn).forward is not expected.forward:
        return (
            f"a {type(layer).__name__} must be followed by a {expected.__name__} to fold, "
            f"but '{name}' is a {type(bn).__name__}"
        )
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if bn.num_features != out:
        return f"the layer has {out} output channels but '{name}' normalizes {bn.num_features}"
    if _is_lazy(bn):
        return f"'{name}' is a lazy module that is not initialized yet; run one forward pass first"
    if need_stats and (bn.running_mean is None or bn.running_var is None):
        return (
            f"'{name}' has no running statistics (track_running_stats=False), so it always "
            "normalizes with batch statistics, which cannot be folded into weights"
        )
    return None


def _pair_problem(
    model: nn.Module, pair: FoldPair, aliases: Counter[int], need_stats: bool = True
) -> str | None:
    """Why ``pair`` (both names resolve) cannot be folded, or None."""
    layer, bn = model.get_submodule(pair.layer), model.get_submodule(pair.bn)
    problem = _layer_problem(pair.layer, layer) or _bn_problem(pair.bn, bn, layer, need_stats)
    if problem is not None:
        return problem
    shared: list[tuple[str, object]] = [(pair.layer, layer), (pair.bn, bn)]
    shared += [(f"{pair.layer}.{n}", p) for n, p in layer.named_parameters(recurse=False)]
    for name, obj in shared:
        if aliases[id(obj)] > 1:
            return (
                f"'{name}' is shared (reachable under more than one name), so folding would "
                "also change its other uses"
            )
    return None


def _norm_names(model: nn.Module) -> Iterator[str]:
    return (name for name, m in model.named_modules() if isinstance(m, _NORM_TYPES))


def _describe(node: fx.Node) -> str:
    """A short human name for what produces ``node``."""
    if node.op == "call_function":
        return f"the function {getattr(node.target, '__name__', node.target)}()"
    if node.op == "call_method":
        return f"the tensor method .{node.target}()"
    if node.op == "placeholder":
        return f"the model input '{node.target}'"
    if node.op == "output":
        return "the model output"
    return f"{node.op} {node.target}"


def _traced_candidate(
    model: nn.Module, graph: fx.Graph, calls: Counter[str], bn_name: str
) -> FoldPair | str:
    """The pair that ends in ``bn_name`` in the traced graph, or why there is none."""
    if calls[bn_name] != 1:
        if calls[bn_name] == 0:
            return "it is not called as a module in forward() (unused, or called indirectly)"
        return (
            f"it is called {calls[bn_name]} times in forward(); one set of statistics cannot "
            "be folded into every caller"
        )
    node = next(n for n in graph.nodes if n.op == "call_module" and n.target == bn_name)
    src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    if not isinstance(src, fx.Node):
        return "it is not called with a single tensor argument"
    if src.op != "call_module":
        return f"its input comes from {_describe(src)}, not from a {_LAYER_NAMES} module"
    src_module = model.get_submodule(str(src.target))
    if not isinstance(src_module, _LAYER_TYPES):
        return f"it follows '{src.target}', a {type(src_module).__name__}, not a {_LAYER_NAMES}"
    layer_name = str(src.target)
    if calls[layer_name] != 1:
        return (
            f"its input layer '{layer_name}' is called {calls[layer_name]} times in forward(), "
            "so folding would change every call"
        )
    others = [_describe(user) for user in src.users if user is not node]
    if others:
        return (
            f"the output of '{layer_name}' is also used by {', '.join(others)}; folding would "
            "change what they see"
        )
    return FoldPair(layer=layer_name, bn=bn_name)


def _sequential_candidates(model: nn.Module) -> dict[str, FoldPair]:
    """Adjacent (conv/linear, next child) pairs inside stock ``nn.Sequential``, keyed by bn."""
    found: dict[str, FoldPair] = {}
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        prefix = f"{seq_name}." if seq_name else ""
        for (a_name, a), (b_name, _) in pairwise(seq.named_children()):
            if isinstance(a, _LAYER_TYPES):
                found[prefix + b_name] = FoldPair(layer=prefix + a_name, bn=prefix + b_name)
    return found


def _submodule_candidates(model: nn.Module) -> dict[str, FoldPair | str]:
    """For a model torch.fx cannot trace as a whole: each batch norm's pair found by tracing
    its closest ancestor that does trace (a conv/bn/activation block of a transformers ResNet,
    say), else by its place in a plain nn.Sequential.

    Tracing a part is as safe as tracing the whole: a layer whose output leaves the traced part
    feeds the part's output node, which counts as another user, so it is not folded.
    """
    by_bn = _sequential_candidates(model)
    traced: dict[str, tuple[fx.Graph, Counter[str]] | None] = {}
    found: dict[str, FoldPair | str] = {}
    for bn_name in _norm_names(model):
        if bn_name in by_bn:
            found[bn_name] = by_bn[bn_name]
            continue
        found[bn_name] = _NOT_IN_SEQUENTIAL
        parts = bn_name.split(".")
        for depth in range(len(parts) - 1, 0, -1):
            owner = ".".join(parts[:depth])
            if owner not in traced:
                try:
                    sub = model.get_submodule(owner)
                    graph = _FoldTracer().trace(sub)
                except Exception:  # noqa: BLE001  # this ancestor does not trace: try its parent
                    traced[owner] = None
                else:
                    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
                    traced[owner] = (graph, calls)
            entry = traced[owner]
            if entry is None:
                continue
            local = _traced_candidate(model.get_submodule(owner), *entry, ".".join(parts[depth:]))
            found[bn_name] = (
                FoldPair(layer=f"{owner}.{local.layer}", bn=bn_name)
                if isinstance(local, FoldPair)
                else local
            )
            break
    return found


def find_foldable(model: nn.Module) -> tuple[list[FoldPair], list[str]]:
    """Find the (conv/linear, batch norm) pairs of ``model`` that can be folded.

    Traces ``model`` with ``torch.fx`` (only to read its call graph; the model is not changed)
    and keeps a batch norm called exactly once whose sole input is the output of a conv/linear
    module that is called exactly once and feeds nothing else. When tracing fails, only batch
    norms that directly follow a conv/linear inside a plain ``nn.Sequential`` are kept.
    Returns the pairs and one human-readable note per batch norm left out (plus one about
    tracing when it failed); the notes are also logged.

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8))
    >>> pairs, notes = find_foldable(model)
    >>> pairs
    [FoldPair(layer='0', bn='1')]
    >>> notes
    ["batch norm '3' not folded: it follows '2', a ReLU, not a Conv1d/Conv2d/Conv3d/Linear"]
    """
    if next(_norm_names(model), None) is None:
        return [], []  # nothing to fold: no need to trace (nor to warn that tracing failed)
    aliases = _alias_counts(model)
    notes: list[str] = []
    try:
        graph = _FoldTracer().trace(model)
    except Exception as exc:  # any failure of tracing means: fall back, never crash
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        notes.append(
            f"torch.fx could not trace {type(model).__name__} ({reason}); folded batch norms "
            "found by tracing the smallest enclosing submodule that traces, and those that "
            "directly follow a conv/linear inside nn.Sequential containers"
        )
        logger.info(notes[-1])
        candidates = _submodule_candidates(model)
    else:
        calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
        candidates = {
            name: _traced_candidate(model, graph, calls, name) for name in _norm_names(model)
        }
    pairs: list[FoldPair] = []
    for bn_name, found in candidates.items():
        problem = found if isinstance(found, str) else _pair_problem(model, found, aliases)
        if problem is None and isinstance(found, FoldPair):
            pairs.append(found)
        else:
            notes.append(f"batch norm '{bn_name}' not folded: {problem}")
            logger.info(notes[-1])
    return pairs, notes


def _resolve(
    model: nn.Module, pairs: Sequence[FoldPair], need_stats: bool
) -> list[tuple[nn.Module, nn.modules.batchnorm._BatchNorm]]:
    """Check every pair before anything is changed; the (layer, bn) modules of each pair."""
    aliases = _alias_counts(model)
    seen: set[str] = set()
    resolved = []
    for pair in pairs:
        if not isinstance(pair, FoldPair):
            raise ValueError(
                f"expected FoldPair items, got {pair!r}; build them as FoldPair(layer=..., bn=...)"
            )
        for name in (pair.layer, pair.bn):
            if name in seen:
                raise ValueError(
                    f"cannot fold {pair}: '{name}' appears in more than one pair; each layer and "
                    "batch norm can be folded once, so remove the duplicate"
                )
            seen.add(name)
            try:
                if name == "":
                    raise AttributeError("the empty name is the model itself")
                model.get_submodule(name)
            except AttributeError as exc:
                raise ValueError(
                    f"cannot fold {pair}: {type(model).__name__} has no submodule '{name}' "
                    f"({exc}); use qualified names from dict(model.named_modules()), "
                    "or the pairs find_foldable(model) returns"
                ) from None
        problem = _pair_problem(model, pair, aliases, need_stats)
        if problem is not None:
            raise ValueError(
                f"cannot fold {pair}: {problem}. Pass only pairs that find_foldable(model) returns"
            )
        bn = model.get_submodule(pair.bn)
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
        resolved.append((model.get_submodule(pair.layer), bn))
    return resolved


def _ensure_bias(layer: nn.Module) -> torch.Tensor:
    """The layer's bias, created as zeros (same dtype/device as the weight) when it had none."""
    if layer.bias is None:
        w = layer.weight
        zeros = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        layer.bias = nn.Parameter(zeros, requires_grad=w.requires_grad)
    bias = layer.bias
    assert isinstance(bias, torch.Tensor)
    return bias


@torch.no_grad()
def fold_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold ``bn``'s running statistics and affine parameters into ``layer``, in place.

    >>> conv, bn = nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2).eval()
    >>> x = torch.randn(1, 1, 3, 3); want = bn(conv(x)); fold_into(conv, bn)
    >>> torch.allclose(conv(x), want, atol=1e-6)
    True
    """
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    assert bn.running_mean is not None and bn.running_var is not None
    dtype = torch.promote_types(weight.dtype, torch.float32)
    mean = bn.running_mean.to(device=weight.device, dtype=dtype)
    var = bn.running_var.to(device=weight.device, dtype=dtype)
    gamma = torch.ones_like(var) if bn.weight is None else bn.weight.to(mean)
    beta = torch.zeros_like(mean) if bn.bias is None else bn.bias.to(mean)
    scale = gamma * torch.rsqrt(var + bn.eps)  # (out,)
    old_bias = _ensure_bias(layer).to(mean)
    # (out,) -> (out, 1, ...): broadcasts over (out, in/groups, *kernel) or (out, in)
    per_out = scale.view(-1, *([1] * (weight.ndim - 1)))
    weight.copy_(weight.to(dtype) * per_out)
    _ensure_bias(layer).copy_((old_bias - mean) * scale + beta)  # (out,)


def fold_batchnorm(model: nn.Module, pairs: Sequence[FoldPair] | None = None) -> list[FoldPair]:
    """Fold batch norms into the conv/linear layers before them, in place; returns the pairs.

    ``pairs`` defaults to ``find_foldable(model)[0]``. Every pair is checked before anything
    changes (a missing module, a wrong type or mismatched channels raise ``ValueError``). Each
    layer's weight and bias are rewritten in place from the batch norm's running statistics
    (eval-mode semantics, whatever ``model.training`` is; a bias is created when the layer had
    none) and the batch norm is replaced by ``nn.Identity()``. The model keeps its class.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> x = torch.randn(2, 3, 8, 8)
    >>> before = model(x)
    >>> fold_batchnorm(model)
    [FoldPair(layer='0', bn='1')]
    >>> model[1]
    Identity()
    >>> torch.allclose(model(x), before, atol=1e-5)
    True
    """
    pairs = find_foldable(model)[0] if pairs is None else list(pairs)
    for pair, (layer, bn) in zip(pairs, _resolve(model, pairs, need_stats=True), strict=True):
        fold_into(layer, bn)
        model.set_submodule(pair.bn, nn.Identity())
    return pairs


def apply_fold_structure(model: nn.Module, pairs: Sequence[FoldPair]) -> list[FoldPair]:
    """Give ``model`` the module structure ``fold_batchnorm`` would, without touching values.

    Replaces each pair's batch norm by ``nn.Identity()`` and adds a zero bias to layers that
    had none; weights are left as they are. Use it before loading a saved model whose folded
    weights and biases come from the file. Pairs are checked like ``fold_batchnorm``'s.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8))
    >>> apply_fold_structure(model, [FoldPair(layer="0", bn="1")])
    [FoldPair(layer='0', bn='1')]
    >>> model[1], bool((model[0].bias == 0).all())
    (Identity(), True)
    """
    pairs = list(pairs)
    for pair, (layer, _) in zip(pairs, _resolve(model, pairs, need_stats=False), strict=True):
        with torch.no_grad():
            _ensure_bias(layer)
        model.set_submodule(pair.bn, nn.Identity())
    return pairs
