"""GPTQ: on the same layer and calibration data it beats round-to-nearest (SQNR of the layer's
output against float, on held-out inputs of the same distribution); its errors name the layer;
the pipeline is sequential, budgeted, and convert() keeps the integers it chose."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.algorithms import AlgorithmError
from lowbit.algorithms.base import rtn_integers
from lowbit.algorithms.gptq import GPTQ, GPTQConfig, GPTQLayer
from lowbit.config import Recipe, load_recipe
from lowbit.report.metrics import sqnr_db

WEIGHTS = {
    "int4-per_channel": {"dtype": "int4", "granularity": "per_channel", "symmetric": True},
    "int4-per_group": {"dtype": "int4", "granularity": "per_group:16", "symmetric": False},
    "int3-per_channel": {"dtype": "int3", "granularity": "per_channel", "symmetric": False},
}


def _recipe(weight: dict[str, Any], observer: str = "mse") -> Recipe:
    base = load_recipe("w4a16").to_dict()
    base["default"] = {"weight": {**weight, "observer": observer}, "input": None}
    base["embedding"] = None
    return Recipe.from_dict(base)


def _linear_inputs(n: int, features: int, seed: int) -> torch.Tensor:
    """Correlated features (a fixed mixing matrix), the case where GPTQ's updates matter."""
    mix = torch.randn(features, features, generator=torch.Generator().manual_seed(99))
    return torch.randn(n, features, generator=torch.Generator().manual_seed(seed)) @ mix


def _image_inputs(n: int, channels: int, seed: int) -> torch.Tensor:
    """Spatially smooth, channel-mixed images (neighbouring patch values correlate)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, 10, 10, generator=gen)
    x = F.avg_pool2d(x, 3, stride=1, padding=1)
    mix = torch.randn(channels, channels, generator=torch.Generator().manual_seed(98))
    return torch.einsum("nchw,cd->ndhw", x, mix)


def _rtn_and_gptq(
    layer: nn.Module, recipe: Recipe, calib: torch.Tensor, test: torch.Tensor, **args: Any
) -> tuple[float, float]:
    """SQNR (dB) of the layer's output against float on ``test``: round-to-nearest, GPTQ."""
    model = nn.Sequential(layer).eval()
    with torch.no_grad():
        ref = model(test)
    prepared = lowbit.prepare(model, recipe)
    batches = list(calib.split(32))
    lowbit.calibrate(prepared, batches)
    with torch.no_grad():
        rtn = sqnr_db(ref, prepared(test))
    GPTQ(GPTQConfig(**args)).apply(prepared, batches)
    with torch.no_grad():
        gptq = sqnr_db(ref, prepared(test))
    return rtn, gptq


@pytest.mark.parametrize("spec", sorted(WEIGHTS))
def test_linear_gptq_beats_round_to_nearest(spec: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    calib, test = _linear_inputs(256, 64, 1), _linear_inputs(256, 64, 2)
    rtn, gptq = _rtn_and_gptq(layer, _recipe(WEIGHTS[spec]), calib, test)
    assert gptq > rtn + 1.0, f"{spec}: GPTQ {gptq:.2f} dB vs RTN {rtn:.2f} dB"


@pytest.mark.parametrize("act_order", [True, False])
def test_act_order_on_and_off_both_beat_round_to_nearest(act_order: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    calib, test = _linear_inputs(256, 64, 1), _linear_inputs(256, 64, 2)
    recipe = _recipe(WEIGHTS["int4-per_group"])
    rtn, gptq = _rtn_and_gptq(layer, recipe, calib, test, act_order=act_order, block_size=16)
    assert gptq > rtn + 1.0, f"act_order={act_order}: GPTQ {gptq:.2f} dB vs RTN {rtn:.2f} dB"


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv2d(8, 16, 3, padding=1),
        lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: one Hessian per channel
        lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, padding_mode="reflect"),
    ],
    ids=["conv2d", "depthwise", "grouped-strided-reflect"],
)
def test_conv_gptq_beats_round_to_nearest(conv: Any) -> None:
    torch.manual_seed(0)
    calib, test = _image_inputs(64, 8, 1), _image_inputs(64, 8, 2)
    rtn, gptq = _rtn_and_gptq(conv(), _recipe(WEIGHTS["int3-per_channel"]), calib, test)
    assert gptq > rtn + 1.0, f"GPTQ {gptq:.2f} dB vs RTN {rtn:.2f} dB"


