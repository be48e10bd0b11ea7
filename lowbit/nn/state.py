"""A frozen layer's quantized tensors as ``state_dict`` entries, and back, with every check.

A quantized weight ``W`` of a layer at ``prefix`` is written as:

- ``{prefix}weight.qdata``: sub-byte integers packed at their width (flat uint8, lowest bits
  first, :func:`~lowbit.primitives.pack_bits`); 8- and 16-bit integers as they are, in the
  weight's shape;
- ``{prefix}weight.scale``: float32, one per tensor, channel or group;
- ``{prefix}weight.zero_point``: packed at the weight's width (uint8), or int32 when it does not
  fit; left out when the grid is symmetric and every zero point is 0.

An int32 bias is ``{prefix}bias.qdata`` (int32) and ``{prefix}bias.scale`` (float32). Reading
checks dtypes, shapes, byte counts, integer ranges and that scales are finite and positive, so
a damaged or crafted file is refused with a message naming the tensor.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lowbit.nn.qtensor import QTensor, compact_zero_point
from lowbit.primitives import pack_bits, qparam_shape, storage_dtype, unpack_bits
from lowbit.spec import PerChannel, PerTensor, QDtype, QuantSpec

__all__ = ["write_qtensor", "read_weight", "read_bias", "check_input_qparams"]


def _canonical_qdata(t: QTensor) -> torch.Tensor:
    if t.qdtype is not None and t.qdtype.storage_bits < 8:
        return t.qdata if t.layout_name == "packed" else pack_bits(t.int_repr(), t.qdtype)
    return t.qdata if t.layout_name == "plain" else t.int_repr()


def write_qtensor(t: QTensor, prefix: str) -> dict[str, torch.Tensor]:
    """The state_dict entries of ``t`` under ``prefix`` (``"layer.weight."``).

    >>> qt = QTensor.quantize(torch.randn(2, 8), QuantSpec("int4", "per_channel"))
    >>> {k: tuple(v.shape) for k, v in write_qtensor(qt, "w.").items()}
    {'w.qdata': (8,), 'w.scale': (2,)}
    """
    out = {prefix + "qdata": _canonical_qdata(t), prefix + "scale": t.scale}
    if t.qdtype is None:
        return out  # int32 bias: zero point 0 by construction
    symmetric = t.spec is not None and t.spec.symmetric and t.qdtype.signed
    if not (symmetric and t.symmetric_zero):
        zero = t.zero_point
        fits = bool((zero >= t.qdtype.qmin).all() and (zero <= t.qdtype.qmax).all())
        out[prefix + "zero_point"] = pack_bits(zero, t.qdtype) if fits else zero
    return out


def _take(state: dict[str, Any], key: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"missing key {key!r}")
    value = state.pop(key)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{key!r} is a {type(value).__name__}, not a tensor")
    return value


def _check_scale(key: str, scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if scale.dtype != torch.float32 or tuple(scale.shape) != shape:
        raise ValueError(
            f"{key!r} is {scale.dtype} of shape {list(scale.shape)}, expected float32 {list(shape)}"
        )
    if scale.device.type != "meta" and not bool(torch.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError(f"{key!r} holds a scale that is not a finite positive number")
    return scale


def _check_range(key: str, q: torch.Tensor, dtype: QDtype) -> None:
    if q.numel() and (int(q.min()) < dtype.qmin or int(q.max()) > dtype.qmax):
        raise ValueError(
            f"{key!r} holds values outside the {dtype} range [{dtype.qmin}, {dtype.qmax}]"
        )


def _check_packed(key: str, data: torch.Tensor, dtype: QDtype, numel: int) -> None:
    """Packed sub-byte integers: the byte count, and the values' range when the grid is
    narrower than its storage width (int3 in 4 bits), checked a slice at a time."""
    if data.dtype != torch.uint8 or data.ndim != 1:
        raise ValueError(f"{key!r} is {data.dtype} of {data.ndim} dims, expected flat packed uint8")
    width = dtype.storage_bits
    needed = math.ceil(numel * width / 8)
    if data.numel() != needed:
        raise ValueError(
            f"{key!r}: {data.numel()} bytes cannot hold exactly {numel} {dtype} values "
            f"(expected {needed}); the file is truncated or its header does not match"
        )
    if dtype.qmax - dtype.qmin == (1 << width) - 1:
        return  # every bit pattern is a value of the grid (int2, int4, uint4, ...)
    shifts = torch.arange(8 // width, dtype=torch.int32) * width
    for start in range(0, needed, 1 << 20):  # a slice at a time: small int32 temporaries
        part = data[start : start + (1 << 20)].to(torch.int32)
        fields = (part.view(-1, 1) >> shifts) & ((1 << width) - 1)  # (bytes, values per byte)
        if int(fields.max()) > dtype.qmax - dtype.qmin:  # padding fields are 0: always valid
            raise ValueError(f"{key!r} holds values outside the {dtype} range")


def _read_ints(key: str, data: torch.Tensor, dtype: QDtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Stored integers checked against ``shape`` and the grid: packed bytes as they are for
    sub-byte grids (never unpacked to check them), plain integers of ``shape`` otherwise."""
    numel = math.prod(shape)
    if dtype.storage_bits < 8:
        _check_packed(key, data, dtype, numel)
        return data
    want = storage_dtype(dtype)
    if data.dtype != want or tuple(data.shape) != shape:
        raise ValueError(
            f"{key!r} is {data.dtype} of shape {list(data.shape)}, expected {want} {list(shape)}"
        )
    _check_range(key, data, dtype)
    return data


