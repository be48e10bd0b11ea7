"""Where a per-input-channel scale can be folded away: the groups SmoothQuant and AWQ scale.

Both algorithms multiply the input channels of some Linear layers by ``s`` (``W[:, j] * s_j``)
and need their input divided by ``s``. That division costs nothing when it is folded into the
op that produces the input, and is exact only when that op is affine per channel and its
output goes nowhere else: a LayerNorm / RMSNorm (``ln_1 -> q, k, v`` in a pre-LN transformer),
or a Linear (its output rows ``W[j, :] / s_j``). Several Linears sharing one input share one
``s``: together with their producer they form a :class:`ScaleGroup`.

Groups are found with ``torch.fx`` (quantized layers and norms are leaves); a model that does
not trace is read from the closest traceable ancestor of each layer. Every candidate is then
checked on real data: its fold with random scales must leave the model's output unchanged
(a Gemma-style ``(1 + weight)`` norm, a tied weight or a hidden second use fails the check).
A layer that cannot be scaled gets a note saying why; nothing is skipped silently.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from lowbit.algorithms.base import weight_layers
from lowbit.algorithms.capture import capture_inputs, quantizers_disabled
from lowbit.api import run_batch
from lowbit.nn import QModule

__all__ = [
    "GroupInputs",
    "ScaleGroup",
    "group_inputs",
    "find_scale_groups",
    "input_axis",
    "scale_group",
    "SCALABLE_KINDS",
]

SCALABLE_KINDS = ("linear", "hf_conv1d")
"""Layer kinds whose input channels are one axis of the weight (Linear, transformers' Conv1D)."""


@dataclass(frozen=True)
class ScaleGroup:
    """Linear layers sharing one input, and the module producing it (qualified names).

    >>> ScaleGroup("ln_1", ("q", "k", "v"))
    ScaleGroup(producer='ln_1', layers=('q', 'k', 'v'))
    """

    producer: str
    layers: tuple[str, ...]


def input_axis(layer: nn.Module) -> int:
    """The weight axis of input channels: 1 for a Linear ``(out, in)``, 0 for a Conv1D
    ``(in, out)``.

    >>> input_axis(torch.nn.Linear(3, 2))
    1
    """
    return 0 if getattr(layer, "kind", "") == "hf_conv1d" else 1


def _output_axis(layer: nn.Module) -> int:
    return 1 - input_axis(layer)


def _is_norm(module: nn.Module) -> bool:
    """A normalisation with a 1-d per-feature weight (LayerNorm, RMSNorm and look-alikes)."""
    weight = getattr(module, "weight", None)
    named_norm = "norm" in type(module).__name__.lower()
    return named_norm and isinstance(weight, torch.Tensor) and weight.ndim == 1


def _tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def _weight(module: nn.Module) -> torch.Tensor:
    w = _tensor(module, "weight")
    assert w is not None, f"{type(module).__name__} has no weight tensor"
    return w


def _along(s: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return s.view(shape)  # (..., n, ...) on ``axis``


@torch.no_grad()
def scale_group(model: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """Multiply the group's input channels by ``s`` (weights) and divide its producer's
    output by ``s``, in place: the model computes the same function.

    >>> net = torch.nn.Sequential(torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    >>> x = torch.randn(4, 3); before = net(x)
    >>> scale_group(net, ScaleGroup("0", ("1",)), torch.tensor([2.0, 0.5, 4.0]))
    >>> torch.allclose(net(x), before, atol=1e-5)
    True
    """
    producer = model.get_submodule(group.producer)
    for name in group.layers:
        layer = model.get_submodule(name)
        w = _weight(layer)
        w.mul_(_along(s.to(w), w.ndim, input_axis(layer)))
    if _is_norm(producer):
        for p in (_weight(producer), _tensor(producer, "bias")):
            if p is not None:
                p.div_(s.to(p))
        return
    w = _weight(producer)
    w.div_(_along(s.to(w), w.ndim, _output_axis(producer)))
    bias = getattr(producer, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(s.to(bias))


class _Tracer(fx.Tracer):
    """Quantized layers and norms stay ``call_module`` nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, QModule) or _is_norm(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace(module: nn.Module) -> fx.Graph | None:
    try:
        return _Tracer().trace(module)
    except Exception:  # noqa: BLE001  # any failure: try an ancestor instead
        return None


def _describe(node: Any) -> str:
    if not isinstance(node, fx.Node):
        return f"the constant {node!r}"
    if node.op == "call_function":
        return f"the function {getattr(node.target, '__name__', node.target)}()"
    if node.op == "call_method":
        return f"the tensor method .{node.target}()"
    if node.op == "placeholder":
        return f"the input '{node.target}'"
    if node.op == "output":
        return "the output"
    return f"{node.op} {node.target}"


@dataclass
class _Graph:
    owner: str  # qualified name of the traced module ("" for the model)
    graph: fx.Graph
    calls: Counter[str]

    def full(self, target: Any) -> str:
        return f"{self.owner}.{target}" if self.owner else str(target)

    def node_of(self, local: str) -> fx.Node:
        return next(n for n in self.graph.nodes if n.op == "call_module" and n.target == local)


def _load(model: nn.Module, owner: str) -> _Graph | None:
    graph = _trace(model.get_submodule(owner))
    if graph is None:
        return None
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    return _Graph(owner, graph, calls)


def _graphs_for(model: nn.Module, name: str, cache: dict[str, _Graph | None]) -> Iterator[_Graph]:
    """Traced graphs holding layer ``name``: the model's, else its ancestors', closest first."""
    if "" not in cache:
        cache[""] = _load(model, "")
    whole = cache[""]
    if whole is not None:
        yield whole
        return
    parts = name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        owner = ".".join(parts[:depth])
        if owner not in cache:
            cache[owner] = _load(model, owner)
        found = cache[owner]
        if found is not None:
            yield found


def _candidate(
    model: nn.Module, g: _Graph, local: str, layers: dict[str, QModule]
) -> tuple[str, ScaleGroup | str]:
    """(key, group or why not) for layer ``local`` (a name inside ``g``); the key identifies
    the shared input so that layers reading it land in one group."""
    if g.calls[local] != 1:
        return (
            local,
            f"it is called {g.calls[local]} times in forward(); one scale cannot fit every call",
        )
    node = g.node_of(local)
    src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    if not isinstance(src, fx.Node):
        return local, "it is not called with a single tensor argument"
    key = f"{g.owner}:{src.name}"
    if src.op != "call_module":
        return key, f"its input comes from {_describe(src)}, which cannot absorb a scale"
    producer_name = g.full(src.target)
    producer = model.get_submodule(producer_name)
    is_linear = isinstance(producer, QModule) and producer.kind in SCALABLE_KINDS
    if not (_is_norm(producer) or is_linear):
        return (
            key,
            f"its input comes from '{producer_name}', a {type(producer).__name__}, "
            "not a norm or Linear",
        )
    if g.calls[str(src.target)] != 1:
        return key, f"its producer '{producer_name}' is called more than once"
    users = [u for u in src.users if not (u.op == "call_module" and g.full(u.target) in layers)]
    if users:
        shown = ", ".join(_describe(u) for u in users)
        return (
            key,
            f"the output of '{producer_name}' also goes to {shown}; dividing it would change them",
        )
    names = tuple(g.full(u.target) for u in src.users)
    return key, ScaleGroup(producer_name, tuple(n for n in layers if n in names))


def _outputs(out: Any) -> list[torch.Tensor]:
    """Every floating tensor in a model's output (tensors, tuples, dicts, ModelOutputs)."""
    if isinstance(out, torch.Tensor):
        return [out.float()] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _outputs(item)]
    return []


def _sqnr(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    signal = sum(float(r.pow(2).sum()) for r in ref)
    noise = sum(float((r - g).pow(2).sum()) for r, g in zip(ref, got, strict=True))
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


@torch.no_grad()
def _fold_is_exact(model: nn.Module, group: ScaleGroup, batch: Any) -> bool:
    """Whether folding random scales into ``group`` leaves the model's output unchanged."""
    producer = model.get_submodule(group.producer)
    first = model.get_submodule(group.layers[0])
    width = _weight(first).shape[input_axis(first)]
    tensors = [_weight(model.get_submodule(n)) for n in group.layers]
    tensors += [t for t in (_weight(producer), _tensor(producer, "bias")) if t is not None]
    saved = [t.detach().clone() for t in tensors]
    gen = torch.Generator().manual_seed(0)
    s = torch.exp(torch.empty(width).uniform_(-1.0, 1.0, generator=gen))  # in [1/e, e]
    was_training = model.training
    model.eval()
    try:
        with quantizers_disabled(model):
            ref = _outputs(run_batch(model, batch))
            scale_group(model, group, s)
            got = _outputs(run_batch(model, batch))
    finally:
        for t, old in zip(tensors, saved, strict=True):
            t.copy_(old)
        model.train(was_training)
    return bool(ref) and len(ref) == len(got) and _sqnr(ref, got) >= 60.0


def _first_sample(batch: Any) -> Any:
    """The first few samples of a batch (the exactness check needs little data)."""
    if isinstance(batch, torch.Tensor) and batch.ndim > 0:
        return batch[:2]
    if isinstance(batch, dict):
        return {k: _first_sample(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_first_sample(v) for v in batch)
    return batch


def _seen_producers(model: nn.Module, names: Sequence[str], batch: Any) -> dict[str, str]:
    """Layer -> the norm or Linear whose output tensor it was called with, seen on one batch
    (for layers torch.fx cannot place; the exactness check then vets each candidate)."""
    made: dict[int, str] = {}
    took: dict[str, int] = {}
    alive: list[torch.Tensor] = []  # every hooked tensor kept, so no id is reused
    handles = []

    def producer_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                alive.append(out)
                made.setdefault(id(out), name)

        return hook

    def consumer_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            if args and isinstance(args[0], torch.Tensor):
                alive.append(args[0])
                took.setdefault(name, id(args[0]))

        return hook

    modules = dict(model.named_modules())
    try:
        for name, module in modules.items():
            if _is_norm(module) or getattr(module, "kind", "") in SCALABLE_KINDS:
                handles.append(module.register_forward_hook(producer_hook(name)))
        for name in names:
            handles.append(modules[name].register_forward_pre_hook(consumer_hook(name)))
        with quantizers_disabled(model), torch.no_grad():
            run_batch(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    alive.clear()
    return {name: made[key] for name, key in took.items() if key in made and made[key] != name}


def find_scale_groups(
    model: nn.Module, data: Sequence[Any] | None = None
) -> tuple[list[ScaleGroup], dict[str, str]]:
    """The groups of ``model``'s Linear layers whose input scale can be folded, and
    ``{layer: why not}`` for the others. With ``data``, each group is checked on its first
    batch: a fold that changes the model's output is refused.

    >>> import lowbit
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.ln, self.a = torch.nn.LayerNorm(4), torch.nn.Linear(4, 4)
    ...         self.b = torch.nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return self.a(self.ln(x)) + self.b(torch.relu(x))
    >>> groups, why = find_scale_groups(lowbit.prepare(Block(), "w8a8"))
    >>> groups
    [ScaleGroup(producer='ln', layers=('a',))]
    >>> why["b"]
    'its input comes from the function relu(), which cannot absorb a scale'
    """
    layers = weight_layers(model, SCALABLE_KINDS)
    aliases = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    cache: dict[str, _Graph | None] = {}
    found: dict[str, tuple[str, ScaleGroup | str]] = {}
    for name, layer in layers.items():
        if aliases[id(layer.weight)] > 1:
            found[name] = (
                name,
                "its weight is shared with another module (tied); scaling it would change both",
            )
            continue
        found[name] = (name, "torch.fx traces no module holding it and its input was not seen")
        for g in _graphs_for(model, name, cache):
            local = name[len(g.owner) + 1 :] if g.owner else name
            result = _candidate(model, g, local, layers)
            found[name] = result
            node = g.node_of(local) if g.calls[local] == 1 else None
            src = node.args[0] if node is not None and node.args else None
            if not (isinstance(src, fx.Node) and src.op == "placeholder"):
                break  # decided here; a placeholder means: the producer is further out
    undecided = [n for n, (_, r) in found.items() if isinstance(r, str) and "input" in r]
    if undecided and data:
        seen = _seen_producers(model, undecided, _first_sample(data[0]))
        for name, producer in seen.items():
            shared = tuple(n for n in undecided if seen.get(n) == producer)
            found[name] = (f"seen:{producer}", ScaleGroup(producer, shared))
    groups: dict[str, ScaleGroup] = {}
    why: dict[str, str] = {}
    for name, (key, outcome) in found.items():
        if isinstance(outcome, str):
            why[name] = outcome
        else:
            groups.setdefault(key, outcome)
    checked = []
    for group in groups.values():
        if data and not _fold_is_exact(model, group, _first_sample(data[0])):
            for name in group.layers:
                why[name] = (
                    f"folding a scale into '{group.producer}' changes the model's output "
                    "(not an affine per-channel op, or its output has another use)"
                )
        else:
            checked.append(group)
    return checked, why


@dataclass
class GroupInputs:
    """What one group's shared input looked like over the calibration data: per input channel
    maximum and mean of ``|x|``, and the first ``max_rows`` rows (tokens) for searches."""

    absmax: torch.Tensor  # (in,)
    absmean: torch.Tensor  # (in,)
    sample: torch.Tensor  # (rows, in)


def group_inputs(
    model: nn.Module, groups: Sequence[ScaleGroup], data: Sequence[Any], max_rows: int
) -> dict[str, GroupInputs]:
    """Per group (keyed by producer), its input statistics, read from the float model (the
    quantizers are off, so calibration observers see nothing).

    >>> import lowbit
    >>> net = torch.nn.Sequential(torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    >>> net = lowbit.prepare(net, "w8a8")
    >>> got = group_inputs(net, [ScaleGroup("0", ("1",))], [torch.randn(5, 3)], max_rows=4)
    >>> got["0"].absmax.shape, got["0"].sample.shape
    (torch.Size([3]), torch.Size([4, 3]))
    """
    by_layer = {group.layers[0]: group.producer for group in groups}
    sums: dict[str, list[Any]] = {}

    def on_input(name: str, x: torch.Tensor, _: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        entry = sums.setdefault(by_layer[name], [None, None, 0, []])
        a = rows.abs()
        entry[0] = a.amax(0) if entry[0] is None else torch.maximum(entry[0], a.amax(0))
        entry[1] = a.sum(0) if entry[1] is None else entry[1] + a.sum(0)
        entry[2] += rows.shape[0]
        kept = sum(t.shape[0] for t in entry[3])
        if kept < max_rows:
            entry[3].append(rows[: max_rows - kept].clone())

    layers = {group.layers[0]: model.get_submodule(group.layers[0]) for group in groups}
    with quantizers_disabled(model), capture_inputs(model, layers, data, on_input=on_input):
        pass
    return {
        key: GroupInputs(amax, total / max(count, 1), torch.cat(rows))
        for key, (amax, total, count, rows) in sums.items()
    }
