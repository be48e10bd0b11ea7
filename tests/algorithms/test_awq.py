"""AWQ: activation-aware scaling lowers low-bit weight error against round-to-nearest on a layer
whose input has outlier channels, keeps the float function, and composes in a recipe."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms.awq import AWQ, AWQConfig, clip_weight
from lowbit.algorithms.capture import quantizers_disabled


def _model_and_data() -> tuple[nn.Module, list[torch.Tensor]]:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 48), nn.ReLU()).eval()
    with torch.no_grad():
        model[0].weight[:4] = 20.0  # outlier input channels of the Linear
    gen = torch.Generator().manual_seed(1)
    return model, [torch.randn(8, 16, 64, generator=gen) for _ in range(4)]


def _sqnr(model: nn.Module, data: list[torch.Tensor], config: AWQConfig | None) -> float:
    prepared = lowbit.prepare(model, "w4a16")  # int4 per_group:32
    if config is not None:
        AWQ(config).apply(prepared, data)
    lowbit.calibrate(prepared, data)
    x = torch.cat(data)
    with torch.no_grad():
        return lowbit.sqnr_db(model(x), prepared(x))


def test_awq_beats_round_to_nearest_with_outlier_channels() -> None:
    model, data = _model_and_data()
    rtn = _sqnr(model, data, None)
    awq = _sqnr(model, data, AWQConfig(max_rows=256))
    assert awq > rtn + 1.0, (rtn, awq)
    clipped = _sqnr(model, data, AWQConfig(clip=True, clip_grid=10, max_rows=256))
    assert clipped > rtn + 1.0, (rtn, clipped)


def test_scaling_keeps_the_float_function() -> None:
    model, data = _model_and_data()
    prepared = lowbit.prepare(model, "w4a16")
    AWQ(AWQConfig(grid=10)).apply(prepared, data)
    x = torch.cat(data)
    with torch.no_grad(), quantizers_disabled(prepared):
        assert lowbit.sqnr_db(model(x), prepared(x)) >= 60.0
    assert "awq: scaled 1 group(s): 0 -> 1" in lowbit.prepared_info(prepared).notes[-1]


def test_clip_weight_only_shrinks_ranges() -> None:
    model, data = _model_and_data()
    prepared = lowbit.prepare(model, "w4a16")
    layer = prepared[1]
    before = layer.weight.detach().clone()
    x = torch.cat(data).reshape(-1, 64)[:256]  # (rows, in)
    assert clip_weight(layer, x, grid=10, min_clip=0.5)
    after = layer.weight.detach()
    assert (after.abs() <= before.abs() + 1e-7).all() and not torch.equal(after, before)


def test_skipped_layers_are_noted_and_config_checked() -> None:
    net = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4)).eval()
    prepared = lowbit.prepare(net, "w4a16")
    AWQ(AWQConfig(grid=4)).apply(prepared, [torch.randn(4, 8)])
    notes = "\n".join(lowbit.prepared_info(prepared).notes)
    assert "awq: 0 not scaled: its input comes from the input" in notes
    assert "awq: 2 not scaled: its input comes from '1', a GELU" in notes
    with pytest.raises(ValueError, match="grid must be a positive integer"):
        AWQConfig(grid=0)
    with pytest.raises(ValueError, match=r"min_clip must be in \(0, 1\]"):
        AWQConfig(min_clip=0.0)


def test_recipe_runs_end_to_end_on_gpt2_from_config() -> None:
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
    q = lowbit.quantize(model, "w4a16-awq", data)
    notes = "\n".join(lowbit.prepared_info(q).notes)
    assert "transformer.h.1.ln_2 -> transformer.h.1.mlp.c_fc" in notes
    assert q(data[0]).logits.shape == (2, 16, 96)
