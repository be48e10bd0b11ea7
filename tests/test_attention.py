"""Quantized nn.MultiheadAttention: torch's semantics, int8 accuracy, transformers, files."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lowbit
from lowbit.config import Recipe
from lowbit.nn import QLinear, QMultiheadAttention

HIGH = Recipe.from_dict(
    {
        "name": "w16a16-dynamic",
        "default": {
            "weight": {"dtype": "int16", "granularity": "per_channel"},
            "input": {"dtype": "int16", "dynamic": True},
        },
    }
)


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal to quantization noise ratio in dB (lowbit's own measure)."""
    return float(lowbit.sqnr_db(ref, out))


class Attn(nn.Module):
    """Calls its attention with whatever it is given."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.attn(*args, **kwargs)


def _masks(kind: str, batch: int, tgt: int, src: int, heads: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(3)
    pad = torch.zeros(batch, src, dtype=torch.bool)
    pad[:, -1] = True
    causal = nn.Transformer.generate_square_subsequent_mask(tgt)[:, :src]
    return {
        "none": {},
        "padding-bool": {"key_padding_mask": pad},
        "padding-float": {"key_padding_mask": pad.float() * -1e4},
        "attn-bool": {"attn_mask": causal.isinf()},
        "attn-float-3d": {"attn_mask": torch.randn(batch * heads, tgt, src, generator=gen)},
        "causal": {"attn_mask": causal, "is_causal": True},
        "causal-and-padding": {"attn_mask": causal, "is_causal": True, "key_padding_mask": pad},
    }[kind]


MASKS = [
    "none",
    "padding-bool",
    "padding-float",
    "attn-bool",
    "attn-float-3d",
    "causal",
    "causal-and-padding",
]
MODULES = {
    "plain": {},
    "batch-first": {"batch_first": True},
    "kv-bias-zero-attn": {"add_bias_kv": True, "add_zero_attn": True},
    "kdim-vdim": {"kdim": 6, "vdim": 10},
    "no-bias": {"bias": False},
}


@pytest.mark.parametrize("options", sorted(MODULES))
@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("need_weights, average", [(True, True), (True, False), (False, True)])
def test_high_bit_twin_matches_float_attention(
    options: str, masks: str, need_weights: bool, average: bool
) -> None:
    torch.manual_seed(0)
    kwargs = MODULES[options]
    mha = nn.MultiheadAttention(8, 2, **kwargs).eval()
    batch, tgt, src = 3, 4, 4
    lead = (lambda n: (batch, n)) if kwargs.get("batch_first") else (lambda n: (n, batch))
    query = torch.randn(*lead(tgt), 8)
    key = torch.randn(*lead(src), kwargs.get("kdim", 8))
    value = torch.randn(*lead(src), kwargs.get("vdim", 8))
    call = {
        **_masks(masks, batch, tgt, src, 2),
        "need_weights": need_weights,
        "average_attn_weights": average,
    }
    q = lowbit.prepare(Attn(mha), HIGH)
    assert isinstance(q.attn, QMultiheadAttention) and isinstance(q.attn.out_proj, QLinear)
    with torch.no_grad():
        ref = mha(query, key, value, **call)
        got = q(query, key, value, **call)
        frozen = lowbit.convert(q)(query, key, value, **call)
    for out in (got, frozen):
        torch.testing.assert_close(out[0], ref[0], atol=1e-4, rtol=1e-3)
        if need_weights:
            torch.testing.assert_close(out[1], ref[1], atol=1e-4, rtol=1e-3)
        else:
            assert out[1] is None and ref[1] is None


def test_unbatched_inputs_and_self_attention() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    q = lowbit.prepare(Attn(mha), HIGH)
    x = torch.randn(5, 8)  # (L, E): no batch
    pad = torch.tensor([False, False, False, True, True])
    mask3 = torch.randn(2, 5, 5)
    for call in ({}, {"key_padding_mask": pad}, {"attn_mask": mask3}):
        ref, got = mha(x, x, x, **call), q(x, x, x, **call)
        assert got[0].shape == ref[0].shape == (5, 8) and got[1].shape == ref[1].shape
        torch.testing.assert_close(got[0], ref[0], atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(got[1], ref[1], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_in_training_mode_draws_like_torch(need_weights: bool) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, dropout=0.5).train()
    q = lowbit.prepare(Attn(mha), HIGH).train()
    x = torch.randn(4, 2, 8)
    torch.manual_seed(7)
    ref = mha(x, x, x, need_weights=need_weights)
    torch.manual_seed(7)
    got = q(x, x, x, need_weights=need_weights)
    torch.testing.assert_close(got[0], ref[0], atol=1e-4, rtol=1e-3)
    assert not torch.allclose(got[0], q.eval()(x, x, x)[0], atol=1e-3)  # dropout was on


def test_bad_masks_and_shapes_name_the_problem() -> None:
    q = lowbit.prepare(Attn(nn.MultiheadAttention(8, 2)), HIGH)
    x = torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match=r"2-D attn_mask is \[3, 4\], but should be \[4, 4\]"):
        q(x, x, x, attn_mask=torch.zeros(3, 4))
    with pytest.raises(TypeError, match="only bool .* and float"):
        q(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        q(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="key and value must be 3-D too"):
        q(x, x[0], x)


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def test_w8a8_attention_keeps_30db() -> None:
    torch.manual_seed(0)
    model = SelfAttention().eval()
    gen = torch.Generator().manual_seed(1)
    # the attention output (out_proj's input) has long tails: calibrate on enough of it
    data = [torch.randn(16, 10, 32, generator=gen) for _ in range(8)]
    q = lowbit.quantize(model, "w8a8", data=data)
    layers = lowbit.quantized_layers(q)
    assert set(layers) == {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"}
    assert all(layer.kernel_name == "onednn-int8" for layer in layers.values())
    x = torch.randn(4, 10, 32)
    with torch.no_grad():
        assert sqnr(model(x), q(x)) >= 30


def test_transformer_encoder_quantizes_its_attention_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)

    def build() -> nn.TransformerEncoder:
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()

    model = build()
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(4, 10, 32, generator=gen) for _ in range(4)]
    q = lowbit.quantize(model, "w8a8", data=data)
    info = lowbit.api.prepared_info(q)
    assert not any("out_proj" in name for name in info.kept_float)
    assert isinstance(q.layers[0].self_attn, QMultiheadAttention)
    assert "layers.1.self_attn.out_proj" in lowbit.quantized_layers(q)
    x = torch.randn(3, 10, 32)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[0, 7:] = True
    with torch.no_grad():
        assert sqnr(model(x), q(x)) >= 25
        assert sqnr(model(x, src_key_padding_mask=pad), q(x, src_key_padding_mask=pad)) >= 25
        back = lowbit.load(lowbit.save(q, tmp_path / "enc"), build())
        assert torch.equal(back(x), q(x))
        assert torch.equal(back(x, src_key_padding_mask=pad), q(x, src_key_padding_mask=pad))


def test_nested_tensor_encoder_runs_dense_once_quantized() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 1).eval()  # enable_nested_tensor defaults to True
    q = lowbit.quantize(model, "w8a8", data=[torch.randn(2, 6, 16)])
    x, pad = torch.randn(2, 6, 16), torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    with torch.no_grad():
        ref, out = model(x, src_key_padding_mask=pad), q(x, src_key_padding_mask=pad)
    # torch's nested path leaves padded positions at 0; the dense path computes them
    assert sqnr(ref[~pad], out[~pad]) >= 25


def test_transformer_decoder_layer_cross_attention() -> None:
    torch.manual_seed(0)
    model = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    tgt, memory = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    q = lowbit.quantize(Attn(model), "w8a8", data=[{"tgt": tgt, "memory": memory}])
    assert isinstance(q.attn.multihead_attn, QMultiheadAttention)
    with torch.no_grad():
        ref = model(tgt, memory, tgt_mask=mask, tgt_is_causal=True)
        out = q(tgt, memory, tgt_mask=mask, tgt_is_causal=True)
    assert sqnr(ref, out) >= 25


def test_a_rule_keeping_the_attention_float_keeps_out_proj_float() -> None:
    recipe = Recipe.from_dict(
        {
            "name": "keep-attn",
            "default": {"weight": {"dtype": "int8", "granularity": "per_channel"}},
            "rules": [{"match": "attn", "config": None}],
        }
    )
    q = lowbit.prepare(SelfAttention(), recipe)
    assert type(q.attn) is nn.MultiheadAttention and type(q.attn.out_proj) is not QLinear
    assert "reads out_proj.weight" in lowbit.api.prepared_info(q).kept_float["attn.out_proj"]


def test_float_state_dict_loads_into_the_prepared_twin() -> None:
    torch.manual_seed(0)
    for kwargs in ({}, {"kdim": 6, "vdim": 10}):
        mha, other = nn.MultiheadAttention(8, 2, **kwargs), nn.MultiheadAttention(8, 2, **kwargs)
        q = lowbit.prepare(Attn(copy.deepcopy(mha)), HIGH)
        q.attn.load_state_dict(other.state_dict())
        x = torch.randn(4, 2, 8)
        k, v = torch.randn(3, 2, kwargs.get("kdim", 8)), torch.randn(3, 2, kwargs.get("vdim", 8))
        torch.testing.assert_close(q(x, k, v)[0], other(x, k, v)[0], atol=1e-4, rtol=1e-3)
        if not kwargs:
            torch.testing.assert_close(q.attn.in_proj_weight, other.in_proj_weight)
