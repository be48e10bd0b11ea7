"""Layers sharing one float weight (tied embeddings and heads) stay tied through convert().

``convert()`` builds a :class:`WeightTies` from the prepared model and hands it to every
layer's :meth:`~lowbit.nn.module.QModule.freeze`: the first layer holding a shared weight
quantizes it; every other one whose weight spec and qparams are the same takes that very
:class:`~lowbit.nn.qtensor.QTensor`, so the converted model (and its file) holds the weight
once. A tie that cannot be kept (different specs, or a holder kept in float) is broken, each
layer keeps its own copy, and a note says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from lowbit.nn.qtensor import QTensor
from lowbit.spec import QuantSpec

if TYPE_CHECKING:
    from lowbit.nn.module import QModule

__all__ = ["WeightTies"]


@dataclass
class _Frozen:
    weight: torch.Tensor  # the float weight, kept alive so its id stays its own
    spec: QuantSpec
    scale: torch.Tensor
    zero_point: torch.Tensor
    qweight: QTensor
    label: str


@dataclass
class WeightTies:
    """Which float weights several modules hold, and the QTensor frozen for each so far.

    >>> from lowbit.api import convert, prepare
    >>> net = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    >>> net[1].weight = net[0].weight
    >>> q = convert(prepare(net, "w8a16"))
    >>> q[0].weight is q[1].weight
    True
    """

    holders: dict[int, list[str]] = field(default_factory=dict)  # id(weight) -> module names
    frozen: dict[int, _Frozen] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, model: nn.Module) -> WeightTies:
        """The shared weights of ``model`` (held by two modules or more), with a note for each
        one that a quantized layer shares with a layer kept in float."""
        from lowbit.nn.module import QModule

        holders: dict[int, list[tuple[str, nn.Module]]] = {}
        for name, module in model.named_modules():
            weight = module._parameters.get("weight")
            if isinstance(weight, torch.Tensor) and not isinstance(weight, QTensor):
                holders.setdefault(id(weight), []).append((name, module))
        ties = cls({key: [n for n, _ in found] for key, found in holders.items() if len(found) > 1})
        for key in ties.holders:
            found = holders[key]
            quantized = [n for n, m in found if isinstance(m, QModule) and m.weight_quantizer]
            kept = [n for n, _ in found if n not in quantized]
            if quantized and kept:
                ties.notes.append(
                    f"{', '.join(quantized)}: weight tied to {', '.join(kept)}, which keeps it "
                    "in float: the tie is broken, the float and the quantized copy are both held "
                    "and stored"
                )
        return ties

    def frozen_for(
        self, layer: QModule, spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor
    ) -> QTensor | None:
        """The QTensor another layer froze from ``layer``'s float weight with the same spec
        and qparams, or None (first holder, not shared, or quantized differently)."""
        found = self.frozen.get(id(layer.weight))
        if found is None or found.weight is not layer.weight:
            return None
        same = (
            found.spec == spec
            and torch.equal(found.scale, scale)
            and torch.equal(found.zero_point, zero_point)
        )
        if not same:
            why = "spec" if found.spec != spec else "ranges (qparams)"
            self.notes.append(
                f"{layer.label}: weight tied to {found.label}'s but quantized with another "
                f"{why}: the tie is broken, each layer holds and stores its own copy"
            )
            return None
        self.notes.append(f"{layer.label}: weight tied to {found.label}'s, held and stored once")
        return found.qweight

    def remember(
        self,
        layer: QModule,
        spec: QuantSpec,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        qweight: QTensor,
    ) -> None:
        """Record the QTensor ``layer`` froze, when its float weight is shared."""
        key = id(layer.weight)
        if key in self.holders and key not in self.frozen:
            self.frozen[key] = _Frozen(
                layer.weight, spec, scale.clone(), zero_point.clone(), qweight, layer.label
            )
