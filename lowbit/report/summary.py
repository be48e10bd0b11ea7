"""What quantization did to a model in memory: every weight-bearing layer, quantized or not.

:func:`summary` lists each module that holds weights (its own parameters, or a frozen
:class:`~lowbit.nn.QTensor`), with the bytes it holds and the bytes the same tensors take in the
float checkpoint, so float leftovers (embeddings, layers without a quantized twin, layers a
recipe rule or a parent kept in float) show by size next to the quantized ones, each with the
reason it stayed float. A tensor shared by several layers (tied embeddings and heads) is counted
once, at the first layer that holds it; the others say whom they share it with.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from lowbit.api import prepared_info
from lowbit.export.summary import plain
from lowbit.nn import QModule, QTensor, qmodule_class

__all__ = ["LayerSummary", "ModelSummary", "summary"]


@dataclass(frozen=True)
class LayerSummary:
    """One weight-bearing layer: how it is stored and what that costs against float.

    ``bytes`` is what the layer holds (packed integers, scales, zero points, biases, input
    qparams, float leftovers); ``float_bytes`` is the same tensors in the float checkpoint
    (the dtype the model reads them as). Tensors shared with an earlier layer count zero here.
    """

    name: str
    kind: str
    quantized: bool
    dtype: str
    granularity: str
    params: int
    bytes: int
    float_bytes: int
    note: str = ""


@dataclass(frozen=True)
class ModelSummary:
    """Every weight-bearing layer of a model, and the totals (shared tensors counted once)."""

    layers: list[LayerSummary] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        """Bytes the model's weights take as it is (each shared tensor once)."""
        return sum(layer.bytes for layer in self.layers)

    @property
    def float_bytes(self) -> int:
        """Bytes the same weights take in the float checkpoint (each shared tensor once)."""
        return sum(layer.float_bytes for layer in self.layers)

    @property
    def ratio(self) -> float:
        """How many times smaller than the float checkpoint (``float_bytes / bytes``)."""
        return self.float_bytes / self.bytes if self.bytes else math.inf

    @property
    def quantized_share(self) -> float:
        """Share of parameter elements stored quantized (0..1)."""
        total = sum(layer.params for layer in self.layers)
        done = sum(layer.params for layer in self.layers if layer.quantized)
        return done / total if total else 0.0

    @property
    def kept_float(self) -> dict[str, str]:
        """Layer name -> why it holds float weights, for every layer that does."""
        return {layer.name: layer.note for layer in self.layers if not layer.quantized}

    def table(self) -> Table:
        """A rich Table of the layers and totals (names are escaped: shown as plain text)."""
        table = Table(show_footer=True)
        table.add_column("layer", footer="total")
        table.add_column("kind")
        table.add_column("stored as")
        table.add_column("params", justify="right", footer=f"{self.quantized_share:.1%} quantized")
        table.add_column("bytes", justify="right", footer=_size(self.bytes))
        table.add_column("float bytes", justify="right", footer=_size(self.float_bytes))
        table.add_column("note", footer=f"{self.ratio:.2f}x smaller")
        for layer in self.layers:
            stored = layer.dtype + (f" {layer.granularity}" if layer.granularity else "")
            table.add_row(
                plain(layer.name or "(model)"),
                plain(layer.kind),
                stored,
                f"{layer.params:,}",
                _size(layer.bytes),
                _size(layer.float_bytes),
                plain(layer.note),
            )
        return table

    def __str__(self) -> str:
        console = Console(file=io.StringIO(), width=140, color_system=None, force_terminal=False)
        console.print(self.table())
        out = console.file
        assert isinstance(out, io.StringIO)
        return out.getvalue()


def _size(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):,.2f} MiB"
    return f"{n / 1024:,.1f} KiB"


def _nbytes(t: torch.Tensor) -> int:
    if isinstance(t, QTensor):
        return t.storage_nbytes()
    return t.numel() * t.element_size()


