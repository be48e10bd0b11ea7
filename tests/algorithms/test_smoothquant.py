"""SmoothQuant: smoothing keeps the float function, lowers W8A8 error under activation outliers,
notes what it cannot smooth, and survives save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms.absorb import find_scale_groups
from lowbit.algorithms.capture import quantizers_disabled
from lowbit.algorithms.smoothquant import SmoothQuant, SmoothQuantConfig


class LNLinear(nn.Module):
    """LayerNorm -> (q, k) Linears sharing its output; a few channels are outliers (x50)."""

    def __init__(self, width: int = 64, outliers: int = 4) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.q = nn.Linear(width, 32)
        self.k = nn.Linear(width, 32)
        with torch.no_grad():
            self.ln.weight[:outliers] = 50.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        return torch.cat([self.q(h), self.k(h)], dim=-1)


def _model_and_data() -> tuple[nn.Module, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LNLinear().eval()
    data = [torch.randn(8, 16, 64, generator=gen) for _ in range(4)]
    return model, data


def _sqnr_after(model: nn.Module, data: list[torch.Tensor], recipe: str, smooth: bool) -> float:
    prepared = lowbit.prepare(model, recipe)
    if smooth:
        SmoothQuant(SmoothQuantConfig(alpha=0.5)).apply(prepared, data)
    lowbit.calibrate(prepared, data)
    x = torch.cat(data)
    with torch.no_grad():
        return lowbit.sqnr_db(model(x), prepared(x))


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-dynamic-token"])
def test_smoothquant_lowers_w8a8_error_with_outliers(recipe: str) -> None:
    model, data = _model_and_data()
    plain = _sqnr_after(model, data, recipe, smooth=False)
    smoothed = _sqnr_after(model, data, recipe, smooth=True)
    assert smoothed > plain + 3.0, (plain, smoothed)


def test_smoothing_keeps_the_float_function() -> None:
    model, data = _model_and_data()
    prepared = lowbit.prepare(model, "w8a8")
    SmoothQuant(SmoothQuantConfig(alpha=0.5)).apply(prepared, data)
    x = torch.cat(data)
    with torch.no_grad(), quantizers_disabled(prepared):
        assert lowbit.sqnr_db(model(x), prepared(x)) >= 60.0
    # the outlier channels moved into the weights: the LayerNorm's gain is flat now
    assert prepared.ln.weight[:4].abs().max() < 50.0 / 2
    # the observers saw nothing during smoothing (calibration is still to come)
    assert prepared.q.input_quantizer.observing


def test_alpha_auto_searches_and_helps() -> None:
    model, data = _model_and_data()
    prepared = lowbit.prepare(model, "w8a8")
    SmoothQuant(SmoothQuantConfig(alpha="auto", grid=5)).apply(prepared, data)
    assert "alpha" in lowbit.prepared_info(prepared).notes[-1]
    lowbit.calibrate(prepared, data)
    x = torch.cat(data)
    with torch.no_grad():
        auto = lowbit.sqnr_db(model(x), prepared(x))
    assert auto > _sqnr_after(model, data, "w8a8", smooth=False) + 3.0


def test_unfoldable_producers_are_noted() -> None:
    class PostLN(nn.Module):  # the LayerNorm also feeds the residual; a GELU feeds fc2
        def __init__(self) -> None:
            super().__init__()
            self.ln, self.fc1, self.fc2 = nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.ln(x)
            return h + self.fc2(nn.functional.gelu(self.fc1(h)))

    prepared = lowbit.prepare(PostLN().eval(), "w8a8")
    SmoothQuant().apply(prepared, [torch.randn(4, 8)])
    notes = "\n".join(lowbit.prepared_info(prepared).notes)
    assert "fc1 not smoothed: the output of 'ln' also goes to" in notes
    assert "fc2 not smoothed: its input comes from the function gelu()" in notes


def test_a_norm_that_is_not_affine_per_channel_is_refused() -> None:
    class OnePlusNorm(nn.Module):  # Gemma-style: x * (1 + weight); dividing weight is wrong
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * (1 + self.weight)

    net = nn.Sequential(OnePlusNorm(), nn.Linear(8, 4)).eval()
    groups, why = find_scale_groups(lowbit.prepare(net, "w8a8"), [torch.randn(4, 8)])
    assert groups == [] and "changes the model's output" in why["1"]


def test_config_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        SmoothQuantConfig(alpha=1.5)
    with pytest.raises(ValueError, match="or 'auto'"):
        SmoothQuantConfig(alpha="best")
    with pytest.raises(ValueError, match="grid must be"):
        SmoothQuantConfig(grid=1)
    with pytest.raises(lowbit.algorithms.AlgorithmError, match="needs calibration data"):
        SmoothQuant().apply(lowbit.prepare(LNLinear(), "w8a8"), None)


def test_recipe_end_to_end_and_save_load_round_trip(tmp_path: object) -> None:
    model, data = _model_and_data()
    q = lowbit.quantize(model, "w8a8-smoothquant", data)
    assert lowbit.prepared_info(q).recipe.name == "w8a8-smoothquant"
    x = torch.cat(data)
    path = lowbit.save(q, f"{tmp_path}/sq")
    back = lowbit.load(path, copy.deepcopy(model))
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
        assert not torch.equal(back.ln.weight, model.ln.weight)  # the smoothed gain came back


def test_gpt2_from_config_end_to_end() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=2,
        vocab_size=96,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 96, (2, 16), generator=gen) for _ in range(2)]
    q = lowbit.quantize(model, "w8a8-smoothquant", data)
    notes = "\n".join(lowbit.prepared_info(q).notes)
    assert "transformer.h.0.ln_1 -> transformer.h.0.attn.c_attn" in notes
    assert "lm_head not smoothed" in notes  # tied to the embedding
    assert q(data[0]).logits.shape == (2, 16, 96)
