"""AWQ: activation-aware weight scaling for weight-only low-bit Linear layers.

Weights that meet large activations matter most. AWQ scales each input channel ``j`` of a
group of Linears (sharing one input) by ``s_j = mean|X_j|^alpha`` (normalised so that
``sqrt(max s * min s) = 1``): the salient columns grow, so rounding costs them relatively less,
and the input is divided by ``s`` in the LayerNorm (or Linear) that produces it
(:mod:`lowbit.algorithms.absorb`), at no runtime cost. ``alpha`` is searched on a grid in
[0, 1) for the lowest output error of the group's layers with their weights quantized by their
own weight spec (int4 per-group, ...) against the float output. ``clip: true`` then searches,
per quantization block, how much to shrink the weight's range (AWQ's auto-clip).

Runs before calibration (stage ``float``): calibration computes the qparams of the scaled
weights, and a ``gptq`` step listed after ``awq`` rounds them.
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
from lowbit.algorithms.smoothquant import fake_quant
from lowbit.nn import QModule
from lowbit.spec import PerChannel, PerGroup

__all__ = ["AWQ", "AWQConfig", "awq_scales", "scaled_error", "clip_weight"]


@dataclass(frozen=True)
class AWQConfig:
    """AWQ's arguments: ``grid`` values of alpha in [0, 1), up to ``max_rows`` calibration rows
    per group, and the optional range clipping (``clip``, ``clip_grid`` ratios down to
    ``min_clip``).

    >>> AWQConfig().grid
    20
    """

    grid: int = 20
    clip: bool = False
    clip_grid: int = 20
    min_clip: float = 0.5
    max_rows: int = 1024
    min_samples: int = 1
    budget_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("grid", "clip_grid", "max_rows", "min_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.clip, bool):
            raise ValueError(f"clip must be true or false, got {self.clip!r}")
        if not 0.0 < self.min_clip <= 1.0:
            raise ValueError(
                f"min_clip must be in (0, 1] (the smallest range ratio tried; 0.5 is usual), "
                f"got {self.min_clip!r}"
            )
        if self.budget_s is not None and not self.budget_s > 0:
            raise ValueError(
                f"budget_s must be positive seconds or null (no limit), got {self.budget_s!r}"
            )


def awq_scales(x_absmean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``mean|X_j|^alpha``, normalised so that ``max * min == 1``.

    >>> awq_scales(torch.tensor([4.0, 1.0]), 1.0)
    tensor([2.0000, 0.5000])
    """
    s = x_absmean.float().clamp(min=1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def _along(s: torch.Tensor, w: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * w.ndim
    shape[axis] = -1
    return s.view(shape)  # (..., in, ...) on the input axis


@torch.no_grad()
def scaled_error(layers: Sequence[QModule], x: torch.Tensor, s: torch.Tensor) -> float:
    """Mean squared output error of ``layers`` (sharing input rows ``x``) when each weight is
    scaled by ``s`` per input channel, quantized with its own spec, and scaled back.

    >>> import lowbit
    >>> m = lowbit.prepare(torch.nn.Sequential(torch.nn.Linear(4, 3)), "w4a16")
    >>> scaled_error([m[0]], torch.randn(8, 4), torch.ones(4)) > 0
    True
    """
    total = 0.0
    for layer in layers:
        wq = layer.weight_quantizer
        assert wq is not None
        w = layer.weight.detach().float()
        along = _along(s, w, input_axis(layer))
        w_hat = fake_quant(w * along, wq.spec) / along
        ref = layer.float_forward(x, w, None)
        total += float((layer.float_forward(x, w_hat, None) - ref).pow(2).mean())
    return total


def _blocks(w: torch.Tensor, layer: QModule) -> tuple[int, int] | None:
    """``(groups, group size)`` along a Linear weight's rows, or None when not clippable."""
    wq = layer.weight_quantizer
    if layer.kind != "linear" or wq is None or w.ndim != 2:
        return None
    gran = wq.spec.gran
    if isinstance(gran, PerGroup) and w.shape[1] <= gran.group_size:
        return 1, w.shape[1]  # one (short) group per row
    if isinstance(gran, PerGroup) and w.shape[1] % gran.group_size == 0:
        return w.shape[1] // gran.group_size, gran.group_size
    if gran == PerChannel(0):
        return 1, w.shape[1]
    return None


@torch.no_grad()
def clip_weight(layer: QModule, x: torch.Tensor, grid: int, min_clip: float) -> bool:
    """Clamp each quantization block of a Linear weight to the fraction of its range (from 1
    down to ``min_clip``) that gives the lowest error of that block's share of the output on
    input rows ``x``; False when the layer's granularity has no row blocks (not clipped).

    >>> import lowbit
    >>> m = lowbit.prepare(torch.nn.Sequential(torch.nn.Linear(8, 3)), "w4a16")
    >>> clip_weight(m[0], torch.randn(16, 8), grid=4, min_clip=0.5)
    True
    """
    w = layer.weight.detach().float()
    shape = _blocks(w, layer)
    if shape is None:
        return False
    groups, size = shape
    wq = layer.weight_quantizer
    assert wq is not None
    wb = w.view(w.shape[0], groups, size)  # (out, groups, g)
    xb = x.float().view(x.shape[0], groups, size)  # (rows, groups, g)
    amax = wb.abs().amax(-1, keepdim=True)  # (out, groups, 1)
    best = torch.full(amax.shape, float("inf"))
    best_max = amax.clone()
    for i in range(grid):
        ratio = 1.0 - (1.0 - min_clip) * i / max(grid - 1, 1)
        limit = amax * ratio
        clipped = torch.maximum(torch.minimum(wb, limit), -limit)
        err = fake_quant(clipped.reshape(w.shape), wq.spec).view_as(wb) - wb  # (out, groups, g)
        out_err = torch.einsum("rgk,ogk->rog", xb, err)  # (rows, out, groups)
        score = out_err.pow(2).mean(0).unsqueeze(-1)  # (out, groups, 1)
        better = score < best
        best = torch.where(better, score, best)
        best_max = torch.where(better, limit, best_max)
    clamped = torch.maximum(torch.minimum(wb, best_max), -best_max)
    layer.weight.copy_(clamped.reshape(w.shape).to(layer.weight.dtype))
    return True


@register_algorithm("awq", AWQConfig)
class AWQ(AlgorithmBase):
    """Activation-aware weight scaling (see the module docstring).

    >>> import lowbit
    >>> net = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
    >>> m = lowbit.prepare(net, "w4a16")
    >>> AWQ(AWQConfig(grid=4)).apply(m, [torch.randn(16, 8)])
    >>> lowbit.prepared_info(m).notes[-1].startswith("awq: scaled 1 group(s): 0 -> 1 (alpha")
    True
    """

    stage = "float"
    config: AWQConfig

    def apply(self, model: nn.Module, data: Sequence[Any] | None) -> None:
        cfg = self.config
        data = require_data(data, "awq", cfg.min_samples)
        groups, why = find_scale_groups(model, data)
        for name, reason in why.items():
            add_note(model, "awq", f"{name} not scaled: {reason}")
        if not groups:
            return
        stats = group_inputs(model, groups, data, cfg.max_rows)
        loop = LayerLoop("awq", {g.producer: g for g in groups}, cfg.budget_s, self.progress)
        done, unclipped = [], []
        for producer, group in loop:
            alpha, gain = self._scale(model, group, stats[producer])
            loop.loss(gain)
            done.append(f"{producer} -> {', '.join(group.layers)} (alpha {alpha:g})")
            if cfg.clip:
                for name in group.layers:
                    layer = model.get_submodule(name)
                    if not clip_weight(layer, stats[producer].sample, cfg.clip_grid, cfg.min_clip):  # type: ignore[arg-type]
                        unclipped.append(name)
        loop.note_skipped(model)
        add_note(model, "awq", f"scaled {len(done)} group(s): {'; '.join(done)}")
        if unclipped:
            add_note(
                model,
                "awq",
                "not clipped (clipping takes Linear layers quantized per_channel or per_group "
                f"with whole groups): {', '.join(unclipped)}",
            )

    def _scale(
        self, model: nn.Module, group: ScaleGroup, inputs: GroupInputs
    ) -> tuple[float, float]:
        """Search alpha for one group and apply its scales; (alpha, error ratio vs alpha 0)."""
        layers: list[QModule] = [model.get_submodule(n) for n in group.layers]  # type: ignore[misc]
        grid = [i / self.config.grid for i in range(self.config.grid)]
        errors = [scaled_error(layers, inputs.sample, awq_scales(inputs.absmean, a)) for a in grid]
        best = min(range(len(grid)), key=errors.__getitem__)
        if grid[best] > 0:
            scale_group(model, group, awq_scales(inputs.absmean, grid[best]))
        return grid[best], errors[best] / max(errors[0], 1e-30)
