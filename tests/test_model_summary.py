"""lowbit.summary: every weight-bearing layer, quantized or not, with bytes and reasons."""

from __future__ import annotations

import torch
from torch import nn

import lowbit
from lowbit.config import Recipe, load_recipe


def _recipe_with_rule(base: str, match: str) -> Recipe:
    data = load_recipe(base).to_dict()
    data["rules"] = [{"match": match, "config": None}]
    return Recipe.from_dict(data)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.norm = nn.LayerNorm(64)
        self.fc2 = nn.Linear(64, 64)
        self.head = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc2(self.norm(self.fc1(x))))


def test_every_weight_bearing_layer_is_listed_with_bytes_and_reason() -> None:
    recipe = _recipe_with_rule("w8a16", "head")
    s = lowbit.summary(lowbit.quantize(Net(), recipe))
    rows = {row.name: row for row in s.layers}
    assert list(rows) == ["fc1", "norm", "fc2", "head"]
    assert rows["fc1"].quantized and rows["fc1"].dtype == "int8"
    assert rows["fc1"].granularity.startswith("per_channel")
    # in memory: 64*64 int8 + 64 fp32 scales + 64 int8 zero points + 64 fp32 bias
    assert rows["fc1"].bytes == 64 * 64 + 64 * 4 + 64 + 64 * 4
    assert rows["fc1"].float_bytes == (64 * 64 + 64) * 4
    assert not rows["norm"].quantized and "no quantized LayerNorm" in rows["norm"].note
    assert not rows["head"].quantized and "recipe rule" in rows["head"].note
    assert rows["head"].bytes == rows["head"].float_bytes == (64 * 8 + 8) * 4
    assert s.kept_float.keys() == {"norm", "head"}
    assert s.bytes == sum(row.bytes for row in s.layers)
    total_params = sum(p.numel() for p in Net().parameters())
    assert sum(row.params for row in s.layers) == total_params
    assert abs(s.quantized_share - 2 * (64 * 64 + 64) / total_params) < 1e-9
    assert s.float_bytes == 4 * total_params


def test_tied_weights_count_once_and_say_so() -> None:
    net = nn.Sequential(nn.Linear(32, 32, bias=False), nn.ReLU(), nn.Linear(32, 32, bias=False))
    net[2].weight = net[0].weight
    s = lowbit.summary(net)  # a float model: the real checkpoint size, tied once
    assert s.float_bytes == s.bytes == 32 * 32 * 4
    assert "shares its weight with 0" in s.layers[1].note
    assert s.layers[1].bytes == 0


def test_a_prepared_model_shows_the_plan() -> None:
    prepared = lowbit.prepare(nn.Sequential(nn.Linear(16, 16)), "w4a16")
    row = lowbit.summary(prepared).layers[0]
    assert not row.quantized and row.dtype.startswith("int4") and "not converted" in row.note


def test_names_from_the_model_print_as_plain_text() -> None:
    net = nn.ModuleDict({"[bold]x\x1b[31m": nn.Linear(4, 4)})
    text = str(lowbit.summary(net))
    assert "[bold]x" in text
    assert "\x1b" not in text
