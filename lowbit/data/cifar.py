"""CIFAR-10 from the standard python batch folder (``cifar-10-batches-py``) that a user already has.

Each batch file is a pickled dict with ``data`` uint8 (N, 3072) and ``labels`` (N ints); it is read
with the allow-listed unpickler, never plain ``pickle``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.data.datasets import DatasetNotFoundError
from lowbit.data.safe_pickle import safe_load

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "load_cifar10"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # per channel, over the 50k training images
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_FILES = ("test_batch",)


def _batch_folder(root: Path) -> Path:
    nested = root / "cifar-10-batches-py"
    return nested if not (root / "test_batch").is_file() and nested.is_dir() else root


def _field(batch: Any, key: str, path: Path) -> Any:
    if isinstance(batch, dict):
        for k in (key.encode(), key):  # Python 2 pickles give str keys with latin-1 decoding
            if k in batch:
                return batch[k]
    raise ValueError(
        f"load_cifar10: {path} is not a CIFAR-10 python batch (no {key!r} entry in a dict); "
        "pass root=... pointing at the folder extracted from cifar-10-python.tar.gz"
    )


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = safe_load(path)
    data = np.asarray(_field(batch, "data", path))
    labels = np.asarray(_field(batch, "labels", path), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"load_cifar10: {path} holds data of dtype {data.dtype} and shape {data.shape}; "
            "expected uint8 (N, 3072) as in the original CIFAR-10 python batches"
        )
    if labels.shape != (len(data),) or (labels.size and not 0 <= labels.min() <= labels.max() < 10):
        raise ValueError(
            f"load_cifar10: {path} has {labels.size} labels for {len(data)} images or labels "
            "outside 0..9; the batch file is damaged, extract it again"
        )
    return data.reshape(-1, 3, 32, 32), labels  # (N, 3072) -> (N, C, H, W), channel-major rows


def load_cifar10(root: str | Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 ``split`` ("train": data_batch_1..5, "test": test_batch) as x, y.

    x is float32 (N, 3, 32, 32), y int64 (N,).

    ``root`` is the ``cifar-10-batches-py`` folder or its parent. Pixels are scaled to [0, 1] and
    normalized per channel with ``CIFAR10_MEAN`` / ``CIFAR10_STD``.

    >>> x, y = load_cifar10("~/data/cifar-10-batches-py", "test")  # doctest: +SKIP
    >>> x.shape  # doctest: +SKIP
    torch.Size([10000, 3, 32, 32])
    """
    if split not in ("train", "test"):
        raise ValueError(f"load_cifar10: unknown split {split!r}; use 'train' or 'test'")
    folder = _batch_folder(Path(root).expanduser())
    names = _TRAIN_FILES if split == "train" else _TEST_FILES
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"CIFAR-10: {', '.join(missing)} not found in {folder}. No CIFAR data ships with "
            "this machine: download cifar-10-python.tar.gz "
            "(https://www.cs.toronto.edu/~kriz/cifar.html), extract it, and pass root=... "
            "pointing at the folder with data_batch_1..5 and test_batch"
        )
    parts = [_read_batch(folder / n) for n in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    x = torch.from_numpy(images).to(torch.float32).div_(255.0)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)  # (C,) -> (1, C, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (x - mean) / std, torch.from_numpy(labels)
