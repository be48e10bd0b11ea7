"""Reading what layers see: their inputs (and outputs) over calibration data, with every
hook removed in ``finally``; and the model with its quantizers switched off (the float
reference an algorithm reconstructs).

Shared by GPTQ, AdaRound, bias correction, AWQ, SmoothQuant and sensitivity analysis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.api import run_batch
from lowbit.nn import Quantizer

__all__ = ["Captured", "capture_inputs", "quantizers_disabled", "run_all"]

OnInput = Callable[[str, torch.Tensor, torch.Tensor], None]


@dataclass
class Captured:
    """One layer's inputs (its first positional argument) and outputs, one entry per call."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)

    def input(self) -> torch.Tensor:
        """Every call's input concatenated on the first dimension.

        >>> Captured([torch.zeros(2, 3), torch.ones(1, 3)]).input().shape
        torch.Size([3, 3])
        """
        return torch.cat(self.inputs)

    def output(self) -> torch.Tensor:
        """Every call's output concatenated on the first dimension."""
        return torch.cat(self.outputs)


def run_all(model: nn.Module, data: Iterable[Any]) -> None:
    """Run every batch through ``model`` in eval mode under no_grad, restoring each
    submodule's train/eval mode afterwards.

    >>> run_all(torch.nn.Linear(2, 2), [torch.zeros(1, 2)])
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            for batch in data:
                run_batch(model, batch)
    finally:
        for module, was_training in modes:
            module.training = was_training


@contextmanager
def capture_inputs(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    data: Iterable[Any],
    *,
    outputs: bool = False,
    on_input: OnInput | None = None,
) -> Iterator[dict[str, Captured]]:
    """Run ``data`` through ``model`` and give each of ``layers`` (name -> module) what it was
    called with; the hooks are gone before the body runs, and the tensors are dropped after.

    With ``on_input(name, input, output)`` nothing is kept: each call is handed over as it
    happens (a Hessian accumulates without holding every input). Tensors are detached.

    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> with capture_inputs(net, {"2": net[2]}, [torch.randn(5, 3)], outputs=True) as got:
    ...     got["2"].input().shape, got["2"].output().shape
    (torch.Size([5, 4]), torch.Size([5, 2]))
    >>> len(net[2]._forward_hooks)
    0
    """
    found = {name: Captured() for name in layers}
    handles = []

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0].detach()
            y = output.detach() if isinstance(output, torch.Tensor) else output
            if on_input is not None:
                on_input(name, x, y)
                return
            found[name].inputs.append(x)
            if outputs and isinstance(y, torch.Tensor):
                found[name].outputs.append(y)

        return hook

    try:
        for name, layer in layers.items():
            handles.append(layer.register_forward_hook(hook_for(name)))
        run_all(model, data)
    finally:
        for handle in handles:
            handle.remove()
    try:
        yield found
    finally:
        found.clear()


@contextmanager
def quantizers_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Switch every quantizer of a prepared model off (the float model), back on after.

    >>> import lowbit
    >>> m = lowbit.prepare(torch.nn.Sequential(torch.nn.Linear(2, 2)), "w4a16")
    >>> with quantizers_disabled(m):
    ...     m[0].weight_quantizer.enabled
    False
    >>> m[0].weight_quantizer.enabled
    True
    """
    states = [(q, q.enabled) for q in model.modules() if isinstance(q, Quantizer)]
    try:
        for quantizer, _ in states:
            quantizer.enabled = False
        yield model
    finally:
        for quantizer, enabled in states:
            quantizer.enabled = enabled
