"""Quantized twins of ConvTranspose1d/2d, Conv3d and transformers' Conv1D (GPT-2): close to
float, output_size/groups/output_padding kept, static and dynamic inputs, save/load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.config import QuantConfig, Recipe
from lowbit.nn import QConv3d, QConvTranspose1d, QConvTranspose2d, QModule, QTensor
from lowbit.spec import PerChannel, QuantSpec


def _high_bit(dynamic: bool) -> Recipe:
    """16-bit weights and inputs: the quantized layer must compute what the float one does."""
    inputs = QuantSpec("int16", symmetric=False, dynamic=dynamic)
    return Recipe(QuantConfig(weight=QuantSpec("int16", "per_channel"), input=inputs))


class Decoder(nn.Module):
    """A 1-d and a grouped 2-d transposed conv (output_padding), and a Conv3d."""

    def __init__(self) -> None:
        super().__init__()
        self.up1 = nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1)
        self.up2 = nn.ConvTranspose2d(6, 8, 3, stride=2, padding=1, groups=2, dilation=1)
        self.vol = nn.Conv3d(2, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up1(x))  # (N, 6, 2L)
        h = self.up2(h[..., None].expand(-1, -1, -1, 4), output_size=[31, 8])  # (N, 8, 31, 8)
        return h.mean(dim=(2, 3)) + self.vol(v).mean(dim=(1, 2, 3, 4))[:, None]


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, generator=gen), torch.randn(2, 2, 4, 5, 6, generator=gen)


def _decoder() -> Decoder:
    torch.manual_seed(0)
    return Decoder().eval()


def _quantize(model: nn.Module, recipe: Recipe | str) -> nn.Module:
    data = [dict(zip(("x", "v"), _inputs(seed), strict=True)) for seed in (0, 10)]
    return lowbit.quantize(model, recipe, data=data)  # keyword batches; the test batch too


def test_kinds_and_per_output_channel_axes() -> None:
    q = _quantize(_decoder(), "w8a8")
    assert isinstance(q.up1, QConvTranspose1d) and q.up1.kind == "conv_transpose1d"
    assert isinstance(q.up2, QConvTranspose2d) and isinstance(q.vol, QConv3d)
    # (in, out/groups, k): output channels are axis 1; grouped, one scale per input channel
    assert q.up1.weight.granularity == PerChannel(1) and q.up1.weight.scale.shape == (6,)
    assert q.up2.weight.granularity == PerChannel(0) and q.up2.weight.scale.shape == (6,)
    assert q.vol.weight.granularity == PerChannel(0) and q.vol.weight.scale.shape == (4,)
    assert all(isinstance(m.weight, QTensor) for m in (q.up1, q.up2, q.vol))
    assert all(not isinstance(m.bias, QTensor) for m in (q.up1, q.up2))  # float bias


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_high_bit_specs_compute_what_float_does(dynamic: bool) -> None:
    model = _decoder()
    q = _quantize(model, _high_bit(dynamic))
    x, v = _inputs(0)
    with torch.no_grad():
        for name in ("up1", "vol"):
            layer, ref = getattr(q, name), getattr(model, name)
            arg = x if name == "up1" else v
            assert lowbit.sqnr_db(ref(arg), layer(arg)) >= 70.0, name
        h = torch.relu(model.up1(x))[..., None].expand(-1, -1, -1, 4)  # calibrated range
        for size in ([31, 7], [32, 8]):  # output_size picks the output padding
            want, got = model.up2(h, output_size=size), q.up2(h, output_size=size)
            assert got.shape == want.shape == (2, 8, *size)
            assert lowbit.sqnr_db(want, got) >= 70.0
        assert lowbit.sqnr_db(model(x, v), q(x, v)) >= 70.0


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-dynamic", "w8a16"])
def test_int8_runs_close_to_float_and_round_trips(recipe: str, tmp_path: Path) -> None:
    model = _decoder()
    q = _quantize(model, recipe)
    x, v = _inputs(0)
    with torch.no_grad():
        for name in ("up1", "vol"):
            arg = x if name == "up1" else v
            assert lowbit.sqnr_db(getattr(model, name)(arg), getattr(q, name)(arg)) >= 30.0
        assert lowbit.sqnr_db(model(x, v), q(x, v)) >= 25.0
        back = lowbit.load(lowbit.save(q, tmp_path / "d.lowbit"), _decoder())
        assert torch.equal(back(x, v), q(x, v))
        h = torch.randn(2, 6, 9, 4)
        assert torch.equal(back.up2(h, output_size=[18, 8]), q.up2(h, output_size=[18, 8]))


def test_prepared_transposed_conv_takes_output_size_too() -> None:
    model = _decoder()
    prepared = lowbit.prepare(model, "w8a16")
    h = torch.randn(1, 6, 5, 5)
    out = prepared.up2(h, output_size=[10, 10])
    assert out.shape == (1, 8, 10, 10)
    assert lowbit.sqnr_db(model.up2(h, output_size=[10, 10]), out) >= 30.0


# --- transformers' Conv1D (GPT-2) -------------------------------------------------------------


def _gpt2(seed: int) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=100,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2Model(config).eval()


def _quantized_share(model: nn.Module) -> float:
    """Share of the model's parameter elements held in QTensors (buffers included)."""
    held = total = 0
    for module in model.modules():
        for t in [*module._parameters.values(), *module._buffers.values()]:
            if t is not None and t.is_floating_point():
                total += t.numel()
                held += t.numel() if isinstance(t, QTensor) else 0
    return held / total


