"""AdaRound and block-wise reconstruction: learned rounding beats rounding to nearest."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms import AlgorithmError
from lowbit.algorithms.adaround import AdaRoundConfig, Rounding, find_blocks
from lowbit.algorithms.base import rtn_integers, weight_layers


def _recipe(base: str, algorithm: Any = "adaround", **args: Any) -> lowbit.Recipe:
    data = lowbit.load_recipe(base).to_dict()
    data.update(algorithm=algorithm, args=args if algorithm else {})
    return lowbit.Recipe.from_dict(data)


def _weight_only(bits: int, algorithm: Any = "adaround", **args: Any) -> lowbit.Recipe:
    spec = {"dtype": f"int{bits}", "granularity": "per_channel", "symmetric": True}
    return lowbit.Recipe.from_dict(
        {
            "name": f"w{bits}",
            "default": {"weight": {**spec, "observer": "mse"}, "input": None},
            "algorithm": algorithm,
            "args": args if algorithm else {},
        }
    )


def _correlated(n: int, features: int, seed: int) -> torch.Tensor:
    """Inputs with correlated features (what makes the rounding choice matter)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=torch.Generator().manual_seed(99))
    return torch.randn(n, features, generator=g) @ mix / features**0.5 + 0.5


def _layer_sqnr(float_layer: nn.Module, recipe: lowbit.Recipe, x: torch.Tensor) -> float:
    calib, held_out = x[:256], x[256:]
    q = lowbit.quantize(float_layer, recipe, data=[calib[i : i + 64] for i in range(0, 256, 64)])
    with torch.no_grad():
        return lowbit.sqnr_db(float_layer(held_out), q(held_out))


@pytest.mark.parametrize("bits", [4, 2])
def test_adaround_beats_round_to_nearest_on_a_linear_layer(bits: int) -> None:
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(32, 16))
    x = _correlated(512, 32, seed=1)
    rtn = _layer_sqnr(layer, _weight_only(bits, None), x)
    ada = _layer_sqnr(layer, _weight_only(bits, iters=300, batch_size=64, lr=1e-2), x)
    assert ada > rtn + 0.5, (ada, rtn)


def test_adaround_beats_round_to_nearest_on_a_conv_layer() -> None:
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1))
    x = torch.randn(320, 4, 6, 6) + 0.3 * torch.randn(1, 4, 1, 1)
    calib, held = x[:256], x[256:]
    batches = [calib[i : i + 64] for i in range(0, 256, 64)]
    rtn = lowbit.quantize(conv, _weight_only(3, None), data=batches)
    ada = lowbit.quantize(conv, _weight_only(3, iters=300, lr=1e-2), data=batches)
    with torch.no_grad():
        assert lowbit.sqnr_db(conv(held), ada(held)) > lowbit.sqnr_db(conv(held), rtn(held)) + 0.25


def test_the_rounding_starts_at_the_float_weight_and_ends_binary_one_step_from_nearest() -> None:
    torch.manual_seed(0)
    m = lowbit.prepare(nn.Sequential(nn.Linear(16, 8)), _weight_only(4))
    layer = weight_layers(m)["0"]
    layer.update_weight_qparams()
    nearest = rtn_integers(layer)
    rounding = Rounding(layer)
    assert torch.equal(rounding.integers(), nearest)  # starts at round-to-nearest
    with torch.no_grad():
        rounding.v.fill_(5.0)  # far on the flat end: h is exactly 1
    assert torch.equal(rounding.h(), torch.ones_like(rounding.h()))
    assert rounding.regularizer(2.0).item() == 0.0
    assert ((rounding.integers() - nearest).abs() <= 1).all()


def test_convert_keeps_the_learned_integers() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = _correlated(128, 16, seed=3)
    prepared = lowbit.calibrate(lowbit.prepare(net, _weight_only(4)), [x])
    nearest = {n: rtn_integers(layer) for n, layer in weight_layers(prepared).items()}
    from lowbit.algorithms.adaround import AdaRound

    AdaRound(AdaRoundConfig(iters=200, lr=1e-2)).apply(prepared, [x])
    learned = {n: rtn_integers(layer) for n, layer in weight_layers(prepared).items()}
    frozen = lowbit.convert(prepared)
    for name, q in learned.items():
        stored = frozen.get_submodule(name).weight.int_repr().to(torch.int32)
        assert torch.equal(stored, q)
        assert ((q - nearest[name]).abs() <= 1).all()
    assert any(not torch.equal(learned[n], nearest[n]) for n in learned)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.relu = nn.ReLU()
        self.b = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(self.relu(self.a(x)))


def test_blocks_are_the_deepest_modules_with_two_weight_layers() -> None:
    net = nn.Sequential(nn.Linear(16, 16), _Block(), nn.Sequential(_Block()), nn.Linear(16, 2))
    m = lowbit.prepare(net, "w4a8")
    assert list(find_blocks(m, weight_layers(m))) == ["0", "1", "2.0", "3"]


def test_block_reconstruction_beats_round_to_nearest_at_two_bits() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(_Block(), _Block())
    x = _correlated(512, 16, seed=4)
    rtn = _layer_sqnr(net, _weight_only(2, None), x)
    block = _layer_sqnr(net, _weight_only(2, "brecq", iters=300, batch_size=64, lr=1e-2), x)
    assert block > rtn + 1.0, (block, rtn)


def test_w4a8_adaround_recipe_runs_end_to_end_on_a_conv_net() -> None:
    from lowbit.data import SmallResNet

    torch.manual_seed(0)
    net = SmallResNet(widths=(4, 8), blocks=(1, 1)).eval()
    x = torch.randn(64, 1, 28, 28)
    for name in ("w4a8-adaround", "w4a4-adaround", "w2a8-brecq"):
        q = lowbit.quantize(net, _recipe(name, lowbit.load_recipe(name).algorithm, iters=5), [x])
        assert q(x[:2]).shape == (2, 10)
        assert lowbit.sqnr_db(net(x), q(x)) > 0


def test_too_few_samples_is_an_error_naming_the_minimum() -> None:
    with pytest.raises(AlgorithmError, match="at least 32 calibration samples, got 8"):
        lowbit.quantize(nn.Sequential(nn.Linear(4, 4)), _weight_only(4), data=[torch.randn(8, 4)])


def test_the_time_budget_leaves_later_layers_at_nearest_with_a_note() -> None:
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    recipe = _weight_only(4, iters=50, budget_s=1e-9)
    m = lowbit.calibrate(lowbit.prepare(net, recipe), [torch.randn(64, 8)])
    from lowbit.algorithms.adaround import AdaRound

    AdaRound(AdaRoundConfig(iters=50, budget_s=1e-9)).apply(m, [torch.randn(64, 8)])
    assert any("keep round-to-nearest: 0, 2" in n for n in lowbit.prepared_info(m).notes)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ({"iters": 0}, "iters must be >= 1"),
        ({"beta": [2, 20]}, "start >= end"),
        ({"drop": 1.0}, "drop must be in [0, 1)"),
        ({"warmup": 1.5}, "warmup must be in [0, 1)"),
    ],
)
def test_bad_arguments_name_the_fix(args: dict[str, Any], words: str) -> None:
    with pytest.raises(lowbit.RecipeError, match=words.replace("[", r"\[").replace(")", r"\)")):
        _weight_only(4, **args)
