"""Integer kernels for converted Conv1d/Conv2d/Conv3d layers.

- ``onednn-int8``: oneDNN's uint8 x int8 convolution (grouped and depthwise included) with
  per-channel weight scales and bias in its epilogue, on channels_last tensors; ReLU and the
  residual add are fused by :mod:`lowbit.runtime.fusion` when ``lowbit.compile`` sees them.
  It is what torch's own x86 int8 path lowers to, and it runs 3x to 4x faster than float32
  on the demo ResNet (``benchmarks/resnet.py``).
- ``bf16-dequant``: a weight-only conv (``w8a16``, ``w4a16``) has no integer kernel in torch
  or oneDNN, so the weight is dequantized to bfloat16 for the call (a transient copy of one
  layer, never kept) and the convolution runs in bfloat16, which this CPU computes natively
  (AVX-512 BF16/AMX): about 4x faster than float32 on the demo ResNet. On a CPU without native
  bfloat16 the layer falls back to the float simulation.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.nn import Kernel, LayerView, QModule, QTensor, as_float, register_kernel
from lowbit.runtime import ops, opscheck
from lowbit.runtime.activation import ActivationGrid, u8_problem
from lowbit.runtime.linear import bf16_problem, symmetric_int8_problem
from lowbit.spec import PerToken

__all__ = ["OneDNNInt8Conv", "BF16DequantConv"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_SHAPES_KEPT = 4  # input shapes a conv keeps a shape-specific packed weight for


def _conv_problem(view: LayerView, dtype: torch.dtype, device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"{device.type} inputs (CPU kernel)"
    if dtype not in _FLOATS:
        return f"{dtype} inputs"
    if view.get("padding_mode", "zeros") != "zeros":
        return f"padding_mode={view.get('padding_mode')!r} (zeros only)"
    if view.get("padding", "explicit") not in ("explicit", "valid"):
        return f"padding={view.get('padding')!r} (explicit sizes only)"
    return None


@functools.lru_cache(maxsize=256)
def _grouped_problem(weight_shape: tuple[int, ...], groups: int) -> str | None:
    """Whether oneDNN computes a grouped convolution of this weight shape right, checked once
    per shape on random integers against the same arithmetic in float64.

    oneDNN 3.x on this CPU returns wrong sums for some grouped shapes (16 input channels per
    group with kernel widths 8 and 16, as in Wav2Vec2's positional convolution: -12 dB against
    the simulation) and right ones for others (3x3, 5x5, depthwise); rather than a list of
    shapes that a oneDNN upgrade would make stale, every grouped shape is tried on first use.
    """
    if groups <= 1:
        return None
    gen = torch.Generator().manual_seed(0)
    out_ch, per_group, *kernel = weight_shape
    margin = {1: 61, 2: 13}.get(len(kernel), 3)  # 1-d: wrong only past ~40 positions
    spatial = [k + margin for k in kernel]
    x = torch.randint(0, 256, (1, per_group * groups, *spatial), generator=gen, dtype=torch.uint8)
    w = torch.randint(-127, 128, tuple(weight_shape), generator=gen, dtype=torch.int8)
    w_scale = torch.full((out_ch,), 1.0 / 128)
    geometry = ([1] * len(kernel), [0] * len(kernel), [1] * len(kernel), groups)
    if x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    packed = ops.qconv_prepack(w, w_scale, *geometry)
    got = ops.qconv(
        x,
        1.0,
        128,
        packed,
        w_scale,
        torch.zeros(out_ch, dtype=torch.int32),
        None,
        geometry,
        torch.float32,
    )
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[x.ndim]
    want = conv(x.double() - 128, w.double() / 128, groups=groups)
    if not torch.allclose(got.double(), want, rtol=1e-3, atol=1e-2 * float(want.abs().max())):
        return (
            f"oneDNN computes this grouped shape wrong here ({per_group} input channels per "
            f"group, kernel {'x'.join(map(str, kernel))}; checked on first use)"
        )
    return None


def _geometry(layer: nn.modules.conv._ConvNd) -> tuple[list[int], list[int], list[int], int]:
    if isinstance(layer.padding, str):  # "valid" (the kernel refuses "same")
        padding = [0] * len(layer.kernel_size)
    else:
        padding = [int(p) for p in layer.padding]
    return list(layer.stride), padding, list(layer.dilation), layer.groups


@register_kernel("conv1d", "conv2d", "conv3d")
class OneDNNInt8Conv(Kernel):
    """uint8 x int8 convolution (oneDNN), per-channel weight scales and bias fused."""

    name = "onednn-int8"
    priority = 100

    @classmethod
    def unsupported(cls, view: LayerView, dtype: torch.dtype, device: torch.device) -> str | None:
        spec = view.input_spec
        if spec is not None and isinstance(spec.gran, PerToken):
            return "per-token activations on a convolution"
        op = {"conv1d": "onednn_qconv1d", "conv3d": "onednn_qconv3d"}.get(
            view.kind, "onednn_qconv2d"
        )
        return (
            _conv_problem(view, dtype, device)
            or symmetric_int8_problem(view.weight_spec)
            or u8_problem(spec)
            or opscheck.available(op)
            or _grouped_problem(view.weight_shape, int(view.get("groups", "1")))
        )

    def __init__(self, layer: QModule) -> None:
        super().__init__(layer)
        assert isinstance(layer, nn.modules.conv._ConvNd) and isinstance(layer.weight, QTensor)
        weight = layer.weight
        self.w_scale = weight.scale.reshape(-1).float().contiguous()  # (out,) or (1,)
        self.w_zero = torch.zeros(self.w_scale.shape, dtype=torch.int32)
        self.geometry = _geometry(layer)
        self.ints = weight.int_repr().to(torch.int8)
        self.packed = ops.qconv_prepack(self.ints, self.w_scale, *self.geometry)
        self._by_shape: dict[tuple[int, ...], torch.Tensor] = {}
        bias = layer.bias
        if bias is not None:
            bias = bias.dequantize(torch.float32) if isinstance(bias, QTensor) else bias.detach()
            bias = bias.float().contiguous()
        self.bias = bias
        self.bias_bf16 = bias.bfloat16() if bias is not None else None
        assert layer.input_quantizer is not None
        self.grid = ActivationGrid.of(layer.input_quantizer)
        self.spatial = len(layer.kernel_size)

    def packed_for(self, shape: torch.Size) -> torch.Tensor:
        """The weight prepacked for inputs of ``shape``: oneDNN picks its kernel for the
        exact shape, measured 8-10% faster per call on the demo ResNet's convolutions. A few
        shapes are kept (conv weights are small); others use the shape-agnostic packing."""
        key = tuple(shape)
        found = self._by_shape.get(key)
        if found is None:
            if len(self._by_shape) >= _SHAPES_KEPT:
                return self.packed
            found = ops.qconv_prepack(self.ints, self.w_scale, *self.geometry, x_shape=key)
            self._by_shape[key] = found
        return found

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        """``x`` as uint8 (channels_last for 2-d) with its scale and zero point."""
        scale, zero = self.grid.qparams(x)
        return self.grid.to_u8(x, scale, zero, channels_last=True), scale, zero

    def out_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype oneDNN writes for a caller's ``dtype`` (float16 goes through float32)."""
        return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32

    def bias_for(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The fused bias in the output dtype."""
        return self.bias_bf16 if dtype == torch.bfloat16 else self.bias

    def __call__(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        unbatched = x.ndim == self.spatial + 1
        if unbatched:
            x = x.unsqueeze(0)
        q, scale, zero = self.quantize_input(x)
        out_dtype = self.out_dtype(x.dtype)
        out = ops.qconv(
            q,
            scale,
            zero,
            self.packed_for(q.shape),
            self.w_scale,
            self.w_zero,
            self.bias_for(out_dtype),
            self.geometry,
            out_dtype,
            relu,
        )
        out = out if out.dtype == x.dtype else out.to(x.dtype)
        return out.squeeze(0) if unbatched else out


@register_kernel("conv1d", "conv2d", "conv3d")
class BF16DequantConv(Kernel):
    """Weight-only conv: weight dequantized to bfloat16 per call, bfloat16 convolution."""

    name = "bf16-dequant"
    priority = 50
    exact = False

    @classmethod
    def unsupported(cls, view: LayerView, dtype: torch.dtype, device: torch.device) -> str | None:
        if view.input_spec is not None:
            return "the input is quantized too (not a weight-only layer)"
        if device.type != "cpu" or dtype not in _FLOATS:
            return f"{dtype} inputs on {device.type}"
        return bf16_problem(view)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        assert isinstance(layer, nn.modules.conv._ConvNd)
        weight = as_float(layer.weight, torch.bfloat16)
        bias = as_float(layer.bias, torch.bfloat16)
        assert weight is not None
        # Splitting a float32 input into bfloat16 + remainder (two convs) was tried: it gains
        # 4 to 8 dB of agreement with the simulation but the extra passes over the activations
        # made the demo ResNet 3x slower than this single bfloat16 call.
        out = layer._conv_forward(x.to(torch.bfloat16), weight, bias)
        return out.to(x.dtype)
