"""Recipes and QuantConfig: strict validation with messages naming the key, rules, YAML files."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from lowbit.api import prepare, quantize, quantized_layers
from lowbit.config import QuantConfig, Recipe, RecipeError, Rule, load_recipe
from lowbit.nn import QLinear
from lowbit.report.metrics import sqnr_db
from lowbit.spec import QuantSpec, SpecError

BASE: dict[str, Any] = {
    "name": "test",
    "description": "a valid recipe that each case breaks in one place",
    "version": 1,
    "default": {
        "weight": {"dtype": "int8", "granularity": "per_channel", "observer": "minmax"},
        "input": {"dtype": "int8", "symmetric": False},
    },
    "rules": [{"match": "head", "config": None}],
    "algorithm": None,
    "args": {},
    "fold_batchnorm": True,
}


DELETE = object()


def _with(path: str, value: Any) -> dict[str, Any]:
    """BASE with the dotted ``path`` set to ``value`` (``...=DELETE`` removes the key)."""
    data = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node: Any = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


def test_base_recipe_is_valid() -> None:
    recipe = Recipe.from_dict(copy.deepcopy(BASE))
    assert recipe.default is not None and recipe.default.input is not None
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe


# (dotted path, value, words the message must contain)
BAD = [
    ("algoritm", "gptq", ["algoritm"]),  # unknown top-level key
    ("default.weight.bitz", 4, ["bitz", "default.weight"]),  # unknown spec key
    ("default.weigth", {"dtype": "int8"}, ["weigth", "default"]),  # unknown config key
    ("default.weight.bits", 0, ["bits=0", "default.weight"]),
    ("default.weight.bits", 17, ["bits=17", "default.weight"]),
    ("default.input.bits", -1, ["bits=-1", "default.input"]),
    ("default.weight.dtype", "float8", ["dtype", "float8", "default.weight"]),
    ("default.weight.dtype", "int32", ["bits=32", "default.weight"]),
    ("default.input.observer", "minmaxx", ["observer", "minmaxx", "default.input"]),
    ("algorithm", "gptqq", ["algorithm", "gptqq"]),
    ("default.weight.granularity", "per_row", ["granularity", "per_row", "default.weight"]),
    ("default.weight.granularity", "per_group:abc", ["group_size", "default.weight"]),
    ("default.input.granularity", "per_group:32", ["per_group", "default.input"]),
    ("default.weight.dynamic", True, ["dynamic", "default.weight"]),
    ("default.weight.symmetric", "yes", ["symmetric", "default.weight"]),
    ("default.weight.observer_args", {"percentile": 99.0}, ["percentile", "default.weight"]),
    ("default.weight.observer", "entropy", ["entropy", "per_tensor", "default.weight"]),
    ("default", DELETE, ["default"]),
    ("default", {}, ["default", "neither weight nor input"]),
    ("version", 2, ["version 2"]),
    ("version", "one", ["version", "one"]),
    ("version", 1.5, ["version", "1.5"]),
    ("fold_batchnorm", "no", ["fold_batchnorm"]),
    ("rules", "head", ["rules"]),
    ("rules.0.mtch", "x", ["rules[0]", "mtch"]),
    ("rules.0.config", {"weight": {"dtype": "int9x"}}, ["rules[0].config.weight", "int9x"]),
    ("args", [1, 2], ["args"]),
]


@pytest.mark.parametrize(("path", "value", "words"), BAD, ids=[f"{p}={v}" for p, v, _ in BAD])
def test_strict_validation_names_the_key(path: str, value: Any, words: list[str]) -> None:
    with pytest.raises(SpecError) as info:  # RecipeError is a SpecError
        Recipe.from_dict(_with(path, value))
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


RECIPE_LEVEL = [
    ("algoritm", "gptq"),
    ("default.weigth", {"dtype": "int8"}),
    ("algorithm", "gptqq"),
    ("default", DELETE),
    ("default", {}),
    ("version", "one"),
    ("default.input.granularity", "per_group:32"),
    ("default.weight.observer_args", {"percentile": 99.0}),
]


@pytest.mark.parametrize(("path", "value"), RECIPE_LEVEL, ids=[p for p, _ in RECIPE_LEVEL])
def test_recipe_level_errors_are_recipe_errors(path: str, value: Any) -> None:
    with pytest.raises(RecipeError):
        Recipe.from_dict(_with(path, value))


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 9, 16])
def test_bits_in_range_are_accepted(bits: int) -> None:
    """Bits 1..16 are valid (int16 for high-precision layers); int1 must be unsigned."""
    spec = {"dtype": "uint8" if bits == 1 else "int8", "bits": bits}
    recipe = Recipe.from_dict(_with("default.weight", spec))
    assert recipe.default is not None and recipe.default.weight is not None
    assert recipe.default.weight.qdtype.bits == bits


def test_null_default_and_null_input_are_allowed() -> None:
    assert Recipe.from_dict(_with("default", None)).default is None
    recipe = Recipe.from_dict(_with("default.input", None))
    assert recipe.default is not None and recipe.default.input is None


def test_yaml_errors() -> None:
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.from_yaml("default: [unclosed")
    with pytest.raises(RecipeError, match="expected a mapping"):
        Recipe.from_yaml("- just\n- a list\n")
    with pytest.raises(RecipeError, match="expected a mapping"):
        Recipe.from_yaml("")


# ---------------------------------------------------------------------------- Python API


def test_quant_config_validation() -> None:
    with pytest.raises(RecipeError, match="neither weight nor input"):
        QuantConfig()
    with pytest.raises(RecipeError, match="QuantConfig.weight"):
        QuantConfig(weight="int8")  # type: ignore[arg-type]
    with pytest.raises(RecipeError, match="QuantConfig.input.*per_group"):
        QuantConfig(weight=QuantSpec("int8"), input=QuantSpec("int8", "per_group:16"))
    with pytest.raises(RecipeError, match="QuantConfig.weight.*dynamic"):
        QuantConfig(weight=QuantSpec("int8", dynamic=True))
    with pytest.raises(RecipeError, match="version"):
        Recipe(QuantConfig(weight=QuantSpec("int8")), version=3)
    with pytest.raises(RecipeError, match="algorithm 'nope'"):
        Recipe(QuantConfig(weight=QuantSpec("int8")), algorithm="nope")


def test_round_trip_with_rules_and_observer_args() -> None:
    recipe = Recipe(
        QuantConfig(
            weight=QuantSpec(
                "int4",
                "per_group:32",
                symmetric=False,
                observer="mse",
                observer_args={"num_candidates": 20},
            ),
            input=QuantSpec(
                "uint8", symmetric=False, observer="percentile", observer_args={"percentile": 99.9}
            ),
        ),
        rules=(
            Rule("stem.*", QuantConfig(weight=QuantSpec("int8", "per_channel"))),
            Rule("head", None),
        ),
        name="mixed",
        description="rules and observer args",
        fold_batchnorm=False,
    )
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert yaml.safe_load(recipe.to_yaml())["rules"][1] == {"match": "head", "config": None}


# ---------------------------------------------------------------------------- rules


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x).mean(dim=(2, 3))  # (N, 8)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(h)))))


W8A8 = QuantConfig(
    weight=QuantSpec("int8", "per_channel"), input=QuantSpec("int8", symmetric=False)
)
W4 = QuantConfig(weight=QuantSpec("int4", "per_channel"))


def _data() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(2)]


def test_first_matching_rule_wins() -> None:
    recipe = Recipe(W8A8, rules=(Rule("fc*", W4), Rule("fc2", None), Rule("head", None)))
    assert recipe.config_for("fc2") == W4
    assert recipe.config_for("head") is None
    assert recipe.config_for("stem.0") == W8A8
    model = prepare(Net(), recipe)
    layers = quantized_layers(model)
    assert set(layers) == {"stem.0", "fc1", "fc2"}
    for name in ("fc1", "fc2"):
        wq = layers[name].weight_quantizer
        assert wq is not None and wq.spec.qdtype.bits == 4
        assert layers[name].input_quantizer is None


def test_null_config_keeps_the_layer_float() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    recipe = dataclasses.replace(load_recipe("w8a8"), rules=(Rule("head", None),))
    q = quantize(model, recipe, data=_data())
    assert type(q.head) is nn.Linear
    assert isinstance(q.fc1, QLinear) and isinstance(q.stem[0], nn.Conv2d)
    torch.testing.assert_close(q.head.weight, model.head.weight)
    x = _data()[0]
    with torch.no_grad():
        assert sqnr_db(model(x), q(x)) > 30.0


def test_null_default_quantizes_only_the_rules() -> None:
    recipe = Recipe(None, rules=(Rule("fc1", W4),))
    q = quantize(Net(), recipe)
    assert list(quantized_layers(q)) == ["fc1"]
    assert type(q.fc2) is nn.Linear and type(q.stem[0]) is nn.Conv2d


def test_rule_matching_no_layer_raises_naming_the_glob() -> None:
    recipe = Recipe(W8A8, rules=(Rule("decoder.*", None),))
    with pytest.raises(RecipeError, match=r"decoder\.\*.*fc1"):
        prepare(Net(), recipe)


# ---------------------------------------------------------------------------- files


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_load_recipe_from_yaml_file(tmp_path: Path, suffix: str) -> None:
    recipe = dataclasses.replace(load_recipe("w8a8"), name="mine", rules=(Rule("head", None),))
    path = tmp_path / f"mine{suffix}"
    path.write_text(recipe.to_yaml())
    assert load_recipe(path) == recipe
    assert load_recipe(str(path)) == recipe
    q = quantize(Net(), path, data=_data())
    assert type(q.head) is nn.Linear and isinstance(q.fc1, QLinear)


def test_bad_yaml_file_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(_with("default.weight.bitz", 4)))
    with pytest.raises(SpecError, match=r"broken\.yaml.*bitz"):
        load_recipe(path)


def test_missing_file_and_unknown_name(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    with pytest.raises(RecipeError, match=r"nowhere\.yaml.*does not exist"):
        load_recipe(missing)
    with pytest.raises(RecipeError, match=r"does not exist"):
        load_recipe(tmp_path)  # a folder is not a recipe file
    with pytest.raises(RecipeError, match=r"'w9a9'.*w8a8"):
        load_recipe("w9a9")


def test_load_recipe_passes_a_recipe_through() -> None:
    recipe = Recipe(W4)
    assert load_recipe(recipe) is recipe
