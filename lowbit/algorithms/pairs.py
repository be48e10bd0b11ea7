"""Which quantized layer feeds which: consecutive (producer, consumer) layer pairs of a
prepared model, and the channel-wise operations between them.

Cross-layer equalization rescales a producer's output channels and its consumer's input
channels together, which is exact only when everything between them keeps channel ``c`` in
channel ``c`` and commutes with a positive per-channel scale (ReLU, LeakyReLU, identity,
dropout in eval, max/average pooling, a flatten or spatial mean that leaves one value per
channel). Analytical bias correction needs the same chain to know what a layer's input is
made of. Both read it from here.

The prepared model is traced with ``torch.fx`` (quantized layers as leaves; the model is not
changed). When the whole model does not trace, each of its children is tried in turn, down to
the closest ancestors that do trace (as :mod:`lowbit.fuse` does for batch norms): a layer whose
output leaves a traced part feeds that part's output node, which counts as another user, so
a pair is never found across a boundary it cannot see.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from lowbit.nn import QModule

__all__ = ["Chain", "PairScan", "find_chains"]

_CONV_KINDS = ("conv1d", "conv2d", "conv3d")
_KINDS = ("linear", *_CONV_KINDS)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_MAXPOOLS = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_AVGPOOLS = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
_F = nn.functional
_FUNCTIONS: dict[Any, str] = {
    _F.relu: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    _F.relu6: "relu6",
    _F.leaky_relu: "leaky_relu",
    torch.flatten: "flatten",
    torch.mean: "mean",
    _F.max_pool1d: "maxpool",
    _F.max_pool2d: "maxpool",
    _F.max_pool3d: "maxpool",
    _F.adaptive_max_pool1d: "maxpool",
    _F.adaptive_max_pool2d: "maxpool",
    _F.adaptive_max_pool3d: "maxpool",
    _F.avg_pool1d: "avgpool",
    _F.avg_pool2d: "avgpool",
    _F.avg_pool3d: "avgpool",
    _F.adaptive_avg_pool1d: "avgpool",
    _F.adaptive_avg_pool2d: "avgpool",
    _F.adaptive_avg_pool3d: "avgpool",
}
_METHODS = {"relu": "relu", "relu_": "relu", "flatten": "flatten", "mean": "mean"}


@dataclass(frozen=True)
class Chain:
    """``producer -> ops -> consumer``: the consumer's input is the producer's output through
    the channel-wise ``ops`` (``"relu"``, ``"relu6"``, ``"leaky_relu"``, ``"identity"``,
    ``"maxpool"``, ``"avgpool"``, ``"flatten"``); ``slope`` is a LeakyReLU's negative slope.
    ``exclusive``: the producer's output reaches nothing but this consumer.

    >>> Chain("conv1", "conv2", ("relu",), exclusive=True).through
    'relu'
    """

    producer: str
    consumer: str
    ops: tuple[str, ...]
    exclusive: bool
    slope: float = 0.0

    @property
    def through(self) -> str:
        """The ops as one readable string (``"identity"`` when there are none)."""
        return " -> ".join(self.ops) or "identity"


@dataclass
class PairScan:
    """What :func:`find_chains` found: consumer name -> its chain, and notes on tracing."""

    chains: dict[str, Chain] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class _Tracer(fx.Tracer):
    """Keeps every quantized layer a ``call_module`` leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, QModule):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _has_layers(module: nn.Module) -> bool:
    return any(isinstance(m, QModule) for m in module.modules())


def _graphs(module: nn.Module, prefix: str, notes: list[str]) -> Iterator[tuple[str, fx.Graph]]:
    """(prefix, graph) of ``module`` when it traces, else of its closest children that do."""
    try:
        graph = _Tracer().trace(module)
    except Exception as exc:  # noqa: BLE001  # any tracing failure: try the children
        if not prefix:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            notes.append(
                f"torch.fx could not trace {type(module).__name__} ({reason[:200]}); layer "
                "pairs were searched inside its largest submodules that trace"
            )
        for name, child in module.named_children():
            if not isinstance(child, QModule) and _has_layers(child):
                yield from _graphs(child, f"{prefix}{name}.", notes)
        return
    yield prefix, graph


def _module_op(module: nn.Module) -> tuple[str, float] | None:
    """The op a module applies channel-wise, or None."""
    if isinstance(module, nn.ReLU6):
        return "relu6", 0.0
    if isinstance(module, nn.ReLU):
        return "relu", 0.0
    if isinstance(module, nn.LeakyReLU):
        return "leaky_relu", float(module.negative_slope)
    if isinstance(module, (nn.Identity, *_DROPOUTS)):
        return "identity", 0.0  # dropout: the model runs in eval mode
    if isinstance(module, _MAXPOOLS):
        return "maxpool", 0.0
    if isinstance(module, _AVGPOOLS):
        return "avgpool", 0.0
    if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
        return "flatten", 0.0
    return None


