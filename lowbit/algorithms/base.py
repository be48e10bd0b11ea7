"""What every PTQ algorithm shares: the protocol, the registry decorator, its layers, its notes,
its progress and time budget, and the one way it writes a rounded weight back.

An algorithm is a class with a frozen config dataclass, registered by name::

    @register_algorithm("gptq", GPTQConfig)
    class GPTQ(AlgorithmBase):
        stage = "quantized"
        def apply(self, model, data): ...

``stage`` says when :func:`lowbit.quantize` runs it: ``"float"`` before calibration (it
reshapes float weights: CLE, SmoothQuant, AWQ), ``"quantized"`` after it (it chooses how the
calibrated weights round: AdaRound, GPTQ, bias correction). ``apply`` works in place on a
prepared model and gets the calibration batches as a list (or None for data-free methods).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.api import PreparedInfo, prepared_info, quantized_layers
from lowbit.nn import QModule
from lowbit.primitives import dequantize, quantize
from lowbit.recipe_steps import ALGORITHMS, STAGES

__all__ = [
    "Algorithm",
    "AlgorithmBase",
    "AlgorithmError",
    "LayerLoop",
    "register_algorithm",
    "weight_layers",
    "set_rounded_weight",
    "rtn_integers",
    "add_note",
    "require_data",
    "num_samples",
]

logger = logging.getLogger("lowbit.algorithms")
A = TypeVar("A", bound=type)


class AlgorithmError(ValueError):
    """An algorithm cannot run as asked; the message names the layer and the fix."""


class Algorithm(Protocol):
    """A PTQ pass over a prepared model."""

    name: ClassVar[str]
    stage: ClassVar[str]
    config_class: ClassVar[type]
    progress: bool

    def apply(self, model: nn.Module, data: Sequence[Any] | None) -> None:
        """Change ``model`` (prepared by :func:`lowbit.prepare`) in place."""


class AlgorithmBase:
    """Holds the config and the progress flag; subclasses set ``stage`` and write ``apply``."""

    name: ClassVar[str] = ""
    stage: ClassVar[str] = "quantized"
    config_class: ClassVar[type]

    def __init__(self, config: Any = None) -> None:
        self.config = self.config_class() if config is None else config
        self.progress = False

    def apply(self, model: nn.Module, data: Sequence[Any] | None) -> None:
        raise NotImplementedError


def register_algorithm(name: str, config_class: type) -> Callable[[A], A]:
    """Register an algorithm class under ``name`` with its config dataclass; recipes then
    name it in ``algorithm:``.

    >>> import lowbit
    >>> from lowbit.recipe_steps import ALGORITHMS
    >>> ALGORITHMS["gptq"].stage
    'quantized'
    """

    def decorator(cls: A) -> A:
        stage = getattr(cls, "stage", "quantized")
        if stage not in STAGES:
            raise ValueError(f"algorithm {name!r}: stage must be one of {STAGES}, got {stage!r}")
        cls.name = name  # type: ignore[attr-defined]
        cls.config_class = config_class  # type: ignore[attr-defined]
        ALGORITHMS[name] = cls
        return cls

    return decorator


def weight_layers(model: nn.Module, kinds: tuple[str, ...] = ()) -> dict[str, QModule]:
    """Prepared (not frozen) layers with a quantized weight, in module order; only those of
    ``kinds`` (``"linear"``, ``"conv2d"``, ...) when given.

    >>> import lowbit
    >>> m = lowbit.prepare(torch.nn.Sequential(torch.nn.Linear(2, 2)), "w8a16")
    >>> list(weight_layers(m))
    ['0']
    """
    return {
        name: layer
        for name, layer in quantized_layers(model).items()
        if layer.weight_quantizer is not None
        and not layer.frozen
        and (not kinds or layer.kind in kinds)
    }


def _info(model: nn.Module) -> PreparedInfo | None:
    try:
        return prepared_info(model)
    except ValueError:
        return None


def add_note(model: nn.Module, algorithm: str, text: str) -> None:
    """Log ``text`` and keep it in the model's :func:`lowbit.prepared_info` notes.

    >>> import lowbit
    >>> m = lowbit.prepare(torch.nn.Sequential(torch.nn.Linear(2, 2)), "w8a16")
    >>> add_note(m, "gptq", "0: example"); lowbit.prepared_info(m).notes[-1]
    'gptq: 0: example'
    """
    line = f"{algorithm}: {text}"
    logger.info("%s", line)
    info = _info(model)
    if info is not None:
        info.notes.append(line)


def num_samples(data: Sequence[Any]) -> int:
    """Samples in a list of batches (the first dimension of each batch's first tensor).

    >>> num_samples([torch.zeros(4, 2), (torch.zeros(3, 2), torch.zeros(3))])
    7
    """
    total = 0
    for batch in data:
        first = batch
        if isinstance(batch, dict):
            first = next(iter(batch.values()), None)
        elif isinstance(batch, (tuple, list)):
            first = batch[0] if batch else None
        total += int(first.shape[0]) if isinstance(first, torch.Tensor) and first.ndim else 1
    return total


def require_data(data: Sequence[Any] | None, algorithm: str, minimum: int) -> Sequence[Any]:
    """``data`` when it holds at least ``minimum`` samples, else an error saying how many.

    >>> len(require_data([torch.zeros(8, 2)], "adaround", 8))
    1
    """
    if data is None or len(data) == 0:
        raise AlgorithmError(
            f"{algorithm} needs calibration data: pass data=[batches...] (at least {minimum} "
            "samples) to lowbit.quantize, or use a recipe without it"
        )
    have = num_samples(data)
    if have < minimum:
        raise AlgorithmError(
            f"{algorithm} needs at least {minimum} calibration samples, got {have}; pass more "
            f"batches, or lower its min_samples argument (at the cost of overfitting them)"
        )
    return data


def rtn_integers(layer: QModule, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Round-to-nearest integers of ``weight`` (the layer's own by default) on the layer's
    calibrated weight grid, as int32.

    >>> import lowbit
    >>> m = lowbit.prepare(torch.nn.Sequential(torch.nn.Linear(4, 2)), "w4a16")
    >>> m[0].update_weight_qparams(); rtn_integers(m[0]).dtype
    torch.int32
    """
    wq = layer.weight_quantizer
    assert wq is not None
    if wq.scale is None:
        layer.update_weight_qparams()
    assert wq.scale is not None and wq.zero_point is not None
    w = layer.weight.detach() if weight is None else weight
    return quantize(w.float(), wq.scale, wq.zero_point, wq.spec.qdtype, wq.spec.gran).to(
        torch.int32
    )


def set_rounded_weight(layer: QModule, integers: torch.Tensor) -> None:
    """Make the layer's float weight the grid values of ``integers`` (on its calibrated
    scale and zero point), so that fake quantization and :func:`lowbit.convert` both give
    exactly those integers.

    >>> import lowbit
    >>> m = lowbit.prepare(torch.nn.Sequential(torch.nn.Linear(4, 2)), "w4a16")
    >>> m[0].update_weight_qparams(); q = rtn_integers(m[0]); set_rounded_weight(m[0], q)
    >>> torch.equal(rtn_integers(m[0]), q)
    True
    """
    wq = layer.weight_quantizer
    assert wq is not None and wq.scale is not None and wq.zero_point is not None
    spec = wq.spec
    q = integers.to(torch.int32).clamp(spec.qdtype.qmin, spec.qdtype.qmax)
    values = dequantize(q, wq.scale, wq.zero_point, spec.gran).reshape(layer.weight.shape)
    with torch.no_grad():
        layer.weight.copy_(values.to(layer.weight.dtype))


class LayerLoop:
    """Layer-by-layer progress (``layer i of n``, the loss) and a time budget.

    Iterate over ``(name, layer)`` pairs; once ``budget_s`` seconds have passed the loop
    stops, and :attr:`skipped` names the layers it never reached (they keep
    round-to-nearest; the caller notes them).

    >>> loop = LayerLoop("demo", {"a": 1, "b": 2}, budget_s=None)
    >>> [name for name, _ in loop], loop.skipped
    (['a', 'b'], [])
    """

    def __init__(
        self,
        algorithm: str,
        layers: dict[str, Any],
        budget_s: float | None = None,
        progress: bool = False,
    ) -> None:
        self.algorithm = algorithm
        self.layers = layers
        self.budget_s = budget_s
        self.progress = progress
        self.skipped: list[str] = []
        self.start = time.perf_counter()
        self._bar: Any = None

    def __iter__(self) -> Any:
        names = list(self.layers)
        with tqdm(total=len(names), desc=self.algorithm, disable=not self.progress) as bar:
            self._bar = bar
            for i, name in enumerate(names):
                if self.budget_s is not None and time.perf_counter() - self.start > self.budget_s:
                    self.skipped = names[i:]
                    return
                bar.set_description(f"{self.algorithm} {name} ({i + 1}/{len(names)})")
                yield name, self.layers[name]
                bar.update(1)

    def loss(self, value: float) -> None:
        """Show the current layer's loss next to the bar."""
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{value:.4g}")

    def note_skipped(self, model: nn.Module) -> None:
        """Note (and log) the layers the budget left at round-to-nearest, if any."""
        if self.skipped:
            add_note(
                model,
                self.algorithm,
                f"time budget of {self.budget_s:g} s spent; {len(self.skipped)} layer(s) keep "
                f"round-to-nearest: {', '.join(self.skipped)}",
            )
