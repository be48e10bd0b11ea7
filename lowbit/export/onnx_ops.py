"""The ONNX nodes of one converted lowbit layer, for :func:`lowbit.export.onnx.export_onnx`.

Each piece computes what lowbit's simulation computes. The input quantizer: uint8
``QuantizeLinear -> DequantizeLinear`` (static; a signed grid with zero point ``z`` is uint8
with ``z + 128``; a grid narrower than uint8 gets a ``Clip`` first),
``DynamicQuantizeLinear -> DequantizeLinear`` (dynamic asymmetric 8-bit per tensor), or the
simulation's own float arithmetic (``ReduceMin``, ``Div``, ``Round``, ``Clip``, ...) for other
dynamic grids (symmetric, per token, per channel) and grids wider than 8 bits. The weight:
integer initializers (int4/uint4, int8/uint8, int16/uint16: the grid's width, wider when the
zero points need it) feeding ``DequantizeLinear`` per tensor, per axis or blocked (per group),
or ``com.microsoft::MatMulNBits`` for 4-bit Linear weights. The bias: ``DequantizeLinear`` of
the int32 bias at ``s_w * s_x``, or float. A weight no ONNX integer type can hold at the opset
is written as float, with a note (:attr:`Emitter.notes`). An embedding is a ``Gather`` of its
dequantized table; transformers' ``Conv1D`` a ``MatMul`` by its ``(in, out)`` weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from lowbit.nn import QModule, QTensor
from lowbit.spec import PerChannel, PerGroup, PerTensor, PerToken, QDtype

__all__ = ["Emitter", "INT4_FORMATS", "MS_DOMAIN", "emit_layer", "nbits_expressible"]

MS_DOMAIN = "com.microsoft"
INT4_FORMATS = ("auto", "qdq", "matmulnbits")
_EPS = float(torch.finfo(torch.float32).eps)  # lowbit.primitives.choose_qparams' scale floor
_INT_TYPES = (  # (ONNX type, lowest, highest, numpy storage, lowest opset), narrowest first
    (TensorProto.INT4, -8, 7, np.int8, 21),
    (TensorProto.UINT4, 0, 15, np.uint8, 21),
    (TensorProto.INT8, -128, 127, np.int8, 10),
    (TensorProto.UINT8, 0, 255, np.uint8, 10),
    (TensorProto.INT16, -(2**15), 2**15 - 1, np.int16, 21),
    (TensorProto.UINT16, 0, 2**16 - 1, np.uint16, 21),
)
_NBITS_BLOCK = 32  # MatMulNBits block for per-tensor / per-channel weights (scales repeated)


@dataclass
class Emitter:
    """Collects the nodes and initializers of one layer call (names unique in the model)."""

    opset: int
    taken: set[str]
    prefix: str = ""
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    domains: set[str] = field(default_factory=set)
    shared: dict[str, str] = field(default_factory=dict)  # weight initializers, one per layer

    def name(self, base: str, sep: str = "/") -> str:
        """A name no other value, initializer or node of the model has."""
        name, i = f"{self.prefix}{sep}{base}", 1
        while name in self.taken:
            name, i = f"{self.prefix}{sep}{base}_{i}", i + 1
        self.taken.add(name)
        return name

    def const(self, base: str, value: np.ndarray | onnx.TensorProto, shared: bool = False) -> str:
        """An initializer named ``{prefix}.{base}``; ``shared``: one for all calls of the layer."""
        if shared and base in self.shared:
            return self.shared[base]
        name = self.name(base, ".")
        if shared:
            self.shared[base] = name
        if isinstance(value, np.ndarray):
            value = numpy_helper.from_array(value, name)
        value.name = name
        self.initializers.append(value)
        return name

    def op(
        self,
        op_type: str,
        inputs: list[str],
        out: str | None = None,
        domain: str = "",
        **attrs: Any,
    ) -> str:
        """Add one node; returns its (first) output name."""
        out = out or self.name(f"{op_type}_output")
        node = helper.make_node(
            op_type, inputs, [out], self.name(op_type), domain=domain or None, **attrs
        )
        if domain:
            self.domains.add(domain)
        self.nodes.append(node)
        return out

    def scalar(self, base: str, value: float) -> str:
        return self.const(base, np.array(value, dtype=np.float32))

    def reduce(self, op_type: str, x: str, axes: list[int] | None, keepdims: bool) -> str:
        """ReduceMin / ReduceMax over ``axes`` (None: all), with the opset's signature."""
        keep = int(keepdims)
        if axes is None:
            return self.op(op_type, [x], keepdims=keep)
        if self.opset < 18:
            return self.op(op_type, [x], axes=axes, keepdims=keep)
        return self.op(op_type, [x, self.const("axes", np.array(axes, np.int64))], keepdims=keep)


