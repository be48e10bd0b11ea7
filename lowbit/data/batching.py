"""Mini-batch iteration over in-memory tensors, for training, evaluation and calibration."""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["batches", "calibration_batches"]


def _check_batch_size(fn: str, batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"{fn}: batch_size={batch_size} must be a positive integer, e.g. 128")


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 256,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x_batch, y_batch)`` pairs; the last batch may be smaller.

    With ``shuffle`` the order is a permutation drawn from ``seed``, so a fixed seed repeats it.

    >>> import torch
    >>> [xb.shape[0] for xb, _ in batches(torch.zeros(5, 2), torch.zeros(5), batch_size=2)]
    [2, 2, 1]
    """
    _check_batch_size("batches", batch_size)
    if len(x) != len(y):
        raise ValueError(
            f"batches: x has {len(x)} samples but y has {len(y)}; pass inputs and labels of the "
            "same split"
        )
    if shuffle:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]
    else:
        for start in range(0, len(x), batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]


def calibration_batches(
    x: torch.Tensor, n: int = 512, batch_size: int = 128, seed: int = 0
) -> Iterator[torch.Tensor]:
    """Yield input-only batches from a fixed random subset of ``n`` samples of ``x``.

    The subset depends only on ``seed`` (all of ``x`` when it has at most ``n`` samples), so
    calibrating twice sees the same data.

    >>> import torch
    >>> [b.shape for b in calibration_batches(torch.zeros(1000, 1, 8, 8), n=300, batch_size=128)]
    [torch.Size([128, 1, 8, 8]), torch.Size([128, 1, 8, 8]), torch.Size([44, 1, 8, 8])]
    """
    _check_batch_size("calibration_batches", batch_size)
    if n < 1:
        raise ValueError(f"calibration_batches: n={n} must be positive, e.g. 512 samples")
    count = min(n, len(x))
    subset = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:count]
    subset = subset.sort().values  # keep the original order within the subset
    for start in range(0, count, batch_size):
        yield x[subset[start : start + batch_size]]
