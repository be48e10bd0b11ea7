"""export_onnx and OrtModule: standard QDQ files with integer weights that onnxruntime runs
and that agree with lowbit's simulation, for every shipped recipe."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.api import quantize, quantized_layers
from lowbit.config import QuantConfig, Recipe, list_recipes
from lowbit.data.zoo import MLP, SmallResNet
from lowbit.report.metrics import sqnr_db
from lowbit.spec import QuantSpec

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, numpy_helper  # noqa: E402

from lowbit.export.onnx import OnnxExportError, OnnxInputError, export_onnx  # noqa: E402
from lowbit.runtime.ort import OrtModule, onnxruntime_module  # noqa: E402

RECIPES = sorted(list_recipes())
MIN_SQNR_DB = 35.0
MODELS = {
    "resnet": (lambda: SmallResNet(widths=(8, 16), blocks=(1, 1)), (1, 28, 28)),
    "mlp": (lambda: MLP(in_features=64, hidden=(128,), num_classes=10), (64,)),
}


FAST_ARGS = {"adaround": {"iters": 10}, "brecq": {"iters": 10}}  # export is tested, not accuracy


@functools.cache
def quantized(model: str, recipe: str | Recipe) -> nn.Module:
    """A converted model (cached: tests only read it); algorithms get 32 calibration samples
    (GPTQ and BRECQ ask for at least that many) and a few iterations."""
    build, shape = MODELS[model]
    torch.manual_seed(0)
    net = build().eval()
    if isinstance(recipe, str):
        recipe = lowbit.load_recipe(recipe)
    fast = {step: FAST_ARGS[step] for step, _ in recipe.steps if step in FAST_ARGS}
    recipe = recipe.with_args(**fast) if fast else recipe
    return quantize(net, recipe, data=[torch.randn(16, *shape), torch.randn(16, *shape)])


@contextmanager
def simulation(model: nn.Module) -> Iterator[None]:
    """Every quantized layer on lowbit's reference kernel (the simulation) inside the block."""
    layers = quantized_layers(model).values()
    for layer in layers:
        layer.set_kernel("reference")
    try:
        yield
    finally:
        for layer in layers:
            layer.set_kernel(None)


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def initializers(path: Path) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in onnx.load(path).graph.initializer}


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("model", list(MODELS))
def test_onnxruntime_matches_the_simulation(model: str, recipe: str, tmp_path: Path) -> None:
    q = quantized(model, recipe)
    shape = MODELS[model][1]
    path = export_onnx(q, torch.randn(2, *shape), tmp_path / "m.onnx")
    onnx.checker.check_model(onnx.load(path), full_check=True)
    run = session(path)
    torch.manual_seed(1)
    for batch in (1, 5):  # one file, a dynamic batch
        x = torch.randn(batch, *shape)
        with simulation(q), torch.no_grad():
            reference = q(x)
        out = torch.from_numpy(run.run(None, {"input": x.numpy()})[0])
        assert sqnr_db(reference, out) >= MIN_SQNR_DB, (model, recipe, batch)


