"""A small zoo of hand-written models for tests and benchmarks: an MLP, LeNet-5, a small ResNet
and a small MobileNetV2.

Every model carries ``input_shape`` (channels, height, width) so callers can build example inputs
for calibration or export. Activations are ``nn.ReLU`` / ``nn.ReLU6`` modules (not functional
calls) and residual adds are plain ``out + identity``, the shapes quantization tooling (torch.fx
tracing, batch-norm folding) expects to find.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

__all__ = [
    "MLP",
    "MODELS",
    "BasicBlock",
    "InvertedResidual",
    "LeNet5",
    "MobileNetV2Small",
    "SmallResNet",
    "create_model",
]


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


def _conv_bn(
    cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    return layers + [nn.ReLU6()] if act else layers


class InvertedResidual(nn.Module):
    """1x1 expansion (Conv-BN-ReLU6, none when ``expand == 1``), 3x3 depthwise Conv-BN-ReLU6,
    1x1 linear projection (Conv-BN); ``out + x`` when the stride is 1 and widths match.

    >>> block = InvertedResidual(8, 8, stride=1, expand=4)
    >>> block(torch.zeros(2, 8, 14, 14)).shape, block.residual
    (torch.Size([2, 8, 14, 14]), True)
    """

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = _conv_bn(cin, hidden, 1) if expand != 1 else []
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden)  # depthwise
        layers += _conv_bn(hidden, cout, 1, act=False)  # linear bottleneck
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return out + x if self.residual else out


class MobileNetV2Small(nn.Module):
    """MobileNetV2 shaped for 28x28 inputs: a 3x3 stride-2 stem, inverted residual stages (width,
    blocks, first stride) from ``stages``, a 1x1 Conv-BN-ReLU6 to ``last`` channels, global
    average pooling and a Linear head.

    The first stage's blocks do not expand (as in MobileNetV2); later ones expand ``expand``
    times. The defaults have about 46k parameters.

    >>> m = MobileNetV2Small(stages=((8, 1, 1), (16, 2, 2)), last=32)
    >>> m(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 28,
        stem: int = 16,
        stages: Sequence[tuple[int, int, int]] = ((16, 1, 1), (24, 2, 2), (32, 2, 1), (48, 1, 1)),
        expand: int = 4,
        last: int = 128,
    ) -> None:
        super().__init__()
        if not stages or any(len(s) != 3 or min(s) < 1 for s in stages):
            raise ValueError(
                f"MobileNetV2Small: stages={tuple(stages)} must be non-empty (width, blocks, "
                "stride) triples of positive integers, e.g. ((16, 1, 1), (24, 2, 2))"
            )
        if min(stem, expand, last) < 1:
            raise ValueError(
                f"MobileNetV2Small: stem={stem}, expand={expand} and last={last} must all be "
                "positive, e.g. stem=16, expand=4, last=128"
            )
        self.input_shape = (in_channels, input_size, input_size)
        blocks: list[nn.Module] = []
        width = stem
        for i, (out, count, stride) in enumerate(stages):
            for j in range(count):
                ratio = 1 if i == 0 else expand
                blocks.append(InvertedResidual(width, out, stride if j == 0 else 1, ratio))
                width = out
        self.features = nn.Sequential(
            *_conv_bn(in_channels, stem, 3, stride=2), *blocks, *_conv_bn(width, last, 1)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()  # (N, last, 1, 1) -> (N, last)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


# Read-only name -> constructor registry.
MODELS: Mapping[str, Callable[..., nn.Module]] = MappingProxyType(
    {
        "mlp": MLP,
        "lenet5": LeNet5,
        "small_resnet": SmallResNet,
        "mobilenet_v2_small": MobileNetV2Small,
    }
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
