"""AdaRound (Nagel et al., 2020) and block-wise reconstruction (BRECQ, Li et al., 2021): learn,
per weight, whether it rounds up or down, so that a layer's (or a residual block's) output on
calibration data stays close to the float model's.

Each weight ``w`` on its calibrated grid (scale ``s``, zero point ``z``) becomes
``s * (clamp(floor(w / s) + h(V) + z, qmin, qmax) - z)`` with ``h`` the rectified sigmoid
``clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``, ``V`` starting where ``h`` equals the
fractional part (so training starts from the float weight). The loss is the output's squared
error plus ``reg * sum(1 - |2h - 1| ** beta)``, with ``beta`` annealed from 20 to 2 after a
warm-up without the regularizer, which pushes every ``h`` to 0 or 1; at the end ``h >= 0.5``
rounds up. The scale stays the calibrated one.

Units run one after another in module order. A unit's input is what it receives in the
quantized model with every earlier unit already rounded (its own input quantizer applied
inside), and its target is the float model's output of that unit on the float model's input.
Layer-wise (``adaround``) every Linear/Conv is a unit; block-wise (``brecq``) a block is: the
deepest non-container module (not the model itself) that holds two or more weight layers, such
as a ResNet basic block, an inverted residual or an attention module; weight layers in no block
are units of their own. Memory stays one unit's inputs and targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from lowbit.algorithms.base import (
    AlgorithmBase,
    LayerLoop,
    add_note,
    register_algorithm,
    require_data,
    set_rounded_weight,
    weight_layers,
)
from lowbit.algorithms.capture import capture_inputs, quantizers_disabled
from lowbit.nn import QModule
from lowbit.primitives import dequantize

__all__ = ["AdaRoundConfig", "AdaRound", "BRECQConfig", "BRECQ", "Rounding", "find_blocks"]

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (the paper's values)
KINDS = ("linear", "conv1d", "conv2d", "conv3d", "hf_conv1d")


@dataclass(frozen=True)
class AdaRoundConfig:
    """AdaRound's arguments (``args:`` of a recipe naming ``algorithm: adaround``).

    ``iters`` optimisation steps per unit on batches of ``batch_size`` samples, Adam at
    ``lr``; ``reg``: weight of the rounding regularizer; ``beta``: its exponent annealed from
    the first value to the second after ``warmup`` (a fraction of ``iters``) steps without
    it; ``drop``: probability of feeding a unit the float model's input instead of the
    quantized one, per element (QDrop; 0 off); ``max_samples``: calibration samples kept per
    unit; ``min_samples``: fewer is an error; ``budget_s``: time budget in seconds (units
    left keep round-to-nearest, with a note); ``seed``: the sampling generator's seed.

    >>> AdaRoundConfig(iters=200).beta
    (20.0, 2.0)
    >>> AdaRoundConfig(reg=-1)
    Traceback (most recent call last):
    ...
    ValueError: reg must be >= 0 (e.g. 0.01), got -1
    """

    iters: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    reg: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    drop: float = 0.0
    max_samples: int = 1024
    min_samples: int = 32
    budget_s: float | None = None
    seed: int = 0
    blocks: bool = False

    def __post_init__(self) -> None:
        beta = tuple(float(b) for b in self.beta)
        object.__setattr__(self, "beta", beta)
        checks = [
            (self.iters >= 1, f"iters must be >= 1 (e.g. 1000), got {self.iters}"),
            (self.batch_size >= 1, f"batch_size must be >= 1 (e.g. 32), got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0 (e.g. 0.001), got {self.lr}"),
            (self.reg >= 0, f"reg must be >= 0 (e.g. 0.01), got {self.reg}"),
            (
                len(beta) == 2 and beta[0] >= beta[1] > 0,
                f"beta must be [start, end] with start >= end > 0 (e.g. [20, 2]), got {self.beta}",
            ),
            (0 <= self.warmup < 1, f"warmup must be in [0, 1) (e.g. 0.2), got {self.warmup}"),
            (0 <= self.drop < 1, f"drop must be in [0, 1) (e.g. 0.5), got {self.drop}"),
            (self.max_samples >= 1, f"max_samples must be >= 1, got {self.max_samples}"),
            (self.min_samples >= 1, f"min_samples must be >= 1, got {self.min_samples}"),
            (
                self.budget_s is None or self.budget_s > 0,
                f"budget_s must be a positive number of seconds or null, got {self.budget_s}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class BRECQConfig(AdaRoundConfig):
    """AdaRound's arguments with block-wise reconstruction on (``algorithm: brecq``).

    >>> BRECQConfig().blocks
    True
    """

    blocks: bool = True


def _expanded(layer: QModule) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's calibrated scale and zero point, one value per weight element."""
    wq = layer.weight_quantizer
    assert wq is not None and wq.scale is not None and wq.zero_point is not None
    ones = torch.ones(layer.weight.shape, dtype=torch.int32)
    gran = wq.spec.gran
    scale = dequantize(ones, wq.scale, torch.zeros_like(wq.zero_point), gran)
    zero = dequantize(ones, wq.zero_point.float(), torch.zeros_like(wq.zero_point), gran)
    return scale.reshape(layer.weight.shape), zero.reshape(layer.weight.shape)


