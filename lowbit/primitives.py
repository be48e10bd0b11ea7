"""Pure quantization math: qparams, quantize, dequantize, fake-quantize (STE), bit packing.

Nothing here holds state: every function takes its ``scale`` and ``zero_point`` explicitly.
``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and ``x' = (q - zero_point) * scale``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.spec import Granularity, PerChannel, PerGroup, PerTensor, PerToken, QDtype, SpecError

__all__ = [
    "storage_dtype",
    "blocks",
    "minmax",
    "choose_qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "pack_bits",
    "unpack_bits",
    "qparam_shape",
]

_EPS = torch.finfo(torch.float32).eps
Restore = Callable[[torch.Tensor], torch.Tensor]


def storage_dtype(dtype: QDtype) -> torch.dtype:
    """The torch dtype that holds unpacked integers of ``dtype`` in memory.

    >>> storage_dtype(QDtype.parse("int4"))
    torch.int8
    """
    if dtype.bits <= 8:
        return torch.int8 if dtype.signed else torch.uint8
    return torch.int16 if dtype.signed else torch.int32


def _grouped(x: torch.Tensor, group_size: int, pad: float = 0.0) -> tuple[torch.Tensor, Restore]:
    """View ``x`` as (rows, groups, group_size), padding a short last group with ``pad``."""
    if x.ndim < 2:
        raise SpecError(
            f"per_group needs a weight with at least 2 dims, got shape {tuple(x.shape)}; "
            "use per_tensor or per_channel for this tensor"
        )
    shape = x.shape
    rows = shape[0]
    flat = x.reshape(rows, -1)  # (out, in*kh*kw)
    width = flat.shape[1]
    groups = math.ceil(width / group_size)
    flat = F.pad(flat, (0, groups * group_size - width), value=pad)
    view = flat.view(rows, groups, group_size)  # (out, groups, g)

    def restore(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(rows, groups * group_size)[:, :width].reshape(shape)

    return view, restore


def qparam_shape(shape: torch.Size | tuple[int, ...], granularity: Granularity) -> tuple[int, ...]:
    """Shape of the scale / zero point for a tensor of ``shape``.

    >>> qparam_shape((64, 100), PerGroup(32))
    (64, 4)
    >>> qparam_shape((2, 5, 16), PerToken())
    (2, 5)
    """
    if isinstance(granularity, PerToken):
        _check_token_shape(len(shape))
        return tuple(shape[:-1])
    if isinstance(granularity, PerChannel):
        _check_axis(len(shape), granularity.axis)
        return (shape[granularity.axis],)
    if isinstance(granularity, PerGroup):
        width = math.prod(shape[1:])
        return (shape[0], math.ceil(width / granularity.group_size))
    return ()


def _check_axis(ndim: int, axis: int) -> None:
    if not -ndim <= axis < ndim:
        raise SpecError(
            f"per_channel axis={axis} does not exist on a {ndim}-d tensor; use an axis in "
            f"[0, {ndim - 1}] (0 = output channels of a weight, 1 = channels of an activation)"
        )


def _check_token_shape(ndim: int) -> None:
    if ndim < 1:
        raise SpecError("per_token needs an input with at least one dimension (tokens, features)")


def _broadcast(
    x: torch.Tensor, param: torch.Tensor, granularity: Granularity
) -> tuple[torch.Tensor, torch.Tensor, Restore]:
    """Return ``x`` and ``param`` in shapes that broadcast, and a function undoing x's view."""
    if isinstance(granularity, PerTensor):
        return x, param.reshape(()), lambda t: t
    if isinstance(granularity, PerToken):
        _check_token_shape(x.ndim)
        return x, param.reshape(*x.shape[:-1], 1), lambda t: t  # (..., 1) per row
    if isinstance(granularity, PerChannel):
        _check_axis(x.ndim, granularity.axis)
        shape = [1] * x.ndim
        shape[granularity.axis] = -1
        return x, param.reshape(shape), lambda t: t  # (…, C, …) broadcast on axis
    view, restore = _grouped(x, granularity.group_size)
    return view, param.reshape(view.shape[0], view.shape[1], 1), restore  # (out, groups, 1)


def blocks(x: torch.Tensor, granularity: Granularity, pad: float = 0.0) -> torch.Tensor:
    """View ``x`` as a matrix with one row per quantization block (tensor, channel or group).

    Rows follow the flattened order of :func:`qparam_shape`; a short last group is padded
    with ``pad`` (0 by default; ``nan`` lets statistics skip the padding with nan-aware ops).

    >>> blocks(torch.zeros(4, 10), PerGroup(4)).shape
    torch.Size([12, 4])
    >>> blocks(torch.ones(1, 6), PerGroup(4), pad=float("nan"))[1].tolist()
    [1.0, 1.0, nan, nan]
    """
    if isinstance(granularity, PerTensor):
        return x.reshape(1, -1)  # (1, numel)
    if isinstance(granularity, PerToken):
        _check_token_shape(x.ndim)
        return x.reshape(-1, x.shape[-1])  # (tokens, features)
    if isinstance(granularity, PerChannel):
        _check_axis(x.ndim, granularity.axis)
        return x.movedim(granularity.axis, 0).reshape(x.shape[granularity.axis], -1)  # (C, rest)
    view, _ = _grouped(x, granularity.group_size, pad)
    return view.reshape(-1, granularity.group_size)  # (out*groups, g)