def _np(t: torch.Tensor, dtype: Any) -> np.ndarray:
    return t.detach().cpu().numpy().astype(dtype)


def int_tensor(values: np.ndarray, data_type: int) -> onnx.TensorProto:
    """An integer initializer of ONNX type ``data_type``; 4-bit values are packed two a byte."""
    if data_type in (TensorProto.INT4, TensorProto.UINT4):
        flat = (values.reshape(-1).astype(np.int64) & 0xF).astype(np.uint8)
        flat = np.append(flat, np.zeros(flat.size % 2, np.uint8))
        packed = flat[0::2] | (flat[1::2] << 4)
        return helper.make_tensor("", data_type, values.shape, packed.tobytes(), raw=True)
    storages: dict[int, Any] = {t[0]: t[3] for t in _INT_TYPES}
    return numpy_helper.from_array(values.astype(storages.get(data_type, np.int32)), "")


def _int_type(lo: int, hi: int, opset: int, bits: int) -> int | None:
    """The narrowest ONNX integer type of at least ``bits`` (4, 8, 16) holding [lo, hi]."""
    for data_type, low, high, _, since in _INT_TYPES:
        if high - low >= 2**bits - 1 and low <= lo and hi <= high and opset >= since:
            return data_type
    return None


def dequantize(
    g: Emitter,
    base: str,
    bits: int,
    q: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray | None,
    axis: int | None = None,
    block_size: int | None = None,
) -> str | None:
    """``DequantizeLinear`` of integer initializer ``q`` (int32 when ``zero`` is None: a
    bias) in the type of the grid's width, wider if the zero points need it; None when no
    ONNX type holds it."""
    data_type: int | None = TensorProto.INT32
    if zero is not None:
        both = np.concatenate([q.reshape(-1), zero.reshape(-1)])
        data_type = _int_type(int(both.min()), int(both.max()), g.opset, bits)
    if data_type is None or (block_size is not None and g.opset < 21):
        return None
    inputs = [g.const(f"{base}_quantized", int_tensor(q, data_type), True)]
    inputs.append(g.const(f"{base}_scale", scale.astype(np.float32), True))
    if zero is not None:
        inputs.append(g.const(f"{base}_zero_point", int_tensor(zero, data_type), True))
    attrs: dict[str, Any] = {} if axis is None else {"axis": axis}
    if block_size is not None:
        attrs["block_size"] = block_size
    return g.op("DequantizeLinear", inputs, **attrs)


# --- input --------------------------------------------------------------------------------
def _float_fake_quant(g: Emitter, x: str, scale: str, zero: str, qdtype: QDtype) -> str:
    """The simulation's arithmetic: ``(clamp(round(x / s) + z, qmin, qmax) - z) * s``."""
    q = g.op("Add", [g.op("Round", [g.op("Div", [x, scale])]), zero])
    q = g.op("Clip", [q, g.scalar("qmin", qdtype.qmin), g.scalar("qmax", qdtype.qmax)])
    return g.op("Mul", [g.op("Sub", [q, zero]), scale])


def _dynamic_qparams(
    g: Emitter, x: str, axes: list[int] | None, qdtype: QDtype, sym: bool
) -> tuple[str, str | None]:
    """Scale and zero point (float; None: the symmetric grid's fixed centre) as
    :func:`lowbit.primitives.choose_qparams` computes them."""
    keep = axes is not None
    zero_f = g.scalar("zero", 0.0)
    lo = g.op("Min", [g.reduce("ReduceMin", x, axes, keep), zero_f])
    hi = g.op("Max", [g.reduce("ReduceMax", x, axes, keep), zero_f])
    qmin, qmax = qdtype.qmin, qdtype.qmax
    if sym:
        center = 0 if qdtype.signed else (qmax + 1) // 2
        levels = max(qmax, 1) if qdtype.signed else max(qmax - center, 1)
        amax = g.op("Max", [g.op("Neg", [lo]), hi])
        scale = g.op(
            "Max", [g.op("Div", [amax, g.scalar("levels", levels)]), g.scalar("eps", _EPS)]
        )
        return scale, None
    span = g.op("Div", [g.op("Sub", [hi, lo]), g.scalar("levels", qmax - qmin)])
    scale = g.op("Max", [span, g.scalar("eps", _EPS)])
    zero = g.op("Sub", [g.scalar("qmin", qmin), g.op("Round", [g.op("Div", [lo, scale])])])
    return scale, g.op("Clip", [zero, g.scalar("qmin", qmin), g.scalar("qmax", qmax)])


