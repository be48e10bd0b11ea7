"""SmoothQuant: move activation outliers into the weights before W8A8 quantization.

A few input channels of a transformer's Linear layers carry values far larger than the rest,
so one per-tensor (or per-token) activation scale wastes its levels on them. SmoothQuant
divides each input channel ``j`` by ``s_j`` and multiplies the weight's column ``j`` by it, the
same function, with ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` from calibration maxima:
``alpha`` moves difficulty from activations (alpha -> 1) to weights (alpha -> 0). The division
is folded into the LayerNorm (or Linear) producing the input (:mod:`lowbit.algorithms.absorb`),
so inference costs nothing extra. ``alpha: auto`` picks, per group, the grid value with the
lowest W8A8 output error on calibration rows. Runs before calibration (stage ``float``), which
then sets activation ranges and weight qparams from the smoothed model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.algorithms.absorb import (
    GroupInputs,
    ScaleGroup,
    find_scale_groups,
    group_inputs,
    input_axis,
    scale_group,
)
from lowbit.algorithms.base import (
    AlgorithmBase,
    LayerLoop,
    add_note,
    register_algorithm,
    require_data,
)
from lowbit.nn import QModule
from lowbit.primitives import choose_qparams, fake_quantize, minmax
from lowbit.spec import QuantSpec

__all__ = ["SmoothQuant", "SmoothQuantConfig", "smooth_scales", "fake_quant", "group_error"]


@dataclass(frozen=True)
class SmoothQuantConfig:
    """SmoothQuant's arguments.

    ``alpha``: migration strength in [0, 1], or ``"auto"`` to search ``grid`` values in
    [0, 1] per group for the lowest W8A8 output error on up to ``max_rows`` calibration rows.

    >>> SmoothQuantConfig(alpha="auto").grid
    11
    """

    alpha: float | str = 0.5
    grid: int = 11
    max_rows: int = 2048
    min_samples: int = 1
    budget_s: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.alpha, str):
            if self.alpha != "auto":
                raise ValueError(f"alpha must be a number in [0, 1] or 'auto', got {self.alpha!r}")
        elif isinstance(self.alpha, bool) or not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(
                f"alpha must be in [0, 1] (0.5 is the usual choice), got {self.alpha!r}"
            )
        if not isinstance(self.grid, int) or self.grid < 2:
            raise ValueError(
                f"grid must be an integer >= 2 (values tried by alpha: auto), got {self.grid!r}"
            )
        if not isinstance(self.max_rows, int) or self.max_rows < 1:
            raise ValueError(f"max_rows must be a positive integer, got {self.max_rows!r}")
        if not isinstance(self.min_samples, int) or self.min_samples < 1:
            raise ValueError(f"min_samples must be a positive integer, got {self.min_samples!r}")
        if self.budget_s is not None and not self.budget_s > 0:
            raise ValueError(
                f"budget_s must be positive seconds or null (no limit), got {self.budget_s!r}"
            )


def smooth_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``, kept finite and positive.

    >>> smooth_scales(torch.tensor([4.0, 1.0]), torch.tensor([1.0, 1.0]), 0.5)
    tensor([2., 1.])
    """
    x = x_absmax.float().clamp(min=1e-5)
    w = w_absmax.float().clamp(min=1e-5)
    return (x.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=1e-5)


