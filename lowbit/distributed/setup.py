"""One-call set-up: the compression hook on a DDP model, and quantizer ranges made identical."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lowbit.distributed.hooks import (
    AllReduceState,
    CompressionState,
    fp32_allreduce_hook,
    quantized_allreduce_hook,
)
from lowbit.nn import Quantizer
from lowbit.nn.rank_sync import average_ranges, merge_observers

__all__ = ["compress_gradients", "sync_quantizers"]


def compress_gradients(
    model: DistributedDataParallel,
    bits: int | None = 8,
    chunk_size: int = 512,
    error_feedback: bool = True,
) -> AllReduceState:
    """Register the gradient hook on a DDP model and return its state (``bytes_sent``,
    ``fp32_bytes``, ``ratio``): ``bits`` 8 or 4 for :func:`quantized_allreduce_hook`, None for
    the counting float32 baseline :func:`fp32_allreduce_hook`.

    >>> compress_gradients(nn.Linear(2, 2))
    Traceback (most recent call last):
    TypeError: ...
    """
    if not isinstance(model, DistributedDataParallel):
        raise TypeError(
            f"compress_gradients needs a DistributedDataParallel model, got "
            f"{type(model).__name__}: wrap it first (DistributedDataParallel(model))"
        )
    group = model.process_group
    if bits is None:
        state = AllReduceState(group=group)
        model.register_comm_hook(state, fp32_allreduce_hook)
        return state
    compressed = CompressionState(
        group=group, bits=bits, chunk_size=chunk_size, error_feedback=error_feedback
    )
    model.register_comm_hook(compressed, quantized_allreduce_hook)
    return compressed


def sync_quantizers(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Make every rank's quantizer ranges identical: observers still observing merge their
    statistics (min of minima, max of maxima, summed moments), moving-average ranges are
    averaged. Every rank must call it at the same point. Returns how many quantizers it
    synchronised (0 outside a process group of more than one rank).

    >>> sync_quantizers(nn.Linear(2, 2))
    0
    """
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
    merge_observers([q for q in quantizers if q.observing], group)
    return average_ranges(quantizers, group)
