"""Every shipped recipe: it loads, round-trips through YAML and quantizes a small model end to end.

Quality floors are in dB (SQNR of the converted model's logits against the float model's, eval
mode). Measured when the floors were set, on this test's seed and [min over 6 seeds]:

    w8a16           53.2  [52.3]      floor 46
    w8a8-dynamic    50.8  [50.3]      floor 44
    w8a8-dynamic-token  52.1  [47.5]  floor 42
    w8a8            51.3  [46.4]      floor 40
    w8a8-pertensor  49.8  [45.3]      floor 40
    w4a8            30.7  [25.7]      floor 21
    w4a16           27.5  [25.7]      floor 21
    w4a16-g128      27.6  [26.1]      floor 21   (groups of 128 cover this model's small layers)
    w2a8            11.6  [10.4]      floor 7   (low but finite)
    w4a16-gptq      43.0  [40.2]      floor 34
    w3a16-gptq      34.7  [32.6]      floor 27
    w4a8-adaround   29.3              floor 24  (40 iterations: FAST_ARGS)
    w4a4-adaround   34.2              floor 28  (40 iterations; first/last layers at 8 bits)
    w2a8-brecq      18.4              floor 13  (40 iterations; first/last layers at 8 bits)
    w8a8-qat        51.7              floor 40  (QAT recipes here: their specs, rounded to nearest)
    w4a4-lsq        34.0              floor 28
    w2a4-lsq        14.4              floor 10
    w1a8-binary     15.3              floor 10  (binary conv2 only: first/last layers at 8 bits)

A new shipped recipe must add its own measured floor here.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.api import prepared_info, quantize, quantized_layers
from lowbit.config import Recipe, list_recipes, load_recipe
from lowbit.report.metrics import sqnr_db

SQNR_FLOOR_DB = {
    "w8a16": 46.0,
    "w8a8-dynamic": 44.0,
    "w8a8-dynamic-token": 42.0,
    "w8a8": 40.0,
    "w8a8-pertensor": 40.0,
    "w8a8-smoothquant": 40.0,
    "w8a8-pertensor-cle": 40.0,
    "w4a8": 21.0,
    "w4a16": 21.0,
    "w4a16-g128": 21.0,
    "w4a16-awq": 21.0,
    "w2a8": 7.0,
    "w4a16-gptq": 34.0,
    "w3a16-gptq": 27.0,
    "w4a8-adaround": 24.0,
    "w4a4-adaround": 28.0,
    "w2a8-brecq": 13.0,
    "w8a8-qat": 40.0,
    "w4a4-lsq": 28.0,
    "w2a4-lsq": 10.0,
    "w1a8-binary": 10.0,
}
RECIPES = sorted(list_recipes())
FAST_ARGS = {"adaround": {"iters": 40}, "brecq": {"iters": 40}}  # the suite stays quick


def _fast(name: str) -> Recipe:
    """The shipped recipe, with its long algorithms cut to a few iterations."""
    recipe = load_recipe(name)
    fast = {step: FAST_ARGS[step] for step, _ in recipe.steps if step in FAST_ARGS}
    return recipe.with_args(**fast) if fast else recipe


class ConvLinear(nn.Module):
    """Conv-BN-ReLU, strided conv, global pooling, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x)).mean(dim=(2, 3))  # (N, 16)
        return self.head(x)


@pytest.fixture(scope="module")
def model_and_data() -> tuple[nn.Module, list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    model = ConvLinear()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.bn1.running_mean.copy_(torch.randn(8, generator=gen) * 0.2)
        model.bn1.running_var.copy_(torch.rand(8, generator=gen) + 0.5)
        model.bn1.weight.copy_(torch.rand(8, generator=gen) + 0.5)
    model.eval()
    calib = [torch.randn(8, 3, 16, 16, generator=gen) for _ in range(4)]
    test = torch.randn(16, 3, 16, 16, generator=gen)
    return model, calib, test


def test_every_recipe_has_a_floor() -> None:
    assert RECIPES, "no shipped recipes found"
    assert set(RECIPES) == set(SQNR_FLOOR_DB), "add a measured SQNR floor for each new recipe"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_and_describes_itself(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.name == name, "a recipe's name field must match its file name"
    assert recipe.description and list_recipes()[name] == recipe.description
    assert recipe.default is not None and recipe.default.weight is not None


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_round_trips_through_yaml(name: str) -> None:
    recipe = load_recipe(name)
    text = recipe.to_yaml()
    assert Recipe.from_yaml(text) == recipe
    assert Recipe.from_yaml(Recipe.from_yaml(text).to_yaml()) == recipe
    assert Recipe.from_dict(recipe.to_dict()) == recipe


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_quantizes_end_to_end(
    name: str, model_and_data: tuple[nn.Module, list[torch.Tensor], torch.Tensor]
) -> None:
    model, calib, test = model_and_data
    recipe = _fast(name)
    q = quantize(model, recipe, data=calib)
    assert type(q) is ConvLinear and q is not model
    assert prepared_info(q).recipe == recipe
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    layers = quantized_layers(q)
    assert set(layers) == {"conv1", "conv2", "head"}
    assert all(layer.frozen for layer in layers.values())
    with torch.no_grad():
        db = sqnr_db(model(test), q(test))
    assert db == db and db != float("inf")  # finite, not NaN
    assert db > SQNR_FLOOR_DB[name], f"{name}: {db:.1f} dB"


def test_fewer_weight_bits_cost_more(
    model_and_data: tuple[nn.Module, list[torch.Tensor], torch.Tensor],
) -> None:
    """Relative claim: on the same activations, 8-bit weights beat 4-bit weights."""
    model, calib, test = model_and_data
    with torch.no_grad():
        ref = model(test)
        w8 = sqnr_db(ref, quantize(model, "w8a16")(test))
        w4 = sqnr_db(ref, quantize(model, "w4a16")(test))
        w4a8 = sqnr_db(ref, quantize(model, "w4a8", data=calib)(test))
        w2a8 = sqnr_db(ref, quantize(model, "w2a8", data=calib)(test))
    assert w8 > w4 + 10.0
    assert w4a8 > w2a8 + 5.0
