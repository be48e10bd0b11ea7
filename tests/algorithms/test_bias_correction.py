"""Bias correction: the mean output shift of rounded weights goes away."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms import AlgorithmError
from lowbit.algorithms.bias_correction import BiasCorrection, BiasCorrectionConfig
from lowbit.config import Recipe


def recipe(dtype: str, static: bool = False) -> Recipe:
    default: dict[str, Any] = {
        "weight": {"dtype": dtype, "granularity": "per_tensor", "symmetric": True}
    }
    if static:
        default["input"] = {"dtype": "int8", "granularity": "per_tensor", "symmetric": False}
    return Recipe.from_dict({"name": "test-bc", "default": default})


def shift(float_model: nn.Module, model: nn.Module, layer: str, data: list[torch.Tensor]) -> float:
    """Mean |E[y_float] - E[y_quant]| over the output channels of ``layer``, the float
    output from the untouched float model (a corrected bias changes the prepared one's)."""
    got: list[torch.Tensor] = []
    for net in (float_model, model):
        handle = net.get_submodule(layer).register_forward_hook(
            lambda mod, args, out: got.append(out.detach())
        )
        with torch.no_grad():
            for x in data:
                net(x)
        handle.remove()
    half = len(got) // 2
    dims = [d for d in range(got[0].ndim) if d != (1 if got[0].ndim > 2 else got[0].ndim - 1)]
    ref = torch.cat(got[:half]).mean(dims)  # (channels,)
    test = torch.cat(got[half:]).mean(dims)  # (channels,)
    return float((ref - test).abs().mean())


def test_empirical_correction_removes_the_mean_shift() -> None:
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    data = [torch.randn(64, 16, generator=gen) + 1.0 for _ in range(2)]
    m = lowbit.calibrate(lowbit.prepare(net, recipe("int3")), data)
    before = shift(net, m, "2", data)
    BiasCorrection(BiasCorrectionConfig(mode="empirical")).apply(m, data)
    after = shift(net, m, "2", data)
    assert after < before / 10, (before, after)


class ConvBnReluConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


def bn_model(data: list[torch.Tensor]) -> nn.Module:
    """The batch norm's running statistics are those of the data (as after training)."""
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ConvBnReluConv()
    bn = model.bn
    assert bn.running_mean is not None and bn.running_var is not None
    with torch.no_grad():
        y = torch.cat([model.conv1(x) for x in data])  # (N, 16, H, W)
        bn.running_mean.copy_(y.mean((0, 2, 3)))
        bn.running_var.copy_(y.var((0, 2, 3)))
        bn.weight.copy_(torch.rand(16, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(16, generator=gen) * 0.5 + 0.3)
    return model.eval()


def test_analytical_correction_lowers_the_shift_without_data() -> None:
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(16, 3, 8, 8, generator=gen) for _ in range(2)]
    model = bn_model(data)
    m = lowbit.prepare(model, recipe("int3"))
    for layer in lowbit.quantized_layers(m).values():
        layer.update_weight_qparams()  # a weight-only recipe: qparams need no data
    before = shift(model, m, "conv2", data)
    BiasCorrection().apply(m, None)  # mode auto, no data: analytical
    after = shift(model, m, "conv2", data)
    assert after < before / 2, (before, after)
    notes = "\n".join(lowbit.prepared_info(m).notes)
    assert "analytical correction of 1 layer(s)" in notes
    assert "batch-norm statistics for the input of" in notes and "conv1" in notes


def test_layers_without_a_bias_are_named_not_changed() -> None:
    net = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 2))
    data = [torch.randn(16, 4)]
    m = lowbit.calibrate(lowbit.prepare(net, recipe("int4")), data)
    BiasCorrection().apply(m, data)
    assert m[0].bias is None
    assert any("no bias" in n and ": 0" in n for n in lowbit.prepared_info(m).notes)


def test_empirical_without_data_and_bad_config_name_the_fix() -> None:
    m = lowbit.prepare(nn.Sequential(nn.Linear(4, 2)), recipe("int4"))
    with pytest.raises(AlgorithmError, match="needs calibration data"):
        BiasCorrection(BiasCorrectionConfig(mode="empirical")).apply(m, None)
    with pytest.raises(ValueError, match="mode must be one of"):
        BiasCorrectionConfig(mode="exact")


def test_static_recipe_end_to_end_with_correction() -> None:
    gen = torch.Generator().manual_seed(2)
    data = [torch.randn(16, 3, 8, 8, generator=gen) for _ in range(2)]
    model = bn_model(data)
    steps = Recipe.from_dict(
        {**recipe("int4", static=True).to_dict(), "algorithm": ["bias_correction"]}
    )
    q = lowbit.quantize(model, steps, data=data)
    plain = lowbit.quantize(model, recipe("int4", static=True), data=data)
    with torch.no_grad():
        ref = model(data[0])
        bias_err = (ref - q(data[0])).mean((0, 2, 3)).abs().mean()  # (8,) -> mean
        plain_err = (ref - plain(data[0])).mean((0, 2, 3)).abs().mean()
    assert bias_err < plain_err
