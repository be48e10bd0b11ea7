"""A converted model is a drop-in: code that reads ``layer.weight`` works, and fp32, bf16 and fp16
models quantize, run, save and load in their own dtype."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.data.zoo import SmallResNet
from lowbit.nn import QTensor


class ReadsItsWeights(nn.Module):
    """Like transformers' patch embeddings and T5's feed-forward: the model's own code reads
    ``.weight.dtype`` / ``.weight.shape`` and even calls F.linear with a child's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, stride=4)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.proj.weight.dtype)  # ViT/CLIP patch embedding
        h = self.proj(x).flatten(2).mean(-1)
        assert self.fc.weight.shape == (8, 8)
        if h.dtype != self.fc.weight.dtype:  # T5DenseActDense's dtype check
            h = h.to(self.fc.weight.dtype)
        h = torch.relu(self.fc(h))
        tied = F.linear(h, self.fc.weight)[:, :4]  # reads a child's weight, like tied heads
        return self.head(h) + 0.1 * tied


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-dynamic", "w4a16"])
def test_model_code_that_reads_weights_keeps_working(recipe: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ReadsItsWeights().eval()
    data = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    q = lowbit.quantize(model, recipe, data=data)
    assert isinstance(q.fc.weight, QTensor) and q.fc.weight.dtype == torch.float32
    assert "weight" not in dict(q.fc.named_parameters())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert lowbit.sqnr_db(model(x), q(x)) > 20.0
        back = lowbit.load(lowbit.save(q, tmp_path / "m.lowbit"), ReadsItsWeights())
        assert torch.equal(back(x), q(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-dynamic", "w4a16"])
def test_models_quantize_run_save_and_load_in_their_dtype(
    dtype: torch.dtype, recipe: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = SmallResNet(widths=(8, 16), blocks=(1, 1)).eval().to(dtype)
    data = [torch.randn(8, 1, 28, 28, dtype=dtype)]
    q = lowbit.quantize(model, recipe, data=data)
    x = torch.randn(4, 1, 28, 28, dtype=dtype)
    with torch.no_grad():
        y = q(x)
        assert y.dtype == dtype
        floor = 20.0 if recipe == "w4a16" else 30.0
        assert lowbit.sqnr_db(model(x).float(), y.float()) > floor
        fresh = SmallResNet(widths=(8, 16), blocks=(1, 1)).to(dtype)
        back = lowbit.load(lowbit.save(q, tmp_path / "m.lowbit"), fresh)
        assert back.conv1.weight.dtype == dtype
        assert torch.equal(back(x), y)


def test_loading_into_another_dtype_names_the_fix(tmp_path: Path) -> None:
    model = SmallResNet(widths=(8,), blocks=(1,)).eval().to(torch.bfloat16)
    q = lowbit.quantize(model, "w8a16")
    path = lowbit.save(q, tmp_path / "m.lowbit")
    with pytest.raises(lowbit.CheckpointError, match="bfloat16 in the file.*model.to"):
        lowbit.load(path, SmallResNet(widths=(8,), blocks=(1,)))


def test_move_and_cast_a_converted_model() -> None:
    torch.manual_seed(0)
    model = SmallResNet(widths=(8,), blocks=(1,)).eval()
    q = lowbit.quantize(model, "w8a8", data=[torch.randn(8, 1, 28, 28)])
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        before = q(x)
        q.to(torch.bfloat16)
        assert q.conv1.weight.dtype == torch.bfloat16 and isinstance(q.conv1.weight, QTensor)
        after = q(x.to(torch.bfloat16))
    assert after.dtype == torch.bfloat16
    assert lowbit.sqnr_db(before, after.float()) > 25.0


def test_an_input_only_layer_is_converted_and_compiles(tmp_path: Path) -> None:
    """A recipe may quantize only a layer's input: the weight stays float, the layer is still
    frozen by convert (and by load), so compile and save take it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    recipe = lowbit.Recipe(lowbit.QuantConfig(input=lowbit.QuantSpec("uint8", symmetric=False)))
    x = torch.randn(16, 8)
    q = lowbit.quantize(model, recipe, data=[x])
    assert all(layer.frozen for layer in lowbit.quantized_layers(q).values())
    assert not isinstance(q[0].weight, QTensor)
    compiled = lowbit.compile(q, "torch", example_inputs=x)
    assert lowbit.kernel_report(compiled).sqnr_db == float("inf")
    back = lowbit.load(lowbit.save(q, tmp_path / "m.lowbit"), model)
    assert all(layer.frozen for layer in lowbit.quantized_layers(back).values())
    with torch.no_grad():
        assert torch.equal(back(x), q(x))


def test_load_onto_a_model_built_on_the_meta_device(tmp_path: Path) -> None:
    """Building the architecture under ``torch.device("meta")`` allocates no float weights;
    everything comes from the file."""
    torch.manual_seed(0)
    model = SmallResNet(widths=(8, 16), blocks=(1, 1)).eval()
    q = lowbit.quantize(model, "w8a8", data=[torch.randn(8, 1, 28, 28)])
    path = lowbit.save(q, tmp_path / "m.lowbit")
    with torch.device("meta"):
        skeleton = SmallResNet(widths=(8, 16), blocks=(1, 1))
    back = lowbit.load(path, skeleton)
    tensors = [*back.parameters(), *back.buffers()]
    assert not any(t.device.type == "meta" for t in tensors)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
