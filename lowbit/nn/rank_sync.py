"""Quantizer ranges agreed across the processes of a ``torch.distributed`` job.

Each process calibrates and trains on its own share of the data, so left alone every rank would
end up with its own scales. These functions make them agree, with at most two collectives per
call whatever the number of quantizers:

- :func:`merge_observers`, before calibration is finished: min-max statistics are reduced
  exactly (minimum of minima, maximum of maxima), mean/std sums are added, moving averages are
  averaged. Observers whose statistics have no exact merge (percentile, MSE, entropy) are left
  alone and :func:`average_ranges` averages the ranges they produce afterwards.
- :func:`average_batch_norms`: batch norms' running statistics averaged (DDP copies rank 0's
  at the start of each forward, so after the last step every rank holds its own).
- :func:`average_ranges`: the mean of each quantizer's covered range ``[lo, hi]`` over ranks,
  turned back into qparams; during training it keeps ``moving_average`` ranges identical
  (learned ``lsq`` ranges are parameters: DDP already averages their gradients).

Without an initialised process group, or with one process, they do nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from lowbit.nn.quantizer import Quantizer
from lowbit.observers import MeanStdObserver, MinMaxObserver, MovingAverageMinMaxObserver
from lowbit.primitives import choose_qparams

__all__ = [
    "world_size",
    "merge_observers",
    "average_ranges",
    "average_batch_norms",
    "exactly_merged",
]


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """The number of processes in ``group`` (1 when torch.distributed is not initialised).

    >>> world_size()
    1
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def exactly_merged(quantizer: Quantizer) -> bool:
    """Whether :func:`merge_observers` merges this quantizer's statistics exactly.

    >>> from lowbit.spec import QuantSpec
    >>> mse = QuantSpec("int8", observer="mse")
    >>> exactly_merged(Quantizer(QuantSpec("int8"))), exactly_merged(Quantizer(mse))
    (True, False)
    """
    return isinstance(quantizer.observer, (MinMaxObserver, MeanStdObserver))


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros(0)
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


