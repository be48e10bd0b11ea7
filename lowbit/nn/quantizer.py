"""Quantizer: one tensor's spec, observer and qparams, switched between observe and fake-quant."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.nn.state import check_input_qparams
from lowbit.observers import Observer, make_observer
from lowbit.primitives import choose_qparams, fake_quantize, minmax
from lowbit.spec import QuantSpec

__all__ = ["Quantizer"]


class Quantizer(nn.Module):
    """Quantizes one tensor (a weight or an activation) according to ``spec``.

    Static quantizers observe during calibration (``observing=True``: values pass through
    unchanged), then fake-quantize with the fixed ``scale`` / ``zero_point`` buffers.
    Dynamic quantizers compute the range of every batch at run time.

    >>> q = Quantizer(QuantSpec("int8"))
    >>> _ = q(torch.tensor([-1.0, 2.0]))          # observe
    >>> q.finish_observing()
    >>> abs(q(torch.tensor([0.3])).item() - round(0.3 / q.scale.item()) * q.scale.item()) < 1e-7
    True
    """

    scale: torch.Tensor | None
    zero_point: torch.Tensor | None

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec
        self.observer: Observer | None = None if spec.dynamic else make_observer(spec)
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)
        self.observing = not spec.dynamic
        self.enabled = True

    def extra_repr(self) -> str:
        spec = self.spec
        mode = "dynamic" if spec.dynamic else ("observing" if self.observing else "static")
        kind = "sym" if spec.symmetric else "asym"
        return f"{spec.qdtype}, {spec.gran.kind}, {kind}, {mode}, observer={spec.observer}"

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Fix the qparams (from an observer, an algorithm or a loaded file)."""
        self.scale = scale.detach().float().clone()
        self.zero_point = zero_point.detach().to(torch.int32).clone()

    def clear_qparams(self) -> None:
        """Drop the qparams (a frozen weight's QTensor holds them) and the observer."""
        self.scale = None
        self.zero_point = None
        self.observer = None
        self.observing = False

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
            self.observer = None
            self.observing = False
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def finish_observing(self) -> None:
        """Turn what the observer saw into qparams and switch to fake-quantization."""
        if self.spec.dynamic:
            return
        assert self.observer is not None
        self.set_qparams(*self.observer.qparams())
        self.observing = False

    def observe_tensor(self, x: torch.Tensor) -> None:
        """Observe one tensor (a weight) from scratch and fix the qparams from it."""
        self.observer = make_observer(self.spec).train(self.training)  # keep the model's mode
        self.observer(x)
        self.finish_observing()

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.observing:
            assert self.observer is not None
            return self.observer(x)
        low = x.dtype in (torch.float16, torch.bfloat16)  # round in float32, then cast back
        xf = x.float() if low else x
        scale, zero_point = self.qparams_for(xf)
        out = fake_quantize(
            xf, scale, zero_point, self.spec.qdtype, self.spec.gran, self.spec.rounding
        )
        return out.to(x.dtype) if low else out