def quantize_input(g: Emitter, layer: QModule, x: str, rank: int) -> str:
    """The layer's input as its input quantizer rounds it (``x`` itself when it has none)."""
    iq = layer.input_quantizer
    if iq is None or not iq.enabled:
        return x
    spec, qdtype = iq.spec, iq.spec.qdtype
    if spec.rounding != "nearest":
        g.notes.append(f"{layer.label}: {spec.rounding} rounding of the input exported as nearest")
    offset = 128 if qdtype.signed else 0  # uint8 value = grid value + offset
    fits_u8 = qdtype.bits <= 8
    if not spec.dynamic:
        assert iq.scale is not None and iq.zero_point is not None
        s, z = float(iq.scale.reshape(())), int(iq.zero_point.reshape(()))
        scale = g.scalar("input_scale", s)
        if not fits_u8:
            return _float_fake_quant(g, x, scale, g.scalar("input_zp", z), qdtype)
        if qdtype.qmin + offset > 0 or qdtype.qmax + offset < 255:  # grid narrower than uint8
            low, high = ((v - z) * s for v in (qdtype.qmin, qdtype.qmax))
            x = g.op("Clip", [x, g.scalar("input_low", low), g.scalar("input_high", high)])
        zp = g.const("input_zero_point", np.array(z + offset, np.uint8))
        return g.op("DequantizeLinear", [g.op("QuantizeLinear", [x, scale, zp]), scale, zp])
    gran = spec.gran
    if isinstance(gran, PerTensor):
        full = qdtype.qmax - qdtype.qmin == 255
        if not spec.symmetric and full:  # exactly ONNX's own dynamic uint8 grid
            outs = [g.name(n) for n in ("x_quantized", "x_scale", "x_zero_point")]
            g.nodes.append(helper.make_node("DynamicQuantizeLinear", [x], outs, g.name("DQL")))
            return g.op("DequantizeLinear", outs)
        axes = None
    elif isinstance(gran, PerToken):
        axes = [rank - 1]
    elif isinstance(gran, PerChannel):
        axes = [a for a in range(rank) if a != gran.axis % rank]
    else:
        raise ValueError(f"{layer.label}: dynamic {gran.kind} input quantization")
    scale, zero = _dynamic_qparams(g, x, axes, qdtype, spec.symmetric)
    center = 0 if qdtype.signed else (qdtype.qmax + 1) // 2
    if spec.symmetric and fits_u8 and axes is None:  # |x / s| <= levels: no clamping needed
        zp = g.const("input_zero_point", np.array(center + offset, np.uint8))
        return g.op("DequantizeLinear", [g.op("QuantizeLinear", [x, scale, zp]), scale, zp])
    return _float_fake_quant(g, x, scale, zero or g.scalar("center", center), qdtype)