@pytest.mark.parametrize("recipe", ["w8a8-dynamic", "w4a16"])
def test_gpt2_conv1d_and_embeddings_are_quantized(recipe: str, tmp_path: Path) -> None:
    from transformers.pytorch_utils import Conv1D

    model = _gpt2(0)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    q = lowbit.quantize(model, recipe, data=[{"input_ids": ids}])
    attn = q.h[0].attn.c_attn
    assert isinstance(attn, Conv1D) and isinstance(attn, QModule) and attn.kind == "hf_conv1d"
    assert isinstance(attn.weight, QTensor) and attn.weight.shape == (64, 192)  # (in, out)
    if recipe == "w8a8-dynamic":  # one scale per output channel: axis 1 of (in, out)
        assert attn.weight.granularity == PerChannel(1) and attn.weight.scale.shape == (192,)
    assert lowbit.prepared_info(q).kept_float == {}
    assert _quantized_share(q) >= 0.9
    with torch.no_grad():
        want, got = model(ids).last_hidden_state, q(ids).last_hidden_state
        floor = 25.0 if recipe == "w8a8-dynamic" else 10.0
        assert lowbit.sqnr_db(want, got) >= floor
        back = lowbit.load(lowbit.save(q, tmp_path / "g.lowbit"), _gpt2(1))
        assert _quantized_share(back) == _quantized_share(q)
        assert torch.equal(back(ids).last_hidden_state, got)


def test_conv1d_prepared_forward_matches_float_at_high_bits() -> None:
    model = _gpt2(0)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    q = lowbit.quantize(model, _high_bit(dynamic=True))  # embeddings: no section, float
    with torch.no_grad():
        assert lowbit.sqnr_db(model(ids).last_hidden_state, q(ids).last_hidden_state) >= 60.0


def test_importing_lowbit_does_not_import_transformers(tmp_path: Path) -> None:
    path = lowbit.save(lowbit.quantize(_gpt2(0), "w8a16"), tmp_path / "g.lowbit")
    code = (  # a fresh process reads a GPT-2 file's header without importing transformers
        "import sys, lowbit; from lowbit.export import read_header; "
        f"kinds = {{layer.kind for layer in read_header({str(path)!r}).layers}}; "
        "print('transformers' in sys.modules, sorted(kinds))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False ['embedding', 'hf_conv1d']"


@pytest.mark.parametrize("recipe", ["w8a8-dynamic", "w8a8", "w8a16", "w4a8"])
def test_conv1d_runs_on_the_kernels_a_linear_gets(recipe: str) -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(48, 64)  # nf, nx: y = x @ W + b, W (64, 48)
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    x = torch.randn(3, 5, 64)
    q_conv = lowbit.quantize(nn.Sequential(conv), recipe, data=[x])[0]
    q_linear = lowbit.quantize(nn.Sequential(linear), recipe, data=[x])[0]
    assert q_conv.kernel_name == q_linear.kernel_name  # whatever this machine runs a Linear on
    with torch.no_grad():
        fast = q_conv(x)
        assert torch.equal(fast, q_linear(x))  # the same integers, the same kernel
        q_conv.set_kernel("reference")
        assert lowbit.sqnr_db(q_conv(x), fast) >= 35.0
    assert q_conv.weight.shape == (64, 48)
    if q_linear.kernel_name == "int8-weight-only":  # the kernel reads the layer's integers
        q_conv.set_kernel(None)
        kernel = q_conv.kernel_for(torch.float32)
        assert kernel.ints.data_ptr() == q_conv.weight.qdata.data_ptr()


def test_weight_only_conv3d_runs_on_the_kernel_a_conv2d_gets() -> None:
    torch.manual_seed(0)
    vol, flat = nn.Conv3d(8, 8, 3), nn.Conv2d(8, 8, 3)
    q_vol = lowbit.quantize(nn.Sequential(vol), "w8a16")[0]
    q_flat = lowbit.quantize(nn.Sequential(flat), "w8a16")[0]
    assert q_vol.kernel_name == q_flat.kernel_name  # bf16-dequant where this CPU has bf16
    v = torch.randn(1, 8, 5, 6, 7)
    with torch.no_grad():
        fast = q_vol(v)
        q_vol.set_kernel("reference")
        assert lowbit.sqnr_db(q_vol(v), fast) >= 30.0
        assert lowbit.sqnr_db(vol(v), fast) >= 30.0


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-dynamic"])
def test_int8_conv3d_runs_on_the_kernel_a_conv2d_gets(recipe: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 8, 3, groups=2))
    model = nn.Sequential(*model, nn.ReLU()).eval()
    v = torch.randn(2, 4, 5, 6, 7)
    q = lowbit.quantize(model, recipe, data=[v])
    flat = lowbit.quantize(nn.Sequential(nn.Conv2d(4, 8, 3)), recipe, data=[v[:, :, 0]])
    layers = lowbit.quantized_layers(q).values()
    assert {layer.kernel_name for layer in layers} == {flat[0].kernel_name}
    with torch.no_grad():
        fast, single = q(v), q[0](v[0])  # an unbatched input too
        for layer in layers:
            layer.set_kernel("reference")
        want = q(v)
        assert lowbit.sqnr_db(want, fast) >= 40.0
        assert lowbit.sqnr_db(q[0](v[0]), single) >= 40.0
        for layer in layers:
            layer.set_kernel(None)
        fused = lowbit.compile(q, backend="torch", example_inputs=v)  # ReLU fused where it can
        assert lowbit.sqnr_db(want, fused(v)) >= 40.0
        assert lowbit.sqnr_db(want, fused(v)) >= 40.0  # the bound fast path of a second call