def read_weight(
    state: dict[str, Any],
    prefix: str,
    spec: QuantSpec,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype,
) -> QTensor:
    """The QTensor stored under ``prefix`` for a weight of ``shape`` quantized with ``spec``
    (its entries are removed from ``state``).

    >>> qt = QTensor.quantize(torch.randn(3, 4), QuantSpec("int2", "per_group:2", symmetric=False))
    >>> back = read_weight(write_qtensor(qt, "w."), "w.", qt.spec, (3, 4), torch.float32)
    >>> torch.equal(back.int_repr(), qt.int_repr())
    True
    """
    shape = tuple(shape)
    qdtype, gran = spec.qdtype, spec.gran
    data = _take(state, prefix + "qdata")
    pshape = qparam_shape(shape, gran)
    scale = _check_scale(prefix + "scale", _take(state, prefix + "scale"), pshape)
    zkey = prefix + "zero_point"
    if zkey not in state:
        if not (spec.symmetric and qdtype.signed):
            raise ValueError(f"missing key {zkey!r} (only a signed symmetric grid has none)")
        zero = torch.zeros(pshape, dtype=torch.int32)
    else:
        stored = _take(state, zkey)
        if stored.dtype == torch.uint8:
            try:
                zero = unpack_bits(stored, qdtype, math.prod(pshape)).reshape(pshape)
            except ValueError as err:
                raise ValueError(f"{zkey!r}: {err}") from None
        elif stored.dtype == torch.int32 and tuple(stored.shape) == pshape:
            zero = stored
        else:
            raise ValueError(
                f"{zkey!r} is {stored.dtype} of shape {list(stored.shape)}, "
                f"expected packed uint8 or int32 {list(pshape)}"
            )
        zero = zero.to(torch.int32)
        if spec.symmetric and qdtype.signed and bool(zero.any()):
            raise ValueError(f"{zkey!r} holds nonzero zero points for a symmetric signed grid")
        _check_range(zkey, zero, qdtype)
    q = _read_ints(prefix + "qdata", data, qdtype, shape)
    if qdtype.storage_bits < 8:  # kept packed, as stored
        zero = compact_zero_point(zero, qdtype)
        return QTensor(q, scale, zero, qdtype, gran, shape, dtype, "packed", spec)
    return QTensor.from_int(q, scale, zero, qdtype, gran, dtype, spec=spec)


def read_bias(
    state: dict[str, Any], prefix: str, shape: torch.Size | tuple[int, ...], dtype: torch.dtype
) -> QTensor:
    """The int32 bias stored under ``prefix`` (entries removed from ``state``).

    >>> qb = QTensor.bias(torch.tensor([0.5, -0.25]), torch.tensor([0.25, 0.25]))
    >>> read_bias(write_qtensor(qb, "b."), "b.", (2,), torch.float32).qdata.tolist()
    [2, -1]
    """
    shape = tuple(shape)
    data = _take(state, prefix + "qdata")
    if data.dtype != torch.int32 or tuple(data.shape) != shape:
        raise ValueError(
            f"{prefix}qdata is {data.dtype} of shape {list(data.shape)}, "
            f"expected int32 {list(shape)}"
        )
    scale = _take(state, prefix + "scale")
    pshape = () if scale.ndim == 0 else shape
    _check_scale(prefix + "scale", scale, pshape)
    gran = PerTensor() if scale.ndim == 0 else PerChannel(0)
    zero = torch.zeros(pshape, dtype=torch.int32)
    return QTensor(data, scale, zero, None, gran, shape, dtype, "plain")


def check_input_qparams(key: str, spec: QuantSpec, scale: torch.Tensor, zero: torch.Tensor) -> None:
    """Raise a ValueError naming ``key`` unless ``scale`` / ``zero`` can be the calibrated
    qparams of an input quantized with ``spec``: float32 finite positive scales, integer zero
    points on the grid (0 for a signed symmetric one), one per tensor (``()``) or one per
    channel (1-d), both the same shape.

    >>> check_input_qparams("x.", QuantSpec("uint8", symmetric=False),
    ...                     torch.tensor(0.1), torch.tensor(3, dtype=torch.int32))
    >>> check_input_qparams("x.", QuantSpec("int8"), torch.tensor(-1.0), torch.tensor(0))
    Traceback (most recent call last):
    ValueError: 'x.scale' holds a scale that is not a finite positive number
    """
    if spec.dynamic:
        raise ValueError(f"{key + 'scale'!r}: a dynamic input computes its scale at run time")
    want = () if isinstance(spec.gran, PerTensor) else None
    if scale.ndim != (0 if want == () else 1):
        raise ValueError(
            f"{key + 'scale'!r} has shape {list(scale.shape)}; a {spec.gran.kind} input has "
            f"{'one scale (shape [])' if want == () else 'one scale per channel (1-d)'}"
        )
    _check_scale(key + "scale", scale, tuple(scale.shape))
    if zero.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"{key + 'zero_point'!r} is {zero.dtype}, expected int32")
    if tuple(zero.shape) != tuple(scale.shape):
        raise ValueError(
            f"{key + 'zero_point'!r} has shape {list(zero.shape)}, the scale {list(scale.shape)}"
        )
    if zero.device.type == "meta":
        return
    qdtype = spec.qdtype
    _check_range(key + "zero_point", zero, qdtype)
    if spec.symmetric and qdtype.signed and bool(zero.any()):
        raise ValueError(f"{key + 'zero_point'!r} is nonzero on a symmetric signed grid")
