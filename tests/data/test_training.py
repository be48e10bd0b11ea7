"""Training, evaluation and the pretrained-weights cache."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lowbit.data.training as train_module
from lowbit.data import (
    FASHION_MNIST_ROOT,
    MLP,
    TrainRecipe,
    default_cache_dir,
    evaluate,
    load_digits,
    load_fashion_mnist,
    load_weights,
    pretrained_resnet_fashion_mnist,
    save_weights,
    train,
)

TINY = TrainRecipe(widths=(4, 4, 4), blocks=(1, 1, 1), epochs=1, batch_size=64)


def test_mlp_learns_digits() -> None:
    x, y = load_digits("train")
    x_te, y_te = load_digits("test")
    torch.manual_seed(0)
    model = MLP(64, (128,), 10)
    losses = train(model, x, y, epochs=15, batch_size=64, lr=3e-3, optimizer="adam", progress=False)
    assert losses[-1] < losses[0]
    assert evaluate(model, x_te, y_te) > 0.90


def test_training_is_deterministic_for_a_seed() -> None:
    x, y = load_digits("train")
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = MLP(64, (16,), 10)
        runs.append(train(model, x, y, epochs=2, lr=0.05, progress=False, seed=5))
    assert runs[0] == runs[1]


def test_channels_last_training_returns_default_layout() -> None:
    model = train_module.SmallResNet(widths=(4, 8, 8), input_size=8)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    train(model, x, y, epochs=1, batch_size=16, channels_last=True, progress=False)
    assert all(p.is_contiguous() for p in model.parameters())


def test_train_and_evaluate_errors() -> None:
    model = MLP(4, (), 2)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        train(model, x, y, optimizer="lion", progress=False)
    with pytest.raises(ValueError, match="epochs >= 1"):
        train(model, x, y, epochs=0, progress=False)
    with pytest.raises(ValueError, match="same non-zero number"):
        evaluate(model, x, y[:3])
    with pytest.raises(ValueError, match="unknown optimizer"):
        TrainRecipe(optimizer="lion")


def test_evaluate_restores_mode() -> None:
    model = MLP(4, (), 2).train()
    evaluate(model, torch.randn(5, 4), torch.zeros(5, dtype=torch.long))
    assert model.training


def test_recipe_digest_tracks_every_field() -> None:
    base = TrainRecipe()
    assert base.digest() == TrainRecipe().digest()
    for field in ("epochs", "lr", "widths"):
        value = getattr(base, field)
        changed = (value[0] + 1, *value[1:]) if isinstance(value, tuple) else value * 2
        assert dataclasses.replace(base, **{field: changed}).digest() != base.digest()


@pytest.fixture
def tiny_fashion(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace Fashion-MNIST with 128 random images; returns a log of the splits loaded."""
    loaded: list[str] = []

    def fake_load(split: str, root: object = None) -> tuple[torch.Tensor, torch.Tensor]:
        loaded.append(split)
        g = torch.Generator().manual_seed(0)
        return torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)

    monkeypatch.setattr(train_module, "load_fashion_mnist", fake_load)
    return loaded


def test_cache_round_trip(tmp_path: Path, tiny_fashion: list[str], monkeypatch) -> None:
    first = pretrained_resnet_fashion_mnist(cache_dir=tmp_path, progress=False, recipe=TINY)
    assert not first.training
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == [f"small_resnet_fashion_mnist-{TINY.digest()}.safetensors"]
    with safe_open(str(files[0]), "pt") as f:
        meta = f.metadata()
    assert 0.0 <= float(meta["test_accuracy"]) <= 1.0 and "train_seconds" in meta

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached model must not be trained again")

    monkeypatch.setattr(train_module, "train", no_training)
    second = pretrained_resnet_fashion_mnist(cache_dir=tmp_path, progress=False, recipe=TINY)
    assert not second.training
    for (k, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_changed_recipe_retrains(tmp_path: Path, tiny_fashion: list[str]) -> None:
    pretrained_resnet_fashion_mnist(cache_dir=tmp_path, progress=False, recipe=TINY)
    other = dataclasses.replace(TINY, lr=0.05)
    pretrained_resnet_fashion_mnist(cache_dir=tmp_path, progress=False, recipe=other)
    assert tiny_fashion.count("train") == 2
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_corrupt_cache_is_retrained(tmp_path: Path, tiny_fashion: list[str]) -> None:
    path = tmp_path / f"small_resnet_fashion_mnist-{TINY.digest()}.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable"):
        model = pretrained_resnet_fashion_mnist(cache_dir=tmp_path, progress=False, recipe=TINY)
    assert tiny_fashion.count("train") == 1
    load_weights(model, path)  # rewritten and readable


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.safetensors"
    save_weights(MLP(4, (), 2), path)
    before = path.read_bytes()

    def broken_save(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(train_module, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_weights(MLP(4, (), 2), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "lowbit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "lowbit"


@pytest.mark.slow
@pytest.mark.skipif(
    not (FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST is not installed: run `sudo apt-get install -y dataset-fashion-mnist`",
)
def test_pretrained_resnet_reaches_91_percent(tmp_path: Path) -> None:
    start = time.perf_counter()
    model = pretrained_resnet_fashion_mnist(cache_dir=tmp_path, progress=False)
    seconds = time.perf_counter() - start
    x, y = load_fashion_mnist("test")
    accuracy = evaluate(model, x, y)
    print(f"trained in {seconds:.1f} s, test accuracy {accuracy:.4f}")
    assert accuracy >= 0.91
