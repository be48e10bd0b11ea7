"""torch's transformer modules: children that their parent bypasses are handled, not broken."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit


class TinyEncoder(nn.Module):
    """Two nn.TransformerEncoderLayer blocks and a Linear head, as users write them."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


@pytest.fixture()
def model_and_data() -> tuple[nn.Module, list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 6, 16, generator=gen) for _ in range(3)]
    return TinyEncoder().eval(), calib, torch.randn(16, 6, 16, generator=gen)


@pytest.mark.parametrize(("recipe", "min_db"), [("w8a8", 30.0), ("w8a8-dynamic", 30.0)])
def test_encoder_layers_quantize_and_really_run_quantized(
    model_and_data: tuple[nn.Module, list[torch.Tensor], torch.Tensor], recipe: str, min_db: float
) -> None:
    model, calib, x = model_and_data
    q = lowbit.quantize(model, recipe, data=calib)
    names = set(lowbit.quantized_layers(q))
    assert {"encoder.layers.0.linear1", "encoder.layers.1.linear2", "head"} <= names
    # the attention's twin runs its projections as quantized layers
    assert {"encoder.layers.0.self_attn.q_proj", "encoder.layers.1.self_attn.out_proj"} <= names
    assert lowbit.prepared_info(q).kept_float == {}
    with torch.no_grad():  # eval + no_grad is where torch's fused path would skip our layers
        out, ref = q(x), model(x)
    assert lowbit.sqnr_db(ref, out) >= min_db
    assert not torch.equal(out, ref)  # the quantized feed-forward layers did run


def test_encoder_fused_path_would_bypass_calibration_without_the_switch(
    model_and_data: tuple[nn.Module, list[torch.Tensor], torch.Tensor],
) -> None:
    """Every encoder Linear sees calibration data (the error otherwise names the layer)."""
    model, calib, _ = model_and_data
    prepared = lowbit.calibrate(lowbit.prepare(model, "w8a8"), calib)
    for name, layer in lowbit.quantized_layers(prepared).items():
        assert layer.input_quantizer is not None and not layer.input_quantizer.observing, name


def test_encoder_round_trip_through_a_file(
    model_and_data: tuple[nn.Module, list[torch.Tensor], torch.Tensor], tmp_path: Path
) -> None:
    model, calib, x = model_and_data
    q = lowbit.quantize(model, "w4a16", data=calib)
    back = lowbit.load(lowbit.save(q, tmp_path / "enc.lowbit"), TinyEncoder())  # train mode
    assert not back.training  # load hands back an inference model: dropout is off
    with torch.no_grad():
        assert torch.equal(back(x), q(x))


def test_attention_only_model_quantizes_its_projections() -> None:
    class AttentionOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x)[0]

    q = lowbit.prepare(AttentionOnly(), "w8a16")
    assert set(lowbit.quantized_layers(q)) == {
        "attn.q_proj",
        "attn.k_proj",
        "attn.v_proj",
        "attn.out_proj",
    }
