"""Graph fusion for the oneDNN int8 kernels: ReLU and residual adds into the layer, and uint8
activations handed from layer to layer.

Run one at a time, each converted layer quantizes its float input, runs the integer kernel and
writes a float output, and the model's own ReLU and ``out + identity`` read and write that
float tensor again: on the demo ResNet those elementwise passes cost more than the
convolutions. When torch.fx can trace the model, :func:`fuse` rewrites its graph:

1. ``layer -> relu`` runs as one kernel call with the ReLU in oneDNN's epilogue;
2. ``conv(x) + other`` (and a ReLU after it) runs as one call whose epilogue adds ``other``
   (oneDNN's ``sum`` post-op, written into ``other``'s buffer);
3. a fused layer whose every consumer is an int8 layer with the same static input scale (or
   the residual add of one) writes uint8 at that scale directly, and its consumers skip their
   quantize pass; the residual add then reads that uint8 tensor.

Step 3 makes the residual add read the block input as the next layer's quantizer rounds it,
where the simulation adds the float value: a difference of one 8-bit rounding, which
``lowbit.compile`` measures against the simulation (``integer_handoff=False`` turns it off).
A layer whose output only feeds a residual add (a ResNet downsample) has no input grid of
its own to write; ``lowbit.compile`` gives it one from the range its output takes on the
example inputs, so the add and everything after it stay uint8 too.
Models torch.fx cannot trace run layer by layer, unfused, with a note.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lowbit.nn import QModule, QParent
from lowbit.runtime.activation import scalar_qparams
from lowbit.runtime.conv import OneDNNInt8Conv
from lowbit.runtime.fused import IntLayer, QuantizeU8, describe
from lowbit.runtime.linear import OneDNNInt8Linear
from lowbit.spec import QDtype

__all__ = ["FusionResult", "fuse"]

_RELU_FUNCTIONS: set[Callable[..., Any]] = {torch.relu, F.relu}
# out-of-place adds only: ``a += b`` and ``a.add_(b)`` change ``a`` for every other reader
_ADD_FUNCTIONS: set[Callable[..., Any]] = {operator.add, torch.add}


class _Tracer(fx.Tracer):
    """Treats lowbit's quantized layers as leaves (the default stops at torch.nn modules)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        leaf = isinstance(m, (QModule, QParent))  # a QParent (LSTM, attention) runs as a whole
        return leaf or super().is_leaf_module(m, module_qualified_name)


@dataclass
class _Plan:
    node: fx.Node
    layer: QModule
    kernel: OneDNNInt8Conv | OneDNNInt8Linear
    relu: bool = False
    add_other: fx.Node | None = None
    input_u8: bool = False
    out_qparams: tuple[float, int] | None = None
    accum_qparams: tuple[float, int] | None = None
    clone_accum: bool = True


@dataclass
class FusionResult:
    """The rewritten module and, per fused layer, what it got."""

    module: nn.Module
    traced: bool
    fused: dict[str, str] = field(default_factory=dict)  # layer name -> "relu", "add+relu", ...
    notes: list[str] = field(default_factory=list)


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1 and not node.kwargs
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1


def _is_add(node: fx.Node) -> bool:
    if node.kwargs or len(node.args) != 2:
        return False
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    return node.op == "call_method" and node.target == "add"


def _drop_identities(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.Identity):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _plans(
    gm: fx.GraphModule, modules: dict[str, nn.Module], dtype: torch.dtype
) -> dict[fx.Node, _Plan]:
    plans: dict[fx.Node, _Plan] = {}
    for node in gm.graph.nodes:
        layer = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(layer, QModule) or not layer.frozen or len(node.args) != 1:
            continue
        kernel = layer.kernel_for(dtype, "cpu")
        if isinstance(kernel, (OneDNNInt8Conv, OneDNNInt8Linear)):
            plans[node] = _Plan(node, layer, kernel)
    return plans


def _fuse_relu_and_add(
    gm: fx.GraphModule, modules: dict[str, nn.Module], plans: dict[fx.Node, _Plan]
) -> None:
    graph = gm.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node, plan in plans.items():
        users = list(node.users)
        if len(users) != 1:
            continue
        user = users[0]
        if _is_relu(user, modules):
            user.replace_all_uses_with(node)
            graph.erase_node(user)
            plan.relu = True
            continue
        if not (_is_add(user) and isinstance(plan.kernel, OneDNNInt8Conv)):
            continue
        if plan.kernel.spatial != 2:
            continue
        other = user.args[1] if user.args[0] is node else user.args[0]
        if not isinstance(other, fx.Node) or other is node or order[other] > order[node]:
            continue  # the add goes into whichever operand is computed last
        plan.add_other = other
        after = list(user.users)
        user.replace_all_uses_with(node)
        graph.erase_node(user)
        if len(after) == 1 and _is_relu(after[0], modules):
            after[0].replace_all_uses_with(node)
            graph.erase_node(after[0])
            plan.relu = True
        node.args = (node.args[0], other)


def _per_token(plan: _Plan) -> bool:
    return isinstance(plan.kernel, OneDNNInt8Linear) and plan.kernel.per_token


def _static_u8(plan: _Plan) -> tuple[float, int] | None:
    """The static uint8 grid a layer reads, when oneDNN can write it for the layer: its
    requantization clamps to the whole [0, 255], so a narrow grid is not one it can write."""
    grid = plan.kernel.grid
    if grid.scale is None or grid.zero is None or (grid.low, grid.high) != (0, 255):
        return None
    return grid.scale, grid.zero