def test_conv1d_gptq_beats_round_to_nearest() -> None:
    torch.manual_seed(0)
    calib, test = _image_inputs(64, 8, 1)[:, :, 0], _image_inputs(64, 8, 2)[:, :, 0]  # (N, C, L)
    layer = nn.Conv1d(8, 16, 3, padding=1)
    rtn, gptq = _rtn_and_gptq(layer, _recipe(WEIGHTS["int3-per_channel"]), calib, test)
    assert gptq > rtn + 0.5, f"GPTQ {gptq:.2f} dB vs RTN {rtn:.2f} dB"


def _prepared_linear(features: int = 8) -> nn.Module:
    torch.manual_seed(0)
    model = lowbit.prepare(
        nn.Sequential(nn.Linear(features, 4)), _recipe(WEIGHTS["int4-per_group"])
    )
    model[0].update_weight_qparams()
    return model


def test_nan_in_hessian_names_the_layer() -> None:
    state = GPTQLayer(_prepared_linear()[0], "encoder.fc")
    state.add_batch(torch.full((4, 8), float("nan")))
    with pytest.raises(AlgorithmError, match=r"'encoder\.fc'.*NaN or Inf"):
        state.solve()


def test_cholesky_failure_retries_with_more_damping_then_names_the_layer() -> None:
    state = GPTQLayer(_prepared_linear(4)[0], "head")
    state.hessian.rows = 1
    state.hessian.matrix[0] = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.05]))  # 10x damp fixes it
    result = state.solve()
    assert (
        result.notes
        and "head: Cholesky failed with damp=0.01; solved with damp=0.1" in result.notes[0]
    )
    state.hessian.matrix[0] = -torch.eye(4)  # no damping fixes this one
    with pytest.raises(AlgorithmError, match=r"'head'.*Cholesky.*raise damp"):
        state.solve()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 8)
    ).eval()


def _mlp_data(seed: int, batches: int = 4) -> list[torch.Tensor]:
    return list(_linear_inputs(32 * batches, 32, seed).split(32))


def test_too_few_samples_is_an_error_naming_the_fix() -> None:
    with pytest.raises(
        AlgorithmError, match=r"at least 16 calibration samples, got 4.*min_samples"
    ):
        lowbit.quantize(_mlp(), "w4a16-gptq", data=[torch.randn(4, 32)])


def test_quantize_end_to_end_keeps_the_integers_gptq_chose() -> None:
    model, data = _mlp(), _mlp_data(1)
    prepared = lowbit.prepare(model, "w4a16-gptq")
    lowbit.calibrate(prepared, data)
    GPTQ(GPTQConfig()).apply(prepared, data)
    chosen = {
        name: rtn_integers(layer) for name, layer in lowbit.quantized_layers(prepared).items()
    }
    q = lowbit.quantize(model, "w4a16-gptq", data=data)
    for name, layer in lowbit.quantized_layers(q).items():
        assert layer.frozen
        assert torch.equal(layer.weight.int_repr().to(torch.int32), chosen[name]), name


def _without_algorithm(name: str) -> Recipe:
    base = load_recipe(name).to_dict()
    base["algorithm"], base["args"] = None, {}
    return Recipe.from_dict(base)


def test_pipeline_beats_round_to_nearest_on_a_three_layer_mlp() -> None:
    model, data, test = _mlp(), _mlp_data(1, 8), torch.cat(_mlp_data(2))
    with torch.no_grad():
        ref = model(test)
        rtn = sqnr_db(
            ref, lowbit.quantize(model, _without_algorithm("w3a16-gptq"), data=data)(test)
        )
        gptq = sqnr_db(ref, lowbit.quantize(model, "w3a16-gptq", data=data)(test))
    assert gptq > rtn + 1.0, f"GPTQ {gptq:.2f} dB vs RTN {rtn:.2f} dB"


