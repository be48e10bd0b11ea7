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

from lowbit.nn import QModule
from lowbit.runtime import ops
from lowbit.runtime.activation import ActivationGrid, scalar_qparams
from lowbit.runtime.conv import OneDNNInt8Conv
from lowbit.runtime.linear import OneDNNInt8Linear
from lowbit.spec import QDtype

__all__ = ["IntLayer", "FusionResult", "fuse"]

_RELU_FUNCTIONS: set[Callable[..., Any]] = {torch.relu, F.relu}
_ADD_FUNCTIONS: set[Callable[..., Any]] = {operator.add, operator.iadd, torch.add}


class IntLayer(nn.Module):
    """One oneDNN int8 layer and what fusion gave it: a ReLU, a residual add, uint8 in or out.

    ``forward(x, other=None)``: ``x`` is float, or uint8 on the layer's own input grid when
    ``input_u8``; ``other`` is the residual added before the ReLU (float, or uint8 at
    ``accum_qparams``). The output is float, or uint8 at ``out_qparams``.
    """

    def __init__(
        self,
        layer: QModule,
        kernel: OneDNNInt8Conv | OneDNNInt8Linear,
        float_dtype: torch.dtype,
        relu: bool = False,
        add: bool = False,
        input_u8: bool = False,
        out_qparams: tuple[float, int] | None = None,
        accum_qparams: tuple[float, int] | None = None,
        clone_accum: bool = True,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.kernel = kernel
        self.float_dtype = float_dtype
        self.relu = relu
        self.add = add
        self.input_u8 = input_u8
        self.out_qparams = out_qparams
        self.accum_qparams = accum_qparams
        self.clone_accum = clone_accum
        self._fast: dict[tuple[tuple[int, ...], torch.dtype], Callable[..., torch.Tensor]] = {}

    def extra_repr(self) -> str:
        return f"{self.layer.label}: {self.kernel.name}, {describe(self) or 'unfused'}"

    # --- the fused call --------------------------------------------------------------------
    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        fast = self._fast.get((tuple(x.shape), x.dtype))
        if fast is not None and (other is None) != self.add:
            return fast(x, other)
        out = self._general(x, other)
        self._prepare_fast(x, other)
        return out

    def _prepare_fast(self, x: torch.Tensor, other: torch.Tensor | None) -> None:
        """For a static uint8 grid, every argument but the tensors is known after the first
        call: bind them once, so later calls of this shape go straight to the oneDNN op. On
        the demo ResNet the general path's Python cost was a tenth of the model's latency."""
        k, grid = self.kernel, self.kernel.grid
        if grid.scale is None or grid.zero is None or self._unfusable(x) or len(self._fast) > 4:
            return
        if self.add and (other is None or not self._accumulates(x, other)):
            return
        scale, zero = grid.scale, grid.zero
        dtype = self.float_dtype if self.input_u8 else x.dtype
        quantize = self._quantizer(scale, zero)
        if self.add:
            self._fast[(tuple(x.shape), x.dtype)] = self._bound_add(quantize, x.shape, dtype)
            return
        if self.out_qparams is not None:
            out_dtype, (out_scale, out_zero) = torch.uint8, self.out_qparams
        else:
            out_dtype, out_scale, out_zero = self._float_out(dtype), 1.0, 0
        if isinstance(k, OneDNNInt8Conv):
            call = ops.bound_qconv(
                scale,
                zero,
                k.packed_for(x.shape),
                k.w_scale,
                k.w_zero,
                k.bias_for(out_dtype),
                k.geometry,
                out_dtype,
                self.relu,
                out_scale,
                out_zero,
            )
        else:
            bias = k.bias_bf16 if out_dtype == torch.bfloat16 else k.bias
            call = ops.bound_qlinear(
                scale,
                zero,
                k.packed,
                k.w_scale,
                k.w_zero,
                bias,
                out_dtype,
                self.relu,
                out_scale,
                out_zero,
            )
        cast = out_dtype not in (torch.uint8, dtype)

        def run(x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
            out = call(quantize(x))
            return out.to(dtype) if cast else out

        self._fast[(tuple(x.shape), x.dtype)] = run

    def _quantizer(self, scale: float, zero: int) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.input_u8:
            return lambda x: x
        grid, channels_last = self.kernel.grid, isinstance(self.kernel, OneDNNInt8Conv)
        return lambda x: grid.to_u8(x, scale, zero, channels_last)

    def _bound_add(
        self,
        quantize: Callable[[torch.Tensor], torch.Tensor],
        shape: torch.Size,
        dtype: torch.dtype,
    ) -> Callable[..., torch.Tensor]:
        k = self.kernel
        assert isinstance(k, OneDNNInt8Conv) and k.grid.scale is not None
        assert k.grid.zero is not None
        if self.accum_qparams is not None and self.out_qparams is not None:  # uint8 residual
            (accum_scale, accum_zero), (out_scale, out_zero) = self.accum_qparams, self.out_qparams
            out_dtype, bias, u8 = torch.uint8, k.bias, True
        else:
            accum_scale, accum_zero, out_scale, out_zero = 1.0, 0, 1.0, 0
            out_dtype, u8 = self._float_out(dtype), False
            bias = k.bias_for(out_dtype)
        call = ops.bound_qconv_add(
            k.grid.scale,
            k.grid.zero,
            k.packed_for(shape),
            k.w_scale,
            k.w_zero,
            bias,
            k.geometry,
            accum_scale,
            accum_zero,
            self.relu,
            out_dtype,
            out_scale,
            out_zero,
        )
        clone = self.clone_accum

        def run(x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
            accum = other if u8 else other.to(out_dtype)
            accum = accum.contiguous(memory_format=torch.channels_last)
            if accum is other and clone:  # oneDNN writes its result into the residual
                accum = accum.clone(memory_format=torch.channels_last)
            out = call(quantize(x), accum)
            return out if out.dtype in (torch.uint8, dtype) else out.to(dtype)

        return run

    def _general(self, x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
        kernel = self.kernel
        if self._unfusable(x):
            return self._finish(
                kernel(self._float_input(x), relu=self.relu and not self.add), other
            )
        dtype = self.float_dtype if self.input_u8 else x.dtype
        q, scale, zero = self._quantized_input(x)
        if self.add:
            if other is not None and self._accumulates(q, other):
                return self._conv_add(q, scale, zero, other, dtype)
            out = self._call(q, scale, zero, self._float_out(dtype), 1.0, 0, relu=False)
            return self._finish(out.to(dtype), other)
        if self.out_qparams is not None:
            return self._call(q, scale, zero, torch.uint8, *self.out_qparams, relu=self.relu)
        out = self._call(q, scale, zero, self._float_out(dtype), 1.0, 0, relu=self.relu)
        return out if out.dtype == dtype else out.to(dtype)

    def _call(
        self,
        q: torch.Tensor,
        scale: float,
        zero: int,
        out_dtype: torch.dtype,
        out_scale: float,
        out_zero: int,
        relu: bool,
    ) -> torch.Tensor:
        k = self.kernel
        if isinstance(k, OneDNNInt8Conv):
            bias = k.bias_for(out_dtype)
            return ops.qconv(
                q,
                scale,
                zero,
                k.packed_for(q.shape) if isinstance(k, OneDNNInt8Conv) else k.packed,
                k.w_scale,
                k.w_zero,
                bias,
                k.geometry,
                out_dtype,
                relu,
                out_scale,
                out_zero,
            )
        bias = k.bias_bf16 if out_dtype == torch.bfloat16 else k.bias
        return ops.qlinear(
            q,
            scale,
            zero,
            k.packed_for(q.shape) if isinstance(k, OneDNNInt8Conv) else k.packed,
            k.w_scale,
            k.w_zero,
            bias,
            out_dtype,
            relu,
            out_scale,
            out_zero,
        )

    def _conv_add(
        self, q: torch.Tensor, scale: float, zero: int, other: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        k = self.kernel
        assert isinstance(k, OneDNNInt8Conv)
        if self.accum_qparams is not None and self.out_qparams is not None:
            accum = other.contiguous(memory_format=torch.channels_last)  # uint8 residual
            (accum_scale, accum_zero), (out_scale, out_zero) = self.accum_qparams, self.out_qparams
            bias = k.bias
        else:
            out_dtype = self._float_out(dtype)
            accum = other.to(out_dtype).contiguous(memory_format=torch.channels_last)
            accum_scale, accum_zero, out_scale, out_zero = 1.0, 0, 1.0, 0
            bias = k.bias_for(out_dtype)
        if accum is other and self.clone_accum:  # oneDNN writes its result into the residual
            accum = accum.clone(memory_format=torch.channels_last)
        out = ops.qconv_add(
            q,
            scale,
            zero,
            k.packed_for(q.shape) if isinstance(k, OneDNNInt8Conv) else k.packed,
            k.w_scale,
            k.w_zero,
            bias,
            k.geometry,
            accum,
            accum_scale,
            accum_zero,
            self.relu,
            out_scale,
            out_zero,
        )
        return out if out.dtype in (torch.uint8, dtype) else out.to(dtype)

    # --- helpers ----------------------------------------------------------------------------
    def _unfusable(self, x: torch.Tensor) -> bool:
        k = self.kernel
        if isinstance(k, OneDNNInt8Linear):
            return k.per_token
        return x.ndim == k.spatial + 1  # an unbatched input

    def _float_out(self, dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32

    def _quantized_input(self, x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        grid = self.kernel.grid
        if self.input_u8:
            assert grid.scale is not None and grid.zero is not None
            return x, grid.scale, grid.zero
        scale, zero = grid.qparams(x)
        channels_last = isinstance(self.kernel, OneDNNInt8Conv)
        return grid.to_u8(x, scale, zero, channels_last), scale, zero

    def _float_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_u8:
            return x
        grid = self.kernel.grid
        assert grid.scale is not None and grid.zero is not None
        return ((x.float() - grid.zero) * grid.scale).to(self.float_dtype)

    def _accumulates(self, q: torch.Tensor, other: torch.Tensor) -> bool:
        """Whether oneDNN can add ``other`` in its epilogue: a 2-d conv output's exact shape."""
        k = self.kernel
        if not isinstance(k, OneDNNInt8Conv) or k.spatial != 2 or other.ndim != 4:
            return False
        if (self.accum_qparams is not None) != (other.dtype == torch.uint8):
            return False
        return tuple(other.shape) == _conv_out_shape(q.shape, k)

    def _finish(self, out: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
        """The add, ReLU and uint8 output done step by step, where oneDNN cannot fuse them."""
        if self.add and other is not None:
            if other.dtype == torch.uint8 and self.accum_qparams is not None:
                accum_scale, accum_zero = self.accum_qparams
                other = (other.float() - accum_zero) * accum_scale
            out = out + other.to(out.dtype)
        if self.relu:
            out = torch.relu(out)
        if self.out_qparams is not None:
            scale, zero = self.out_qparams
            return torch.clamp(torch.round(out.float() / scale) + zero, 0, 255).to(torch.uint8)
        return out


def _conv_out_shape(shape: torch.Size, kernel: OneDNNInt8Conv) -> tuple[int, ...]:
    layer = kernel.layer
    assert isinstance(layer, nn.Conv2d)
    stride, padding, dilation, _ = kernel.geometry
    sizes = [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, p, d, k, s in zip(
            shape[2:], padding, dilation, layer.kernel_size, stride, strict=True
        )
    ]
    return (shape[0], layer.out_channels, *sizes)


def describe(layer: IntLayer) -> str:
    """What fusion gave a layer, e.g. ``"add+relu, uint8 in, uint8 out"``."""
    ops_ = "+".join(w for w, on in (("add", layer.add), ("relu", layer.relu)) if on)
    tags = [ops_] if ops_ else []
    tags += ["uint8 in"] if layer.input_u8 else []
    tags += ["uint8 out"] if layer.out_qparams is not None else []
    return ", ".join(tags)


class _Tracer(fx.Tracer):
    """Treats lowbit's quantized layers as leaves (the default stops at torch.nn modules)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, QModule) or super().is_leaf_module(m, module_qualified_name)


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
    return node.op == "call_method" and node.target in ("add", "add_")


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
    grid = plan.kernel.grid
    if grid.scale is None or grid.zero is None:
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


class QuantizeU8(nn.Module):
    """One quantize pass shared by several int8 layers that read the same float value on the
    same static grid (a ResNet block input read by its first conv and its downsample)."""

    def __init__(self, grid: ActivationGrid) -> None:
        super().__init__()
        self.grid = grid

    def extra_repr(self) -> str:
        return f"uint8 @ {self.grid.scale:.4g}, zero point {self.grid.zero}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.grid.scale is not None and self.grid.zero is not None
        return self.grid.to_u8(x, self.grid.scale, self.grid.zero, channels_last=x.ndim == 4)


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
    """A fused add writes into its residual's buffer: keep it only when nothing reads that
    value afterwards and it is not the caller's own tensor."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node, plan in plans.items():
        other = plan.add_other
        if other is None:
            continue
        later = [u for u in other.users if u is not node and order[u] > order[node]]
        plan.clone_accum = bool(later) or other.op in ("placeholder", "get_attr", "output")


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
