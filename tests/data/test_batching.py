"""Mini-batch and calibration iterators."""

from __future__ import annotations

import pytest
import torch

from lowbit.data import batches, calibration_batches


def test_batches_cover_everything_in_order() -> None:
    x, y = torch.arange(10).float().unsqueeze(1), torch.arange(10)
    parts = list(batches(x, y, batch_size=4))
    assert [len(xb) for xb, _ in parts] == [4, 4, 2]
    assert torch.equal(torch.cat([yb for _, yb in parts]), y)


def test_shuffle_is_a_seeded_permutation() -> None:
    x, y = torch.arange(100).float(), torch.arange(100)
    first = torch.cat([yb for _, yb in batches(x, y, 16, shuffle=True, seed=3)])
    again = torch.cat([yb for _, yb in batches(x, y, 16, shuffle=True, seed=3)])
    other = torch.cat([yb for _, yb in batches(x, y, 16, shuffle=True, seed=4)])
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert sorted(first.tolist()) == list(range(100))
    for xb, yb in batches(x, y, 16, shuffle=True):
        assert torch.equal(xb.long(), yb)  # pairs stay together


def test_batches_errors() -> None:
    with pytest.raises(ValueError, match="x has 3 samples but y has 2"):
        next(batches(torch.zeros(3), torch.zeros(2)))
    with pytest.raises(ValueError, match="batch_size=0"):
        next(batches(torch.zeros(3), torch.zeros(3), batch_size=0))


def test_calibration_batches_fixed_subset() -> None:
    x = torch.arange(1000).float().view(1000, 1, 1, 1)  # (N, C, H, W)
    got = list(calibration_batches(x, n=300, batch_size=128))
    assert [len(b) for b in got] == [128, 128, 44]
    subset = torch.cat(got).flatten()
    assert len(set(subset.tolist())) == 300
    again = torch.cat(list(calibration_batches(x, n=300, batch_size=100))).flatten()
    assert torch.equal(subset, again)  # depends on the seed only, not on batch_size
    other = torch.cat(list(calibration_batches(x, n=300, seed=1))).flatten()
    assert not torch.equal(subset, other)


def test_calibration_uses_all_of_a_small_set() -> None:
    x = torch.randn(10, 3)
    assert torch.equal(torch.cat(list(calibration_batches(x, n=512))), x)
    with pytest.raises(ValueError, match="n=0"):
        next(calibration_batches(x, n=0))