def minmax(x: torch.Tensor, granularity: Granularity) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum and maximum of ``x`` per quantization block (tensor, channel or group).

    >>> lo, hi = minmax(torch.tensor([[1.0, -2.0], [3.0, 4.0]]), PerChannel(0))
    >>> lo.tolist(), hi.tolist()
    ([-2.0, 3.0], [1.0, 4.0])
    """
    x = x.detach()
    if isinstance(granularity, PerGroup):
        # pad a short last group with values that can win neither the min nor the max
        info = torch.finfo(x.dtype) if x.is_floating_point() else torch.iinfo(x.dtype)
        lo = blocks(x, granularity, pad=info.max).amin(dim=1)
        hi = blocks(x, granularity, pad=info.min).amax(dim=1)
    else:
        rows = blocks(x, granularity)
        # amin and amax separately: torch.aminmax along a dim was measured 9x slower on CPU
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
    shape = qparam_shape(x.shape, granularity)
    return lo.reshape(shape), hi.reshape(shape)


def choose_qparams(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    dtype: QDtype,
    symmetric: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) covering [min_val, max_val] and always 0.

    Symmetric grids put zero at the centre (0 for signed, 2**(bits-1) for unsigned);
    asymmetric grids map min to qmin and pick the integer zero point nearest to exact.

    >>> s, z = choose_qparams(torch.tensor(-1.0), torch.tensor(1.0), QDtype(8), True)
    >>> round(s.item() * 127, 6), z.item()
    (1.0, 0)
    """
    lo = torch.clamp(min_val.detach().float(), max=0.0)
    hi = torch.clamp(max_val.detach().float(), min=0.0)
    qmin, qmax = dtype.qmin, dtype.qmax
    if symmetric:
        amax = torch.maximum(-lo, hi)
        if dtype.signed:
            zero = torch.zeros_like(amax, dtype=torch.int32)
            levels = float(max(qmax, 1))
        else:
            zero = torch.full_like(amax, (qmax + 1) // 2, dtype=torch.int32)
            levels = float(max(qmax - (qmax + 1) // 2, 1))
        scale = torch.clamp(amax / levels, min=_EPS)
        return scale, zero
    scale = torch.clamp((hi - lo) / float(qmax - qmin), min=_EPS)
    zero = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int32)
    return scale, zero


def _sign(v: torch.Tensor) -> torch.Tensor:
    """The binary grid's rounding: +1 for v >= 0, -1 below."""
    return torch.where(v >= 0, 1.0, -1.0).to(v.dtype)


def _to_grid(
    v: torch.Tensor, dtype: QDtype, rounding: str, generator: torch.Generator | None
) -> torch.Tensor:
    """``v`` (``x / scale``) rounded onto the grid's integers, before the zero point."""
    return _sign(v) if dtype.binary else _round(v, rounding, generator)


def _round(v: torch.Tensor, rounding: str, generator: torch.Generator | None) -> torch.Tensor:
    if rounding == "nearest":
        return torch.round(v)  # round half to even
    if rounding == "stochastic":
        noise = torch.rand(v.shape, generator=generator, device=v.device, dtype=v.dtype)
        return torch.floor(v + noise)
    raise SpecError(f"rounding={rounding!r} is unknown: use 'nearest' or 'stochastic'")


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    dtype: QDtype,
    granularity: Granularity | None = None,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Map ``x`` to integers of ``dtype``: ``clamp(round(x / scale) + zero_point, qmin, qmax)``.

    >>> quantize(torch.tensor([0.5, 1.0, 9.0]), torch.tensor(0.5), torch.tensor(0), QDtype(4))
    tensor([1, 2, 7], dtype=torch.int8)
    """
    gran = granularity or PerTensor()
    view, s, restore = _broadcast(x, scale, gran)
    _, z, _ = _broadcast(x, zero_point, gran)
    q = _to_grid(view.float() / s, dtype, rounding, generator) + z
    q = torch.clamp(q, dtype.qmin, dtype.qmax)
    return restore(q).to(storage_dtype(dtype))


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    granularity: Granularity | None = None,
) -> torch.Tensor:
    """Map integers back to float32: ``(q - zero_point) * scale``.

    >>> dequantize(torch.tensor([1, 2, 7]), torch.tensor(0.5), torch.tensor(0))
    tensor([0.5000, 1.0000, 3.5000])
    """
    gran = granularity or PerTensor()
    view, s, restore = _broadcast(q.to(torch.int32), scale, gran)
    _, z, _ = _broadcast(q, zero_point, gran)
    return restore((view - z).float() * s)


class _FakeQuantSTE(torch.autograd.Function):
    """Quantize-dequantize; gradient 1 inside the clipping range and 0 outside."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        dtype: QDtype,
        granularity: Granularity,
        rounding: str,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        view, s, restore = _broadcast(x, scale, granularity)
        _, z, _ = _broadcast(x, zero_point, granularity)
        v = view / s
        q = _to_grid(v, dtype, rounding, generator) + z
        if dtype.binary:  # BinaryConnect's straight-through window
            inside = v.abs() <= 1
        else:
            inside = (v + z >= dtype.qmin - 0.5) & (v + z <= dtype.qmax + 0.5)
        out = (torch.clamp(q, dtype.qmin, dtype.qmax) - z) * s
        ctx.save_for_backward(restore(inside))
        return restore(out).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (inside,) = ctx.saved_tensors
        grad = torch.where(inside, grad_outputs[0], 0.0)
        return grad, None, None, None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    dtype: QDtype,
    granularity: Granularity | None = None,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Quantize then dequantize ``x`` in float, with a straight-through gradient.

    The gradient is 1 where ``x`` falls inside the representable range and 0 where it is
    clipped.

    >>> x = torch.tensor([0.26, 5.0], requires_grad=True)
    >>> y = fake_quantize(x, torch.tensor(0.5), torch.tensor(0), QDtype(4))
    >>> y.sum().backward(); y.tolist(), x.grad.tolist()
    ([0.5, 3.5], [1.0, 0.0])
    """
    gran = granularity or PerTensor()
    if torch.is_grad_enabled() and x.requires_grad:
        out: torch.Tensor = _FakeQuantSTE.apply(
            x, scale.detach(), zero_point.detach(), dtype, gran, rounding, generator
        )
        return out
    # Inference: the same arithmetic in place, without the clipping mask the gradient needs.
    view, s, restore = _broadcast(x, scale, gran)
    _, z, _ = _broadcast(x, zero_point, gran)
    q = _to_grid(view / s, dtype, rounding, generator)
    q.add_(z).clamp_(dtype.qmin, dtype.qmax).sub_(z).mul_(s)
    return restore(q).to(x.dtype)


def pack_bits(q: torch.Tensor, dtype: QDtype) -> torch.Tensor:
    """Pack integers of ``dtype`` into a flat uint8 tensor at their storage width.

    Values are offset by ``-qmin`` to be non-negative; 1-, 2- and 4-bit values share bytes
    (lowest bits first), 8-bit take one byte and 16-bit two (little endian).

    >>> pack_bits(torch.tensor([-8, 7, 0], dtype=torch.int8), QDtype(4)).tolist()
    [240, 8]
    """
    u = q.detach().reshape(-1).to(torch.int32) - dtype.qmin  # (n,) in [0, 2**bits)
    if dtype.binary:
        if u.numel() and bool((u == 1).any()):
            raise ValueError(
                "pack_bits: a binary weight holds 0; binary values are -1 or +1 (quantize "
                "with lowbit.primitives.quantize; rounding algorithms such as GPTQ and "
                "AdaRound do not support binary)"
            )
        u = u >> 1  # -1 -> 0, +1 -> 1
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= (1 << dtype.bits)):
        raise ValueError(f"pack_bits: values outside the {dtype} range; quantize them first")
    width = dtype.storage_bits
    if width == 16:
        return torch.stack([u & 0xFF, u >> 8], dim=1).reshape(-1).to(torch.uint8)  # (2n,)
    per_byte = 8 // width
    u = F.pad(u, (0, (-u.numel()) % per_byte)).view(-1, per_byte)  # (bytes, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32) * width
    return (u << shifts).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, dtype: QDtype, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``numel`` integers of ``dtype`` (flat, storage dtype).

    >>> unpack_bits(torch.tensor([240, 8], dtype=torch.uint8), QDtype(4), 3).tolist()
    [-8, 7, 0]
    """
    width = dtype.storage_bits
    data = packed.reshape(-1).to(torch.int32)
    needed = 2 * numel if width == 16 else math.ceil(numel * width / 8)
    if data.numel() != needed:
        raise ValueError(
            f"unpack_bits: {data.numel()} bytes cannot hold exactly {numel} {dtype} values "
            f"(expected {needed}); the file is truncated or its header does not match"
        )
    if width == 16:
        pairs = data.view(-1, 2)  # (n, 2) low byte, high byte
        u = pairs[:, 0] | (pairs[:, 1] << 8)
    else:
        per_byte = 8 // width
        shifts = torch.arange(per_byte, dtype=torch.int32) * width
        u = ((data.view(-1, 1) >> shifts) & ((1 << width) - 1)).reshape(-1)[:numel]
    if dtype.binary:
        u = u << 1  # 0 -> -1, 1 -> +1 (after the offset below)
    return (u + dtype.qmin).to(storage_dtype(dtype))
