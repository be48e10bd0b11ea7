"""export_onnx for embeddings, transformers' Conv1D and Conv3d: integer initializers, and
onnxruntime agreeing with lowbit's simulation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.export.onnx import export_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")


class Mixed(nn.Module):
    """Token embedding -> GPT-2 style Conv1D, plus a Conv3d branch."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 64, padding_idx=0)
        self.fc = transformers.pytorch_utils.Conv1D(32, 64)  # nf, nx
        self.vol = nn.Conv3d(2, 3, 3)

    def forward(self, ids: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids)).mean(-1) + self.vol(v).mean((1, 2, 3, 4))[:, None]


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-dynamic", "w4a16", "w4a8"])
def test_embedding_conv1d_conv3d_export_and_agree_with_the_simulation(
    recipe: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    ids, v = torch.randint(0, 50, (2, 7), generator=gen), torch.randn(2, 2, 4, 5, 6, generator=gen)
    q = lowbit.quantize(Mixed().eval(), recipe, data=[{"ids": ids, "v": v}])
    layers = lowbit.quantized_layers(q)
    assert sorted(layer.kind for layer in layers.values()) == ["conv3d", "embedding", "hf_conv1d"]
    for layer in layers.values():
        layer.set_kernel("reference")
    with torch.no_grad():
        want = q(ids, v)
    path = export_onnx(q, {"ids": ids, "v": v}, tmp_path / "m.onnx", int4_format="qdq")
    model = onnx.load(path)
    ops = {node.op_type for node in model.graph.node}
    assert {"Gather", "MatMul", "Conv", "DequantizeLinear"} <= ops
    table = next(i for i in model.graph.initializer if i.name.startswith("emb.weight_quantized"))
    int4 = recipe.startswith("w4")
    assert table.data_type == (onnx.TensorProto.INT4 if int4 else onnx.TensorProto.INT8)
    got = ort.InferenceSession(str(path)).run(None, {"ids": ids.numpy(), "v": v.numpy()})[0]
    assert lowbit.sqnr_db(want, torch.from_numpy(got)) >= 50.0
