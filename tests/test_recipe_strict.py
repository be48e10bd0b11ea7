"""Recipe values are type-checked strictly, and crafted YAML is refused before it expands."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest

from lowbit.config import Recipe, RecipeError, load_recipe

BASE: dict[str, Any] = {
    "name": "strict",
    "version": 1,
    "default": {
        "weight": {"dtype": "int8", "granularity": "per_channel"},
        "input": {"dtype": "uint8", "symmetric": False},
    },
}


def _set(path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node: Any = data
    for key in parents:
        node = node[key]
    node[last] = value
    return data


# (dotted path, value, words the message must contain)
WRONG_TYPES = [
    # bool is an int in Python: uint + bits: true used to build a "uintTrue" grid
    ("default.input.bits", True, ["default.input", "bits=True", "whole number"]),
    ("default.weight.bits", 4.0, ["default.weight", "bits=4.0", "whole number"]),
    ("default.weight.bits", "4", ["default.weight", "bits='4'", "without quotes"]),
    (
        "default.weight.granularity",
        {"kind": "per_group", "group_size": True},
        ["default.weight", "group_size=True"],
    ),
    ("name", 5, ["recipe.name", "text"]),
    ("description", ["a", "list"], ["recipe.description", "text"]),
    ("algorithm", {"gptq": 1}, ["recipe.algorithm", "list of names or null"]),
    ("algorithm", ["gptq", 3], ["recipe.algorithm", "list of names or null"]),
    ("rules", {}, ["recipe.rules", "list"]),
    ("args", "", ["recipe.args", "mapping"]),
    ("default.weight", "int8", ["default.weight", "expected a mapping such as"]),
]

OBSERVER_ARGS = [
    ("percentile", {"percentile": True}),
    ("percentile", {"percentile": "99.9"}),
    ("mse", {"num_candidates": 24.0}),
    ("mse", {"refine": "yes"}),
    ("entropy", {"bins": 2048.5}),
    ("meanstd", {"k": True}),
    ("moving_average", {"averaging_constant": float("nan")}),
]


@pytest.mark.parametrize(
    ("path", "value", "words"),
    WRONG_TYPES,
    ids=lambda v: repr(v)[:30],
)
def test_wrong_types_name_the_field(path: str, value: Any, words: list[str]) -> None:
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(_set(path, value))
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


@pytest.mark.parametrize(("observer", "args"), OBSERVER_ARGS, ids=lambda v: repr(v)[:30])
def test_observer_args_of_the_wrong_type(observer: str, args: dict[str, Any]) -> None:
    spec = {"dtype": "uint8", "symmetric": False, "observer": observer, "observer_args": args}
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(_set("default.input", spec))
    (name,) = args
    assert f"observer_args.{name}=" in str(info.value) and "default.input" in str(info.value)


def test_observer_args_of_the_right_type_still_load() -> None:
    spec = {
        "dtype": "uint8",
        "symmetric": False,
        "observer": "mse",
        "observer_args": {"num_candidates": 8, "min_ratio": 1, "refine": False},
    }
    recipe = Recipe.from_dict(_set("default.input", spec))
    assert recipe.default is not None and recipe.default.input is not None
    assert dict(recipe.default.input.observer_args)["min_ratio"] == 1


def test_spec_fields_one_level_too_high_say_where_they_go() -> None:
    with pytest.raises(RecipeError, match=r"recipe\.default: unknown key.*under weight: or input:"):
        Recipe.from_dict(_set("default", {"dtype": "int8", "granularity": "per_channel"}))
    data = {"version": 1, "weight": {"dtype": "int8"}, "default": None}
    with pytest.raises(RecipeError, match=r"unknown key.*'weight'.*go under default:"):
        Recipe.from_dict(data)


def test_keys_that_are_not_strings_are_refused() -> None:
    with pytest.raises(RecipeError, match=r"default\.weight: key 4 is not a field name"):
        Recipe.from_yaml("version: 1\ndefault:\n  weight: {4: int8}\n")
    with pytest.raises(RecipeError, match="unknown key"):  # mixed key types sort as text
        Recipe.from_yaml("version: 1\ndefault: null\n1: a\nzz: b\n")


def test_duplicate_yaml_keys_are_refused() -> None:
    text = "version: 1\ndefault:\n  weight: {dtype: int8}\n  weight: {dtype: int4}\n"
    with pytest.raises(RecipeError, match=r"line 4: key 'weight' appears twice"):
        Recipe.from_yaml(text, where="dup.yaml")


def _laughs(levels: int, width: int = 10) -> str:
    lines = ['a0: &a0 "lol"']
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * width)
        lines.append(f"a{i}: &a{i} [{refs}]")
    lines.append(f"default:\n  weight: {{dtype: int8, observer_args: {{x: *a{levels - 1}}}}}")
    return "\n".join(lines) + "\n"


def test_billion_laughs_is_refused_quickly() -> None:
    text = _laughs(10)  # 10**9 strings once expanded
    start = time.perf_counter()
    with pytest.raises(RecipeError, match=r"laughs\.yaml: YAML of more than .* values"):
        Recipe.from_yaml(text, where="laughs.yaml")
    assert time.perf_counter() - start < 0.5


def test_small_aliases_are_still_fine() -> None:
    text = (
        "version: 1\ndefault:\n  weight: &w {dtype: int8, granularity: per_channel}\n"
        "rules:\n  - {match: head, config: {weight: *w}}\n"
    )
    recipe = Recipe.from_yaml(text)
    assert recipe.rules[0].config is not None and recipe.rules[0].config.weight is not None
    assert recipe.default is not None and recipe.rules[0].config.weight == recipe.default.weight


def test_deep_nesting_and_recursive_aliases_are_refused() -> None:
    for opener, closer in (("[", "]"), ("{a: ", "}"), ("[a, ", "]")):
        deep = "version: 1\ndefault: " + opener * 5000 + closer * 5000 + "\n"
        start = time.perf_counter()
        with pytest.raises(RecipeError, match="nested deeper than"):
            Recipe.from_yaml(deep)
        assert time.perf_counter() - start < 0.2
    block = "version: 1\ndefault:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 3000))
    with pytest.raises(RecipeError, match="nested deeper than"):
        Recipe.from_yaml(block)
    with pytest.raises(RecipeError, match="alias refers to a mapping or list holding it"):
        Recipe.from_yaml("version: 1\ndefault: &loop [*loop]\n")


def test_unreadable_recipe_files_are_recipe_errors(tmp_path: Path) -> None:
    binary = tmp_path / "blob.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(RecipeError, match="blob.yaml.*not UTF-8"):
        load_recipe(binary)
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    with pytest.raises(RecipeError, match="folder.yaml"):
        load_recipe(folder)