def _float_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.dtype.itemsize  # a QTensor's dtype is the float one it reads as


def _direct_tensors(module: nn.Module) -> list[torch.Tensor]:
    """A module's own parameters, QTensors and persistent buffers (not its children's)."""
    found: list[torch.Tensor] = list(module.parameters(recurse=False))
    found += [
        b
        for n, b in module.named_buffers(recurse=False)
        if isinstance(b, QTensor) or n not in module._non_persistent_buffers_set
    ]
    return found


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The tensors a row accounts for: a QModule's whole subtree (its quantizers' qparams
    included), another module's own tensors."""
    if isinstance(module, QModule):
        return [t for sub in module.modules() for t in _direct_tensors(sub)]
    return _direct_tensors(module)


def _inside_qmodule(name: str, qnames: list[str]) -> bool:
    return any(name.startswith(q + ".") for q in qnames)


def _float_reason(name: str, module: nn.Module, kept: dict[str, str]) -> str:
    if name in kept:
        return kept[name]
    if isinstance(module, QModule):
        return "the recipe quantizes its input only; the weight stays float"
    if qmodule_class(module) is not None:
        return "supported but not quantized (not prepared with lowbit)"
    return f"lowbit has no quantized {type(module).__name__}"


def summary(model: nn.Module) -> ModelSummary:
    """Every weight-bearing layer of ``model``: stored dtype, bytes against float, and for each
    layer kept in float, why. Shared (tied) tensors are counted once.

    >>> import torch, lowbit
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64))
    >>> s = lowbit.summary(lowbit.quantize(net, "w8a16"))
    >>> [(row.name, row.dtype, row.quantized) for row in s.layers]
    [('0', 'int8', True), ('1', 'float32', False)]
    >>> s.layers[1].note
    'lowbit has no quantized LayerNorm'
    >>> round(s.ratio, 1) > 1.5
    True
    """
    try:
        kept = prepared_info(model).kept_float
    except ValueError:
        kept = {}
    seen: dict[int, str] = {}  # id(tensor) -> the layer that counted it
    qnames: list[str] = []
    layers: list[LayerSummary] = []
    for name, module in model.named_modules():
        if _inside_qmodule(name, qnames):
            continue
        if isinstance(module, QModule):
            qnames.append(name)
        tensors = _own_tensors(module)
        if not tensors:
            continue
        held = stored = floats = 0
        shared_with: list[str] = []
        for t in tensors:
            owner = seen.get(id(t))
            if owner is not None:
                shared_with.append(owner or "(model)")
                continue
            seen[id(t)] = name
            stored += _nbytes(t)
            floats += _float_nbytes(t)
            held += t.numel() if t.is_floating_point() or isinstance(t, QTensor) else 0
        weight = getattr(module, "weight", None)
        quantized = isinstance(weight, QTensor) and weight.qdtype is not None
        if quantized:
            assert isinstance(weight, QTensor) and weight.qdtype is not None
            dtype = str(weight.qdtype)
            gran = str(weight.spec.to_dict()["granularity"]) if weight.spec else ""
            note = ""
        elif isinstance(module, QModule) and not module.frozen and module.weight_quantizer:
            spec = module.weight_quantizer.spec
            dtype, gran = f"{spec.qdtype} (planned)", str(spec.to_dict()["granularity"])
            note = "prepared, not converted"
            quantized = False
        else:
            float_dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors}
            dtype, gran = "/".join(sorted(float_dtypes)), ""
            note = _float_reason(name, module, kept)
        if shared_with:
            tie = "shares its weight with " + ", ".join(dict.fromkeys(shared_with))
            note = f"{note}; {tie}" if note else tie
        layers.append(
            LayerSummary(
                name=name,
                kind=type(module).__name__,
                quantized=quantized,
                dtype=dtype,
                granularity=gran,
                params=held,
                bytes=stored,
                float_bytes=floats,
                note=note,
            )
        )
    return ModelSummary(layers)