def _handoff(
    gm: fx.GraphModule,
    plans: dict[fx.Node, _Plan],
    ranges: dict[str, tuple[float, float]] | None = None,
) -> None:
    """Decide which fused layers write uint8 for their consumers.

    A layer can when every consumer is a fused layer that reads it either as its input, with
    one and the same static input grid, or as the residual of an add that itself writes
    uint8; and a layer that adds a residual can only write uint8 when that residual is uint8.
    A layer read only as a residual has no grid of its own: with ``ranges`` (its output's
    range on example inputs) it gets an unsigned 8-bit grid covering that range.
    Candidates that break a rule are dropped until none does.
    """
    candidates: dict[fx.Node, tuple[float, int]] = {}
    for node, plan in plans.items():
        if not node.users or _per_token(plan):
            continue
        residual_only = all(
            user in plans and plans[user].add_other is node and user.args[0] is not node
            for user in node.users
        )
        seen = (ranges or {}).get(plan.layer.layer_name)
        if residual_only and seen is not None:
            lo, hi = seen
            candidates[node] = scalar_qparams(lo, hi, QDtype(8, signed=False), symmetric=False)
            continue
        wanted: set[tuple[float, int]] = set()
        for user in node.users:
            consumer = plans.get(user)
            reads_input = consumer is not None and user.args[0] is node
            reads_residual = consumer is not None and consumer.add_other is node
            if consumer is None or reads_input == reads_residual:
                wanted = set()
                break
            if reads_input:
                qparams = _static_u8(consumer)
                if qparams is None:
                    wanted = set()
                    break
                wanted.add(qparams)
        if len(wanted) == 1:
            candidates[node] = wanted.pop()
    changed = True
    while changed:
        changed = False
        for node in list(candidates):
            plan = plans[node]
            residual_float = plan.add_other is not None and plan.add_other not in candidates
            feeds_float_add = any(
                plans[user].add_other is node and user not in candidates for user in node.users
            )
            if residual_float or feeds_float_add:
                del candidates[node]
                changed = True
    for node, qparams in candidates.items():
        plans[node].out_qparams = qparams
        for user in node.users:
            consumer = plans[user]
            if user.args[0] is node:
                consumer.input_u8 = True
            if consumer.add_other is node:
                consumer.accum_qparams = qparams


def _shared_quantize(gm: fx.GraphModule, plans: dict[fx.Node, _Plan]) -> int:
    """Quantize a float value once for every fused layer reading it on the same static grid;
    returns how many shared quantize nodes were added."""
    added = 0
    for node in list(gm.graph.nodes):
        plan = plans.get(node)
        if plan is not None and plan.out_qparams is not None:
            continue  # already uint8
        groups: dict[tuple[float, int], list[fx.Node]] = {}
        for user in node.users:
            consumer = plans.get(user)
            if consumer is None or user.args[0] is not node or consumer.add_other is node:
                continue
            qparams = _static_u8(consumer)
            if qparams is not None and not consumer.input_u8:
                groups.setdefault(qparams, []).append(user)
        for users in groups.values():
            if len(users) < 2:
                continue
            target = f"lowbit_quantize_{added}"
            gm.add_submodule(target, QuantizeU8(plans[users[0]].kernel.grid))
            with gm.graph.inserting_after(node):
                shared = gm.graph.call_module(target, (node,))
            for user in users:
                user.args = (shared, *user.args[1:])
                plans[user].input_u8 = True
            added += 1
    return added


def _residual_copies(gm: fx.GraphModule, plans: dict[fx.Node, _Plan]) -> None:
    """A fused add writes into its residual's buffer: write into it only when it is the fresh
    output of another fused layer that nothing reads afterwards; anything else (the caller's
    tensor, or a value some op may return as an alias of one) is copied first."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node, plan in plans.items():
        other = plan.add_other
        if other is None:
            continue
        later = [u for u in other.users if u is not node and order[u] > order[node]]
        plan.clone_accum = bool(later) or other not in plans


def fuse(
    model: nn.Module,
    dtype: torch.dtype = torch.float32,
    integer_handoff: bool = True,
    ranges: dict[str, tuple[float, float]] | None = None,
) -> FusionResult:
    """``model`` with its oneDNN int8 layers fused with the ReLUs and residual adds around
    them (a torch.fx GraphModule sharing the model's layers), or ``model`` itself with a note
    when torch.fx cannot trace it.

    >>> import lowbit
    >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> q = lowbit.quantize(net, "w8a8", data=[torch.randn(16, 8)])
    >>> fused = fuse(q)
    >>> fused.fused
    {'0': 'relu, uint8 out', '2': 'uint8 in'}
    """
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises many types for code it cannot trace
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        return FusionResult(
            model,
            False,
            notes=[f"torch.fx cannot trace the model ({reason}): layers run one by one, unfused"],
        )
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    modules = dict(gm.named_modules())
    _drop_identities(gm, modules)
    plans = _plans(gm, modules, dtype)
    _fuse_relu_and_add(gm, modules, plans)
    if integer_handoff:
        _handoff(gm, plans, ranges)
        _shared_quantize(gm, plans)
    _residual_copies(gm, plans)
    result = FusionResult(gm, True)
    for index, (node, plan) in enumerate(plans.items()):
        fused = IntLayer(
            plan.layer,
            plan.kernel,
            dtype,
            plan.relu,
            plan.add_other is not None,
            plan.input_u8,
            plan.out_qparams,
            plan.accum_qparams,
            plan.clone_accum,
        )
        target = f"lowbit_fused_{index}"
        gm.add_submodule(target, fused)
        node.target = target
        result.fused[plan.layer.layer_name or str(node.name)] = describe(fused)
    gm.graph.lint()
    gm.recompile()
    return result
