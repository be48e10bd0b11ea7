"""A self-test for each private torch op in :mod:`lowbit.runtime.ops`: the op on a tiny input
against a float reference. Kernels ask :func:`available` before using an op; an op whose
self-test fails is not used (its layers fall back to the next kernel), so a torch upgrade that
changes one breaks its test loudly instead of the package quietly."""

from __future__ import annotations

import functools
import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lowbit.runtime.ops import (
    dynamic_linear,
    dynamic_linear_prepack,
    int4_block_n,
    int4_from_packed_bytes,
    int4_mm,
    int4_pack,
    int4_unpack,
    qconv,
    qconv_add,
    qconv_prepack,
    qlinear,
    qlinear_prepack,
    weight_int8_mm,
)

__all__ = ["SELF_TESTS", "available", "self_test"]


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> str | None:
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item() or 1.0
    return None if err <= tol * scale else f"max error {err:.3g} against {scale:.3g}"


def _test_qlinear() -> str | None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (16, 32), dtype=torch.int8, generator=gen)
    ws = torch.rand(16, generator=gen) * 0.01 + 0.001
    x = torch.randint(0, 256, (3, 32), dtype=torch.uint8, generator=gen)
    bias = torch.randn(16, generator=gen)
    zeros = torch.zeros(16, dtype=torch.int32)
    got = qlinear(x, 0.05, 120, qlinear_prepack(w), ws, zeros, bias, torch.float32, relu=True)
    want = torch.relu(F.linear((x.float() - 120) * 0.05, w.float() * ws[:, None], bias))
    return _close(got, want, 1e-4)


def _test_qconv() -> str | None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (8, 4, 3, 3), dtype=torch.int8, generator=gen)
    ws = torch.rand(8, generator=gen) * 0.01 + 0.001
    zeros = torch.zeros(8, dtype=torch.int32)
    x = torch.randint(0, 256, (2, 4, 6, 6), dtype=torch.uint8, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last)
    geometry = ([1, 1], [1, 1], [1, 1], 1)
    packed = qconv_prepack(w, ws, *geometry)
    dense = F.conv2d((x.float() - 100) * 0.02, w.float() * ws[:, None, None, None], None, 1, 1)
    got = qconv(x, 0.02, 100, packed, ws, zeros, None, geometry, torch.float32)
    problem = _close(got, dense, 1e-4)
    if problem is not None:
        return problem
    accum = torch.randn(dense.shape, generator=gen).contiguous(memory_format=torch.channels_last)
    want = torch.relu(dense + accum)
    got = qconv_add(x, 0.02, 100, packed, ws, zeros, None, geometry, accum.clone(), 1.0, 0, True)
    return _close(got, want, 1e-4)


def _test_qconv1d() -> str | None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (8, 4, 3), dtype=torch.int8, generator=gen)
    ws = torch.rand(8, generator=gen) * 0.01 + 0.001
    x = torch.randint(0, 256, (2, 4, 9), dtype=torch.uint8, generator=gen)
    geometry = ([1], [1], [1], 1)
    packed = qconv_prepack(w, ws, *geometry)
    zeros = torch.zeros(8, dtype=torch.int32)
    got = qconv(x, 0.02, 100, packed, ws, zeros, None, geometry, torch.float32)
    want = F.conv1d((x.float() - 100) * 0.02, w.float() * ws[:, None, None], None, 1, 1)
    return _close(got, want, 1e-4)


def _test_qconv3d() -> str | None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (8, 4, 3, 3, 3), dtype=torch.int8, generator=gen)
    ws = torch.rand(8, generator=gen) * 0.01 + 0.001
    x = torch.randint(0, 256, (2, 4, 4, 5, 6), dtype=torch.uint8, generator=gen)
    geometry = ([1, 1, 1], [1, 1, 1], [1, 1, 1], 1)
    packed = qconv_prepack(w, ws, *geometry)
    zeros = torch.zeros(8, dtype=torch.int32)
    got = qconv(x, 0.02, 100, packed, ws, zeros, None, geometry, torch.float32)
    want = F.conv3d((x.float() - 100) * 0.02, w.float() * ws[:, None, None, None, None], None, 1, 1)
    return _close(got, want, 1e-4)


