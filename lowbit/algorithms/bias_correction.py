"""Bias correction (Nagel et al. 2019, "Data-Free Quantization", section 4.2).

Rounding weights shifts a layer's expected output: ``E[W~ x] != E[W x]``. Adding the shift
back to the bias removes the mean error that the rest of the network would otherwise amplify
(per-tensor low-bit weights suffer most). Two ways to know it:

* empirical (calibration data given): per output channel, ``E[y_float] - E[y_quant]`` over the
  data, where ``y_float = W x`` runs the model with every quantizer off and ``y_quant = W~ x~``
  runs the quantized model, whose earlier layers are already corrected (layers are corrected
  one at a time in module order, so each correction sees the ones before it). ``y_quant``
  includes the layer's own input quantization, so the shift it removes is the whole mean
  error at that layer's output, not only the weight's part.
* analytical (no data): ``(W - W~) E[x]``, with ``E[x]`` per input channel from the batch
  norm that :func:`lowbit.prepare` folded into the layer producing that input
  (``prepared_info(model).bn_stats``: a normal pre-activation with mean beta and std
  |gamma|), through the activation between the two layers (a ReLU gives the clipped-normal
  mean ``mu Phi(mu/sigma) + sigma phi(mu/sigma)``). Layers whose input does not come from
  such a layer (the first layer, after a residual add, a max pool) are named in a note.

``mode: auto`` takes empirical when data is given, analytical otherwise. A layer without a
bias is not corrected (a note names it): :func:`lowbit.load` rebuilds the model from the
user's float model, which has no bias there, so the saved file could not be loaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.algorithms.base import (
    AlgorithmBase,
    AlgorithmError,
    LayerLoop,
    _info,
    add_note,
    register_algorithm,
    require_data,
    weight_layers,
)
from lowbit.algorithms.capture import capture_inputs, quantizers_disabled
from lowbit.algorithms.cle import input_channel_index
from lowbit.algorithms.pairs import Chain, find_chains
from lowbit.nn import QModule

__all__ = ["BiasCorrectionConfig", "BiasCorrection", "expected_input", "channel_means"]

_KINDS = ("linear", "conv1d", "conv2d", "conv3d")
_MODES = ("auto", "empirical", "analytical")
_NONLINEAR = ("relu", "relu6", "leaky_relu")


@dataclass(frozen=True)
class BiasCorrectionConfig:
    """``mode``: ``auto`` (empirical with data, analytical without), ``empirical`` or
    ``analytical``; ``min_samples``: calibration samples empirical mode needs;
    ``budget_s``: time budget of empirical mode (layers past it stay uncorrected)."""

    mode: str = "auto"
    min_samples: int = 8
    budget_s: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {list(_MODES)}, got {self.mode!r}")
        if not isinstance(self.min_samples, int) or self.min_samples < 1:
            raise ValueError(f"min_samples must be an integer >= 1, got {self.min_samples!r}")
        if self.budget_s is not None and not self.budget_s > 0:
            raise ValueError(f"budget_s must be > 0 seconds or null, got {self.budget_s!r}")


def channel_means(layer: QModule, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per output channel, the sum of ``y`` (float64) and the number of values summed.

    >>> from lowbit.nn import QConv2d; from lowbit.spec import QuantSpec
    >>> conv = QConv2d.from_float(torch.nn.Conv2d(1, 2, 1), QuantSpec("int8"))
    >>> total, n = channel_means(conv, torch.ones(3, 2, 4, 4)); total.tolist(), n
    ([48.0, 48.0], 48)
    """
    channels = layer.weight.shape[0]
    if layer.kind == "linear":
        flat = y.reshape(-1, channels)  # (tokens, out)
    else:
        flat = y.transpose(0, 1).reshape(channels, -1).T  # (N*spatial, out)
    return flat.double().sum(0), int(flat.shape[0])