class Rounding(nn.Module):
    """One layer's learnable rounding: ``V`` and the fixed grid around the float weight.

    >>> import lowbit
    >>> m = lowbit.prepare(torch.nn.Sequential(torch.nn.Linear(4, 3)), "w4a16")
    >>> m[0].update_weight_qparams()
    >>> r = Rounding(m[0])
    >>> from lowbit.algorithms.base import rtn_integers
    >>> torch.equal(r.integers(), rtn_integers(m[0]))   # it starts at round-to-nearest
    True
    """

    scale: torch.Tensor
    zero: torch.Tensor
    floor: torch.Tensor

    def __init__(self, layer: QModule) -> None:
        super().__init__()
        wq = layer.weight_quantizer
        assert wq is not None
        self.qmin, self.qmax = float(wq.spec.qdtype.qmin), float(wq.spec.qdtype.qmax)
        scale, zero = _expanded(layer)
        w = layer.weight.detach().float() / scale
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("floor", torch.floor(w))
        frac = (w - torch.floor(w)).clamp(0.01, 0.99)  # away from h's flat ends
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1))

    def h(self) -> torch.Tensor:
        """The rectified sigmoid: how far each weight rounds up, in [0, 1]."""
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def soft_weight(self) -> torch.Tensor:
        """The weight with the current soft rounding."""
        q = torch.clamp(self.floor + self.h() + self.zero, self.qmin, self.qmax)
        return self.scale * (q - self.zero)

    def regularizer(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2h - 1| ** beta)``: zero once every ``h`` is 0 or 1."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def integers(self) -> torch.Tensor:
        """The hard rounding: up where ``h >= 0.5``, as int32 grid values."""
        up = (self.h() >= 0.5).float()
        return torch.clamp(self.floor + up + self.zero, self.qmin, self.qmax).to(torch.int32)


def _is_container(module: nn.Module) -> bool:
    return isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


def find_blocks(model: nn.Module, layers: dict[str, QModule]) -> dict[str, nn.Module]:
    """Name -> block: the deepest modules (not containers, not ``model``) holding two or
    more of ``layers``; a layer in no block is its own unit. Units come in module order.

    >>> import lowbit
    >>> from lowbit.data import SmallResNet
    >>> m = lowbit.prepare(SmallResNet(widths=(4, 8), blocks=(1, 1)), "w4a8")
    >>> list(find_blocks(m, weight_layers(m)))
    ['conv1', 'stages.0.0', 'stages.1.0', 'fc']
    """
    counts: dict[str, int] = {}
    for name in layers:
        parts = name.split(".")
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i])
            counts[prefix] = counts.get(prefix, 0) + 1
    modules = dict(model.named_modules())
    candidates = [p for p, n in counts.items() if n >= 2 and not _is_container(modules[p])]
    deepest = [p for p in candidates if not any(o.startswith(p + ".") for o in candidates)]
    units: dict[str, nn.Module] = {}
    for name, layer in layers.items():
        owner = next((p for p in deepest if name.startswith(p + ".")), None)
        if owner is None:
            units[name] = layer
        elif owner not in units:
            units[owner] = modules[owner]
    return units


def _sample(tensors: list[torch.Tensor], limit: int) -> torch.Tensor:
    x = torch.cat(tensors)
    return x[:limit]


class _Unit:
    """One unit's roundings, its layers' weight names and the call that runs it."""

    def __init__(self, unit: nn.Module, layers: dict[str, QModule]) -> None:
        self.unit = unit
        own = {id(m): n for n, m in unit.named_modules()}
        self.names = {own[id(layer)]: layer for layer in layers.values() if id(layer) in own}
        self.roundings = {rel: Rounding(layer) for rel, layer in self.names.items()}
        convs = any(layer.kind.startswith("conv") for layer in self.names.values())
        self.channel_dim = 1 if convs else -1  # the squared error sums over channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = {
            (f"{rel}.weight" if rel else "weight"): r.soft_weight()
            for rel, r in self.roundings.items()
        }
        return functional_call(self.unit, weights, (x,), strict=False)

    def parameters(self) -> list[nn.Parameter]:
        return [r.v for r in self.roundings.values()]

    def regularizer(self, beta: float) -> torch.Tensor:
        return sum((r.regularizer(beta) for r in self.roundings.values()), torch.zeros(()))

    def commit(self) -> None:
        for rel, layer in self.names.items():
            set_rounded_weight(layer, self.roundings[rel].integers())


