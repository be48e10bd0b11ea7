"""Per-token activation quantization and its output rescale, compiled by torch.compile.

A per-token int8 Linear spends more time around its GEMM than in it: the row minimum and
maximum, the scale, the rounding and clamping into uint8 (seven passes over the input in
eager torch), then each row's zero point and scale applied to the output (two passes). On the
BERT benchmark (all-MiniLM-L6-v2, 1024 tokens) those passes took 30% of the model's time;
compiled by inductor into one loop each they take a third of that, which brought lowbit's
per-token model from 1.15x to 1.0x torch.ao's per-batch dynamic int8 latency.

This is opt-in (``lowbit.compile(..., inductor=True)``): inductor needs a C++ compiler, and its
first compile takes tens of seconds (later ones come from its cache). The functions compute
exactly what :meth:`ActivationGrid.per_token` and the eager epilogue compute, in the same
float32 arithmetic; :func:`available` says why they cannot be used when they cannot.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

__all__ = ["available", "per_token_quantizer", "per_token_epilogue"]

_EPS = float(torch.finfo(torch.float32).eps)


def _quantize(
    x: torch.Tensor, qmin: float, qmax: float, shift: float, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lo = x.amin(dim=1, keepdim=True).clamp(max=0.0)  # (rows, 1)
    hi = x.amax(dim=1, keepdim=True).clamp(min=0.0)
    if symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).clamp(min=_EPS)
        zero = torch.zeros_like(scale)
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=_EPS)
        zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    q = (torch.round(x / scale) + zero + shift).clamp(qmin + shift, qmax + shift)
    return q.to(torch.uint8), scale, zero + shift


def _epilogue(
    acc: torch.Tensor,
    zero: torch.Tensor,
    col_sums: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    relu: bool,
) -> torch.Tensor:
    out = (acc - zero * col_sums) * scale + bias  # (rows, out)
    return out.clamp(min=0.0) if relu else out


@functools.cache
def available() -> str | None:
    """None when inductor compiles and runs here (checked once, on a tiny input), else why."""
    try:
        x = torch.randn(4, 8)
        q, scale, zero = per_token_quantizer()(x, -128.0, 127.0, 128.0, False)
        per_token_epilogue()(torch.randn(4, 3), zero, torch.ones(3), scale, torch.zeros(3), True)
        return None if q.dtype == torch.uint8 else "unexpected output"
    except Exception as err:  # inductor raises many types (no compiler, no headers, ...)
        return f"torch.compile failed: {str(err).strip().splitlines()[0][:160]}"


@functools.cache
def per_token_quantizer() -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``f(x2d, qmin, qmax, shift, symmetric) -> (uint8, scale, uint8 zero point)``, compiled."""
    return torch.compile(_quantize, dynamic=True)


@functools.cache
def per_token_epilogue() -> Callable[..., torch.Tensor]:
    """``f(acc, zero, col_sums, scale, bias, relu)`` = ``(acc - zero*col_sums)*scale + bias``."""
    return torch.compile(_epilogue, dynamic=True)
