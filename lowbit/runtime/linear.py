"""Integer kernels for converted Linear layers.

Which kernel runs what, and why (measured with ``benchmarks/mlp.py`` on the 2-core CPU this
project runs on; the numbers are in benchmarks/results/):

- ``onednn-int8``: int8 weights x uint8 activations -> int32 on oneDNN's VNNI/AMX GEMM, the
  weight scales, bias and (when the model has one) ReLU fused into its epilogue. It beat
  ``torch._int_mm`` plus a separate rescale pass by about 2x at batch 64 (the rescale is a
  second full pass over the output) and is at least as fast as torch.ao's fbgemm path, so it
  serves static per-tensor, dynamic per-batch and dynamic per-token activations alike.
- ``int8-weight-only`` / ``int4-weight-only``: the weight stays packed in memory and the
  activations stay float (bfloat16 inside the kernel). torch's weight-only CPU matmuls are
  vectorised only for bfloat16 (float32 runs a scalar loop 50x slower), so the input is cast
  to bfloat16 and the result back. They are GEMV kernels, fast at small batches (weight
  traffic dominates); at large batches int8 weights are dequantized a tile of rows at a time
  into a bfloat16 GEMM, which never holds a float copy of the whole weight.

transformers' ``Conv1D`` (GPT-2's Linear, weight ``(in, out)``) runs on the int8 kernels too,
read as the ``(out, in)`` Linear it is (:class:`LinearForm`).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch

from lowbit.nn import Kernel, LayerView, Layout, QModule, QTensor, register_kernel, register_layout
from lowbit.nn.hf_conv1d import KIND as HF_CONV1D
from lowbit.nn.hf_conv1d import QHFConv1DBase, as_linear_view
from lowbit.runtime import inductor, ops, opscheck
from lowbit.runtime.activation import ActivationGrid, LastInput, u8_problem
from lowbit.spec import PerChannel, PerGroup, PerTensor, PerToken, QDtype, QuantSpec

__all__ = [
    "OneDNNInt8Linear",
    "WeightOnlyInt8Linear",
    "WeightOnlyInt4Linear",
    "OneDNNInt8Conv1D",
    "WeightOnlyInt8Conv1D",
]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_SMALL_BATCH = 16  # rows up to which the weight-only GEMV kernels beat a tiled bf16 GEMM
_TILE = 512  # weight rows dequantized at a time by the tiled path


def symmetric_int8_problem(spec: QuantSpec | None) -> str | None:
    """None for a weight the oneDNN and int8 weight-only kernels take: signed, at most 8 bits
    (an int4 or int2 grid is a subset of int8's), symmetric (zero point 0), one scale per
    tensor or per output channel."""
    if spec is None:
        return "the weight stays float"
    if spec.qdtype.bits > 8 or not spec.qdtype.signed:
        return f"{spec.qdtype} weights (these kernels take signed grids of up to 8 bits)"
    if not spec.symmetric:
        return "asymmetric weights (oneDNN ignores weight zero points)"
    if not (isinstance(spec.gran, PerTensor) or spec.gran == PerChannel(0)):
        return f"{spec.gran.kind} weight scales (per tensor or per output channel only)"
    return None


def _cpu_float(dtype: torch.dtype, device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"{device.type} inputs (CPU kernel)"
    if dtype not in _FLOATS:
        return f"{dtype} inputs"
    return None


def _float_bias(layer: QModule) -> torch.Tensor | None:
    bias = layer.bias
    if bias is None:
        return None
    value = bias.dequantize(torch.float32) if isinstance(bias, QTensor) else bias.detach()
    return value.float().contiguous()


def _qweight(layer: QModule) -> QTensor:
    weight = layer.weight
    assert isinstance(weight, QTensor), f"{layer.label} is not frozen"
    return weight


# at most this many rows: fbgemm's dynamic kernel; beyond, oneDNN's (faster on 64 rows and
# more of a 1024x4096 layer, slower on one row)
FEW_ROWS = 16


def _few_rows_ok(grid: ActivationGrid) -> bool:
    """Whether fbgemm's dynamic kernel computes exactly this input grid: dynamic, per tensor,
    8-bit asymmetric over the input's own range (zero included), all 256 levels."""
    spec = grid.spec
    return (
        spec.dynamic
        and isinstance(spec.gran, PerTensor)
        and not spec.symmetric
        and spec.qdtype.bits == 8
        and not spec.narrow_range
        and opscheck.available("fbgemm_dynamic_linear") is None
    )


@register_kernel("linear")
class OneDNNInt8Linear(Kernel):
    """uint8 x int8 -> int32 GEMM (oneDNN) with per-channel weight scales, bias and ReLU fused."""

    name = "onednn-int8"
    priority = 100

    @classmethod
    def unsupported(cls, view: LayerView, dtype: torch.dtype, device: torch.device) -> str | None:
        return (
            _cpu_float(dtype, device)
            or symmetric_int8_problem(view.weight_spec)
            or u8_problem(view.input_spec)
            or opscheck.available("onednn_qlinear")
        )

    def __init__(self, layer: QModule) -> None:
        super().__init__(layer)
        weight = _qweight(layer)
        ints = weight.int_repr().to(torch.int8)  # (out, in)
        self._packed: torch.Tensor | None = None  # oneDNN's packing, made on first use
        self.w_scale = weight.scale.reshape(-1).float().contiguous()  # (out,) or (1,)
        self.w_zero = torch.zeros(self.w_scale.shape, dtype=torch.int32)
        self.bias = _float_bias(layer)
        self.bias_bf16 = self.bias.bfloat16() if self.bias is not None else None
        assert layer.input_quantizer is not None
        self.grid = ActivationGrid.of(layer.input_quantizer)
        self.per_token = isinstance(self.grid.spec.gran, PerToken)
        self.shared: LastInput | None = None  # set by lowbit.compile for layers sharing inputs
        self.compiled = False  # per-token passes compiled by inductor (lowbit.compile option)
        self.zero_bias = self.bias
        # sum_k W[n, k] * s_w[n]: what a per-row zero point contributes to output column n
        self.col_sums = (ints.float().sum(dim=1) * self.w_scale).contiguous()  # (out,)
        self.few_rows = _few_rows_ok(self.grid)
        self._few_rows_packed: Any = None  # fbgemm's packing, made on the first small call
        self._weight_layer = layer  # (out, in) view: a Conv1D adapter replaces self.layer

    def __call__(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        if self.per_token:
            return self._per_token(x, relu)
        if self.few_rows and x.numel() <= FEW_ROWS * x.shape[-1]:
            return self._few(x, relu)
        scale, zero = self.grid.qparams(x)
        q = self.grid.to_u8(x, scale, zero)
        if x.dtype == torch.bfloat16:
            return ops.qlinear(
                q,
                scale,
                zero,
                self.packed,
                self.w_scale,
                self.w_zero,
                self.bias_bf16,
                torch.bfloat16,
                relu,
            )
        out = ops.qlinear(
            q, scale, zero, self.packed, self.w_scale, self.w_zero, self.bias, torch.float32, relu
        )
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    @property
    def packed(self) -> torch.Tensor:
        """oneDNN's packed weight, made on the first call that needs it (a layer only ever
        called on a few rows holds fbgemm's packing alone)."""
        if self._packed is None:
            self._packed = ops.qlinear_prepack(
                _qweight(self._weight_layer).int_repr().to(torch.int8)
            )
        return self._packed

    def _few(self, x: torch.Tensor, relu: bool) -> torch.Tensor:
        """A few rows (batch 1, an RNN step): fbgemm's dynamic kernel, less overhead per call
        than oneDNN's at that size (``benchmarks/mlp.py``, batch 1), on the same uint8 grid
        over the input's own range (it rounds ``x * (1 / scale)`` where the simulation rounds
        ``x / scale``: a value on a rounding boundary may land one step over, > 50 dB of
        agreement)."""
        if self._few_rows_packed is None:
            ints = _qweight(self._weight_layer).int_repr().to(torch.int8)
            self._few_rows_packed = ops.dynamic_linear_prepack(ints, self.w_scale, self.bias)
        rows = x.reshape(-1, x.shape[-1])
        out = ops.dynamic_linear(
            rows if rows.dtype == torch.float32 else rows.float(), self._few_rows_packed
        )
        if relu:
            out.relu_()
        return out.reshape(*x.shape[:-1], -1).to(x.dtype)

    def use_inductor(self, on: bool) -> None:
        """Quantize per token and rescale the output with :mod:`lowbit.runtime.inductor`'s
        compiled functions (same arithmetic, one pass each) instead of eager torch ops."""
        spec = self.grid.spec
        self.compiled = on and (spec.qdtype.signed or not spec.symmetric)
        self.zero_bias = torch.zeros_like(self.col_sums) if self.bias is None else self.bias

    def _per_token(self, x: torch.Tensor, relu: bool) -> torch.Tensor:
        if self.compiled:
            return self._per_token_compiled(x, relu)
        grid = self.grid

        def quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return grid.per_token(t.reshape(-1, t.shape[-1]))  # (tokens, in)

        q, scale, zero = self.shared.get(x, quantize) if self.shared else quantize(x)
        if self.grid.spec.symmetric and self.grid.spec.qdtype.signed:
            # one shared uint8 zero point (128): oneDNN subtracts it itself
            acc = ops.qlinear(
                q, 1.0, 128, self.packed, self.w_scale, self.w_zero, None, torch.float32
            )
        else:
            acc = ops.qlinear(
                q, 1.0, 0, self.packed, self.w_scale, self.w_zero, None, torch.float32
            )
            # each row's zero point times every column's weight sum, as one rank-1 update
            acc.addr_(zero.reshape(-1).float(), self.col_sums, alpha=-1)  # (tokens, out)
        # bias + acc * row scale in one pass
        out = acc.mul_(scale) if self.bias is None else torch.addcmul(self.bias, acc, scale)
        if relu:
            out.relu_()
        return out.reshape(*x.shape[:-1], -1).to(x.dtype)

    def _per_token_compiled(self, x: torch.Tensor, relu: bool) -> torch.Tensor:
        spec, shift = self.grid.spec, float(self.grid.shift)
        quantizer = inductor.per_token_quantizer()
        qmin, qmax = float(spec.qdtype.qmin), float(spec.qdtype.qmax)

        def quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            rows = t.reshape(-1, t.shape[-1]).float()  # (tokens, in)
            return quantizer(rows, qmin, qmax, shift, spec.symmetric)

        q, scale, zero = self.shared.get(x, quantize) if self.shared else quantize(x)
        acc = ops.qlinear(q, 1.0, 0, self.packed, self.w_scale, self.w_zero, None, torch.float32)
        out = inductor.per_token_epilogue()(acc, zero, self.col_sums, scale, self.zero_bias, relu)
        return out.reshape(*x.shape[:-1], -1).to(x.dtype)


MIN_BF16_REDUCTION = 64


def bf16_problem(view: LayerView) -> str | None:
    """Why a layer should not round its activations to bfloat16, if it should not.

    A layer whose outputs sum few products (a stem conv over one image channel: 9) gains
    nothing from bfloat16, since it does little arithmetic, and loses the most: its rounding
    errors do not average out. On the test suite's Fashion-MNIST ResNet, the one-channel stem
    alone in bfloat16 cost 16 dB of agreement with the simulation, every other layer < 3 dB.
    """
    reduction = math.prod(view.weight_shape[1:])  # inputs (x kernel taps) per output
    if reduction < MIN_BF16_REDUCTION:
        return f"{reduction} products per output: too few to gain from bfloat16"
    if not ops.bf16_fast():
        return "this CPU has no native bfloat16"
    return None


def _weight_only_problem(view: LayerView, dtype: torch.dtype, device: torch.device) -> str | None:
    if view.input_spec is not None:
        return "the input is quantized too (not a weight-only layer)"
    return bf16_problem(view) or _cpu_float(dtype, device)


@register_kernel("linear")
class WeightOnlyInt8Linear(Kernel):
    """Weight-only int8: bfloat16 activations against the int8 weight, never a float copy."""

    name = "int8-weight-only"
    priority = 90
    exact = False

    @classmethod
    def unsupported(cls, view: LayerView, dtype: torch.dtype, device: torch.device) -> str | None:
        return (
            _weight_only_problem(view, dtype, device)
            or symmetric_int8_problem(view.weight_spec)
            or opscheck.available("weight_int8_mm")
        )

    def __init__(self, layer: QModule) -> None:
        super().__init__(layer)
        weight = _qweight(layer)
        # (out, in) int8: the QTensor's own data for int8, unpacked once for narrower grids
        self.ints = weight.int_repr().to(torch.int8).contiguous()
        out_features = self.ints.shape[0]
        self.scale = weight.scale.reshape(-1).expand(out_features).bfloat16().contiguous()
        bias = _float_bias(layer)
        self.bias = bias.bfloat16() if bias is not None else None

    def _tile(self, start: int) -> torch.Tensor:
        """Weight rows ``start .. start + _TILE`` dequantized to bfloat16 (a transient tile)."""
        ints = self.ints[start : start + _TILE]  # (tile, in)
        return ints.to(torch.bfloat16) * self.scale[start : start + _TILE, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # (tokens, in)
        if rows.shape[0] <= _SMALL_BATCH:
            out = ops.weight_int8_mm(rows, self.ints, self.scale)
        else:
            out = torch.cat([rows @ self._tile(i).t() for i in range(0, len(self.ints), _TILE)], 1)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], -1).to(x.dtype)


INT4_GROUPS = (32, 64, 128, 256)
INT4_LAYOUT = "int4pack_cpu"


def _unpack_int4(
    qdata: torch.Tensor, qdtype: QDtype | None, shape: tuple[int, ...]
) -> torch.Tensor:
    """Signed int4 values (int8, ``(out, in)``) of a weight in the CPU int4 kernel's layout."""
    rows, cols = shape
    return (ops.int4_unpack(qdata, rows, cols).to(torch.int16) - 8).to(torch.int8)


register_layout(Layout(INT4_LAYOUT, _unpack_int4))

_LARGE = 1 << 20  # weights from which re-packing returns freed memory to the system


def _repack_int4(weight: QTensor) -> torch.Tensor:
    """The weight in the CPU int4 kernel's layout. From lowbit's packed bytes (how a loaded
    or converted int4 weight is held) it is a byte shuffle; any other layout goes through
    torch's packing op a block of rows at a time."""
    rows, cols = weight.shape
    if weight.layout_name == "packed":
        return ops.int4_from_packed_bytes(weight.qdata, rows, cols)
    ints = weight.int_repr()
    step = 8 * (ops.int4_block_n() or 8)
    return torch.cat(
        [ops.int4_pack(ints[i : i + step].to(torch.int32) + 8) for i in range(0, rows, step)]
    )


@register_kernel("linear")
class WeightOnlyInt4Linear(Kernel):
    """Weight-only int4 per group: torch's CPU int4 matmul on the weight in its packed layout.

    Preparing the kernel re-packs the layer's QTensor into that layout in place of the plain
    packed bytes (same size, same values), so the weight is held once, at 4 bits.
    """

    name = "int4-weight-only"
    priority = 90
    exact = False

    @classmethod
    def unsupported(cls, view: LayerView, dtype: torch.dtype, device: torch.device) -> str | None:
        problem = _weight_only_problem(view, dtype, device)
        if problem is not None:
            return problem
        spec = view.weight_spec
        if spec is None or spec.qdtype.bits != 4 or not spec.qdtype.signed:
            return "the weight is not int4"
        if spec.qdtype.qmin != -8:
            return "a narrow int4 grid (the kernel's values are q + 8 in 0..15)"
        gran = spec.gran
        if not isinstance(gran, PerGroup) or gran.group_size not in INT4_GROUPS:
            return f"int4 kernel groups are {INT4_GROUPS} (this weight: {gran.kind})"
        rows, cols = view.weight_shape
        block = ops.int4_block_n()
        if cols % gran.group_size or (block is not None and rows % block):
            return f"weight {rows}x{cols} is not a whole number of kernel tiles"
        return opscheck.available("int4_mm")

    def __init__(self, layer: QModule) -> None:
        super().__init__(layer)
        weight = _qweight(layer)
        if weight.layout_name != INT4_LAYOUT:
            weight = weight.with_layout(INT4_LAYOUT, _repack_int4(weight))
            layer.weight = weight  # the QTensor now holds the kernel's layout only
            if weight.numel() >= _LARGE:
                ops.release_free_memory()  # the old bytes and the temporaries
        self.packed = weight.qdata
        spec = weight.spec
        assert spec is not None and isinstance(spec.gran, PerGroup)
        self.group = spec.gran.group_size
        scale = weight.scale.float()  # (out, groups)
        offset = -weight.zero_point.float() * scale  # w = (u - 8) * s + offset, u = q + 8
        self.scale_zeros = torch.stack([scale.t(), offset.t()], dim=-1).bfloat16().contiguous()
        bias = _float_bias(layer)
        self.bias = bias.bfloat16() if bias is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()  # (tokens, in)
        out = ops.int4_mm(rows, self.packed, self.group, self.scale_zeros)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], -1).to(x.dtype)


