"""Cases a review of the integer runtime found: each was wrong once, each is a test now."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.nn import QTensor
from lowbit.runtime import opscheck
from lowbit.spec import QuantSpec

pytestmark = pytest.mark.skipif(
    opscheck.available("onednn_qlinear") is not None, reason="no oneDNN int8 on this machine"
)


def test_a_bias_beyond_int32_at_its_scale_stays_float() -> None:
    """A channel whose weights are all zero has a tiny weight scale (pruned, or batch norm
    with gamma 0 folded in): its bias does not fit int32 at s_w * s_x and must stay float."""
    layer = nn.Linear(8, 4)
    with torch.no_grad():
        layer.weight[1] = 0.0
        layer.bias.copy_(torch.tensor([0.5, 8.0, -8.0, 0.25]))
    x = torch.randn(16, 8)
    q = lowbit.quantize(nn.Sequential(layer), "w8a8", data=[x])
    assert not isinstance(q[0].bias, QTensor)
    with torch.no_grad():
        out = q(x)
    torch.testing.assert_close(out[:, 1], torch.full((16,), 8.0))


def test_a_narrow_int4_grid_does_not_take_the_int4_kernel(tmp_path: Path) -> None:
    spec = QuantSpec("int4", "per_group:32", narrow_range=True)
    recipe = lowbit.Recipe(lowbit.QuantConfig(weight=spec))
    model = nn.Sequential(nn.Linear(128, 64))
    q = lowbit.quantize(model, recipe)
    assert q[0].kernel_name != "int4-weight-only"
    x = torch.randn(3, 128)
    with torch.no_grad():
        out = q(x)
        back = lowbit.load(lowbit.save(q, tmp_path / "m.lowbit"), model)
        assert torch.equal(back(x), out)


class SharedInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def test_a_refilled_input_buffer_is_never_served_stale() -> None:
    """Per-token layers sharing an input quantize it once per forward pass: a buffer refilled
    through .data or numpy (which bump no version counter) must be quantized again."""
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    q = lowbit.quantize(SharedInput().eval(), "w8a8-dynamic-token", data=[x])
    compiled = lowbit.compile(q, "torch", example_inputs=x)
    buffer = torch.randn(4, 16)
    with torch.no_grad():
        compiled(buffer)
        buffer.numpy()[:] = torch.randn(4, 16).numpy() * 3
        fresh = compiled(buffer)
        for layer in lowbit.quantized_layers(q).values():
            layer.kernel_for(torch.float32).shared = None  # type: ignore[attr-defined]
        assert torch.equal(fresh, q(buffer))
    with torch.inference_mode():
        assert compiled(torch.randn(4, 16)).shape == (4, 16)


class AliasedResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x.contiguous(memory_format=torch.channels_last)  # an alias of the input
        return self.conv(x) + identity


def test_fused_adds_never_write_into_the_callers_tensor() -> None:
    """The residual here aliases the caller's input: the fused add must copy it first."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    model = AliasedResidual().eval()
    q = lowbit.quantize(model, "w8a8", data=[x.clone()])
    with torch.no_grad():
        expected = lowbit.compile(q, "reference")(x.clone())
        compiled = lowbit.compile(q, "torch", integer_handoff=False)
        kept = x.clone()
        out = compiled(x)
    assert lowbit.kernel_report(compiled).layers[0].fused == "add"
    assert lowbit.sqnr_db(expected, out) > 30.0
    assert torch.equal(x, kept)


def test_in_place_adds_are_not_fused() -> None:
    """``a.add_(b)`` changes ``a`` for every reader: it stays an op of its own."""
    from lowbit.runtime.fusion import _is_add

    graph = torch.fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    assert _is_add(graph.call_function(torch.add, (a, b)))
    assert not _is_add(graph.call_method("add_", (a, b)))


def test_a_compiled_graph_follows_its_layers_kernels() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(5, 8)
    q = lowbit.quantize(model, "w8a8", data=[x])
    compiled = lowbit.compile(q, "torch", example_inputs=x)
    with torch.no_grad():
        fused = compiled(x)
        for layer in lowbit.quantized_layers(q).values():
            layer.set_kernel("reference")
        simulated = compiled(x)  # the fused graph now runs the layers' own kernel
        assert torch.equal(simulated, lowbit.compile(q, "reference")(x))
    assert lowbit.sqnr_db(simulated, fused) > 40.0


def test_a_narrow_activation_grid_is_not_handed_off_as_uint8() -> None:
    """oneDNN's uint8 output clamps to [0, 255]; a narrow grid starts at 1."""
    inp = QuantSpec("int8", symmetric=True, narrow_range=True)
    recipe = lowbit.Recipe(lowbit.QuantConfig(weight=QuantSpec("int8", "per_channel"), input=inp))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8)).eval()
    x = torch.randn(32, 16)
    q = lowbit.quantize(model, recipe, data=[x])
    compiled = lowbit.compile(q, "torch", example_inputs=x)
    assert not any("uint8 out" in row.fused for row in lowbit.kernel_report(compiled).layers)


def test_compiling_for_onnxruntime_leaves_the_layers_on_their_kernels() -> None:
    pytest.importorskip("onnxruntime")
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    x = torch.randn(4, 8)
    q = lowbit.quantize(model, "w8a8", data=[x])
    lowbit.compile(q, "onnxruntime", example_inputs=x)
    assert q[0].kernel_name == "onednn-int8"


def test_writing_into_a_frozen_weight_is_an_error() -> None:
    q = lowbit.quantize(nn.Sequential(nn.Linear(8, 4)), "w8a16")
    for write in (lambda w: w.mul_(0.0), nn.init.zeros_, lambda w: w.copy_(torch.zeros(4, 8))):
        with pytest.raises(RuntimeError, match="cannot write into a frozen quantized weight"):
            write(q[0].weight)
