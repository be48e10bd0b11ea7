"""A small zoo of hand-written models for tests and benchmarks: an MLP, LeNet-5 and a small ResNet.

Every model carries ``input_shape`` (channels, height, width) so callers can build example inputs
for calibration or export. Activations are ``nn.ReLU`` modules (not functional calls) and residual
adds are plain ``out + identity``, the shapes quantization tooling expects to find.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

__all__ = ["MLP", "MODELS", "BasicBlock", "LeNet5", "SmallResNet", "create_model"]


def _check_input_size(name: str, input_size: int, minimum: int) -> None:
    if input_size < minimum:
        raise ValueError(
            f"{name}: input_size={input_size} is too small; use at least {minimum} "
            "(28 for MNIST-like data, 32 for CIFAR-like data)"
        )


class MLP(nn.Module):
    """Multi-layer perceptron that flattens its input: Linear-ReLU per hidden size, then a head.

    >>> MLP(in_features=64, hidden=(32,), num_classes=10)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self, in_features: int = 784, hidden: Sequence[int] = (256, 128), num_classes: int = 10
    ) -> None:
        super().__init__()
        self.input_shape = (in_features,)
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling; ``input_size`` sets the size of the first Linear layer.

    >>> LeNet5(in_channels=3, input_size=32)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> None:
        super().__init__()
        _check_input_size("LeNet5", input_size, 12)
        self.input_shape = (in_channels, input_size, input_size)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),  # s -> s
            nn.ReLU(),
            nn.MaxPool2d(2),  # s -> s // 2
            nn.Conv2d(6, 16, kernel_size=5),  # s // 2 -> s // 2 - 4
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = (input_size // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (N, 16, side, side) -> (N, 16 * side * side)
            nn.Linear(16 * side * side, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: Conv-BN-ReLU, Conv-BN, ``out + identity``, ReLU.

    The identity path gets a 1x1 Conv+BN (``downsample``) when stride or width changes.

    >>> BasicBlock(8, 16, stride=2)(torch.zeros(1, 8, 28, 28)).shape
    torch.Size([1, 16, 14, 14])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


class SmallResNet(nn.Module):
    """A small ResNet: 3x3 stem, stages of BasicBlocks (stride 2 from the second stage on),
    global average pooling and a Linear head.

    ``widths[i]`` channels and ``blocks[i]`` blocks in stage ``i``.

    >>> m = SmallResNet(in_channels=3, input_size=32, widths=(8, 16, 32), blocks=(1, 1, 1))
    >>> m(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 28,
        widths: Sequence[int] = (32, 64, 128),
        blocks: Sequence[int] = (1, 1, 1),
    ) -> None:
        super().__init__()
        if len(widths) != len(blocks) or not widths or min(blocks) < 1:
            raise ValueError(
                f"SmallResNet: widths={tuple(widths)} and blocks={tuple(blocks)} must have the "
                "same non-zero length and at least one block per stage, e.g. widths=(32, 64, 128), "
                "blocks=(1, 1, 1)"
            )
        _check_input_size("SmallResNet", input_size, 2 ** (len(widths) - 1))
        self.input_shape = (in_channels, input_size, input_size)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages: list[nn.Module] = []
        width = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            layers = [BasicBlock(width, w, stride=1 if i == 0 else 2)]
            layers += [BasicBlock(w, w) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            width = w
        self.stages = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()  # (N, C, 1, 1) -> (N, C)
        self.fc = nn.Linear(width, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)  # each block starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.stages(x)
        return self.fc(self.flatten(self.avgpool(x)))


# Read-only name -> constructor registry.
MODELS: Mapping[str, Callable[..., nn.Module]] = MappingProxyType(
    {"mlp": MLP, "lenet5": LeNet5, "small_resnet": SmallResNet}
)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a zoo model by name (a key of ``MODELS``), passing ``kwargs`` to its constructor.

    >>> create_model("lenet5", input_size=28)(torch.zeros(1, 1, 28, 28)).shape
    torch.Size([1, 10])
    """
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(
            f"create_model: unknown model {name!r}; choose one of {sorted(MODELS)}"
        ) from None
    return factory(**kwargs)