class LinearForm:
    """A transformers ``Conv1D`` layer (weight ``(in, out)``) seen as the ``(out, in)`` Linear
    the kernels above read: its weight through ``linear_weight()``, the rest as it is."""

    def __init__(self, layer: QHFConv1DBase) -> None:
        self.weight = layer.linear_weight()
        self.bias = layer.bias
        self.input_quantizer = layer.input_quantizer
        self.label = layer.label


def _conv1d_layer(layer: QModule) -> QModule:
    assert isinstance(layer, QHFConv1DBase), f"{layer.label} is not a Conv1D layer"
    return cast(QModule, LinearForm(layer))


class _OnConv1D(Kernel):
    """A Linear kernel run on a transformers Conv1D layer through its (out, in) view."""

    @classmethod
    def unsupported(cls, view: LayerView, dtype: torch.dtype, device: torch.device) -> str | None:
        return super().unsupported(as_linear_view(view), dtype, device)

    def __init__(self, layer: QModule) -> None:
        super().__init__(_conv1d_layer(layer))
        self.layer = layer


@register_kernel(HF_CONV1D)
class OneDNNInt8Conv1D(_OnConv1D, OneDNNInt8Linear):
    """:class:`OneDNNInt8Linear` on a transformers Conv1D layer (GPT-2's Linear)."""


@register_kernel(HF_CONV1D)
class WeightOnlyInt8Conv1D(_OnConv1D, WeightOnlyInt8Linear):
    """:class:`WeightOnlyInt8Linear` on a transformers Conv1D layer (GPT-2's Linear)."""
