"""Quantizer: one tensor's spec, observer and qparams, switched between observe and fake-quant.

Its whole state is in its ``state_dict``: ``scale`` and ``zero_point`` (buffers, or parameters
when learned), the observer's statistics (the observer is a child module) and, while it is not
frozen, ``flags`` (observing, enabled, training steps seen). A calibrated or half-trained model
can be checkpointed with ``torch.save(model.state_dict())`` and resumed with
``load_state_dict`` on a freshly prepared one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.nn.qat_ops import lsq_fake_quantize, lsq_grad_factor
from lowbit.nn.state import check_input_qparams
from lowbit.observers import MovingAverageMinMaxObserver, Observer, make_observer
from lowbit.primitives import choose_qparams, fake_quantize, minmax, qparam_shape
from lowbit.spec import PerTensor, PerToken, QuantSpec

__all__ = ["Quantizer", "RANGES"]

# How a quantizer's range is kept: "fixed" (calibrated once: post-training quantization),
# "minmax" (recomputed from the tensor at every call: QAT weights), "moving_average" (an
# exponential moving average of each training batch's range, QAT activations) and "lsq"
# (scale and, for asymmetric grids, offset are parameters learned by gradient descent)
RANGES = ("fixed", "minmax", "moving_average", "lsq")


class Quantizer(nn.Module):
    """Quantizes one tensor (a weight or an activation) according to ``spec``.

    Static quantizers observe during calibration (``observing=True``: values pass through
    unchanged), then fake-quantize with the fixed ``scale`` / ``zero_point`` buffers.
    Dynamic quantizers compute the range of every batch at run time. For quantization-aware
    training :meth:`set_range` switches the range to one that moves or learns (see ``RANGES``).

    >>> q = Quantizer(QuantSpec("int8"))
    >>> _ = q(torch.tensor([-1.0, 2.0]))          # observe
    >>> q.finish_observing()
    >>> abs(q(torch.tensor([0.3])).item() - round(0.3 / q.scale.item()) * q.scale.item()) < 1e-7
    True
    """

    scale: torch.Tensor | None
    zero_point: torch.Tensor | None

    def __init__(self, spec: QuantSpec, shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.shape = shape  # of the tensor it quantizes, when known ahead (weights)
        self.observer: Observer | None = None if spec.dynamic else make_observer(spec)
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)
        self.observing = not spec.dynamic
        self.enabled = True
        self.range = "fixed"
        self.freeze_after: int | None = None  # training steps after which the range stops moving
        self.steps = 0  # training-mode calls seen since set_range
        self.grad_factor = 1.0

    def extra_repr(self) -> str:
        spec = self.spec
        mode = "dynamic" if spec.dynamic else ("observing" if self.observing else "static")
        kind = "sym" if spec.symmetric else "asym"
        learned = "" if self.range == "fixed" else f", range={self.range}"
        return f"{spec.qdtype}, {spec.gran.kind}, {kind}, {mode}, observer={spec.observer}{learned}"

    # --- ranges for quantization-aware training --------------------------------------------
    def set_range(
        self,
        kind: str,
        freeze_after: int | None = None,
        averaging_constant: float = 0.01,
        learned_offset: bool = True,
    ) -> None:
        """Keep the range ``kind`` (one of ``RANGES``) from now on. ``"lsq"`` makes ``scale``
        (and ``zero_point`` of an asymmetric grid, with ``learned_offset``) parameters of the
        qparams' shape, initialised from the qparams when set, else at 1 and 0 until
        calibration sets them; ``"moving_average"`` starts its average from the calibrated
        range. ``freeze_after`` training steps stop a ``minmax`` or ``moving_average`` range
        (learned ranges keep learning).

        >>> q = Quantizer(QuantSpec("int4", "per_channel"), shape=(3, 8))
        >>> q.set_range("lsq"); type(q.scale).__name__, tuple(q.scale.shape)
        ('Parameter', (3,))
        """
        if kind not in RANGES:
            raise ValueError(f"range {kind!r} is unknown: use one of {list(RANGES)}")
        if self.spec.dynamic and kind != "fixed":
            raise ValueError("a dynamic quantizer computes its range per batch; it learns none")
        if kind == "lsq":
            self._make_learned(learned_offset)
        if kind == "moving_average":
            self.averaging_constant = averaging_constant
            self._seed_moving_average()
        self.range, self.freeze_after, self.steps = kind, freeze_after, 0

    def _learned_shape(self) -> tuple[int, ...]:
        if self.scale is not None:
            return tuple(self.scale.shape)
        if isinstance(self.spec.gran, PerTensor):
            return ()
        if self.shape is None or isinstance(self.spec.gran, PerToken):
            raise ValueError(
                f"a learned (lsq) range needs its shape ahead of time; {self.spec.gran.kind} "
                "activations have none: use per_tensor for the input, or range moving_average"
            )
        return qparam_shape(self.shape, self.spec.gran)

    def _make_learned(self, learned_offset: bool) -> None:
        shape = self._learned_shape()
        device = self.scale.device if self.scale is not None else None
        scale = self.scale.detach().clone() if self.scale is not None else torch.ones(shape)
        zero = (
            self.zero_point.detach().float() if self.zero_point is not None else torch.zeros(shape)
        )
        for name in ("scale", "zero_point"):
            self._buffers.pop(name, None)
            self.__dict__.pop(name, None)
        self.scale = nn.Parameter(scale.to(device))
        asymmetric = not self.spec.symmetric
        if asymmetric and learned_offset:
            self.zero_point = nn.Parameter(zero.to(device))
        else:
            self.register_buffer("zero_point", zero.to(device))
        self.grad_factor = lsq_grad_factor(self.shape or (), self.spec.gran, self.spec.qdtype)

    def _seed_moving_average(self) -> None:
        observer = MovingAverageMinMaxObserver(self.spec, self.averaging_constant)
        if self.scale is not None and self.zero_point is not None:
            low, high = self.spec.qdtype.qmin, self.spec.qdtype.qmax
            zero = self.zero_point.float()
            observer.seed((low - zero) * self.scale, (high - zero) * self.scale)
        self.observer = observer.train(self.training)

    @property
    def learned(self) -> bool:
        """Whether the scale is a parameter (range ``"lsq"``)."""
        return isinstance(self.scale, nn.Parameter)

    def _moving(self) -> bool:
        """Whether this call may move the range (``minmax``/``moving_average`` before their
        freeze step)."""
        if self.range not in ("minmax", "moving_average"):
            return False
        return self.freeze_after is None or self.steps < self.freeze_after

    # --- qparams ---------------------------------------------------------------------------
    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Fix the qparams (from an observer, an algorithm or a loaded file); a learned range
        takes them as its new starting point (in place: optimizers keep their references)."""
        if self.learned:
            assert isinstance(self.scale, torch.Tensor) and self.zero_point is not None
            with torch.no_grad():
                self.scale.copy_(scale.reshape(self.scale.shape))
                self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
            return
        scale = scale.detach().float()
        zero_point = zero_point.detach().to(torch.int32)
        if self.scale is not None and self.scale.shape == scale.shape:
            self.scale.copy_(scale)  # in place: DDP and optimizers hold these tensors
            assert self.zero_point is not None
            self.zero_point.copy_(zero_point)
            return
        self.scale = scale.clone()
        self.zero_point = zero_point.clone()

    def fixed_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current qparams as a frozen layer stores them: float32 scale, int32 zero point
        (a learned zero point rounded and clamped to the grid).

        >>> q = Quantizer(QuantSpec("uint4", symmetric=False)); q.set_range("lsq")
        >>> q.fixed_qparams()[1].dtype
        torch.int32
        """
        if self.scale is None or self.zero_point is None:
            raise RuntimeError("this quantizer has no qparams yet: calibrate the model first")
        low, high = self.spec.qdtype.qmin, self.spec.qdtype.qmax
        # a learned scale is used by magnitude (see forward)
        scale = self.scale.detach().float().abs().clamp_min(torch.finfo(torch.float32).tiny)
        zero = self.zero_point.detach().float().round().clamp(low, high).to(torch.int32)
        return scale.clone(), zero

    def make_fixed(self) -> None:
        """End training: the current qparams become fixed buffers (``range`` back to fixed)."""
        if self.range == "fixed":
            return
        scale, zero = self.fixed_qparams()
        for name in ("scale", "zero_point"):
            self._parameters.pop(name, None)
            self._buffers.pop(name, None)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero)
        self.range = "fixed"

    def clear_qparams(self) -> None:
        """Drop the qparams (a frozen weight's QTensor holds them) and the observer."""
        self.make_fixed()
        self.scale = None
        self.zero_point = None
        self.observer = None
        self.observing = False

    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.observer is not None or self.range != "fixed":  # frozen: qparams alone
            destination[prefix + "flags"] = torch.tensor(
                [int(self.observing), int(self.enabled), self.steps], dtype=torch.int64
            )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        if not any(key.startswith(prefix) for key in state_dict):
            return  # a float model's state_dict: this quantizer keeps its own state
        flags = state_dict.get(prefix + "flags")
        if flags is not None:
            if (
                not isinstance(flags, torch.Tensor)
                or flags.shape != (3,)
                or flags.is_floating_point()
            ):
                error_msgs.append(f"{prefix}flags must be 3 integers (observing, enabled, steps)")
                return
            self.observing, self.enabled, self.steps = bool(flags[0]), bool(flags[1]), int(flags[2])
            state_dict = {k: v for k, v in state_dict.items() if k != prefix + "flags"}
            self._observer_like(state_dict, prefix)
        # qparams that are not set yet (None buffers) are taken from the state as they are
        scale, zero = state_dict.get(prefix + "scale"), state_dict.get(prefix + "zero_point")
        if self.scale is None and isinstance(scale, torch.Tensor):
            if not isinstance(zero, torch.Tensor):
                error_msgs.append(f"{prefix}zero_point is missing")
                return
            try:
                check_input_qparams(prefix, self.spec, scale, zero)
            except ValueError as err:
                error_msgs.append(str(err))
                return
            self.set_qparams(scale, zero)  # then loaded (copied or assigned) as usual below
            if flags is None:  # a frozen layer's input: its range is final
                self.observer = None
                self.observing = False
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _observer_like(self, state_dict: dict[str, Any], prefix: str) -> None:
        """The observer the saved state has (its statistics are loaded into it next): none,
        the moving average of a training range, or the spec's own."""
        if not any(key.startswith(prefix + "observer.") for key in state_dict):
            self.observer = None
        elif self.range == "moving_average" and not self.observing:
            self.observer = MovingAverageMinMaxObserver(self.spec, self.averaging_constant)
        elif self.observer is None or isinstance(self.observer, MovingAverageMinMaxObserver):
            self.observer = make_observer(self.spec)
        if self.observer is not None:
            self.observer.train(self.training)

    def finish_observing(self) -> None:
        """Turn what the observer saw into qparams and switch to fake-quantization (a moving
        average range starts from them)."""
        if self.spec.dynamic:
            return
        assert self.observer is not None
        self.set_qparams(*self.observer.qparams())
        self.observing = False
        if self.range == "moving_average" and not isinstance(
            self.observer, MovingAverageMinMaxObserver
        ):
            self._seed_moving_average()

    def observe_tensor(self, x: torch.Tensor) -> None:
        """Observe one tensor (a weight) from scratch and fix the qparams from it (the
        observer is dropped: a weight's range is computed again whenever it is needed)."""
        observer = make_observer(self.spec).train(self.training)  # keep the model's mode
        observer(x)
        self.set_qparams(*observer.qparams())
        self.observer = None
        self.observing = False

    def qparams_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The qparams applied to ``x``: fixed ones, or ``x``'s own range when dynamic."""
        if self.spec.dynamic:
            lo, hi = minmax(x.detach(), self.spec.gran)
            return choose_qparams(lo, hi, self.spec.qdtype, self.spec.symmetric)
        if self.scale is None or self.zero_point is None:
            raise RuntimeError(
                "this quantizer has no qparams yet: calibrate the model "
                "(lowbit.calibrate(model, data)) before running it quantized"
            )
        return self.scale, self.zero_point

    @staticmethod
    def range_of(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """Min-max qparams of ``x`` on ``spec``'s grid.

        >>> scale, _ = Quantizer.range_of(torch.tensor([-1.0, 2.0]), QuantSpec("int8"))
        >>> round(scale.item() * 127, 4)
        2.0
        """
        lo, hi = minmax(x.detach().float(), spec.gran)
        return choose_qparams(lo, hi, spec.qdtype, spec.symmetric)

    def _move_range(self, x: torch.Tensor) -> None:
        """``minmax``: the range of ``x``; ``moving_average``: one more step of the average
        (training mode only)."""
        if self.range == "minmax":
            self.set_qparams(*self.range_of(x, self.spec))
        elif self.training:
            assert self.observer is not None
            self.observer(x)
            self.set_qparams(*self.observer.qparams())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.observing:
            if self.training and self.range != "fixed":
                raise RuntimeError(
                    "quantization-aware training before calibration: this input's range is "
                    "not initialised; run lowbit.calibrate(model, data) after prepare(..., "
                    "qat=True) and before training"
                )
            assert self.observer is not None
            return self.observer(x)
        if self.range != "fixed":
            if self._moving():
                self._move_range(x)
            if self.training:
                self.steps += 1
        low = x.dtype in (torch.float16, torch.bfloat16)  # round in float32, then cast back
        xf = x.float() if low else x
        if self.learned:
            assert self.scale is not None and self.zero_point is not None
            tiny = torch.finfo(torch.float32).tiny
            out = lsq_fake_quantize(
                xf,
                # by magnitude: a step that pushes a scale through zero flips its sign (the
                # same grid) instead of clamping it to a dead channel with no gradient
                self.scale.abs().clamp_min(tiny),
                self.zero_point.float(),
                self.spec.qdtype,
                self.spec.gran,
                self.grad_factor,
            )
            return out.to(x.dtype) if low else out
        scale, zero_point = self.qparams_for(xf)
        out = fake_quantize(
            xf, scale, zero_point, self.spec.qdtype, self.spec.gran, self.spec.rounding
        )
        return out.to(x.dtype) if low else out