def _relu_mean(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[max(x, 0)] for x ~ N(mu, sigma^2), per channel (sigma 0: max(mu, 0))."""
    safe = sigma.clamp_min(1e-12)
    z = mu / safe
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return torch.where(sigma > 0, mu * cdf + safe * pdf, mu.clamp_min(0))


def expected_input(chain: Chain, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor | None:
    """E[input channel] of ``chain``'s consumer when the producer's pre-activation output is
    N(mean, std^2) per channel; None when the ops do not allow it (a max pool, two
    non-linearities).

    >>> chain = Chain("a", "b", ("relu",), exclusive=True)
    >>> expected_input(chain, torch.tensor([0.0]), torch.tensor([1.0]))  # 1/sqrt(2 pi)
    tensor([0.3989])
    """
    nonlinear = [op for op in chain.ops if op in _NONLINEAR]
    if "maxpool" in chain.ops or len(nonlinear) > 1:
        return None
    mu, sigma = mean.double(), std.double()
    if not nonlinear:
        return mu.float()
    if nonlinear[0] == "relu":
        out = _relu_mean(mu, sigma)
    elif nonlinear[0] == "relu6":  # clip(x, 0, 6) = relu(x) - relu(x - 6)
        out = _relu_mean(mu, sigma) - _relu_mean(mu - 6, sigma)
    else:  # leaky(x) = relu(x) - a relu(-x) = (1 - a) relu(x) + a x
        out = (1 - chain.slope) * _relu_mean(mu, sigma) + chain.slope * mu
    return out.float()


@torch.no_grad()
def _add_to_bias(layer: QModule, shift: torch.Tensor) -> None:
    assert layer.bias is not None
    layer.bias.add_(shift.to(layer.bias))


@register_algorithm("bias_correction", BiasCorrectionConfig)
class BiasCorrection(AlgorithmBase):
    """Bias correction, empirical or analytical (see the module docstring).

    >>> import lowbit
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> q = lowbit.quantize(net, "w4a8", data=[torch.randn(16, 8)])  # no correction
    >>> m = lowbit.prepare(net, "w4a8"); m = lowbit.calibrate(m, [torch.randn(16, 8)])
    >>> BiasCorrection().apply(m, [torch.randn(16, 8)])
    >>> lowbit.prepared_info(m).notes[-1]
    'bias_correction: empirical correction of 2 layer(s)'
    """

    stage = "quantized"
    config: BiasCorrectionConfig

    def apply(self, model: nn.Module, data: Sequence[Any] | None) -> None:
        mode = self.config.mode
        if mode == "auto":
            mode = "empirical" if data else "analytical"
        layers = {n: m for n, m in weight_layers(model, _KINDS).items()}
        no_bias = [name for name, layer in layers.items() if layer.bias is None]
        if no_bias:
            add_note(
                model,
                "bias_correction",
                f"not corrected, no bias (give the layer bias=True to correct it): "
                f"{', '.join(no_bias)}",
            )
        layers = {n: m for n, m in layers.items() if m.bias is not None}
        if mode == "empirical":
            self._empirical(
                model, layers, require_data(data, "bias_correction", self.config.min_samples)
            )
        else:
            self._analytical(model, layers)

    def _empirical(self, model: nn.Module, layers: dict[str, QModule], data: Sequence[Any]) -> None:
        sums: dict[str, tuple[torch.Tensor, int]] = {}

        def accumulate(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
            total, n = channel_means(layers[name], y)
            old, count = sums.get(name, (torch.zeros_like(total), 0))
            sums[name] = (old + total, count + n)

        with quantizers_disabled(model), capture_inputs(model, layers, data, on_input=accumulate):
            pass
        float_means = {name: total / count for name, (total, count) in sums.items()}
        loop = LayerLoop("bias_correction", layers, self.config.budget_s, self.progress)
        done = 0
        for name, layer in loop:
            if name not in float_means:
                continue  # never called on this data
            sums.pop(name, None)
            with capture_inputs(model, {name: layer}, data, on_input=accumulate):
                pass
            total, count = sums[name]
            shift = float_means[name] - total / count
            loop.loss(float(shift.abs().mean()))
            _add_to_bias(layer, shift)
            done += 1
        loop.note_skipped(model)
        add_note(model, "bias_correction", f"empirical correction of {done} layer(s)")

    def _analytical(self, model: nn.Module, layers: dict[str, QModule]) -> None:
        info = _info(model)
        if info is None:
            raise AlgorithmError(
                "bias_correction: the model was not prepared by lowbit; call lowbit.prepare first"
            )
        chains = find_chains(model).chains
        done, missing = [], []
        for name, layer in layers.items():
            chain = chains.get(name)
            stats = info.bn_stats.get(chain.producer) if chain is not None else None
            expected = None
            if chain is not None and stats is not None:
                expected = expected_input(chain, *stats)
            if expected is None:
                missing.append(name)
                continue
            w = layer.weight.detach().float()
            delta = w - layer.quantized_weight().detach().float()  # W - W~
            delta = delta.flatten(2).sum(2) if delta.ndim > 2 else delta  # (out, in/groups)
            index = input_channel_index(layer)  # (out, in/groups)
            _add_to_bias(layer, (delta * expected.to(delta)[index]).sum(1))  # (out,)
            done.append(name)
        add_note(model, "bias_correction", f"analytical correction of {len(done)} layer(s)")
        if missing:
            add_note(
                model,
                "bias_correction",
                "no batch-norm statistics for the input of (not corrected without data; pass "
                f"calibration data for empirical correction): {', '.join(missing)}",
            )
