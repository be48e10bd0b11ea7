"""``prepare_qat`` (prepare, calibrate, train mode) and ``fit`` (a plain training loop)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.api import RecipeLike, calibrate, prepare, run_batch
from lowbit.nn import Quantizer
from lowbit.nn.rank_sync import average_batch_norms, average_ranges, world_size

__all__ = ["prepare_qat", "fit"]

M = TypeVar("M", bound=nn.Module)


def prepare_qat(
    model: M,
    recipe: RecipeLike,
    data: Iterable[Any],
    num_batches: int | None = None,
    inplace: bool = False,
    sync_ranks: bool | None = None,
) -> M:
    """A copy of ``model`` ready for quantization-aware training: prepared with ``qat=True``
    (learned or moving ranges, batch norms trained folded), calibrated on ``data`` (the
    ranges' starting point) and in train mode. Train it with any optimizer created after this
    call, then ``lowbit.convert`` it. In a ``torch.distributed`` job (``sync_ranks=None``:
    whenever a process group of more than one rank is initialised) every rank calibrates on
    its own data and the statistics are merged, so all ranks start from the same ranges.

    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> q = prepare_qat(net, "w4a4-lsq", [torch.randn(8, 4)])
    >>> q.training, type(q[0].weight_quantizer.scale).__name__
    (True, 'Parameter')
    """
    prepared = prepare(model, recipe, inplace=inplace, qat=True)
    sync = world_size() > 1 if sync_ranks is None else sync_ranks
    calibrate(prepared, data, num_batches=num_batches, sync_ranks=sync)
    return prepared.train()


def _inputs_and_target(batch: Any) -> tuple[Any, torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(
        "fit() takes batches of (inputs, targets); got "
        f"{type(batch).__name__}: yield (x, y) pairs from the training data"
    )


def fit(
    model: nn.Module,
    batches: Callable[[], Iterable[Any]] | Iterable[Any],
    optimizer: torch.optim.Optimizer,
    epochs: int = 1,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
    scheduler: Any = None,
    on_epoch_end: Callable[[int, float], None] | None = None,
    progress: bool = False,
    sync_ranks: bool | None = None,
) -> list[float]:
    """Train ``model`` on ``(inputs, targets)`` batches for ``epochs``; returns each epoch's
    mean loss. ``batches`` is an iterable read once per epoch, or a function returning a new
    one (a shuffled loader per epoch). ``scheduler.step()`` runs after every batch;
    ``on_epoch_end(epoch, loss)`` after every epoch (evaluate, checkpoint). Under
    ``torch.distributed`` (``sync_ranks=None``: a process group of more than one rank is
    initialised; wrap the model in DistributedDataParallel) the moving-average ranges are
    and the batch norms' running statistics are averaged over the ranks after every step, so
    every rank holds the same qparams and folds the same batch norms.

    >>> net = torch.nn.Linear(2, 2)
    >>> data = [(torch.randn(8, 2), torch.randint(0, 2, (8,)))]
    >>> losses = fit(net, data, torch.optim.SGD(net.parameters(), lr=0.1), epochs=2)
    >>> len(losses)
    2
    """
    if epochs < 1:
        raise ValueError(f"epochs={epochs} must be at least 1")
    sync = world_size() > 1 if sync_ranks is None else sync_ranks
    moving = [
        q for q in model.modules() if isinstance(q, Quantizer) and q.range == "moving_average"
    ]
    losses = []
    for epoch in range(epochs):
        model.train()
        total, count = 0.0, 0
        source = batches() if callable(batches) else batches
        for batch in tqdm(source, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress):
            inputs, target = _inputs_and_target(batch)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(run_batch(model, inputs), target)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the loss became {float(loss.detach())} in epoch {epoch + 1}: lower the "
                    "learning rate (QAT starts from a trained model: 10-100x below its "
                    "training rate)"
                )
            loss.backward()
            optimizer.step()
            if sync:
                average_ranges(moving)
                average_batch_norms(model)
            if scheduler is not None:
                scheduler.step()
            total, count = total + float(loss.detach()), count + 1
        losses.append(total / max(count, 1))
        if on_epoch_end is not None:
            on_epoch_end(epoch, losses[-1])
    return losses
