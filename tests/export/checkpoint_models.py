"""Small models and helpers for the checkpoint tests (imported by conftest and the tests)."""

from __future__ import annotations

import torch
from torch import nn

import lowbit.api


class Block(nn.Module):
    """conv -> BN -> ReLU -> depthwise conv -> BN, plus a residual add."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.bn_dw = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return torch.relu(x + self.bn_dw(self.dw(y)))


class Net(nn.Module):
    """Stem conv + BN, a residual block with a depthwise conv, LayerNorm, two Linear layers.

    ``offset`` is a float buffer and ``norm`` a float layer lowbit never quantizes.
    """

    def __init__(self, width: int = 8, hidden: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.block = Block(width)
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.head = nn.Linear(hidden, classes)
        self.register_buffer("offset", torch.randn(classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(torch.relu(self.stem_bn(self.stem(x))))
        y = self.norm(y.mean(dim=(2, 3)))  # (N, width)
        return self.head(torch.relu(self.fc1(y))) + self.offset


class NetWithoutFc1(Net):
    """Same as Net but without ``fc1`` (head reads the normalised features directly)."""

    def __init__(self) -> None:
        super().__init__(hidden=8)
        del self.fc1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(torch.relu(self.stem_bn(self.stem(x))))
        return self.head(self.norm(y.mean(dim=(2, 3)))) + self.offset


def warm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine parameters and running statistics, then eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen))
        model.train()
        for _ in range(2):
            model(torch.randn(8, 3, 12, 12, generator=gen) * 2 + 0.5)
    return model.eval()


def batch(seed: int, n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


def quantized_net(recipe: lowbit.api.RecipeLike = "w8a8", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return lowbit.api.quantize(warm(Net(), seed), recipe, data=[batch(100), batch(101)])


def fresh_net(seed: int = 12345, **kwargs: int) -> Net:
    torch.manual_seed(seed)
    return Net(**kwargs)
