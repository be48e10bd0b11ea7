"""``prepare_qat`` (prepare, calibrate, train mode) and ``fit`` (a plain training loop)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.api import RecipeLike, calibrate, prepare, run_batch

__all__ = ["prepare_qat", "fit"]

M = TypeVar("M", bound=nn.Module)


def prepare_qat(
    model: M,
    recipe: RecipeLike,
    data: Iterable[Any],
    num_batches: int | None = None,
    inplace: bool = False,
) -> M:
    """A copy of ``model`` ready for quantization-aware training: prepared with ``qat=True``
    (learned or moving ranges, batch norms trained folded), calibrated on ``data`` (the
    ranges' starting point) and in train mode. Train it with any optimizer created after this
    call, then ``lowbit.convert`` it.

    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> q = prepare_qat(net, "w4a4-lsq", [torch.randn(8, 4)])
    >>> q.training, type(q[0].weight_quantizer.scale).__name__
    (True, 'Parameter')
    """
    prepared = prepare(model, recipe, inplace=inplace, qat=True)
    calibrate(prepared, data, num_batches=num_batches)
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
) -> list[float]:
    """Train ``model`` on ``(inputs, targets)`` batches for ``epochs``; returns each epoch's
    mean loss. ``batches`` is an iterable read once per epoch, or a function returning a new
    one (a shuffled loader per epoch). ``scheduler.step()`` runs after every batch;
    ``on_epoch_end(epoch, loss)`` after every epoch (evaluate, checkpoint).

    >>> net = torch.nn.Linear(2, 2)
    >>> data = [(torch.randn(8, 2), torch.randint(0, 2, (8,)))]
    >>> losses = fit(net, data, torch.optim.SGD(net.parameters(), lr=0.1), epochs=2)
    >>> len(losses)
    2
    """
    if epochs < 1:
        raise ValueError(f"epochs={epochs} must be at least 1")
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
                    f"the loss became {float(loss)} in epoch {epoch + 1}: lower the learning "
                    "rate (QAT starts from a trained model: 10-100x below its training rate)"
                )
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total, count = total + float(loss.detach()), count + 1
        losses.append(total / max(count, 1))
        if on_epoch_end is not None:
            on_epoch_end(epoch, losses[-1])
    return losses
