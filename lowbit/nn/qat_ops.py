"""The differentiable pieces of quantization-aware training.

- :func:`lsq_fake_quantize`: fake quantization whose scale (and, for LSQ+, offset) learns.
  Learned step size (Esser et al., 2020): ``out = (clamp(round(x / s) + z, qmin, qmax) - z) * s``
  with a straight-through ``round``; the scale's gradient is multiplied by
  ``g = 1 / sqrt(N * Qp)`` (N: elements per scale, Qp: the largest positive level), which keeps
  its updates on the scale of the weights' own. The zero point is a float rounded through a
  straight-through estimator, so the grid stays integer and converts exactly.
- :func:`quantize_gradient`: identity forward; backward quantizes the incoming gradient to
  the spec's grid (range of that gradient, stochastic or nearest rounding) and passes the
  dequantized values on.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lowbit.primitives import _broadcast, _round, _to_grid, choose_qparams, minmax, qparam_shape
from lowbit.spec import Granularity, PerGroup, PerTensor, QDtype, QuantSpec

__all__ = ["lsq_fake_quantize", "lsq_grad_factor", "quantize_gradient", "round_ste"]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward.

    >>> x = torch.tensor([0.4, 1.6], requires_grad=True)
    >>> y = round_ste(x); y.sum().backward(); y.tolist(), x.grad.tolist()
    ([0.0, 2.0], [1.0, 1.0])
    """
    return x + (torch.round(x) - x).detach()


def lsq_grad_factor(shape: tuple[int, ...], gran: Granularity, dtype: QDtype) -> float:
    """LSQ's gradient scale ``1 / sqrt(N * Qp)`` for a tensor of ``shape`` (N: elements that
    share one scale, Qp: the grid's largest positive level, at least 1).

    >>> round(lsq_grad_factor((64, 100), PerTensor(), QDtype(4)), 5)
    0.00472
    """
    blocks = max(1, math.prod(qparam_shape(shape, gran)))
    per_scale = max(1, math.prod(shape) // blocks)
    if isinstance(gran, PerGroup):
        per_scale = min(per_scale, gran.group_size)
    return 1.0 / math.sqrt(per_scale * max(1, dtype.qmax))


def lsq_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    dtype: QDtype,
    gran: Granularity,
    grad_factor: float,
) -> torch.Tensor:
    """Fake-quantize ``x`` with a learnable ``scale`` (and float ``zero_point``, rounded
    through a straight-through estimator); gradients reach ``x`` (inside the range), the scale
    (times ``grad_factor``) and the zero point.

    >>> s = torch.tensor(0.5, requires_grad=True)
    >>> y = lsq_fake_quantize(torch.tensor([0.3, 9.0]), s, torch.tensor(0.0), QDtype(4),
    ...                       PerTensor(), 1.0)
    >>> y.sum().backward(); y.tolist(), round(s.grad.item(), 4)  # 1 - 0.3/0.5, clipped: 7
    ([0.5, 3.5], 7.4)
    """
    view, s, restore = _broadcast(x, scale, gran)
    _, z, _ = _broadcast(x, zero_point, gran)
    if not torch.is_grad_enabled():
        zr = torch.round(z)
        q = _to_grid(view / s, dtype, "nearest", None).add_(zr).clamp_(dtype.qmin, dtype.qmax)
        return restore(q.sub_(zr).mul_(s))
    out: torch.Tensor = _LsqFakeQuant.apply(view, s, z, dtype, grad_factor)
    return restore(out)


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``t`` over the dimensions it was broadcast along to become ``t.shape`` from
    ``shape``."""
    if t.shape == shape:
        return t
    lead = t.ndim - len(shape)
    dims = list(range(lead)) + [
        lead + i for i, n in enumerate(shape) if n == 1 and t.shape[lead + i] != 1
    ]
    return t.sum(dim=dims, keepdim=True).reshape(shape)


class _LsqFakeQuant(torch.autograd.Function):
    """LSQ in one node: the same values and gradients as the straight-through formula above,
    a few elementwise passes instead of autograd's dozen."""

    @staticmethod
    def forward(
        ctx: Any,
        v: torch.Tensor,
        s: torch.Tensor,
        z: torch.Tensor,
        dtype: QDtype,
        grad_factor: float,
    ) -> torch.Tensor:
        zr = torch.round(z.detach())
        ratio = v.detach() / s.detach()
        q = _to_grid(ratio, dtype, "nearest", None)  # round(x / s): q - z on the grid after
        clipped = q.clamp(dtype.qmin - zr, dtype.qmax - zr)  # the clamp, shifted by z
        # binary: BinaryConnect's straight-through window |x / s| <= 1
        inside = ratio.abs() <= 1 if dtype.binary else q == clipped
        out = clipped * s.detach()
        # d out / d s: (q - z - v/s) inside the grid, (q - z) where clipped
        ds = torch.where(inside, clipped - ratio, clipped)
        ctx.save_for_backward(inside, ds, s)
        ctx.shapes = (s.shape, z.shape, z.requires_grad)
        ctx.grad_factor = grad_factor
        return out

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (g,) = grads
        inside, ds, s = ctx.saved_tensors
        s_shape, z_shape, z_learns = ctx.shapes
        grad_v = torch.where(inside, g, 0.0) if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            if s.numel() == 1:  # one scale: a dot product, one pass
                total = torch.dot(g.reshape(-1), ds.reshape(-1))
                grad_s = (total * ctx.grad_factor).reshape(s_shape)
            else:
                grad_s = _sum_to(g * ds, s_shape) * ctx.grad_factor
        grad_z = None
        if z_learns and ctx.needs_input_grad[2]:  # LSQ+: -s where clipped, 0 inside
            clipped = _sum_to(torch.where(inside, 0.0, g), z_shape)
            grad_z = -clipped * s.detach() * ctx.grad_factor
        return grad_v, grad_s, grad_z, None, None


class _GradientQuantizer(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        ctx.spec = spec
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        return fake_quantize_gradient(grad_outputs[0], ctx.spec), None


def fake_quantize_gradient(
    grad: torch.Tensor, spec: QuantSpec, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``grad`` quantized to ``spec``'s grid over its own range (per tensor or per channel)
    and dequantized; stochastic rounding makes it unbiased.

    >>> g = torch.tensor([0.1, -0.4, 0.25])
    >>> fake_quantize_gradient(g, QuantSpec("int8", rounding="nearest")).tolist() == g.tolist()
    False
    """
    if not grad.numel():
        return grad
    gf = grad.float()
    gran = spec.gran
    if not isinstance(gran, PerTensor) and grad.ndim < 2:
        gran = PerTensor()  # a bias or a 1-d input: one scale
    lo, hi = minmax(gf, gran)
    scale, zero = choose_qparams(lo, hi, spec.qdtype, spec.symmetric)
    view, s, restore = _broadcast(gf, scale, gran)
    _, z, _ = _broadcast(gf, zero, gran)
    q = (
        _round(view / s, spec.rounding, generator)
        .add_(z)
        .clamp_(spec.qdtype.qmin, spec.qdtype.qmax)
    )
    return restore(q.sub_(z).mul_(s)).to(grad.dtype)


def quantize_gradient(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``x`` unchanged; the gradient flowing back through it is quantized to ``spec``.

    >>> x = torch.ones(3, requires_grad=True)
    >>> quantize_gradient(x, QuantSpec("int8", rounding="stochastic")).mul(0.3).sum().backward()
    >>> torch.allclose(x.grad, torch.full((3,), 0.3))
    True
    """
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x
    out: torch.Tensor = _GradientQuantizer.apply(x, spec)
    return out