def fake_quant(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``x`` rounded on the min/max grid of ``spec`` (its own range, at its granularity).

    >>> fake_quant(torch.tensor([0.0, 0.3, 1.0]), QuantSpec("int4")).tolist()
    [0.0, 0.2857142984867096, 1.0]
    """
    lo, hi = minmax(x, spec.gran)
    scale, zero = choose_qparams(lo, hi, spec.qdtype, spec.symmetric)
    return fake_quantize(x, scale, zero, spec.qdtype, spec.gran)


def _along(s: torch.Tensor, w: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * w.ndim
    shape[axis] = -1
    return s.view(shape)  # (..., in, ...) on the input axis


@torch.no_grad()
def group_error(layers: Sequence[QModule], x: torch.Tensor, s: torch.Tensor) -> float:
    """Relative output error of ``layers`` (sharing input rows ``x``) quantized with their own
    weight and input specs after smoothing by ``s``.

    >>> import lowbit
    >>> m = lowbit.prepare(torch.nn.Sequential(torch.nn.Linear(4, 3)), "w8a8")
    >>> group_error([m[0]], torch.randn(8, 4), torch.ones(4)) < 0.01
    True
    """
    xs = x / s  # (rows, in)
    noise = signal = 0.0
    for layer in layers:
        w = layer.weight.detach().float()
        ref = layer.float_forward(x, w, layer.bias)
        iq, wq = layer.input_quantizer, layer.weight_quantizer
        xq = fake_quant(xs, iq.spec) if iq is not None else xs
        ws = w * _along(s, w, input_axis(layer))
        ws = fake_quant(ws, wq.spec) if wq is not None else ws
        out = layer.float_forward(xq, ws, layer.bias)
        noise += float((out - ref).pow(2).sum())
        signal += float(ref.pow(2).sum())
    return noise / max(signal, 1e-30)


def _weight_absmax(layers: Sequence[QModule]) -> torch.Tensor:
    """Per input channel, the largest ``|W|`` over every layer of a group."""
    cols = []
    for layer in layers:
        w = layer.weight.detach().float().abs()
        cols.append(w.amax(dim=1 - input_axis(layer)))  # (in,)
    return torch.stack(cols).amax(0)


@register_algorithm("smoothquant", SmoothQuantConfig)
class SmoothQuant(AlgorithmBase):
    """Smooth activation outliers into the weights (see the module docstring).

    >>> import lowbit
    >>> net = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
    >>> m = lowbit.prepare(net, "w8a8")
    >>> SmoothQuant(SmoothQuantConfig(alpha=0.5)).apply(m, [torch.randn(16, 8)])
    >>> lowbit.prepared_info(m).notes[-1]
    'smoothquant: smoothed 1 group(s): 0 -> 1 (alpha 0.5)'
    """

    stage = "float"
    config: SmoothQuantConfig

    def apply(self, model: nn.Module, data: Sequence[Any] | None) -> None:
        cfg = self.config
        data = require_data(data, "smoothquant", cfg.min_samples)
        groups, why = find_scale_groups(model, data)
        for name, reason in why.items():
            add_note(model, "smoothquant", f"{name} not smoothed: {reason}")
        if not groups:
            return
        stats = group_inputs(model, groups, data, cfg.max_rows)
        loop = LayerLoop(
            "smoothquant", {g.producer: g for g in groups}, cfg.budget_s, self.progress
        )
        done = []
        for producer, group in loop:
            alpha = self._smooth(model, group, stats[producer])
            loop.loss(alpha)
            done.append(f"{producer} -> {', '.join(group.layers)} (alpha {alpha:g})")
        loop.note_skipped(model)
        add_note(model, "smoothquant", f"smoothed {len(done)} group(s): {'; '.join(done)}")

    def _smooth(self, model: nn.Module, group: ScaleGroup, inputs: GroupInputs) -> float:
        """Choose alpha (given or searched) for one group, apply its scales; the alpha."""
        layers = [model.get_submodule(name) for name in group.layers]
        w_absmax = _weight_absmax(layers)  # type: ignore[arg-type]
        if self.config.alpha == "auto":
            grid = torch.linspace(0.0, 1.0, self.config.grid).tolist()
            errors = [
                group_error(layers, inputs.sample, smooth_scales(inputs.absmax, w_absmax, a))  # type: ignore[arg-type]
                for a in grid
            ]
            alpha = grid[min(range(len(grid)), key=errors.__getitem__)]
        else:
            alpha = float(self.config.alpha)
        scale_group(model, group, smooth_scales(inputs.absmax, w_absmax, alpha))
        return alpha
