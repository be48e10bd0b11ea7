"""The one place lowbit calls private torch ops: oneDNN int8 matmul and convolution, and the
weight-only int8/int4 CPU matmuls.

Every op here is private to torch and may change in any release, so each has a self-test
(:mod:`lowbit.runtime.opscheck`) that runs it on a tiny input against a float reference; a
kernel that uses an op asks ``opscheck.available`` first, and an op whose self-test fails is
not used (its layers fall back to the next kernel, ultimately the float simulation). A torch
upgrade then breaks these tests loudly instead of the package quietly. What each op needs on
this kind of CPU is in shared/RUNTIME-NOTES.md: the fast int8 paths want uint8 activations
and symmetric int8 weights; the weight-only paths are fast in bfloat16 only.
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "bf16_fast",
    "qlinear_prepack",
    "qlinear",
    "qconv_prepack",
    "qconv",
    "qconv_add",
    "bound_qlinear",
    "bound_qconv",
    "bound_qconv_add",
    "weight_int8_mm",
    "int4_block_n",
    "int4_pack",
    "int4_from_packed_bytes",
    "int4_unpack",
    "release_free_memory",
    "int4_mm",
]

_ONEDNN = torch.ops.onednn
_QUANTIZED = torch.ops.quantized
_ATEN = torch.ops.aten


# --- oneDNN int8 matmul ----------------------------------------------------------------------
def qlinear_prepack(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's packed form of an int8 ``(out, in)`` weight (an opaque tensor)."""
    return _ONEDNN.qlinear_prepack(weight, None)


def qlinear(
    x: torch.Tensor,
    x_scale: float,
    x_zero: int,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    relu: bool = False,
    out_scale: float = 1.0,
    out_zero: int = 0,
) -> torch.Tensor:
    """``(x - x_zero) * x_scale @ (w * w_scale).T + bias`` with ``x`` uint8 ``(..., in)``, int8
    weights and an int32 accumulator; float ``out_dtype`` output, or uint8 requantized at
    ``out_scale``/``out_zero``; ``relu`` fused."""
    return _ONEDNN.qlinear_pointwise(
        x,
        x_scale,
        x_zero,
        packed,
        w_scale,
        w_zero,
        bias,
        out_scale,
        out_zero,
        out_dtype,
        "relu" if relu else "none",
        [],
        "",
    )