# --- weight and bias ------------------------------------------------------------------------
def _qparts(w: QTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _np(w.int_repr(), np.int64), _np(w.scale, np.float32), _np(w.zero_point, np.int64)


def _float_weight(g: Emitter, layer: QModule, why: str, transpose: bool) -> str:
    weight = layer.weight
    w = weight.dequantize(torch.float32) if isinstance(weight, QTensor) else weight.float()
    if isinstance(weight, QTensor):
        g.notes.append(f"{layer.label}: weight written as dequantized float32 ({why})")
    array = _np(w.t() if transpose else w, np.float32)
    return g.const("weight", np.ascontiguousarray(array), True)


def weight_input(g: Emitter, layer: QModule, transpose: bool) -> str:
    """The float weight the op reads: ``DequantizeLinear`` of integer initializers.

    ``transpose``: a Linear weight (out, in) stored (in, out), as MatMul reads it.
    """
    w = layer.weight
    if not isinstance(w, QTensor):
        return _float_weight(g, layer, "", transpose)
    q, scale, zero = _qparts(w)
    gran, bits = w.granularity, 4 if w.qdtype and w.qdtype.bits <= 4 else 8
    bits = 16 if w.qdtype and w.qdtype.bits > 8 else bits
    out: str | None
    if isinstance(gran, PerGroup):
        if g.opset < 21:
            return _float_weight(g, layer, "per-group weights need opset 21 or later", transpose)
        rows = q.shape[0]
        flat = q.reshape(rows, -1)  # (out, in*k...): the groups run along this axis
        if transpose:  # (in, out), blocked along axis 0
            out = dequantize(g, "weight", bits, flat.T, scale.T, zero.T, 0, gran.group_size)
            return out or _float_weight(
                g, layer, f"no ONNX integer type holds it at opset {g.opset}", transpose
            )
        out = dequantize(g, "weight", bits, flat, scale, zero, 1, gran.group_size)
        if out is None:
            return _float_weight(
                g, layer, f"no ONNX integer type holds it at opset {g.opset}", transpose
            )
        return g.op("Reshape", [out, g.const("weight_shape", np.array(q.shape, np.int64))])
    axis = None
    if isinstance(gran, PerChannel):
        axis = gran.axis % q.ndim
        axis = 1 - axis if transpose else axis
    values = np.ascontiguousarray(q.T) if transpose else q
    out = dequantize(g, "weight", bits, values, scale, zero, axis)
    return out or _float_weight(
        g, layer, f"no ONNX integer type holds it at opset {g.opset}", transpose
    )


def bias_input(g: Emitter, layer: QModule) -> str | None:
    """The float bias: ``DequantizeLinear`` of an int32 bias, a float initializer, or None."""
    bias = layer.bias
    if bias is None:
        return None
    if isinstance(bias, QTensor):  # int32 at s_w * s_x, zero point 0
        scale = _np(bias.scale, np.float32)
        return dequantize(
            g, "bias", 32, _np(bias.int_repr(), np.int64), scale, None, 0 if scale.ndim else None
        )
    return g.const("bias", _np(bias, np.float32), True)


def nbits_expressible(w: torch.Tensor, bits: int = 4) -> int | None:
    """The MatMulNBits block size for a Linear weight at ``bits`` (4 or 8), or None when
    MatMulNBits cannot hold it (a wider grid, a group size that is not a power of two >= 16,
    per-input channels)."""
    if not isinstance(w, QTensor) or w.qdtype is None or w.qdtype.bits > bits or w.ndim != 2:
        return None
    gran, block = w.granularity, _NBITS_BLOCK
    if isinstance(gran, PerGroup):
        block = gran.group_size
        if block < 16 or block & (block - 1):
            return None
    elif isinstance(gran, PerChannel) and gran.axis % 2 != 0:
        return None
    q, _, zero = _qparts(w)
    half = 1 << (bits - 1)
    both = np.concatenate([q.reshape(-1), zero.reshape(-1)]) + (half if w.qdtype.signed else 0)
    return block if both.min() >= 0 and both.max() <= 2 * half - 1 else None


def _pack_nibbles(u: np.ndarray) -> np.ndarray:
    """Pairs along the last axis into bytes, the first value in the low nibble."""
    u = u.astype(np.uint8)
    if u.shape[-1] % 2:
        u = np.concatenate([u, np.zeros((*u.shape[:-1], 1), np.uint8)], axis=-1)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def matmul_nbits(g: Emitter, layer: QModule, x: str, out: str, block: int, bits: int = 4) -> str:
    """``com.microsoft::MatMulNBits`` (``bits`` 4 or 8, accuracy_level=4), bias included."""
    w = layer.weight
    assert isinstance(w, QTensor) and w.qdtype is not None
    q, scale, zero = _qparts(w)
    n, k = q.shape
    blocks = math.ceil(k / block)
    if scale.ndim < 2:  # per tensor or per output channel: one scale repeated per block
        scale = np.broadcast_to(scale.reshape(-1, 1), (n, blocks))
        zero = np.broadcast_to(zero.reshape(-1, 1), (n, blocks))
    half = 1 << (bits - 1)  # MatMulNBits reads unsigned values, default zero point 2**(bits-1)
    offset = half if w.qdtype.signed else 0
    u, uz = q + offset, zero + offset
    padded = np.repeat(uz, block, axis=1)  # a short last block padded with its zero point
    padded[:, :k] = u
    blocked = padded.reshape(n, blocks, block)
    packed = _pack_nibbles(blocked) if bits == 4 else blocked.astype(np.uint8)  # (N, blocks, ..)
    scale = np.ascontiguousarray(scale, np.float32)
    inputs = [x, g.const("weight_quantized", packed, True), g.const("weight_scale", scale, True)]
    zeros = _pack_nibbles(uz) if bits == 4 else uz.astype(np.uint8)
    inputs.append("" if (uz == half).all() else g.const("weight_zero_point", zeros, True))
    bias = layer.bias
    if bias is not None:
        float_bias = bias.dequantize(torch.float32) if isinstance(bias, QTensor) else bias
        inputs += ["", g.const("bias", _np(float_bias, np.float32), True)]
    while inputs[-1] == "":
        inputs.pop()
    attrs = {"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": 4}
    return g.op("MatMulNBits", inputs, out, domain=MS_DOMAIN, **attrs)


# --- layers -----------------------------------------------------------------------------------
def _linear(g: Emitter, layer: QModule, x: str, out: str, int4_format: str) -> None:
    block = nbits_expressible(layer.weight)
    grouped = isinstance(getattr(layer.weight, "granularity", None), PerGroup)
    if block is not None and (int4_format == "matmulnbits" or (grouped and g.opset < 21)):
        matmul_nbits(g, layer, x, out, block)  # blocked DequantizeLinear needs opset 21
        return
    block8 = nbits_expressible(layer.weight, bits=8)
    if layer.input_quantizer is None and block8 is not None and int4_format == "matmulnbits":
        # 8-bit weight-only: DequantizeLinear -> MatMul runs in float in onnxruntime (its Gemm
        # fusion takes the MatMul first), 50x slower at batch 1 than MatMulNBits bits=8
        matmul_nbits(g, layer, x, out, block8, bits=8)
        return
    bias = bias_input(g, layer)
    y = g.op("MatMul", [x, weight_input(g, layer, transpose=True)], None if bias else out)
    if bias is not None:
        g.op("Add", [y, bias], out)


def _conv(g: Emitter, layer: QModule, x: str, out: str, rank: int) -> None:
    assert isinstance(layer, nn.modules.conv._ConvNd)
    dims = len(layer.kernel_size)
    if rank != dims + 2:
        raise ValueError(f"{layer.label}: an unbatched input; give (N, C, ...) example inputs")
    rpt = [int(p) for p in layer._reversed_padding_repeated_twice]  # last dim first
    begins, ends = rpt[-2::-2], rpt[::-2]  # (begin, end) per spatial dim, first dim first
    pads = begins + ends
    if layer.padding_mode != "zeros" and any(pads):
        if layer.padding_mode == "circular" and g.opset < 19:
            raise ValueError(f"{layer.label}: circular padding needs opset 19 or later")
        mode = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}[layer.padding_mode]
        full = g.const("pads", np.array([0, 0, *begins, 0, 0, *ends], np.int64))
        x, pads = g.op("Pad", [x, full], mode=mode), [0] * (2 * dims)
    bias = bias_input(g, layer)
    inputs = [x, weight_input(g, layer, transpose=False), *([bias] if bias else [])]
    attrs: dict[str, Any] = {"kernel_shape": list(layer.kernel_size), "strides": list(layer.stride)}
    attrs |= {"pads": pads, "dilations": list(layer.dilation), "group": layer.groups}
    g.op("Conv", inputs, out, **attrs)


def emit_layer(g: Emitter, layer: QModule, x: str, out: str, rank: int, int4_format: str) -> None:
    """Nodes computing ``out`` from ``x`` (of ``rank`` dims) as the simulation does."""
    x = quantize_input(g, layer, x, rank)
    if layer.kind == "linear":
        _linear(g, layer, x, out, int4_format)
    elif layer.kind in ("conv1d", "conv2d", "conv3d"):
        _conv(g, layer, x, out, rank)
    elif layer.kind == "hf_conv1d":  # transformers' Conv1D: y = x @ W + b, W stored (in, out)
        bias = bias_input(g, layer)
        y = g.op("MatMul", [x, weight_input(g, layer, transpose=False)], None if bias else out)
        if bias is not None:
            g.op("Add", [y, bias], out)
    elif layer.kind == "embedding":  # rows of the dequantized (rows, dim) table
        g.op("Gather", [weight_input(g, layer, transpose=False), x], out, axis=0)
    else:
        raise ValueError(f"{layer.label}: {layer.kind} layers")