def test_each_layer_sees_its_already_rounded_predecessors(monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = _mlp(), _mlp_data(1)
    prepared = lowbit.prepare(model, "w4a16-gptq")
    lowbit.calibrate(prepared, data)
    seen: dict[str, list[torch.Tensor]] = {}
    add_batch = GPTQLayer.add_batch

    def record(self: GPTQLayer, x: torch.Tensor) -> None:
        seen.setdefault(self.name, []).append(x)
        add_batch(self, x)

    monkeypatch.setattr(GPTQLayer, "add_batch", record)
    rtn_first = copy.deepcopy(prepared[0])
    GPTQ(GPTQConfig()).apply(prepared, data)
    x = torch.cat(data)
    with torch.no_grad():
        after_gptq = torch.relu(prepared[0](x))  # layer 0 as GPTQ left it
        after_rtn = torch.relu(rtn_first(x))
    assert torch.equal(torch.cat(seen["2"]), after_gptq)
    assert not torch.equal(after_gptq, after_rtn)


def test_time_budget_leaves_layers_at_round_to_nearest_with_a_note() -> None:
    model, data = _mlp(), _mlp_data(1)
    prepared = lowbit.prepare(model, "w4a16-gptq")
    lowbit.calibrate(prepared, data)
    before = {n: rtn_integers(layer) for n, layer in lowbit.quantized_layers(prepared).items()}
    GPTQ(GPTQConfig(budget_s=1e-9)).apply(prepared, data)
    for name, layer in lowbit.quantized_layers(prepared).items():
        assert torch.equal(rtn_integers(layer), before[name])
    notes = lowbit.prepared_info(prepared).notes
    assert any("time budget" in n and "0, 2, 4" in n for n in notes), notes


def test_unsupported_layers_keep_round_to_nearest_with_a_note() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(16, 32), nn.Linear(32, 8))
    data = [torch.randint(0, 16, (32, 4))]
    q = lowbit.quantize(model, "w4a16-gptq", data=data)
    notes = lowbit.prepared_info(q).notes
    assert any("gptq" in n and "0 (embedding)" in n for n in notes), notes


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"damp": 0.0}, "damp must be in"),
        ({"block_size": 0}, "block_size must be a positive integer"),
        ({"min_samples": 0}, "min_samples"),
        ({"budget_s": -1.0}, "budget_s"),
        ({"refit_groups": True}, "refit_groups needs act_order: false"),
    ],
)
def test_config_errors_name_the_field(args: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GPTQConfig(**args)


def test_passes_stop_once_the_target_layer_has_its_input() -> None:
    model, data = _mlp(), _mlp_data(1)  # 4 batches, 3 layers
    prepared = lowbit.prepare(model, "w4a16-gptq")
    lowbit.calibrate(prepared, data)
    calls = []
    handle = prepared[4].register_forward_hook(lambda *_: calls.append(1))
    try:
        GPTQ(GPTQConfig()).apply(prepared, data)
    finally:
        handle.remove()
    assert len(calls) == 1 + 1 + 4  # layers 0 and 2: first batch only; layer 4: every batch


def test_refit_groups_beats_round_to_nearest_and_stores_its_qparams() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    calib, test = _linear_inputs(256, 64, 1), _linear_inputs(256, 64, 2)
    recipe = _recipe(WEIGHTS["int4-per_group"])
    rtn, gptq = _rtn_and_gptq(layer, recipe, calib, test, act_order=False, refit_groups=True)
    assert gptq > rtn + 1.0, f"GPTQ {gptq:.2f} dB vs RTN {rtn:.2f} dB"
    model = lowbit.prepare(nn.Sequential(layer), recipe)
    lowbit.calibrate(model, list(calib.split(32)))
    calibrated = model[0].weight_quantizer.scale.clone()
    GPTQ(GPTQConfig(act_order=False, refit_groups=True)).apply(model, list(calib.split(32)))
    assert model[0].weight_quantizer.scale.shape == calibrated.shape == (32, 4)
    assert not torch.equal(model[0].weight_quantizer.scale, calibrated)
    frozen = lowbit.convert(model)
    assert torch.equal(frozen[0].weight.int_repr().to(torch.int32), rtn_integers(model[0]))