def _weights_off(layers: dict[str, QModule]) -> list[tuple[Any, bool]]:
    states = []
    for layer in layers.values():
        wq = layer.weight_quantizer
        assert wq is not None
        states.append((wq, wq.enabled))
        wq.enabled = False
    return states


def _reconstruct(
    unit: _Unit, x_q: torch.Tensor, x_fp: torch.Tensor, target: torch.Tensor, cfg: AdaRoundConfig
) -> float:
    """Learn the unit's roundings; returns the final reconstruction loss."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(unit.parameters(), lr=cfg.lr)
    start = int(cfg.warmup * cfg.iters)
    rec = torch.zeros(())
    for step in range(cfg.iters):
        idx = torch.randint(0, len(x_q), (min(cfg.batch_size, len(x_q)),), generator=gen)
        x = x_q[idx]
        if cfg.drop > 0:
            keep = torch.rand(x.shape, generator=gen) >= cfg.drop
            x = torch.where(keep, x, x_fp[idx])
        out = unit.forward(x)
        rec = (out - target[idx]).pow(2).sum(unit.channel_dim).mean()
        loss = rec
        if step >= start:
            progress = (step - start) / max(cfg.iters - start, 1)
            b0, b1 = cfg.beta
            beta = b0 + (b1 - b0) * progress  # linear decay, as in the paper's code
            loss = rec + cfg.reg * unit.regularizer(beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(rec.detach())


@register_algorithm("adaround", AdaRoundConfig)
class AdaRound(AlgorithmBase):
    """AdaRound over every Linear/Conv of a prepared, calibrated model (layer by layer, or
    block by block with ``blocks: true``).

    >>> import lowbit
    >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> recipe = lowbit.load_recipe("w4a8-adaround").to_dict()
    >>> recipe["args"] = {"iters": 20}
    >>> q = lowbit.quantize(net, lowbit.Recipe.from_dict(recipe), data=[torch.randn(64, 8)])
    >>> q(torch.randn(3, 8)).shape
    torch.Size([3, 2])
    """

    stage = "quantized"
    config: AdaRoundConfig

    def apply(self, model: nn.Module, data: Sequence[Any] | None) -> None:
        """Learn the roundings unit by unit, in module order."""
        batches = require_data(data, self.name, self.config.min_samples)
        layers: dict[str, QModule] = {}
        skipped: list[str] = []
        for name, layer in weight_layers(model).items():
            if layer.kind in KINDS:
                layers[name] = layer
            else:
                skipped.append(f"{name} ({layer.kind})")
        if skipped:
            add_note(
                model,
                self.name,
                f"{len(skipped)} layer(s) keep round-to-nearest, of kinds it does not "
                f"handle: {', '.join(skipped)}",
            )
        units = find_blocks(model, layers) if self.config.blocks else dict(layers)
        loop = LayerLoop(self.name, units, self.config.budget_s, self.progress)
        for name, module in loop:
            self._unit(model, name, module, layers, batches, loop)
        loop.note_skipped(model)

    def _unit(
        self,
        model: nn.Module,
        name: str,
        module: nn.Module,
        layers: dict[str, QModule],
        data: Sequence[Any],
        loop: LayerLoop,
    ) -> None:
        limit = self.config.max_samples
        with (
            quantizers_disabled(model),
            capture_inputs(model, {name: module}, data, outputs=True) as got,
        ):
            if not got[name].inputs:
                add_note(model, self.name, f"{name}: no calibration input reached it; RTN")
                return
            x_fp, target = _sample(got[name].inputs, limit), _sample(got[name].outputs, limit)
        with capture_inputs(model, {name: module}, data) as got:
            x_q = _sample(got[name].inputs, limit)
        if x_q.shape != x_fp.shape or target.shape[0] != x_fp.shape[0]:
            add_note(model, self.name, f"{name}: called with inputs of several shapes; RTN")
            return
        unit = _Unit(module, layers)
        states = _weights_off(unit.names)
        try:
            loss = _reconstruct(unit, x_q, x_fp, target, self.config)
        finally:
            for wq, enabled in states:
                wq.enabled = enabled
        unit.commit()
        loop.loss(loss)


@register_algorithm("brecq", BRECQConfig)
class BRECQ(AdaRound):
    """AdaRound with block-wise reconstruction: a residual block's output is the target.

    >>> BRECQ().config.blocks
    True
    """