def _call_op(node: fx.Node) -> tuple[str, float] | None:
    """The op of a call_function / call_method node acting on its first argument, or None."""
    if node.op == "call_function":
        name = _FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        name = _METHODS.get(str(node.target))
    else:
        return None
    if name is None or any(isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values())):
        return None
    rest, kwargs = node.args[1:], node.kwargs
    if name == "flatten":
        start = rest[0] if rest else kwargs.get("start_dim", 0)
        end = rest[1] if len(rest) > 1 else kwargs.get("end_dim", -1)
        return ("flatten", 0.0) if (start, end) == (1, -1) else None
    if name == "mean":
        dims: Any = rest[0] if rest else kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else dims
        keep = rest[1] if len(rest) > 1 else kwargs.get("keepdim", False)
        ok = isinstance(dims, tuple | list) and all(
            isinstance(d, int) and (d >= 2 or d < 0) for d in dims
        )
        return (f"mean{len(dims)}" if not keep else "avgpool", 0.0) if ok else None
    if name == "leaky_relu":
        slope: Any = rest[0] if rest else kwargs.get("negative_slope", 0.01)
        return "leaky_relu", float(slope)
    return name, 0.0


def _op_of(root: nn.Module, node: fx.Node) -> tuple[str, float] | None:
    if node.op == "call_module":
        module = root.get_submodule(str(node.target))
        return None if isinstance(module, QModule) else _module_op(module)
    return _call_op(node)


def _fits(producer: QModule, consumer: QModule, ops: list[str]) -> bool:
    """Whether channel c of the producer's output is channel c of the consumer's input."""
    out = producer.weight.shape[0]
    if producer.kind == "linear":  # channels last: elementwise ops only
        return consumer.kind == "linear" and all(
            op in ("relu", "relu6", "leaky_relu", "identity") for op in ops
        )
    spatial = producer.weight.ndim - 2
    reduced = "flatten" in ops or any(op == f"mean{spatial}" for op in ops)
    if any(op.startswith("mean") and op != f"mean{spatial}" for op in ops):
        return False  # a mean over some spatial dims only
    if consumer.kind == "linear":
        return reduced and consumer.weight.shape[1] == out
    if reduced or consumer.kind != producer.kind:
        return False
    return int(getattr(consumer, "in_channels", -1)) == out


def _chain_to(root: nn.Module, prefix: str, node: fx.Node, calls: Counter[str]) -> Chain | None:
    """The chain ending at quantized-layer ``node``, or None when its input is not one."""
    consumer = root.get_submodule(str(node.target))
    if not isinstance(consumer, QModule) or len(node.args) != 1 or node.kwargs:
        return None
    src = node.args[0]
    ops: list[str] = []
    slope, exclusive = 0.0, True
    while isinstance(src, fx.Node):
        exclusive = exclusive and len(src.users) == 1
        if src.op == "call_module" and isinstance(root.get_submodule(str(src.target)), QModule):
            break
        found = _op_of(root, src)
        if found is None or not src.args or not isinstance(src.args[0], fx.Node):
            return None
        ops.insert(0, found[0])
        slope = found[1] if found[0] == "leaky_relu" else slope
        src = src.args[0]
    if not isinstance(src, fx.Node) or src.op != "call_module":
        return None
    producer = root.get_submodule(str(src.target))
    assert isinstance(producer, QModule)
    if calls[str(src.target)] != 1 or calls[str(node.target)] != 1:
        return None
    if producer.kind not in _KINDS or consumer.kind not in _KINDS:
        return None
    if not _fits(producer, consumer, ops):
        return None
    names = (f"{prefix}{src.target}", f"{prefix}{node.target}")
    ops = ["avgpool" if op.startswith("mean") else op for op in ops]  # a spatial mean
    return Chain(names[0], names[1], tuple(ops), exclusive, slope)


def _shared(model: nn.Module) -> set[str]:
    """Names of quantized layers whose module or weight is reachable under several names."""
    counts = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    counts.update(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {
        name
        for name, m in model.named_modules()
        if isinstance(m, QModule) and (counts[id(m)] > 1 or counts[id(m.weight)] > 1)
    }


def find_chains(model: nn.Module) -> PairScan:
    """Every quantized linear/conv layer whose input is another one's output through
    channel-wise ops, keyed by the consumer's name. Layers called more than once, shared
    layers and tied weights are left out.

    >>> import lowbit
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    >>> scan = find_chains(lowbit.prepare(net, "w8a16"))
    >>> scan.chains["2"]
    Chain(producer='0', consumer='2', ops=('relu',), exclusive=True, slope=0.0)
    """
    scan = PairScan()
    shared = _shared(model)
    for prefix, graph in _graphs(model, "", scan.notes):
        root = model.get_submodule(prefix[:-1]) if prefix else model
        calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            chain = _chain_to(root, prefix, node, calls)
            if chain is not None and not {chain.producer, chain.consumer} & shared:
                scan.chains[chain.consumer] = chain
    return scan
