"""No silent no-ops in the API: recalibration, stochastic rounding at convert, modes, mappings
as batches, shared layers, float biases said out loud, the summary line, int32 biases."""

from __future__ import annotations

import dataclasses
import logging
from collections import UserDict

import pytest
import torch
from torch import nn

from lowbit.api import (
    calibrate,
    convert,
    prepare,
    prepared_info,
    quantize,
    quantized_layers,
    run_batch,
)
from lowbit.config import QuantConfig, Recipe, RecipeError, Rule, list_recipes, load_recipe
from lowbit.nn import QModule, QTensor
from lowbit.report.metrics import sqnr_db
from lowbit.spec import QuantSpec


def _data(n: int, scale: float = 1.0, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 6, generator=gen) * scale for _ in range(n)]


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _input_scale(model: nn.Module, name: str = "0") -> torch.Tensor:
    quantizer = quantized_layers(model)[name].input_quantizer
    assert quantizer is not None and quantizer.scale is not None
    return quantizer.scale.clone()


# ---------------------------------------------------------------------------- recalibration


def test_second_calibrate_recomputes_ranges_from_the_new_data() -> None:
    small, large = _data(2, 1.0, seed=1), _data(2, 10.0, seed=2)
    model = calibrate(prepare(_mlp(), "w8a8"), small)
    first = _input_scale(model)
    calibrate(model, large)
    fresh = calibrate(prepare(_mlp(), "w8a8"), large)
    assert float(_input_scale(model)) > 5 * float(first)  # the range followed the new data
    torch.testing.assert_close(_input_scale(model), _input_scale(fresh))
    # and back down: the old statistics were dropped, not merged
    calibrate(model, small)
    torch.testing.assert_close(_input_scale(model), first)


def test_accumulate_adds_the_new_data_to_the_old() -> None:
    small, large = _data(2, 1.0, seed=1), _data(2, 10.0, seed=2)
    model = calibrate(prepare(_mlp(), "w8a8"), large)
    calibrate(model, small, accumulate=True)
    both = calibrate(prepare(_mlp(), "w8a8"), large + small)
    torch.testing.assert_close(_input_scale(model), _input_scale(both))
    observer = quantized_layers(model)["0"].input_quantizer.observer
    assert observer is not None and observer.batches == 4


def test_calibrate_after_convert_is_an_error_not_a_no_op() -> None:
    converted = quantize(_mlp(), "w8a8", data=_data(1))
    with pytest.raises(RuntimeError, match=r"converted model.*'0'.*before convert\(\)"):
        calibrate(converted, _data(1))


# ---------------------------------------------------------------------------- stochastic rounding


def _stochastic_recipe() -> Recipe:
    spec = QuantSpec("int4", "per_channel", rounding="stochastic")
    return Recipe(QuantConfig(weight=spec), name="w4-stochastic")


def test_stochastic_weight_rounding_is_unbiased_at_convert() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 16)
    prepared = prepare(nn.Sequential(layer), _stochastic_recipe())
    calibrate(prepared, None)
    copies = [
        convert(prepared, generator=torch.Generator().manual_seed(i))[0].weight.dequantize()
        for i in range(200)
    ]
    assert not torch.equal(copies[0], copies[1])  # really random, not nearest
    same_seed = convert(prepared, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same_seed[0].weight.dequantize(), copies[0])  # and reproducible
    nearest_spec = dataclasses.replace(_stochastic_recipe().default.weight, rounding="nearest")
    nearest = quantize(nn.Sequential(layer), Recipe(QuantConfig(weight=nearest_spec)))
    float_w = layer.weight.detach()
    mean_error = (torch.stack(copies).mean(0) - float_w).abs().mean()
    nearest_error = (nearest[0].weight.dequantize() - float_w).abs().mean()
    assert mean_error < nearest_error / 3


# ---------------------------------------------------------------------------- modes, batches


def test_prepare_and_quantize_give_back_eval_mode() -> None:
    model = _mlp().train()
    assert not prepare(model, "w8a16").training
    q = quantize(model, "w8a8", data=_data(1))
    assert not any(m.training for m in q.modules())
    assert model.training  # the user's model is left as it was


class KeywordNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.fc(input_ids * attention_mask)


def test_any_mapping_is_a_batch_of_keyword_inputs() -> None:
    from transformers import BatchEncoding

    x, mask = torch.randn(4, 6), torch.ones(4, 6)
    model = KeywordNet()
    expected = model(input_ids=x, attention_mask=mask)
    for batch in (
        UserDict(input_ids=x, attention_mask=mask),
        BatchEncoding({"input_ids": x, "attention_mask": mask}),
    ):
        torch.testing.assert_close(run_batch(model, batch), expected)
        calibrated = calibrate(prepare(model, "w8a8"), [batch])
        reference = calibrate(prepare(model, "w8a8"), [{"input_ids": x, "attention_mask": mask}])
        torch.testing.assert_close(_input_scale(calibrated, "fc"), _input_scale(reference, "fc"))


