"""Zoo models: output shapes for 28x28 and 32x32 inputs, structure, registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.data import MLP, MODELS, BasicBlock, LeNet5, SmallResNet, create_model


@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", ["mlp", "lenet5", "small_resnet", "mobilenet_v2_small"])
def test_output_shapes(name: str, size: int, channels: int) -> None:
    if name == "mlp":
        model = create_model(name, in_features=channels * size * size, num_classes=7)
    else:
        model = create_model(name, in_channels=channels, input_size=size, num_classes=7)
    out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)


def test_input_shape_attribute() -> None:
    assert LeNet5(3, input_size=32).input_shape == (3, 32, 32)
    assert SmallResNet(1, input_size=28).input_shape == (1, 28, 28)
    assert MLP(64).input_shape == (64,)


def test_small_resnet_is_a_real_resnet() -> None:
    model = SmallResNet(widths=(8, 16, 32, 64), blocks=(2, 1, 1, 1))
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 5
    assert blocks[0].downsample is None and blocks[1].downsample is None  # 8 -> 8, 8 -> 8
    assert all(b.downsample is not None for b in blocks[2:])  # width and stride change
    assert [b.conv1.stride for b in blocks] == [(1, 1), (1, 1), (2, 2), (2, 2), (2, 2)]
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 1 + 2 * len(blocks)
    x = torch.randn(2, 1, 28, 28)
    assert model.stages[2](model.stages[1](model.stages[0](torch.randn(2, 8, 28, 28)))).shape == (
        2,
        32,
        7,
        7,
    )
    assert model(x).shape == (2, 10)


def test_registry_and_errors() -> None:
    assert set(MODELS) == {"mlp", "lenet5", "small_resnet", "mobilenet_v2_small"}
    with pytest.raises(TypeError):
        MODELS["x"] = MLP  # type: ignore[index]
    with pytest.raises(ValueError, match="unknown model 'resnet50'.*'lenet5'"):
        create_model("resnet50")
    with pytest.raises(ValueError, match="same non-zero length"):
        SmallResNet(widths=(8, 16), blocks=(1,))
    with pytest.raises(ValueError, match="input_size=8 is too small"):
        LeNet5(input_size=8)
