"""CIFAR-10 python batch folders, written by the test in the original format (pickle protocol 2)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DatasetNotFoundError,
    UnsafePickleError,
    load_cifar10,
)

_PER_BATCH = 4


def _write_batch(path: Path, seed: int, str_keys: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (_PER_BATCH, 3072), dtype=np.uint8)  # (N, 3 * 32 * 32)
    batch = {
        b"batch_label": path.name.encode(),
        b"labels": [int(v) for v in rng.integers(0, 10, _PER_BATCH)],
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(_PER_BATCH)],
    }
    if str_keys:
        batch = {k.decode(): v for k, v in batch.items()}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return data


def _write_folder(folder: Path) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return [_write_batch(folder / name, seed) for seed, name in enumerate(names)]


def test_train_and_test_splits(tmp_path: Path) -> None:
    written = _write_folder(tmp_path)
    x, y = load_cifar10(tmp_path, "train")
    assert x.shape == (5 * _PER_BATCH, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (5 * _PER_BATCH,) and y.dtype == torch.int64
    x_te, _ = load_cifar10(tmp_path, "test")
    assert x_te.shape == (_PER_BATCH, 3, 32, 32)
    # Rows are channel-major: pixel (c, h, w) is column c * 1024 + h * 32 + w.
    raw = written[0][1]
    for c, h, w in [(0, 0, 0), (1, 5, 7), (2, 31, 31)]:
        expected = (raw[c * 1024 + h * 32 + w] / 255 - CIFAR10_MEAN[c]) / CIFAR10_STD[c]
        assert x[1, c, h, w].item() == pytest.approx(expected, abs=1e-5)


def test_parent_folder_and_python2_style_keys(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _write_folder(folder)
    _write_batch(folder / "test_batch", seed=9, str_keys=True)
    assert load_cifar10(tmp_path, "test")[0].shape == (_PER_BATCH, 3, 32, 32)


def test_missing_batches_say_how_to_get_them(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    os.remove(tmp_path / "data_batch_3")
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar10(tmp_path, "train")
    assert "data_batch_3" in str(info.value)
    assert "pass root=... pointing at the folder with data_batch_1..5" in str(info.value)
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        load_cifar10(tmp_path / "nowhere", "test")


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("true",))


def test_malicious_batch_is_refused(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(UnsafePickleError):
        load_cifar10(tmp_path, "test")


def test_wrong_layout_is_explained(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(ValueError, match=r"expected uint8 \(N, 3072\)"):
        load_cifar10(tmp_path, "test")
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump([1, 2], f, protocol=2)
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        load_cifar10(tmp_path, "test")