# ---------------------------------------------------------------------------- shared layers


class SharedNet(nn.Module):
    """One Linear registered under two names and called at two places."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = self.a
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(torch.relu(self.a(x)) * 3.0))


def test_a_shared_layer_is_quantized_at_every_name() -> None:
    torch.manual_seed(0)
    model = SharedNet()
    data = _data(2)
    prepared = prepare(model, "w8a8")
    assert isinstance(prepared.a, QModule) and prepared.a is prepared.b
    assert any("a, b" in note for note in prepared_info(prepared).notes)
    calibrate(prepared, data)
    # the observer saw both uses: the second one (3x relu output) widens the range
    only_first = calibrate(prepare(nn.Sequential(model.a), "w8a8"), data)
    assert float(_input_scale(prepared, "a")) > float(_input_scale(only_first))
    q = convert(prepared)
    assert q.a is q.b and isinstance(q.b.weight, QTensor)
    x = _data(1, seed=5)[0]
    with torch.no_grad():
        assert sqnr_db(model(x), q(x)) > 25.0


def test_a_shared_layer_with_two_configs_is_an_error() -> None:
    rules = (Rule("b", None),)
    recipe = dataclasses.replace(load_recipe("w8a8"), rules=rules)
    with pytest.raises(RecipeError, match=r"'a' and 'b' are the same module"):
        prepare(SharedNet(), recipe)


# ---------------------------------------------------------------------------- float bias note


def test_a_bias_that_leaves_int32_is_named_in_the_notes(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    with torch.no_grad():
        model[0].weight[2].zero_()  # a pruned row: its weight scale is ~1e-7
        model[0].bias[2] = 100.0
    prepared = calibrate(prepare(model, "w8a8"), _data(2))
    with caplog.at_level(logging.INFO, logger="lowbit.api"):
        q = convert(prepared)
    assert not isinstance(q[0].bias, QTensor)
    notes = [n for n in prepared_info(q).notes if "bias kept in float" in n]
    assert notes and notes[0].startswith("0:")
    assert "0: bias kept in float" in caplog.text
    assert not any("bias kept" in n for n in prepared_info(prepared).notes)  # a copy's notes
    x = _data(1, seed=3)[0]
    with torch.no_grad():
        assert sqnr_db(model(x), q(x)) > 25.0


# ---------------------------------------------------------------------------- summary line


def test_quantize_logs_one_summary_line(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    recipe = dataclasses.replace(load_recipe("w8a16"), rules=(Rule("2", None),))
    with caplog.at_level(logging.INFO, logger="lowbit.api"):
        quantize(model, recipe)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("quantized")]
    assert len(lines) == 1
    assert lines[0].startswith("quantized 1 of 2 layers (1 kept float: 2) with w8a16, ")
    before, after = lines[0].split(", ")[-1].split(" -> ")
    assert before == f"{(64 * 64 + 64 + 8 * 64 + 8) * 4 / 1024:.1f} KiB"
    assert float(after.split()[0]) < float(before.split()[0]) / 2


# ---------------------------------------------------------------------------- int32 bias grid

INT_BIAS_RECIPES = [
    name
    for name in list_recipes()
    if (c := load_recipe(name).default) is not None
    and c.input is not None
    and not c.input.dynamic
    and c.input.gran.kind == "per_tensor"
    and c.weight is not None
    and c.weight.gran.kind in ("per_tensor", "per_channel")
]


def test_some_shipped_recipes_have_an_int32_bias() -> None:
    assert {"w8a8", "w4a8", "w8a8-pertensor"} <= set(INT_BIAS_RECIPES)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("name", INT_BIAS_RECIPES)
def test_qbias_is_the_bias_on_the_s_w_times_s_x_grid(name: str, kind: str) -> None:
    torch.manual_seed(0)
    if kind == "linear":
        layer, data = nn.Linear(6, 8), _data(2)
    else:
        layer, data = nn.Conv2d(2, 4, 3), [torch.randn(2, 2, 5, 5) for _ in range(2)]
    prepared = calibrate(prepare(nn.Sequential(layer), name), data)
    wq, iq = prepared[0].weight_quantizer, prepared[0].input_quantizer
    assert wq is not None and wq.scale is not None and iq is not None and iq.scale is not None
    s = (wq.scale * iq.scale).double().reshape(-1)  # (out,) or (1,)
    expected = torch.round(layer.bias.detach().double() / s).to(torch.int32)
    qbias = convert(prepared)[0].bias
    assert isinstance(qbias, QTensor)
    assert torch.equal(qbias.int_repr(), expected)
