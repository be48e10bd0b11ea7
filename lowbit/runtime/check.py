"""Checking a compiled model against lowbit's simulation on example inputs.

The model's output is compared with the simulation's (SQNR). Integer kernels that feed the
simulation's own integers to exact integer arithmetic differ from it only by float rounding
order, but in a model that amplifies small differences (a pretrained transformer whose
activations have large outliers: one rounding that goes the other way moves a whole token)
those can add up to an output difference comparable to quantization itself. So each layer is
also compared on its own inputs, captured from the simulation run: a configuration whose every
layer agrees is faithful, whatever the model does with rounding differences.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from lowbit.nn import QModule

__all__ = ["Inputs", "Reference", "call", "flat", "sqnr", "reference_run", "layer_agreement"]

Inputs = torch.Tensor | tuple[Any, ...] | Mapping[str, Any]


def call(model: nn.Module, inputs: Inputs) -> Any:
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


def flat(output: Any) -> torch.Tensor:
    """Every floating-point tensor of a model output, flattened into one float64 vector."""
    if isinstance(output, Mapping):
        output = list(output.values())
    leaves = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
    floats = [t.detach().double().reshape(-1) for t in leaves if t.is_floating_point()]
    if not floats:
        raise TypeError("the model's output holds no floating-point tensor to compare")
    return torch.cat(floats)


def sqnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    noise = (reference - test).pow(2).sum().item()
    signal = reference.pow(2).sum().item()
    if noise == 0.0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise)).item() if signal else float("-inf")


@dataclass
class Reference:
    """The simulation on example inputs: its output, each layer's output range and the first
    input each layer saw."""

    output: torch.Tensor
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)


def set_all(layers: dict[str, QModule], kernel: str | None, exact_only: bool) -> None:
    """Every layer on ``kernel`` (None: the best), exact kernels only or not."""
    for layer in layers.values():
        layer.set_kernel(kernel, exact_only=exact_only)


def reference_run(model: nn.Module, layers: dict[str, QModule], inputs: Inputs) -> Reference:
    """Run the simulation on ``inputs``, recording what :class:`Reference` holds."""
    found = Reference(torch.empty(0))

    def record(name: str, args: tuple[Any, ...], output: Any) -> None:
        if args and isinstance(args[0], torch.Tensor) and name not in found.inputs:
            found.inputs[name] = args[0].detach()
        if isinstance(output, torch.Tensor) and output.is_floating_point() and output.numel():
            lo, hi = float(output.min()), float(output.max())
            old = found.ranges.get(name, (lo, hi))
            found.ranges[name] = (min(lo, old[0]), max(hi, old[1]))

    set_all(layers, "reference", False)
    hooks = [
        layer.register_forward_hook(lambda m, a, o, name=name: record(name, a, o))
        for name, layer in layers.items()
    ]
    try:
        with torch.no_grad():
            found.output = flat(call(model, inputs))
    finally:
        for hook in hooks:
            hook.remove()
        set_all(layers, None, False)  # back on their best kernels
    return found


def layer_agreement(layers: dict[str, QModule], reference: Reference) -> tuple[float, str]:
    """The worst SQNR of a layer's kernel against the simulated layer on the layer's own
    recorded input, and that layer's name."""
    worst, worst_name = float("inf"), ""
    with torch.no_grad():
        for name, layer in layers.items():
            x = reference.inputs.get(name)
            if x is None or not layer.frozen:
                continue
            kernel = layer.kernel_for(x.dtype, x.device)
            simulated = layer.kernel_for(x.dtype, x.device, grad=True)  # the reference kernel
            db = sqnr(flat(simulated(x)), flat(kernel(x)))
            if db < worst:
                worst, worst_name = db, name
    return worst, worst_name
