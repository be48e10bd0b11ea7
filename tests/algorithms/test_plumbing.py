"""The plumbing every PTQ algorithm shares: registry, recipe steps, data read once, captures."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms import (
    AlgorithmBase,
    AlgorithmError,
    LayerLoop,
    capture_inputs,
    quantizers_disabled,
    register_algorithm,
    weight_layers,
)
from lowbit.algorithms.base import require_data, rtn_integers, set_rounded_weight
from lowbit.config import Recipe, RecipeError, load_recipe
from lowbit.recipe_steps import ALGORITHMS


@dataclass(frozen=True)
class CountConfig:
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise ValueError(f"scale must be positive, got {self.scale}")


SEEN: list[int] = []


@pytest.fixture
def counting() -> Iterator[None]:
    """Two throw-away algorithms, one per stage, registered for one test only."""

    @register_algorithm("test_count", CountConfig)
    class Count(AlgorithmBase):
        stage = "quantized"

        def apply(self, model: nn.Module, data: Sequence[Any] | None) -> None:
            SEEN.append(len(data or []))

    @register_algorithm("test_reshape", CountConfig)
    class Reshape(AlgorithmBase):
        stage = "float"

        def apply(self, model: nn.Module, data: Sequence[Any] | None) -> None:
            for layer in weight_layers(model).values():
                assert layer.weight_quantizer is not None
                assert layer.weight_quantizer.scale is None  # before calibration
                with torch.no_grad():
                    layer.weight.mul_(self.config.scale)

    SEEN.clear()
    try:
        yield
    finally:
        ALGORITHMS.pop("test_count", None)
        ALGORITHMS.pop("test_reshape", None)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _recipe(**kw: Any) -> Recipe:
    base = load_recipe("w8a8").to_dict()
    base.update(kw)
    return Recipe.from_dict(base)


def test_a_generator_is_read_once_and_every_algorithm_sees_all_of_it(counting: None) -> None:
    batches = (torch.randn(4, 6) for _ in range(5))
    lowbit.quantize(_net(), _recipe(algorithm="test_count"), data=batches)
    assert SEEN == [5]


def test_num_batches_caps_what_the_algorithm_sees(counting: None) -> None:
    lowbit.quantize(
        _net(), _recipe(algorithm="test_count"), data=[torch.randn(2, 6)] * 9, num_batches=3
    )
    assert SEEN == [3]


def test_float_stage_runs_before_calibration(counting: None) -> None:
    net, x = _net(), torch.randn(64, 6)
    recipe = _recipe(algorithm=["test_reshape", "test_count"], args={"test_reshape": {"scale": 2}})
    q = lowbit.quantize(net, recipe, data=[x])
    assert SEEN == [1]
    doubled = copy.deepcopy(net)
    for layer in doubled:
        if isinstance(layer, nn.Linear):
            layer.weight.data.mul_(2)
    # calibrated on the doubled weights: the int8 model follows them, not the original
    assert lowbit.sqnr_db(doubled(x), q(x)) > 30
    assert lowbit.sqnr_db(net(x), q(x)) < 10


def test_a_list_of_algorithms_round_trips_through_yaml(counting: None) -> None:
    recipe = _recipe(algorithm=["test_reshape", "test_count"], args={"test_count": {"scale": 3}})
    back = Recipe.from_yaml(recipe.to_yaml())
    assert back == recipe
    assert back.steps == (("test_reshape", ()), ("test_count", (("scale", 3),)))


def test_single_algorithm_takes_flat_args(counting: None) -> None:
    recipe = _recipe(algorithm="test_count", args={"scale": 0.5})
    assert recipe.steps == (("test_count", (("scale", 0.5),)),)
    assert Recipe.from_yaml(recipe.to_yaml()).steps == recipe.steps


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"algorithm": "test_count", "args": {"scal": 1}}, ["no argument", "scal", "scale"]),
        ({"algorithm": "test_count", "args": {"scale": -1}}, ["scale must be positive"]),
        ({"algorithm": ["test_count", "test_reshape"]}, ["must come before", "reorder"]),
        ({"algorithm": ["test_count"], "args": {"nope": {}}}, ["keyed by algorithm name"]),
        ({"algorithm": ["test_count", "test_count"]}, ["twice"]),
        ({"algorithm": None, "args": {"scale": 1}}, ["no algorithm"]),
        ({"algorithm": "nope"}, ["unknown", "test_count"]),
    ],
)
def test_bad_steps_name_the_fix(counting: None, kw: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(RecipeError) as info:
        _recipe(**kw)
    for word in words:
        assert word in str(info.value)


def test_first_and_last_get_their_own_config() -> None:
    recipe = _recipe(
        first={"weight": {"dtype": "int8", "granularity": "per_channel"}, "input": None},
        last=None,
    )
    recipe = Recipe.from_yaml(recipe.to_yaml())
    m = lowbit.prepare(_net(), recipe)
    layers = lowbit.quantized_layers(m)
    assert list(layers) == ["0", "2"]
    assert layers["0"].input_quantizer is None  # first: weight-only int8
    assert layers["2"].input_quantizer is not None  # the middle one follows default
    assert "4" in lowbit.prepared_info(m).kept_float  # last: null keeps it float


def test_a_rule_naming_the_first_layer_wins_over_first() -> None:
    recipe = _recipe(
        first=None, rules=[{"match": "0", "config": {"weight": {"dtype": "int4"}, "input": None}}]
    )
    layer = lowbit.quantized_layers(lowbit.prepare(_net(), recipe))["0"]
    assert layer.weight_quantizer is not None
    assert layer.weight_quantizer.spec.qdtype.bits == 4


def test_first_rejects_a_non_config() -> None:
    with pytest.raises(RecipeError, match="first"):
        _recipe(first=[1, 2])


def test_capture_inputs_removes_hooks_when_the_model_fails() -> None:
    net = _net()
    with pytest.raises(RuntimeError), capture_inputs(net, {"2": net[2]}, [torch.randn(2, 5)]):
        pass
    assert not net[2]._forward_hooks


def test_capture_streams_without_keeping_tensors() -> None:
    net, rows = _net(), []
    with capture_inputs(
        net, {"0": net[0]}, [torch.randn(3, 6)] * 2, on_input=lambda n, x, y: rows.append(len(x))
    ) as got:
        assert got["0"].inputs == []
    assert rows == [3, 3]


def test_quantizers_disabled_gives_the_float_model() -> None:
    net, x = _net(), torch.randn(16, 6)
    m = lowbit.calibrate(lowbit.prepare(net, "w4a8"), [x])
    with quantizers_disabled(m):
        assert torch.allclose(m(x), net(x), atol=1e-6)
    assert not torch.allclose(m(x), net(x), atol=1e-3)


def test_set_rounded_weight_survives_convert() -> None:
    m = lowbit.calibrate(lowbit.prepare(_net(), "w4a8"), [torch.randn(8, 6)])
    layer = weight_layers(m)["2"]
    q = rtn_integers(layer)
    q[0, 0] = q[0, 0] + (1 if q[0, 0] < 7 else -1)  # one rounding RTN would not choose
    set_rounded_weight(layer, q)
    frozen = lowbit.convert(m)
    assert torch.equal(frozen[2].weight.int_repr().to(torch.int32), q)


def test_require_data_says_how_many() -> None:
    with pytest.raises(AlgorithmError, match="needs at least 64 calibration samples, got 8"):
        require_data([torch.zeros(8, 2)], "adaround", 64)
    with pytest.raises(AlgorithmError, match="needs calibration data"):
        require_data(None, "gptq", 1)


def test_layer_loop_stops_at_the_budget() -> None:
    m = lowbit.prepare(_net(), "w8a16")
    loop = LayerLoop("demo", weight_layers(m), budget_s=0.0)
    assert [name for name, _ in loop] == []
    loop.note_skipped(m)
    assert "keep round-to-nearest: 0, 2, 4" in lowbit.prepared_info(m).notes[-1]
