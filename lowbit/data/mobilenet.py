"""A small MobileNetV2 for 28x28 images (inverted residuals, depthwise convolutions, ReLU6), and
a copy trained on Fashion-MNIST, cached like the ResNet.

Depthwise convolutions have nine weights per output channel, and after batch-norm folding their
channels' ranges differ by orders of magnitude: the case where round-to-nearest 4-bit weights
hurt and PTQ algorithms earn their keep.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from lowbit.data.datasets import load_fashion_mnist
from lowbit.data.training import default_cache_dir, evaluate, load_weights, save_weights, train

__all__ = [
    "InvertedResidual",
    "MobileNetV2Small",
    "MobileNetRecipe",
    "MOBILENET_FASHION_RECIPE",
    "pretrained_mobilenet_fashion_mnist",
]


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


@dataclasses.dataclass(frozen=True)
class MobileNetRecipe:
    """Hyper-parameters of the cached Fashion-MNIST MobileNetV2; its hash names the cache.

    >>> len(MobileNetRecipe().digest())
    12
    """

    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 4e-5
    label_smoothing: float = 0.1
    seed: int = 0
    train_images: int | None = None  # None: the whole training split

    def digest(self) -> str:
        """A short hash of the recipe (and the architecture's defaults)."""
        blob = json.dumps({"arch": "mobilenet_v2_small-2", **dataclasses.asdict(self)})
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


MOBILENET_FASHION_RECIPE = MobileNetRecipe()


def pretrained_mobilenet_fashion_mnist(
    cache_dir: Path | None = None,
    progress: bool = True,
    *,
    recipe: MobileNetRecipe = MOBILENET_FASHION_RECIPE,
    root: str | Path | None = None,
) -> nn.Module:
    """A MobileNetV2Small trained on Fashion-MNIST, in eval mode; trained once (a few minutes
    on 2 CPU cores), then loaded from ``cache_dir`` (default :func:`default_cache_dir`).

    >>> model = pretrained_mobilenet_fashion_mnist()  # doctest: +SKIP
    """
    folder = default_cache_dir() if cache_dir is None else Path(cache_dir)
    path = folder / f"mobilenet_v2_fashion_mnist-{recipe.digest()}.safetensors"
    if path.is_file():
        try:
            return load_weights(MobileNetV2Small(), path).eval()
        except (SafetensorError, RuntimeError, OSError) as exc:
            warnings.warn(f"cached weights {path} are unreadable ({exc}); retraining", stacklevel=2)
    x, y = load_fashion_mnist("train", root=root)
    if recipe.train_images is not None:
        x, y = x[: recipe.train_images], y[: recipe.train_images]
    with torch.random.fork_rng():  # seeded init without touching the caller's RNG
        torch.manual_seed(recipe.seed)
        model = MobileNetV2Small()
    start = time.perf_counter()
    train(
        model, x, y, recipe.epochs, recipe.batch_size, recipe.lr, optimizer="sgd",
        weight_decay=recipe.weight_decay, label_smoothing=recipe.label_smoothing,
        seed=recipe.seed, channels_last=True, progress=progress,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    test_x, test_y = load_fashion_mnist("test", root=root)
    metadata = {
        "recipe": json.dumps(dataclasses.asdict(recipe), sort_keys=True),
        "train_seconds": f"{seconds:.1f}",
        "test_accuracy": f"{evaluate(model, test_x, test_y):.4f}",
    }
    save_weights(model, path, metadata)
    return model.eval()