def _unflatten(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, start = [], 0
    for t in like:
        out.append(flat[start : start + t.numel()].reshape(t.shape).to(t.dtype))
        start += t.numel()
    return out


def _reduce(
    maxed: list[torch.Tensor], summed: list[torch.Tensor], group: dist.ProcessGroup | None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """All-reduce ``maxed`` with MAX and ``summed`` with SUM, one collective each (gloo has no
    AVG; the caller divides)."""
    flat_max, flat_sum = _flat(maxed), _flat(summed)
    if flat_max.numel():
        dist.all_reduce(flat_max, op=dist.ReduceOp.MAX, group=group)
    if flat_sum.numel():
        dist.all_reduce(flat_sum, op=dist.ReduceOp.SUM, group=group)
    return _unflatten(flat_max, maxed), _unflatten(flat_sum, summed)


def merge_observers(
    quantizers: Iterable[Quantizer], group: dist.ProcessGroup | None = None
) -> None:
    """Merge the observers' statistics over all ranks (every rank must call it with the same
    quantizers in the same order). Call it after the calibration batches and before the
    ranges are fixed (``lowbit.calibrate(..., sync_ranks=True)`` does).

    >>> from lowbit.spec import QuantSpec
    >>> merge_observers([Quantizer(QuantSpec("int8"))])  # one process: nothing to do
    """
    world = world_size(group)
    if world == 1:
        return
    observers = [q.observer for q in quantizers if q.observer is not None and exactly_merged(q)]
    maxed: list[torch.Tensor] = []
    summed: list[torch.Tensor] = []
    for obs in observers:
        if isinstance(obs, MovingAverageMinMaxObserver):
            summed += [obs.min_val, obs.max_val]
        elif isinstance(obs, MinMaxObserver):
            maxed += [-obs.min_val, obs.max_val]
        elif isinstance(obs, MeanStdObserver):
            maxed += [-obs.lo, obs.hi]
            summed += [obs.sum, obs.sumsq, obs.count]
    maxed, summed = _reduce(maxed, summed, group)
    for obs in observers:
        if isinstance(obs, MovingAverageMinMaxObserver):
            obs.min_val, obs.max_val = summed.pop(0) / world, summed.pop(0) / world
        elif isinstance(obs, MinMaxObserver):
            obs.min_val, obs.max_val = -maxed.pop(0), maxed.pop(0)
        elif isinstance(obs, MeanStdObserver):
            obs.lo, obs.hi = -maxed.pop(0), maxed.pop(0)
            obs.sum, obs.sumsq, obs.count = summed.pop(0), summed.pop(0), summed.pop(0)


def _covered_range(q: Quantizer) -> tuple[torch.Tensor, torch.Tensor]:
    scale, zero = q.fixed_qparams()
    zero_f = zero.float()
    return (q.spec.qdtype.qmin - zero_f) * scale, (q.spec.qdtype.qmax - zero_f) * scale


def average_ranges(
    quantizers: Iterable[Quantizer],
    group: dist.ProcessGroup | None = None,
    fixed: bool = False,
) -> int:
    """Average over ranks the ranges of the quantizers given: a ``moving_average`` range's
    running minimum and maximum, and with ``fixed=True`` a fixed (or a learned range's
    current) covered interval; then set their qparams from the average. Dynamic and
    still-observing quantizers are skipped, learned (``lsq``) ones unless ``fixed``. Returns
    how many quantizers it synchronised. Every rank must call it with the same quantizers.

    >>> from lowbit.spec import QuantSpec
    >>> average_ranges([Quantizer(QuantSpec("int8"))])
    0
    """
    world = world_size(group)
    if world == 1:
        return 0
    moving: list[Quantizer] = []
    fixed_ones: list[Quantizer] = []
    for q in quantizers:
        if q.spec.dynamic or q.scale is None or q.observing:
            continue
        if q.range == "moving_average" and isinstance(q.observer, MovingAverageMinMaxObserver):
            moving.append(q)
        elif fixed and (q.range == "fixed" or q.learned):  # a learned range's starting point
            fixed_ones.append(q)
    summed: list[torch.Tensor] = []
    for q in moving:
        assert isinstance(q.observer, MovingAverageMinMaxObserver)
        summed += [q.observer.min_val, q.observer.max_val]
    for q in fixed_ones:  # symmetric grids: the scale itself (the zero point is fixed)
        summed += [q.fixed_qparams()[0]] if q.spec.symmetric else list(_covered_range(q))
    _, summed = _reduce([], summed, group)
    for q in moving:
        obs = q.observer
        assert isinstance(obs, MovingAverageMinMaxObserver)
        obs.min_val, obs.max_val = summed.pop(0) / world, summed.pop(0) / world
        q.set_qparams(*obs.qparams())
    for q in fixed_ones:
        if q.spec.symmetric:
            q.set_qparams(summed.pop(0).float() / world, q.fixed_qparams()[1])
            continue
        lo, hi = summed.pop(0) / world, summed.pop(0) / world
        q.set_qparams(*choose_qparams(lo, hi, q.spec.qdtype, q.spec.symmetric))
    return len(moving) + len(fixed_ones)


def average_batch_norms(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Average every batch norm's running mean and variance over ranks (one collective), so the
    ranks fold identical statistics into their weights. Returns how many batch norms it
    averaged (0 outside a process group of more than one rank).

    >>> average_batch_norms(nn.Sequential(nn.BatchNorm1d(3)))
    0
    """
    world = world_size(group)
    if world == 1:
        return 0
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]
    stats: list[torch.Tensor] = []
    for bn in norms:
        assert bn.running_mean is not None and bn.running_var is not None
        stats += [bn.running_mean, bn.running_var]
    _, averaged = _reduce([], stats, group)
    with torch.no_grad():
        for bn in norms:
            assert bn.running_mean is not None and bn.running_var is not None
            bn.running_mean.copy_(averaged.pop(0) / world)
            bn.running_var.copy_(averaged.pop(0) / world)
    return len(norms)