def test_weights_are_int8_initializers_with_uint8_qdq_activations(tmp_path: Path) -> None:
    q = quantized("resnet", "w8a8")
    path = export_onnx(q, torch.randn(1, 1, 28, 28), tmp_path / "m.onnx")
    graph, inits = onnx.load(path).graph, initializers(path)
    made_by = producers(graph)
    floats = [i for i in inits.values() if i.data_type == TensorProto.FLOAT]
    assert all(numpy_helper.to_array(i).size <= 16 for i in floats)  # scales and zero, no weights
    layers = quantized_layers(q)
    weights = {n: inits[f"{n}.weight_quantized"] for n in layers}
    assert {w.data_type for w in weights.values()} == {TensorProto.INT8}
    for name, layer in layers.items():
        expected = layer.weight.int_repr().numpy()
        found = numpy_helper.to_array(weights[name])
        assert (found == (expected.T if layer.kind == "linear" else expected)).all(), name
    quantize_nodes = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize_nodes) == len(layers)
    for node in quantize_nodes:  # uint8 activations, each Q feeding a DequantizeLinear
        assert inits[node.input[2]].data_type == TensorProto.UINT8
    dq_inputs = [n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"]
    assert all(d in inits or made_by[d].op_type == "QuantizeLinear" for d in dq_inputs)
    biases = [inits[d] for d in dq_inputs if d.endswith("bias_quantized")]
    assert biases and {b.data_type for b in biases} == {TensorProto.INT32}


def test_dynamic_recipe_uses_dynamic_quantize_linear(tmp_path: Path) -> None:
    path = export_onnx(quantized("mlp", "w8a8-dynamic"), torch.randn(1, 64), tmp_path / "m.onnx")
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("DynamicQuantizeLinear") == 2 and "QuantizeLinear" not in ops


@pytest.mark.parametrize("int4_format", ["qdq", "matmulnbits"])
def test_int4_weights_stay_int4(int4_format: str, tmp_path: Path) -> None:
    q = quantized("mlp", "w4a16")
    path = export_onnx(q, torch.randn(1, 64), tmp_path / "m.onnx", int4_format=int4_format)
    model = onnx.load(path)
    inits = initializers(path)
    nodes = [n for n in model.graph.node if n.op_type in ("MatMulNBits", "DequantizeLinear")]
    for name, layer in quantized_layers(q).items():
        weight = inits[f"{name}.weight_quantized"]
        if int4_format == "qdq":  # int4 (K, N), blocked along K
            assert weight.data_type == TensorProto.INT4
            values = numpy_helper.to_array(weight).astype("int64")
            assert (values == layer.weight.int_repr().numpy().T).all()
        else:  # MatMulNBits: uint8 (N, k_blocks, 16), two unsigned nibbles a byte
            assert weight.data_type == TensorProto.UINT8
            assert tuple(weight.dims) == (layer.weight.shape[0], layer.weight.shape[1] // 32, 16)
    assert {n.op_type for n in nodes} == {
        "qdq": {"DequantizeLinear"},
        "matmulnbits": {"MatMulNBits"},
    }[int4_format]
    domains = {o.domain for o in model.opset_import}
    assert ("com.microsoft" in domains) == (int4_format == "matmulnbits")


def test_per_group_conv_weights_are_blocked_int4(tmp_path: Path) -> None:
    x = torch.randn(1, 1, 28, 28)
    path = export_onnx(quantized("resnet", "w4a16"), x, tmp_path / "m.onnx")
    inits = initializers(path)
    assert inits["conv1.weight_quantized"].data_type == TensorProto.INT4
    notes = {p.key: p.value for p in onnx.load(path).metadata_props}["lowbit.notes"]
    assert notes == ""  # nothing written as float


def test_opset_without_int4_falls_back_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    q = quantized("resnet", "w4a16")
    x = torch.randn(1, 1, 28, 28)
    with caplog.at_level(logging.WARNING, logger="lowbit.export.onnx"):
        path = export_onnx(q, x, tmp_path / "m.onnx", opset=17)
    assert "conv1: weight written as dequantized float32" in caplog.text
    notes = {p.key: p.value for p in onnx.load(path).metadata_props}["lowbit.notes"]
    assert "per-group weights need opset 21" in notes
    assert initializers(path)["fc.weight_quantized"].data_type == TensorProto.UINT8  # MatMulNBits
    with simulation(q), torch.no_grad():
        reference = q(x)
    assert sqnr_db(reference, OrtModule(path)(x)) >= MIN_SQNR_DB


def test_per_token_and_symmetric_dynamic_inputs_on_3d_tensors(tmp_path: Path) -> None:
    weight = QuantSpec("int8", "per_channel")
    net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    for spec in (
        QuantSpec("int8", "per_token", symmetric=False, dynamic=True),
        QuantSpec("int8", "per_tensor", symmetric=True, dynamic=True),
    ):
        q = quantize(net, Recipe(QuantConfig(weight, spec)))
        x = torch.randn(3, 5, 16)
        fast = onnxruntime_module(q, torch.randn(2, 5, 16), folder=tmp_path / spec.gran.kind)
        with simulation(q), torch.no_grad():
            assert sqnr_db(q(x), fast(x)) >= MIN_SQNR_DB, spec


def test_ort_module_takes_positional_and_keyword_inputs(tmp_path: Path) -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(6, 4)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"sum": self.a(x) + self.b(y), "diff": self.a(x) - self.b(y)}

    data = [{"x": torch.randn(8, 8), "y": torch.randn(8, 6)}]
    q = quantize(TwoInputs().eval(), "w8a8", data=data)
    x, y = torch.randn(3, 8), torch.randn(3, 6)
    path = export_onnx(q, {"y": torch.randn(1, 6), "x": torch.randn(1, 8)}, tmp_path / "m.onnx")
    fast = OrtModule(path)
    assert fast.input_names == ["y", "x"] and fast.output_names == ["sum", "diff"]
    with simulation(q), torch.no_grad():
        expected = q(x, y)
    for got in (fast(y, x), fast(x=x, y=y)):
        assert isinstance(got, tuple) and len(got) == 2
        assert sqnr_db(expected["sum"], got[0]) >= MIN_SQNR_DB
        assert sqnr_db(expected["diff"], got[1]) >= MIN_SQNR_DB
    by_position = onnxruntime_module(q, (torch.randn(1, 8), torch.randn(1, 6)))
    assert by_position.input_names == ["input_0", "input_1"]
    with pytest.raises(OnnxInputError, match="missing inputs"):
        fast(y)


def test_bfloat16_model_exports_in_float32(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = MLP(in_features=64, hidden=(128,), num_classes=10).eval().to(torch.bfloat16)
    q = quantize(net, "w8a8", data=[torch.randn(16, 64, dtype=torch.bfloat16)])
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    path = export_onnx(q, x, tmp_path / "m.onnx")
    assert onnx.load(path).graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert quantized_layers(q)["layers.1"].weight.dtype == torch.bfloat16  # model untouched
    out = OrtModule(path)(x)
    assert out.dtype == torch.bfloat16
    with simulation(q), torch.no_grad():
        assert sqnr_db(q(x), out) >= 25.0  # the simulation rounds activations to bfloat16


def test_clear_errors(tmp_path: Path) -> None:
    net = MLP(in_features=64, hidden=(128,), num_classes=10).eval()
    with pytest.raises(OnnxExportError, match="no quantized layer.*lowbit.quantize"):
        export_onnx(net, torch.randn(1, 64), tmp_path / "m.onnx")
    prepared = lowbit.prepare(net, "w8a8")
    with pytest.raises(OnnxExportError, match="is not converted.*lowbit.convert"):
        export_onnx(prepared, torch.randn(1, 64), tmp_path / "m.onnx")
    q = quantized("mlp", "w8a8")
    with pytest.raises(OnnxInputError, match="example_inputs is a list|example input"):
        export_onnx(q, [1.0], tmp_path / "m.onnx")
    with pytest.raises(OnnxExportError, match="int4_format"):
        export_onnx(q, torch.randn(1, 64), tmp_path / "m.onnx", int4_format="int3")
    with pytest.raises(OnnxExportError, match="opset=11"):
        export_onnx(q, torch.randn(1, 64), tmp_path / "m.onnx", opset=11)
    with pytest.raises(OnnxExportError, match="does not exist"):
        export_onnx(q, torch.randn(1, 64), tmp_path / "no" / "m.onnx")
    with pytest.raises(ValueError, match="expected an input with 64 features"):
        export_onnx(q, torch.randn(1, 60), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file
    assert all("forward" not in layer.__dict__ for layer in quantized_layers(q).values())


def test_missing_onnxruntime_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = export_onnx(quantized("mlp", "w8a8"), torch.randn(1, 64), tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    with pytest.raises(ImportError, match=r"onnxruntime is not installed.*lowbit\[onnx\]"):
        OrtModule(path)


def test_a_model_compiled_for_torch_is_refused(tmp_path: Path) -> None:
    q = quantized.__wrapped__("resnet", "w8a8")  # a model of its own: compile sets kernels
    x = torch.randn(2, 1, 28, 28)
    fused = lowbit.compile(q, "torch", example_inputs=x)
    if fused is not q:  # torch.fx traced it: fused oneDNN layers
        with pytest.raises(OnnxExportError, match="fused oneDNN layer from lowbit.compile"):
            export_onnx(fused, x, tmp_path / "m.onnx")
    with simulation(q), torch.no_grad():
        reference = q(x)
    assert sqnr_db(reference, OrtModule(export_onnx(q, x, tmp_path / "m.onnx"))(x)) > 100
