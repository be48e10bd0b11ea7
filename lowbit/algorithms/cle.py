"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization", section 4.1).

For consecutive layers ``y = W2 f(W1 x + b1)`` with ``f`` positively homogeneous per channel
(ReLU, LeakyReLU, identity, pooling), scaling output channel ``c`` of layer 1 by ``1/s_c`` and
input channel ``c`` of layer 2 by ``s_c`` computes the same function. With ``r1_c`` the range
(max |w|) of layer 1's row ``c`` and ``r2_c`` that of layer 2's input channel ``c``,
``s_c = sqrt(r1_c * r2_c) / r2_c`` gives both the same range ``sqrt(r1_c * r2_c)``, so a
per-tensor weight grid no longer wastes its levels on one large channel. Chains (conv1x1 ->
depthwise -> conv1x1) are equalized pair by pair, a few rounds, until the scales settle.

Data-free: it reads weights only (``data`` may be None). It runs on the prepared model before
calibration (batch norms already folded by :func:`lowbit.prepare`), and keeps the recorded
batch-norm statistics (``prepared_info(model).bn_stats``) in step with the rescaled outputs.

ReLU6 is not scale-equivariant (``relu6(y / s) != relu6(y) / s``), so pairs through a ReLU6
are left alone with a note naming them. The DFQ paper replaces ReLU6 by ReLU first; in lowbit
that has to happen in the user's own float model, because :func:`lowbit.load` rebuilds the
saved model from it: call :func:`relu6_to_relu` on the model before quantizing AND on the one
given to ``load``, so both compute the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.algorithms.base import AlgorithmBase, _info, add_note, register_algorithm
from lowbit.algorithms.pairs import Chain, find_chains
from lowbit.nn import QModule

__all__ = ["CLEConfig", "CrossLayerEqualization", "relu6_to_relu", "equalize_pair"]

_HOMOGENEOUS = {"relu", "leaky_relu", "identity", "maxpool", "avgpool", "flatten"}


@dataclass(frozen=True)
class CLEConfig:
    """``iterations``: rounds over all pairs (chains need several); ``tolerance``: stop once
    no scale moves by more than this factor (``|log s| < tolerance``); ``max_scale``: bound
    on one round's ``s_c`` and ``1/s_c`` (a channel of all zeros is never rescaled)."""

    iterations: int = 20
    tolerance: float = 1e-4
    max_scale: float = 1e4

    def __post_init__(self) -> None:
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {self.iterations!r}")
        if not self.tolerance > 0:
            raise ValueError(f"tolerance must be > 0 (e.g. 1e-4), got {self.tolerance!r}")
        if not self.max_scale > 1:
            raise ValueError(f"max_scale must be > 1 (e.g. 1e4), got {self.max_scale!r}")


def input_channel_index(layer: QModule) -> torch.Tensor:
    """For each (out, in/groups) weight column, the input channel it reads: one group of a
    grouped (or depthwise) conv sees its own slice of the input channels.

    >>> conv = torch.nn.Conv2d(4, 4, 3, groups=4)  # depthwise
    >>> from lowbit.nn import QConv2d; from lowbit.spec import QuantSpec
    >>> input_channel_index(QConv2d.from_float(conv, QuantSpec("int8"))).flatten().tolist()
    [0, 1, 2, 3]
    """
    out, per_group = layer.weight.shape[0], layer.weight.shape[1]
    groups = int(getattr(layer, "groups", 1))
    group = torch.arange(out, device=layer.weight.device) // (out // groups)  # (out,)
    column = torch.arange(per_group, device=layer.weight.device)  # (in/groups,)
    return group[:, None] * per_group + column[None, :]  # (out, in/groups)


def _ranges(first: QModule, second: QModule) -> tuple[torch.Tensor, torch.Tensor]:
    """Max |w| of each output channel of ``first`` and each input channel of ``second``."""
    r1 = first.weight.detach().flatten(1).abs().amax(1).float()  # (out,)
    w2 = second.weight.detach().abs().float()
    w2 = w2.flatten(2).amax(2) if w2.ndim > 2 else w2  # (out2, in2/groups)
    index = input_channel_index(second)
    r2 = torch.zeros(r1.shape[0], device=w2.device)
    r2 = r2.scatter_reduce(0, index.flatten(), w2.flatten(), "amax")  # (in2,)
    return r1, r2


