"""Graph fusion (ReLU, residual add, uint8 hand-off) and lowbit.compile's backends and checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.data.zoo import SmallResNet
from lowbit.runtime import opscheck
from lowbit.runtime.fusion import fuse

pytestmark = pytest.mark.skipif(
    opscheck.available("onednn_qconv2d") is not None, reason="no oneDNN int8 on this machine"
)


@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = SmallResNet(widths=(8, 16), blocks=(1, 1)).eval()
    with torch.no_grad():  # non-trivial residual branches (bn2 starts at zero)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.uniform_(-0.2, 0.2)
    data = torch.randn(16, 1, 28, 28)
    return model, data


def _reference(q: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for layer in lowbit.quantized_layers(q).values():
        layer.set_kernel("reference")
    with torch.no_grad():
        out = q(x)
    for layer in lowbit.quantized_layers(q).values():
        layer.set_kernel(None)
    return out


def test_fusion_folds_relu_and_residual_adds_into_the_convolutions(resnet) -> None:
    model, data = resnet
    q = lowbit.quantize(model, "w8a8", data=[data])
    result = fuse(q)
    assert result.traced
    assert result.fused["conv1"].startswith("relu")
    assert result.fused["stages.0.0.conv2"].startswith("add+relu")
    assert "uint8 out" in result.fused["stages.0.0.conv1"]
    assert "uint8 in" in result.fused["stages.0.0.conv2"]
    graph_ops = {n.target for n in result.module.graph.nodes if n.op == "call_module"}
    assert not any(str(t).endswith("relu") for t in graph_ops)  # every ReLU went into a kernel
    x = torch.randn(8, 1, 28, 28)
    x_copy = x.clone()
    with torch.no_grad():
        out = result.module(x)
    assert torch.equal(x, x_copy), "a fused add must never write into the caller's tensor"
    assert lowbit.sqnr_db(_reference(q, x), out) > 30.0


def test_fusion_without_handoff_matches_the_simulation_closely(resnet) -> None:
    model, data = resnet
    q = lowbit.quantize(model, "w8a8", data=[data])
    result = fuse(q, integer_handoff=False)
    assert not any("uint8" in tags for tags in result.fused.values())
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert lowbit.sqnr_db(_reference(q, x), result.module(x)) > 55.0


class KeepsTheResidual(nn.Module):
    """The residual is read again after the add: fusion must copy it, not overwrite it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = torch.relu(self.a(x))
        out = torch.relu(self.b(x) + identity)
        return out * identity.mean()


def test_a_residual_read_after_the_add_is_not_overwritten() -> None:
    torch.manual_seed(1)
    model = KeepsTheResidual().eval()
    x = torch.randn(2, 4, 8, 8)
    q = lowbit.quantize(model, "w8a8", data=[x])
    result = fuse(q, integer_handoff=False)
    assert result.fused["b"] == "add+relu"
    with torch.no_grad():
        assert lowbit.sqnr_db(_reference(q, x), result.module(x)) > 55.0


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return torch.relu(self.fc(x))
        return self.fc(x)


def test_an_untraceable_model_runs_unfused_with_a_note() -> None:
    x = torch.randn(4, 8)
    q = lowbit.quantize(Untraceable(), "w8a8", data=[x])
    compiled = lowbit.compile(q, "torch", example_inputs=x)
    report = lowbit.kernel_report(compiled)
    assert compiled is q and any("torch.fx cannot trace" in n for n in report.notes)
    assert report.layers[0].kernel == "onednn-int8"


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-dynamic", "w8a16", "w4a16"])
def test_compile_checks_the_result_against_the_simulation(resnet, recipe: str) -> None:
    model, data = resnet
    q = lowbit.quantize(model, recipe, data=[data])
    x = torch.randn(8, 1, 28, 28)
    compiled = lowbit.compile(q, "torch", example_inputs=x)
    report = lowbit.kernel_report(compiled)
    assert report.sqnr_db is not None and report.sqnr_db >= 35.0
    kernels = {row.kernel for row in report.layers}
    assert kernels & {"onednn-int8", "bf16-dequant", "int8-weight-only"}
    for row in report.layers:  # a layer left on the float path says why
        assert row.kernel != "reference" or row.note.startswith("float path; "), row


def test_an_unreachable_floor_falls_back_to_the_simulation(resnet) -> None:
    model, data = resnet
    q = lowbit.quantize(model, "w8a8", data=[data])
    x = torch.randn(4, 1, 28, 28)
    compiled = lowbit.compile(q, "torch", example_inputs=x, min_sqnr_db=1000.0)
    report = lowbit.kernel_report(compiled)
    assert report.backend == "reference"
    assert any("uint8 hand-off gave" in n for n in report.notes)
    assert {row.kernel for row in report.layers} == {"reference"}


def test_reference_backend_and_errors(resnet) -> None:
    model, data = resnet
    q = lowbit.quantize(model, "w8a8", data=[data])
    sim = lowbit.compile(q, "reference")
    assert {row.kernel for row in lowbit.kernel_report(sim).layers} == {"reference"}
    with pytest.raises(ValueError, match="backend='fastest' is unknown"):
        lowbit.compile(q, "fastest")
    with pytest.raises(lowbit.SpecError, match="not converted"):
        lowbit.compile(lowbit.prepare(model, "w8a8"))
    with pytest.raises(lowbit.SpecError, match="no quantized layer"):
        lowbit.compile(model)


def test_auto_without_example_inputs_is_the_torch_backend(resnet) -> None:
    model, data = resnet
    q = lowbit.quantize(model, "w8a8", data=[data])
    compiled = lowbit.compile(q)
    assert lowbit.kernel_report(compiled).backend == "torch"
    with torch.no_grad():
        assert compiled(torch.randn(3, 1, 28, 28)).shape == (3, 10)