def _test_weight_int8() -> str | None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (16, 32), dtype=torch.int8, generator=gen)
    scale = torch.rand(16, generator=gen) * 0.01 + 0.001
    x = torch.randn(3, 32, generator=gen).bfloat16()
    got = weight_int8_mm(x, w, scale.bfloat16())
    want = x.float() @ (w.float() * scale.bfloat16().float()[:, None]).t()
    return _close(got, want, 2e-2)


def _test_int4() -> str | None:
    if int4_block_n() is None:
        return "the packed layout matches no known blocking"
    gen = torch.Generator().manual_seed(0)
    rows, cols, group = 64, 64, 32
    q = torch.randint(0, 16, (rows, cols), dtype=torch.int32, generator=gen)
    packed = int4_pack(q)
    if not torch.equal(int4_unpack(packed, rows, cols).to(torch.int32), q):
        return "unpacking does not give back the packed values"
    flat = q.reshape(-1, 2)
    ours = (flat[:, 0] | (flat[:, 1] << 4)).to(torch.uint8)  # lowbit's packed bytes
    if not torch.equal(int4_from_packed_bytes(ours, rows, cols), packed):
        return "re-packing lowbit's packed bytes does not give torch's layout"
    scale = torch.rand(cols // group, rows, generator=gen) * 0.05 + 0.01
    zero = torch.randn(cols // group, rows, generator=gen) * 0.01
    scale_zeros = torch.stack([scale, zero], dim=-1).bfloat16()  # (groups, out, 2)
    x = torch.randn(3, cols, generator=gen).bfloat16()
    got = int4_mm(x, packed, group, scale_zeros)
    sz = scale_zeros.float()
    w = (q.float() - 8).reshape(rows, cols // group, group) * sz[..., 0].t()[..., None]
    w = (w + sz[..., 1].t()[..., None]).reshape(rows, cols)  # (out, in)
    return _close(got, x.float() @ w.t(), 2e-2)


def _test_dynamic_linear() -> str | None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (16, 32), dtype=torch.int8, generator=gen)
    w_scale = torch.rand(16, generator=gen) / 100 + 1e-3
    bias = torch.randn(16, generator=gen)
    x = torch.randn(3, 32, generator=gen)
    got = dynamic_linear(x, dynamic_linear_prepack(w, w_scale, bias))
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255
    zero = round(-lo / scale)
    xq = ((x / scale).round() + zero).clamp(0, 255)
    want = ((xq - zero) * scale) @ (w.float() * w_scale[:, None]).t() + bias
    return _close(got, want, 1e-2)


SELF_TESTS: dict[str, Callable[[], str | None]] = {
    "fbgemm_dynamic_linear": _test_dynamic_linear,
    "onednn_qlinear": _test_qlinear,
    "onednn_qconv2d": _test_qconv,
    "onednn_qconv1d": _test_qconv1d,
    "onednn_qconv3d": _test_qconv3d,
    "weight_int8_mm": _test_weight_int8,
    "int4_mm": _test_int4,
}


def _platform_problem() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the oneDNN int8 paths are checked on x86-64 only (this is {platform.machine()})"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    return None


@functools.cache
def available(op: str) -> str | None:
    """None when ``op`` (a key of :data:`SELF_TESTS`) works on this machine and torch build,
    otherwise why not; the self-test runs once per process.

    >>> available("onednn_qlinear") is None or isinstance(available("onednn_qlinear"), str)
    True
    """
    problem = _platform_problem()
    if problem is not None:
        return problem
    try:
        return SELF_TESTS[op]()
    except (RuntimeError, AttributeError, NotImplementedError, TypeError) as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"


def self_test() -> dict[str, str | None]:
    """Every private op's self-test: op name -> None (works) or the problem.

    >>> sorted(self_test())  # doctest: +NORMALIZE_WHITESPACE
    ['fbgemm_dynamic_linear', 'int4_mm', 'onednn_qconv1d', 'onednn_qconv2d', 'onednn_qconv3d',
     'onednn_qlinear', 'weight_int8_mm']
    """
    return {op: available(op) for op in SELF_TESTS}