@torch.no_grad()
def equalize_pair(first: QModule, second: QModule, max_scale: float = 1e4) -> torch.Tensor:
    """Rescale ``first``'s output channels by ``1/s`` and ``second``'s input channels by
    ``s`` so both have range ``sqrt(r1 * r2)``; returns ``s``. The caller checks that the
    two are consecutive through positively homogeneous ops.

    >>> from lowbit.nn import QLinear; from lowbit.spec import QuantSpec
    >>> a = QLinear.from_float(torch.nn.Linear(2, 2), QuantSpec("int8"))
    >>> b = QLinear.from_float(torch.nn.Linear(2, 2), QuantSpec("int8"))
    >>> with torch.no_grad():
    ...     _ = a.weight.copy_(torch.tensor([[4.0, 0.0], [0.0, 1.0]]))
    ...     _ = b.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    >>> equalize_pair(a, b).tolist(), a.weight.diagonal().tolist()
    ([2.0, 1.0], [2.0, 1.0])
    """
    r1, r2 = _ranges(first, second)
    usable = (r1 > 0) & (r2 > 0)
    s = torch.where(usable, (r1 / r2.clamp_min(1e-30)).sqrt(), torch.ones_like(r1))
    s = s.clamp(1 / max_scale, max_scale)  # (out,)
    w1 = first.weight
    w1.mul_((1 / s).to(w1.dtype).view(-1, *([1] * (w1.ndim - 1))))  # (out, 1, ...)
    if first.bias is not None:
        first.bias.mul_((1 / s).to(first.bias.dtype))
    w2 = second.weight
    per_column = s[input_channel_index(second)]  # (out2, in2/groups)
    w2.mul_(per_column.to(w2.dtype).view(*per_column.shape, *([1] * (w2.ndim - 2))))
    return s


def relu6_to_relu(model: nn.Module) -> list[str]:
    """Replace every ``nn.ReLU6`` of a float model by ``nn.ReLU`` in place (what the DFQ
    paper does before equalizing); returns their names. It changes what the model computes
    where activations exceed 6: apply it to the model you quantize AND to the model you pass
    to :func:`lowbit.load`, and check the float accuracy first.

    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU6())
    >>> relu6_to_relu(net), type(net[1]).__name__
    (['1'], 'ReLU')
    """
    names = [name for name, m in model.named_modules() if type(m) is nn.ReLU6]
    for name in names:
        model.set_submodule(name, nn.ReLU())
    return names


@register_algorithm("cle", CLEConfig)
class CrossLayerEqualization(AlgorithmBase):
    """Cross-layer equalization of consecutive conv/linear pairs (see the module docstring).

    >>> import lowbit
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> m = lowbit.prepare(net, "w8a8-pertensor")
    >>> CrossLayerEqualization().apply(m, None)
    >>> lowbit.prepared_info(m).notes[-1]
    'cle: equalized 1 layer pair(s): 0 -> 2'
    """

    stage = "float"
    config: CLEConfig

    def apply(self, model: nn.Module, data: Sequence[Any] | None) -> None:
        scan = find_chains(model)
        for note in scan.notes:
            add_note(model, "cle", note)
        pairs, skipped = self._pairs(scan.chains.values())
        layers = dict(model.named_modules())
        info = _info(model)
        for _ in range(self.config.iterations):
            moved = 0.0
            for chain in pairs:
                first, second = layers[chain.producer], layers[chain.consumer]
                assert isinstance(first, QModule) and isinstance(second, QModule)
                s = equalize_pair(first, second, self.config.max_scale)
                moved = max(moved, float(s.log().abs().max()))
                if info is not None and chain.producer in info.bn_stats:
                    mean, std = info.bn_stats[chain.producer]
                    info.bn_stats[chain.producer] = (mean / s.to(mean), std / s.to(std))
            if moved < self.config.tolerance:
                break
        shown = ", ".join(f"{c.producer} -> {c.consumer}" for c in pairs)
        add_note(model, "cle", f"equalized {len(pairs)} layer pair(s): {shown or 'none found'}")
        if skipped:
            add_note(model, "cle", "not equalized: " + "; ".join(skipped))

    def _pairs(self, chains: Any) -> tuple[list[Chain], list[str]]:
        """The chains CLE can rescale exactly, and why the others are left out."""
        pairs, skipped = [], []
        for chain in chains:
            if not chain.exclusive:
                continue  # a residual or other use sees the producer's output: not a pair
            if "relu6" in chain.ops:
                skipped.append(
                    f"{chain.producer} -> {chain.consumer} (through ReLU6, which is not "
                    "scale-equivariant; call lowbit.algorithms.cle.relu6_to_relu on the float "
                    "model, and on the one given to lowbit.load, to equalize it)"
                )
            elif set(chain.ops) <= _HOMOGENEOUS:
                pairs.append(chain)
        return pairs, skipped
