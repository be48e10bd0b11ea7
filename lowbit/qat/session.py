"""``train_qat``: quantization-aware fine-tuning of a model on tensors, epoch by epoch.

What the ``lowbit qat`` command and ``benchmarks/qat.py`` run: prepare and calibrate
(:func:`lowbit.prepare_qat`), SGD with Nesterov momentum and a cosine learning rate, the loss
and the accuracy after every epoch, and the best epoch's state kept. Inside a
``torch.distributed`` job every rank trains on its own share of each epoch's shuffled data
(``wrap`` puts the model in DistributedDataParallel, e.g. with a gradient hook) and the
quantizer ranges stay identical on all ranks.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.api import RecipeLike, run_batch
from lowbit.nn.rank_sync import world_size
from lowbit.qat.loop import fit, prepare_qat

__all__ = ["QatSchedule", "EpochRecord", "QatRun", "accuracy_on", "train_qat"]


@dataclasses.dataclass(frozen=True)
class QatSchedule:
    """Hyper-parameters of :func:`train_qat`. ``batch_size`` is the global batch (split
    over the ranks); ``lr`` the peak of a per-step cosine decay to 0; quantizer parameters
    (learned scales) get no weight decay; ``calibration`` training images start the ranges.

    >>> QatSchedule(epochs=3).epochs
    3
    """

    epochs: int = 3
    lr: float = 0.01
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-5
    label_smoothing: float = 0.1
    calibration: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.calibration < 1:
            raise ValueError(
                f"QatSchedule: epochs={self.epochs}, batch_size={self.batch_size} and "
                f"calibration={self.calibration} must all be at least 1"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"QatSchedule: lr={self.lr} must be a positive number (try 0.01)")


@dataclasses.dataclass
class EpochRecord:
    """One epoch: mean training loss, accuracy after it (None without ``evaluate``) and the
    seconds its training took (evaluation not included)."""

    epoch: int
    loss: float
    accuracy: float | None
    seconds: float


@dataclasses.dataclass
class QatRun:
    """The trained (prepared, not converted) model holding the best epoch's state, and the
    history."""

    model: nn.Module
    history: list[EpochRecord]
    best_epoch: int

    @property
    def best_accuracy(self) -> float | None:
        """Accuracy of the epoch whose state the model holds."""
        return self.history[self.best_epoch - 1].accuracy


def _optimizer(model: nn.Module, schedule: QatSchedule) -> torch.optim.Optimizer:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        quantizer = "quantizer." in name or name.startswith("quantizer")
        (no_decay if quantizer or param.ndim <= 1 else decay).append(param)
    return torch.optim.SGD(
        [
            {"params": decay, "weight_decay": schedule.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=schedule.lr,
        momentum=schedule.momentum,
        nesterov=schedule.momentum > 0,
    )


def _epoch_batches(
    x: torch.Tensor, y: torch.Tensor, schedule: QatSchedule, epoch: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the epoch: the same shuffle on every rank, every world-th
    example, in batches of ``batch_size / world``."""
    world = world_size()
    rank = torch.distributed.get_rank() if world > 1 else 0
    gen = torch.Generator().manual_seed(schedule.seed + epoch)
    order = torch.randperm(len(x), generator=gen)[rank::world]
    per_rank = max(1, schedule.batch_size // world)
    steps = len(x) // world // per_rank  # the same number of steps on every rank
    return [
        (x[order[i * per_rank : (i + 1) * per_rank]], y[order[i * per_rank : (i + 1) * per_rank]])
        for i in range(steps)
    ]


def train_qat(
    model: nn.Module,
    recipe: RecipeLike | None,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    schedule: QatSchedule | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    progress: bool = False,
    on_epoch: Callable[[EpochRecord, nn.Module, bool], None] | None = None,
) -> QatRun:
    """Prepare ``model`` for QAT with ``recipe``, calibrate on ``schedule.calibration``
    training images, and train ``schedule.epochs`` epochs on ``(train_x, train_y)``.
    ``evaluate(model)`` (the prepared model in eval mode) gives the accuracy after each
    epoch; the epoch with the best one is kept (the last one without ``evaluate``). ``wrap``
    wraps the prepared model for training (DistributedDataParallel). ``model`` is not changed.
    ``recipe=None`` trains a float copy in the same loop (the baseline to compare with).
    ``on_epoch(record, model, is_best)`` runs after every epoch (print, checkpoint the best).

    >>> x, y = torch.randn(256, 16), torch.randint(0, 2, (256,))
    >>> run = train_qat(torch.nn.Sequential(torch.nn.Linear(16, 2)), "w8a8-qat", x, y,
    ...                 QatSchedule(epochs=1, batch_size=64, calibration=64))
    >>> len(run.history), run.best_epoch
    (1, 1)
    """
    schedule = schedule or QatSchedule()
    if len(train_x) != len(train_y) or len(train_x) < schedule.batch_size:
        raise ValueError(
            f"train_qat: {len(train_x)} inputs and {len(train_y)} labels; they must match and "
            f"hold at least one batch ({schedule.batch_size})"
        )
    world = world_size()
    rank = torch.distributed.get_rank() if world > 1 else 0
    calib = train_x[rank::world][: schedule.calibration]  # every rank its own images
    calib_batches = [calib[i : i + 128] for i in range(0, len(calib), 128)]
    if recipe is None:
        prepared = copy.deepcopy(model).train()
    else:
        prepared = prepare_qat(model, recipe, calib_batches)
    trained = wrap(prepared) if wrap is not None else prepared
    optimizer = _optimizer(prepared, schedule)
    steps = len(_epoch_batches(train_x, train_y, schedule, 0)) * schedule.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    )

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, target, label_smoothing=schedule.label_smoothing)

    history: list[EpochRecord] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    for epoch in range(1, schedule.epochs + 1):
        data = _epoch_batches(train_x, train_y, schedule, epoch)
        start = time.perf_counter()
        loss = fit(
            trained,
            tqdm(data, desc=f"epoch {epoch}/{schedule.epochs}", disable=not progress),
            optimizer,
            loss_fn=loss_fn,
            scheduler=scheduler,
        )[0]
        seconds = time.perf_counter() - start
        accuracy = evaluate(prepared.eval()) if evaluate is not None else None
        prepared.train()
        history.append(EpochRecord(epoch, loss, accuracy, seconds))
        score = accuracy if accuracy is not None else float(epoch)
        improved = best is None or score > best[0]
        if improved:
            state = {k: v.detach().clone() for k, v in prepared.state_dict().items()}
            best = (score, epoch, state)
        if on_epoch is not None:
            on_epoch(history[-1], prepared.eval(), improved)
            prepared.train()
    assert best is not None
    if best[1] != schedule.epochs:
        prepared.load_state_dict(best[2])
    return QatRun(prepared.eval(), history, best[1])


def accuracy_on(
    x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000
) -> Callable[[nn.Module], float]:
    """An ``evaluate`` for :func:`train_qat`: top-1 accuracy on ``(x, y)``.

    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> accuracy_on(x, torch.tensor([0, 0]))(torch.nn.Identity())
    0.5
    """

    def evaluate(model: nn.Module) -> float:
        correct = 0
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                out = run_batch(model, x[i : i + batch_size])
                correct += int((out.argmax(dim=1) == y[i : i + batch_size]).sum())
        return correct / max(len(x), 1)

    return evaluate
