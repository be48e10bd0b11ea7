"""Cross-layer equalization: balanced ranges, the same float function, only exact pairs."""

from __future__ import annotations

import tempfile
from typing import Any

import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms import quantizers_disabled
from lowbit.algorithms.cle import CLEConfig, CrossLayerEqualization, relu6_to_relu
from lowbit.algorithms.pairs import find_chains
from lowbit.config import Recipe
from lowbit.nn import QModule
from lowbit.report.metrics import sqnr_db


def recipe(weight_dtype: str = "int8", steps: Any = None, static: bool = True) -> Recipe:
    """Per-tensor symmetric weights (where CLE matters), optional static int8 inputs."""
    default: dict[str, Any] = {
        "weight": {"dtype": weight_dtype, "granularity": "per_tensor", "symmetric": True}
    }
    if static:
        default["input"] = {"dtype": "int8", "granularity": "per_tensor", "symmetric": False}
    return Recipe.from_dict({"name": "test-pt", "default": default, "algorithm": steps})


class Unbalanced(nn.Module):
    """conv1 -> BN -> ReLU -> conv2 -> ReLU -> pool -> linear; conv1's output channels span
    1e-2..1e2 and conv2's inputs compensate, so the float function is an ordinary one."""

    def __init__(self, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act1 = act()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 4)
        scale = torch.logspace(-2, 2, 8)[torch.randperm(8, generator=gen)]  # (8,)
        with torch.no_grad():  # the batch norm's gamma carries the imbalance into conv1
            self.bn.weight.copy_(scale)
            self.bn.bias.copy_((torch.rand(8, generator=gen) - 0.3) * scale)
            self.conv2.weight.div_(scale.view(1, -1, 1, 1))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.conv2(self.act1(self.bn(self.conv1(x)))))
        return self.head(torch.flatten(self.pool(x), 1))


def weight_sqnr(layer: nn.Module, dim: int = 0) -> float:
    """Mean over the channels along ``dim`` (those CLE rescales) of each channel's SQNR (dB)
    under the layer's per-tensor fake quantization: a small channel's error counts as much
    as a large one's, as it does downstream once the next layer scales it back up."""
    assert isinstance(layer, QModule)
    layer.update_weight_qparams()
    with torch.no_grad():
        w, q = layer.weight.transpose(0, dim), layer.quantized_weight().transpose(0, dim)
        return sum(sqnr_db(a, b) for a, b in zip(w, q, strict=True)) / w.shape[0]


def float_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), quantizers_disabled(model):
        return model(x)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_cle_raises_weight_sqnr_and_keeps_float_output(dtype: str) -> None:
    m = lowbit.prepare(Unbalanced(), recipe(dtype))
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    before_out = float_output(m, x)
    sides = {"conv1": 0, "conv2": 1}  # conv1's output channels, conv2's input channels
    before = {n: weight_sqnr(m.get_submodule(n), d) for n, d in sides.items()}
    CrossLayerEqualization().apply(m, None)
    after = {n: weight_sqnr(m.get_submodule(n), d) for n, d in sides.items()}
    for name in before:
        assert after[name] > before[name] + 3.0, (name, before[name], after[name])
    assert sqnr_db(before_out, float_output(m, x)) >= 60.0
    assert "cle: equalized 2 layer pair(s): conv1 -> conv2, conv2 -> head" in (
        lowbit.prepared_info(m).notes
    )


