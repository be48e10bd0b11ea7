"""The small MobileNetV2: structure, batch-norm folding, and its cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms import quantizers_disabled
from lowbit.data import mobilenet
from lowbit.data.mobilenet import InvertedResidual, MobileNetRecipe, MobileNetV2Small

TINY = dict(stem=4, stages=((4, 1, 1), (8, 2, 2)), expand=2, last=16)


def _trained_looking(model: nn.Module) -> nn.Module:
    """Batch norms with non-trivial statistics, in eval mode."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def test_residual_only_where_shapes_match() -> None:
    assert InvertedResidual(8, 8, 1, 4).residual
    assert not InvertedResidual(8, 8, 2, 4).residual
    assert not InvertedResidual(8, 16, 1, 4).residual
    assert InvertedResidual(8, 16, 2, 4)(torch.zeros(1, 8, 14, 14)).shape == (1, 16, 7, 7)


def test_depthwise_convs_have_one_group_per_channel() -> None:
    model = MobileNetV2Small(**TINY)
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_bad_stages_name_the_fix() -> None:
    with pytest.raises(ValueError, match="width, blocks"):
        MobileNetV2Small(stages=((8, 0, 1),))


def test_prepare_folds_every_batch_norm_and_keeps_the_function() -> None:
    torch.manual_seed(0)
    model = _trained_looking(MobileNetV2Small(**TINY))
    prepared = lowbit.prepare(model, "w8a8")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())
    x = torch.randn(4, 1, 28, 28)
    with quantizers_disabled(prepared), torch.no_grad():
        assert lowbit.sqnr_db(model(x), prepared(x)) > 60


def test_training_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(64, 1, 28, 28, generator=gen)
    labels = torch.randint(0, 10, (64,), generator=gen)
    monkeypatch.setattr(mobilenet, "load_fashion_mnist", lambda split, root=None: (images, labels))
    monkeypatch.setattr(mobilenet, "MobileNetV2Small", lambda: MobileNetV2Small(**TINY))
    recipe = MobileNetRecipe(epochs=1, batch_size=32)
    first = mobilenet.pretrained_mobilenet_fashion_mnist(tmp_path, False, recipe=recipe)
    assert len(list(tmp_path.glob("mobilenet_v2_fashion_mnist-*.safetensors"))) == 1
    again = mobilenet.pretrained_mobilenet_fashion_mnist(tmp_path, False, recipe=recipe)
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not again.training
