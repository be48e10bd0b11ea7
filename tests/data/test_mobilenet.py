"""The small MobileNetV2: structure, batch-norm folding, and its cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import lowbit
from lowbit.algorithms import quantizers_disabled
from lowbit.data import create_model, mobilenet
from lowbit.data.mobilenet import InvertedResidual, MobileNetRecipe, MobileNetV2Small
from lowbit.data.training import load_weights, train

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


def test_registry_shapes_and_input_shape() -> None:
    model = create_model("mobilenet_v2_small", in_channels=3, input_size=32, num_classes=7, **TINY)
    assert isinstance(model, MobileNetV2Small) and model.input_shape == (3, 32, 32)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert [b.residual for b in blocks] == [True, False, True]  # 4->4, 4->8 stride 2, 8->8
    assert all(isinstance(b.conv[-1], nn.BatchNorm2d) for b in blocks)  # linear bottleneck
    assert sum(isinstance(m, nn.ReLU6) for m in model.modules()) == 2 + 5  # stem, last; blocks


def test_bad_arguments_name_the_fix() -> None:
    with pytest.raises(ValueError, match="width, blocks"):
        MobileNetV2Small(stages=((8, 0, 1),))
    with pytest.raises(ValueError, match="expand=0"):
        MobileNetV2Small(expand=0)
    with pytest.raises(ValueError, match="epochs=0"):
        MobileNetRecipe(epochs=0)
    with pytest.raises(ValueError, match="train_images=0"):
        MobileNetRecipe(train_images=0)


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
    images = torch.randn(300, 1, 28, 28, generator=gen)
    labels = torch.randint(0, 10, (300,), generator=gen)
    monkeypatch.setattr(mobilenet, "load_fashion_mnist", lambda split, root=None: (images, labels))
    monkeypatch.setattr(mobilenet, "MobileNetV2Small", lambda: MobileNetV2Small(**TINY))
    recipe = MobileNetRecipe(epochs=1, batch_size=32, train_images=200)
    first = mobilenet.pretrained_mobilenet_fashion_mnist(tmp_path, False, recipe=recipe)
    (path,) = tmp_path.glob("mobilenet_v2_fashion_mnist-*.safetensors")
    assert recipe.digest() in path.name
    meta = safe_open(str(path), "pt").metadata()
    assert float(meta["train_seconds"]) >= 0 and 0 <= float(meta["test_accuracy"]) <= 1
    assert json.loads(meta["recipe"])["train_images"] == 200
    monkeypatch.setattr(mobilenet, "_train_mobilenet", None)  # a second call must not train
    again = mobilenet.pretrained_mobilenet_fashion_mnist(tmp_path, False, recipe=recipe)
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not again.training


def test_unreadable_cache_retrains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    monkeypatch.setattr(mobilenet, "load_fashion_mnist", lambda split, root=None: (images, labels))
    monkeypatch.setattr(mobilenet, "MobileNetV2Small", lambda: MobileNetV2Small(**TINY))
    recipe = MobileNetRecipe(epochs=1, batch_size=32)
    path = tmp_path / f"mobilenet_v2_fashion_mnist-{recipe.digest()}.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable"):
        mobilenet.pretrained_mobilenet_fashion_mnist(tmp_path, False, recipe=recipe)
    load_weights(MobileNetV2Small(**TINY), path)  # rewritten, readable


def test_micro_recipe_with_a_one_step_warmup_is_a_clear_error() -> None:
    x, y = torch.randn(200, 1, 28, 28), torch.randint(0, 10, (200,))
    with pytest.raises(ValueError, match="single step.*change batch_size"):
        train(MobileNetV2Small(**TINY), x, y, epochs=1, batch_size=64, progress=False)