def test_equalized_ranges_match() -> None:
    m = lowbit.prepare(Unbalanced(), recipe())
    CrossLayerEqualization().apply(m, None)
    r1 = m.conv1.weight.detach().flatten(1).abs().amax(1)  # (8,)
    r2 = m.conv2.weight.detach().abs().amax(dim=(0, 2, 3))  # (8,)
    # conv2 is equalized on both sides: the last pair (conv2 -> head) moves its rows, so
    # after the rounds settle the first pair's ranges agree closely
    assert torch.allclose(r1, r2, rtol=1e-2)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        with torch.no_grad():
            self.conv1.weight.mul_(torch.logspace(-2, 2, 4).view(-1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        return self.conv2(torch.relu(y)) + y  # conv1's output has a second user


def test_pairs_through_a_residual_add_are_not_equalized() -> None:
    m = lowbit.prepare(Residual(), recipe())
    w1, w2 = m.conv1.weight.detach().clone(), m.conv2.weight.detach().clone()
    assert not find_chains(m).chains["conv2"].exclusive
    CrossLayerEqualization().apply(m, None)
    assert torch.equal(m.conv1.weight, w1) and torch.equal(m.conv2.weight, w2)


def test_relu6_pairs_are_skipped_with_a_note_and_relu6_to_relu_enables_them() -> None:
    model = Unbalanced(act=nn.ReLU6)
    m = lowbit.prepare(model, recipe())
    w1 = m.conv1.weight.detach().clone()
    CrossLayerEqualization().apply(m, None)
    assert torch.equal(m.conv1.weight, w1)
    notes = "\n".join(lowbit.prepared_info(m).notes)
    assert "conv1 -> conv2 (through ReLU6" in notes and "relu6_to_relu" in notes
    assert relu6_to_relu(model) == ["act1"]
    m = lowbit.prepare(model, recipe())
    CrossLayerEqualization().apply(m, None)
    assert not torch.equal(m.conv1.weight, w1)


class MobileChain(nn.Module):
    """conv1x1 -> ReLU -> depthwise 3x3 -> ReLU -> conv1x1, as in a MobileNetV2 block."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(2)
        self.expand = nn.Conv2d(4, 12, 1)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.project = nn.Conv2d(12, 6, 1)
        scale = torch.logspace(-2, 2, 12)[torch.randperm(12, generator=gen)]  # (12,)
        with torch.no_grad():
            self.expand.weight.mul_(scale.view(-1, 1, 1, 1))
            self.dw.weight.mul_(scale.flip(0).view(-1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.relu(self.dw(torch.relu(self.expand(x)))))


def test_depthwise_chain_is_equalized_exactly() -> None:
    m = lowbit.prepare(MobileChain(), recipe("int4"))
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    before_out = float_output(m, x)
    before = [weight_sqnr(m.get_submodule(n)) for n in ("expand", "dw", "project")]
    CrossLayerEqualization().apply(m, None)
    after = [weight_sqnr(m.get_submodule(n)) for n in ("expand", "dw", "project")]
    assert after[0] > before[0] + 3.0 and after[1] > before[1] + 3.0
    assert sqnr_db(before_out, float_output(m, x)) >= 60.0


def test_linear_pairs_and_untraceable_models_use_the_traceable_parts() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.1), nn.Linear(8, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.body(x)
            return self.body(-x)

    m = lowbit.prepare(Branchy(), recipe(static=False))
    scan = find_chains(m)
    assert scan.chains["body.2"].ops == ("leaky_relu",) and "could not trace" in scan.notes[0]
    x = torch.randn(5, 4)
    before = float_output(m, x)
    CrossLayerEqualization().apply(m, None)
    assert sqnr_db(before, float_output(m, x)) >= 60.0


def test_bad_config_names_the_fix() -> None:
    with pytest.raises(ValueError, match="iterations must be an integer >= 1"):
        CLEConfig(iterations=0)
    with pytest.raises(ValueError, match="max_scale must be > 1"):
        CLEConfig(max_scale=0.5)


def test_quantize_with_cle_beats_plain_and_reloads() -> None:
    model = Unbalanced()
    gen = torch.Generator().manual_seed(4)
    calib = [torch.randn(8, 3, 8, 8, generator=gen) for _ in range(2)]
    x = torch.randn(16, 3, 8, 8, generator=gen)
    with torch.no_grad():
        ref = model(x)
        plain = sqnr_db(ref, lowbit.quantize(model, recipe("int4"), data=calib)(x))
        q = lowbit.quantize(model, recipe("int4", ["cle", "bias_correction"]), data=calib)
        both = sqnr_db(ref, q(x))
        with tempfile.TemporaryDirectory() as d:
            back = lowbit.load(lowbit.save(q, f"{d}/m"), Unbalanced())
            assert torch.equal(back(x), q(x))
    assert both > plain + 6.0, (plain, both)


def test_shipped_recipe_runs_data_free_and_with_data() -> None:
    model = Unbalanced()
    gen = torch.Generator().manual_seed(5)
    calib = [torch.randn(8, 3, 8, 8, generator=gen)]
    x = torch.randn(8, 3, 8, 8, generator=gen)
    with torch.no_grad():
        ref = model(x)
        q = lowbit.quantize(model, "w8a8-pertensor-cle", data=calib)
        plain = lowbit.quantize(model, "w8a8-pertensor", data=calib)
        assert sqnr_db(ref, q(x)) > sqnr_db(ref, plain(x))
        weight_only = recipe("int4", ["cle", "bias_correction"], static=False)
        free = lowbit.quantize(model, weight_only, data=None)
        assert sqnr_db(ref, free(x)) > sqnr_db(
            ref, lowbit.quantize(model, recipe("int4", static=False))(x)
        )
    notes = "\n".join(lowbit.prepared_info(free).notes)
    assert "cle: equalized" in notes and "bias_correction: analytical correction" in notes