# --- oneDNN int8 convolution ----------------------------------------------------------------
def dynamic_linear_prepack(
    weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> Any:
    """fbgemm's packed form of a symmetric int8 ``(out, in)`` weight with per-tensor ``(1,)``
    or per-channel ``(out,)`` scales and a float bias: torch.ao's dynamic Linear kernel."""
    with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors; the
        warnings.simplefilter("ignore", UserWarning)  # self-test notices when they go
        if w_scale.numel() == 1:
            wq = torch._make_per_tensor_quantized_tensor(weight, float(w_scale), 0)
        else:
            zeros = torch.zeros(weight.shape[0], dtype=torch.long)
            wq = torch._make_per_channel_quantized_tensor(weight, w_scale.double(), zeros, 0)
        return _QUANTIZED.linear_prepack(wq, bias)


def dynamic_linear(x: torch.Tensor, packed: Any) -> torch.Tensor:
    """float32 ``(rows, in)`` -> float32 ``(rows, out)``: ``x`` quantized to uint8 over its
    own range (zero included, all 8 bits), the int8 GEMM, rescale and bias (fbgemm)."""
    return _QUANTIZED.linear_dynamic(x, packed, False)


def qconv_prepack(
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    x_shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """oneDNN's packed form of an int8 ``(out, in/groups, *kernel)`` conv weight, for inputs
    of ``x_shape`` when given (any shape otherwise)."""
    if weight.ndim == 4:
        weight = weight.contiguous(memory_format=torch.channels_last)
    shape = list(x_shape) if x_shape is not None else None
    return _ONEDNN.qconv_prepack(
        weight, w_scale, 1.0, 0, list(stride), list(padding), list(dilation), groups, shape
    )


def _relu_after(out: torch.Tensor, relu: bool, out_zero: int) -> torch.Tensor:
    """ReLU applied to a conv's output: float, or uint8 around its zero point ``out_zero``."""
    if not relu:
        return out
    return out.clamp_(min=out_zero) if out.dtype == torch.uint8 else out.relu_()


def qconv(
    x: torch.Tensor,
    x_scale: float,
    x_zero: int,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor,
    bias: torch.Tensor | None,
    geometry: tuple[list[int], list[int], list[int], int],
    out_dtype: torch.dtype,
    relu: bool = False,
    out_scale: float = 1.0,
    out_zero: int = 0,
) -> torch.Tensor:
    """Int8 convolution of a uint8 input (channels_last for 2-d; 1-, 2- or 3-d); ``geometry``
    is (stride, padding, dilation, groups). Float output, or uint8 at ``out_scale``/``out_zero``."""
    three_d = x.ndim == 5  # oneDNN's generic op, which takes no ReLU post-op
    if three_d:
        op = _ONEDNN.qconv_pointwise
    else:
        op = _ONEDNN.qconv2d_pointwise if x.ndim == 4 else _ONEDNN.qconv1d_pointwise
    out = op(
        x,
        x_scale,
        x_zero,
        packed,
        w_scale,
        w_zero,
        bias,
        *geometry,
        out_scale,
        out_zero,
        out_dtype,
        "relu" if relu and not three_d else "none",
        [],
        "",
    )
    return _relu_after(out, relu and three_d, out_zero)


def qconv_add(
    x: torch.Tensor,
    x_scale: float,
    x_zero: int,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor,
    bias: torch.Tensor | None,
    geometry: tuple[list[int], list[int], list[int], int],
    accum: torch.Tensor,
    accum_scale: float,
    accum_zero: int,
    relu: bool = False,
    out_scale: float = 1.0,
    out_zero: int = 0,
) -> torch.Tensor:
    """``conv(x) + (accum - accum_zero) * accum_scale`` (+ ReLU) in one 2-d oneDNN call.

    ``accum`` (channels_last) is overwritten with the result and returned; it has the output's
    dtype: float, or uint8 requantized at ``out_scale``/``out_zero``.
    """
    return _ONEDNN.qconv2d_pointwise.binary(
        x,
        x_scale,
        x_zero,
        packed,
        w_scale,
        w_zero,
        accum,
        bias,
        *geometry,
        out_scale,
        out_zero,
        accum.dtype,
        accum_scale,
        accum_zero,
        "sum",
        1.0,
        "relu" if relu else None,
        [],
        None,
    )


# --- the same calls with everything but the tensors bound once -----------------------------
Bound = Callable[..., torch.Tensor]


def bound_qlinear(
    x_scale: float,
    x_zero: int,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    relu: bool,
    out_scale: float = 1.0,
    out_zero: int = 0,
) -> Bound:
    """:func:`qlinear` as ``f(x)``, its other arguments bound (the overload resolved once)."""
    op = _ONEDNN.qlinear_pointwise.default
    args: tuple[Any, ...] = (
        x_scale,
        x_zero,
        packed,
        w_scale,
        w_zero,
        bias,
        out_scale,
        out_zero,
        out_dtype,
        "relu" if relu else "none",
        [],
        "",
    )
    return lambda x: op(x, *args)


def bound_qconv(
    x_scale: float,
    x_zero: int,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor,
    bias: torch.Tensor | None,
    geometry: tuple[list[int], list[int], list[int], int],
    out_dtype: torch.dtype,
    relu: bool,
    out_scale: float = 1.0,
    out_zero: int = 0,
) -> Bound:
    """:func:`qconv` (2-d, or 3-d for a 3-d ``geometry``) as ``f(x)``, its other arguments
    bound."""
    if len(geometry[0]) == 3:  # no ReLU post-op in oneDNN's 3-d op
        bound = (x_scale, x_zero, packed, w_scale, w_zero, bias, geometry, out_dtype)
        return lambda x: qconv(x, *bound, relu, out_scale, out_zero)
    op = _ONEDNN.qconv2d_pointwise.default
    args: tuple[Any, ...] = (
        x_scale,
        x_zero,
        packed,
        w_scale,
        w_zero,
        bias,
        *geometry,
        out_scale,
        out_zero,
        out_dtype,
        "relu" if relu else "none",
        [],
        "",
    )
    return lambda x: op(x, *args)


def bound_qconv_add(
    x_scale: float,
    x_zero: int,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor,
    bias: torch.Tensor | None,
    geometry: tuple[list[int], list[int], list[int], int],
    accum_scale: float,
    accum_zero: int,
    relu: bool,
    out_dtype: torch.dtype,
    out_scale: float = 1.0,
    out_zero: int = 0,
) -> Bound:
    """:func:`qconv_add` as ``f(x, accum)`` (``accum`` of ``out_dtype``, overwritten)."""
    op = _ONEDNN.qconv2d_pointwise.binary
    head = (x_scale, x_zero, packed, w_scale, w_zero)
    tail: tuple[Any, ...] = (
        bias,
        *geometry,
        out_scale,
        out_zero,
        out_dtype,
        accum_scale,
        accum_zero,
        "sum",
        1.0,
        "relu" if relu else None,
        [],
        None,
    )
    return lambda x, accum: op(x, *head, accum, *tail)


# --- weight-only matmuls --------------------------------------------------------------------
def weight_int8_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (weight * scale).T`` for a 2-d ``x`` (bfloat16 for the vectorized path), int8
    ``(out, in)`` weight and per-output-channel ``scale`` in ``x``'s dtype."""
    return _ATEN._weight_int8pack_mm(x, weight, scale)


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """The CPU int4 matmul's packed weight from unsigned 4-bit values ``(out, in)`` in 0..15."""
    return _ATEN._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)


def _unpack_blocked(packed: torch.Tensor, rows: int, cols: int, block: int) -> torch.Tensor:
    """Inverse of the CPU int4 packing: rows are packed ``block`` at a time; within a block,
    byte ``(k, j)`` holds row ``j``'s value at column ``k`` in its low nibble and row
    ``j + block/2``'s in its high nibble."""
    half = block // 2
    view = packed.reshape(rows // block, cols, half)  # (blocks, in, block/2)
    low, high = view & 0xF, view >> 4
    both = torch.cat([low, high], dim=2)  # (blocks, in, block)
    return both.permute(0, 2, 1).reshape(rows, cols)  # (out, in)


@functools.cache
def int4_block_n() -> int | None:
    """How many output rows the CPU int4 packing interleaves (64 with AVX-512, 32 with AVX2),
    found by packing a probe; None when no known layout matches (the int4 kernel is then off).
    """
    rows, cols = 128, 64
    probe = (torch.arange(rows * cols, dtype=torch.int32).reshape(rows, cols) * 7) % 16
    try:
        packed = int4_pack(probe)
    except RuntimeError:
        return None
    for block in (64, 32, 16):
        back = _unpack_blocked(packed, rows, cols, block)
        if torch.equal(back.to(torch.int32), probe):
            return block
    return None


def int4_from_packed_bytes(data: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The CPU int4 matmul's layout straight from lowbit's packed bytes of an int4 weight
    (row-major, two values per byte, low nibble first, ``q + 8``), with byte operations only:
    torch's own packing takes int32 values, 4 bytes a weight. Equal to :func:`int4_pack` of
    the unpacked values (checked by the self-test)."""
    block = int4_block_n()
    if block is None or rows % block or cols % 2:
        raise RuntimeError("the CPU int4 packing of this torch build is not understood")
    half, per_chunk = block // 2, max(1, 1024 // block)  # 1024 rows at a time
    view = data.reshape(rows // block, 2, half, cols // 2)  # (blocks, low/high rows, rows, bytes)
    parts = []
    for start in range(0, rows // block, per_chunk):
        c = view[start : start + per_chunk]
        nibbles = torch.stack([c & 0xF, c >> 4], dim=-1).flatten(-2)  # (b, 2, half, in)
        nibbles = nibbles.transpose(2, 3)  # (b, 2, in, half)
        parts.append((nibbles[:, 0] | (nibbles[:, 1] << 4)).reshape(-1, cols // 2))
    return torch.cat(parts)


def int4_unpack(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The unsigned 4-bit values ``(out, in)`` (uint8) of a weight packed by :func:`int4_pack`."""
    block = int4_block_n()
    if block is None or rows % block:
        raise RuntimeError("the CPU int4 packing of this torch build is not understood")
    return _unpack_blocked(packed, rows, cols, block)


def int4_mm(
    x: torch.Tensor, packed: torch.Tensor, group_size: int, scale_zeros: torch.Tensor
) -> torch.Tensor:
    """``x @ W.T`` with ``W[n, k] = (q[n, k] - 8) * s[g, n] + z[g, n]`` for group ``g = k //
    group_size``; ``scale_zeros`` is ``(in/group_size, out, 2)`` in ``x``'s dtype."""
    return _ATEN._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_zeros)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to call
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Give heap memory the process has freed back to the operating system (glibc's
    ``malloc_trim``; a no-op returning False elsewhere).

    Re-packing a large weight frees as much temporary memory as it allocates, but glibc keeps
    freed heap pages mapped, so the process's resident size stays at its high-water mark:
    on the benchmark MLP that was 2x the int4 weights themselves.
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def bf16_fast() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


# --- self-tests -----------------------------------------------------------------------------
