"""Activations into the uint8 the fast CPU kernels want, exactly as lowbit's simulation rounds.

Any 8-bit activation grid maps onto uint8 without changing a single value: a signed grid with
zero point ``z`` is the unsigned grid shifted by 128 (``q + 128`` with zero point ``z + 128``).
Static inputs use their calibrated scale; dynamic ones compute it per batch (one scale) or per
token (one per row) with the same float32 arithmetic as :func:`~lowbit.primitives.choose_qparams`,
so the integers match the simulation's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from lowbit.nn import Quantizer
from lowbit.primitives import choose_qparams, minmax
from lowbit.spec import PerTensor, PerToken, QDtype, QuantSpec

__all__ = ["ActivationGrid", "LastInput", "scalar_qparams", "u8_problem"]

_EPS = np.float32(torch.finfo(torch.float32).eps)
T = TypeVar("T")


def u8_problem(spec: QuantSpec | None) -> str | None:
    """None when activations of ``spec`` can be fed to the uint8 kernels, otherwise why not."""
    if spec is None:
        return "the input stays float (weight-only layer)"
    if spec.qdtype.bits != 8:
        return f"{spec.qdtype} activations (the int8 kernels take 8-bit inputs)"
    if spec.rounding != "nearest":
        return "stochastic rounding of activations"
    if not isinstance(spec.gran, (PerTensor, PerToken)):
        return f"{spec.gran.kind} activation scales (one scale per tensor or per token only)"
    return None


def scalar_qparams(lo: float, hi: float, dtype: QDtype, symmetric: bool) -> tuple[float, int]:
    """:func:`~lowbit.primitives.choose_qparams` for one range, in float32 without tensors.

    >>> s, z = scalar_qparams(-1.0, 3.0, QDtype(8, signed=False), symmetric=False)
    >>> ref = choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), QDtype(8, False), False)
    >>> (s, z) == (ref[0].item(), ref[1].item())
    True
    """
    f32 = np.float32
    lo32, hi32 = min(f32(lo), f32(0.0)), max(f32(hi), f32(0.0))
    qmin, qmax = dtype.qmin, dtype.qmax
    if symmetric:
        amax = max(-lo32, hi32)
        if dtype.signed:
            zero, levels = 0, f32(max(qmax, 1))
        else:
            zero, levels = (qmax + 1) // 2, f32(max(qmax - (qmax + 1) // 2, 1))
        return float(max(f32(amax / levels), _EPS)), zero
    scale = max(f32((hi32 - lo32) / f32(qmax - qmin)), _EPS)
    zero = int(np.clip(qmin - np.round(f32(lo32 / scale)), qmin, qmax))
    return float(scale), zero


@dataclass(frozen=True)
class ActivationGrid:
    """How one layer's input becomes uint8: the spec, its shift onto uint8 and, when static,
    the calibrated scale and zero point."""

    spec: QuantSpec
    shift: int  # 128 for a signed grid, 0 for an unsigned one
    scale: float | None = None
    zero: int | None = None  # on the uint8 grid (already shifted)

    @classmethod
    def of(cls, quantizer: Quantizer) -> ActivationGrid:
        """The grid of a layer's input quantizer (static qparams read once)."""
        spec = quantizer.spec
        shift = 128 if spec.qdtype.signed else 0
        if spec.dynamic:
            return cls(spec, shift)
        assert quantizer.scale is not None and quantizer.zero_point is not None
        return cls(spec, shift, float(quantizer.scale), int(quantizer.zero_point) + shift)

    @property
    def low(self) -> int:
        """Smallest uint8 value the grid uses."""
        return self.spec.qdtype.qmin + self.shift

    @property
    def high(self) -> int:
        """Largest uint8 value the grid uses."""
        return self.spec.qdtype.qmax + self.shift

    def qparams(self, x: torch.Tensor) -> tuple[float, int]:
        """Scale and uint8 zero point for ``x``: calibrated, or ``x``'s own range (per tensor)."""
        if self.scale is not None and self.zero is not None:
            return self.scale, self.zero
        lo, hi = torch.aminmax(x.detach())
        scale, zero = scalar_qparams(float(lo), float(hi), self.spec.qdtype, self.spec.symmetric)
        return scale, zero + self.shift

    def to_u8(
        self,
        x: torch.Tensor,
        scale: float | torch.Tensor,
        zero: int | torch.Tensor,
        channels_last: bool = False,
    ) -> torch.Tensor:
        """``clamp(round(x / scale) + zero, low, high)`` as uint8 (channels_last on request)."""
        q = torch.div(x if x.dtype == torch.float32 else x.float(), scale)
        q.round_().add_(zero).clamp_(self.low, self.high)
        if channels_last and q.ndim == 4:
            return q.to(torch.uint8, memory_format=torch.channels_last)
        return q.to(torch.uint8)

    def per_token(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-row uint8 values, scales ``(rows, 1)`` and uint8 zero points ``(rows, 1)``."""
        xf = x2d if x2d.dtype == torch.float32 else x2d.float()
        lo, hi = minmax(xf, PerToken())
        scale, zero = choose_qparams(lo, hi, self.spec.qdtype, self.spec.symmetric)
        scale, zero = scale.unsqueeze(1), (zero + self.shift).unsqueeze(1)  # (rows, 1)
        return self.to_u8(xf, scale, zero), scale, zero


class LastInput:
    """The last input a group of layers quantized, with the result, so layers that read the
    same tensor on the same grid (an attention block's query, key and value projections)
    quantize it once. The input is recognised by identity and version counter (identity alone
    for inference-mode tensors, which have no counter); one input is kept at a time, and
    ``lowbit.compile`` clears it at the start of every forward pass of the compiled model, so
    a buffer refilled between calls (through ``.data`` or numpy, which bump no counter) is
    never served stale.

    >>> cache, calls = LastInput(), []
    >>> x = torch.ones(2, 3)
    >>> _ = cache.get(x, lambda t: calls.append(1) or t * 2)
    >>> _ = cache.get(x, lambda t: calls.append(1) or t * 2)
    >>> len(calls)
    1
    """

    def __init__(self) -> None:
        self._input: torch.Tensor | None = None
        self._version = -1
        self._value: object = None

    def get(self, x: torch.Tensor, make: Callable[[torch.Tensor], T]) -> T:
        """``make(x)``, computed once for each distinct input tensor (and version)."""
        version = -1 if x.is_inference() else x._version
        if self._input is x and self._version == version:
            return self._value  # type: ignore[return-value]
        value = make(x)
        self._input, self._version, self._value = x, version, value
        return value

    def clear(self) -> None:
        """Forget the input kept (a new forward pass begins)."""
        self._input, self._version, self._value = None, -1, None
