"""The modules a fused graph calls: one oneDNN int8 layer with what fusion gave it (ReLU,
residual add, uint8 in or out), and a quantize pass shared by several layers. The graph
passes that place them are in :mod:`lowbit.runtime.fusion`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lowbit.nn import QModule
from lowbit.runtime import ops
from lowbit.runtime.activation import ActivationGrid
from lowbit.runtime.conv import OneDNNInt8Conv
from lowbit.runtime.linear import FEW_ROWS, OneDNNInt8Linear

__all__ = ["IntLayer", "QuantizeU8", "describe"]


class IntLayer(nn.Module):
    """One oneDNN int8 layer and what fusion gave it: a ReLU, a residual add, uint8 in or out.

    ``forward(x, other=None)``: ``x`` is float, or uint8 on the layer's own input grid when
    ``input_u8``; ``other`` is the residual added before the ReLU (float, or uint8 at
    ``accum_qparams``). The output is float, or uint8 at ``out_qparams``.
    """

    def __init__(
        self,
        layer: QModule,
        kernel: OneDNNInt8Conv | OneDNNInt8Linear,
        float_dtype: torch.dtype,
        relu: bool = False,
        add: bool = False,
        input_u8: bool = False,
        out_qparams: tuple[float, int] | None = None,
        accum_qparams: tuple[float, int] | None = None,
        clone_accum: bool = True,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.kernel = kernel
        self.float_dtype = float_dtype
        self.relu = relu
        self.add = add
        self.input_u8 = input_u8
        self.out_qparams = out_qparams
        self.accum_qparams = accum_qparams
        self.clone_accum = clone_accum
        self._fast: dict[tuple[tuple[int, ...], torch.dtype], Callable[..., torch.Tensor]] = {}
        self._generation = layer.generation
        self._fallback = False  # the layer moved off this kernel after fusion

    def extra_repr(self) -> str:
        return f"{self.layer.label}: {self.kernel.name}, {describe(self) or 'unfused'}"

    # --- the fused call --------------------------------------------------------------------
    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        if self.layer.generation != self._generation:
            self._refresh()
        if self._fallback:  # the layer's own kernel, then the fused ops one by one
            return self._finish(self.layer(self._float_input(x)), other)
        fast = self._fast.get((tuple(x.shape), x.dtype))
        if fast is not None and (other is None) != self.add:
            return fast(x, other)
        out = self._general(x, other)
        self._prepare_fast(x, other)
        return out

    def _refresh(self) -> None:
        """The layer was loaded, moved or given another kernel after fusion: take its new
        kernel, or run it unfused when that is not a oneDNN one."""
        self._generation, self._fast = self.layer.generation, {}
        kernel = self.layer.kernel_for(self.float_dtype)
        if isinstance(kernel, (OneDNNInt8Conv, OneDNNInt8Linear)):
            self.kernel, self._fallback = kernel, False
        else:
            self._fallback = True

    def _prepare_fast(self, x: torch.Tensor, other: torch.Tensor | None) -> None:
        """For a static uint8 grid, every argument but the tensors is known after the first
        call: bind them once, so later calls of this shape go straight to the oneDNN op. On
        the demo ResNet the general path's Python cost was a tenth of the model's latency."""
        k, grid = self.kernel, self.kernel.grid
        if grid.scale is None or grid.zero is None or self._unfusable(x) or len(self._fast) > 4:
            return
        if self.add and (other is None or not self._accumulates(x, other)):
            return
        scale, zero = grid.scale, grid.zero
        dtype = self.float_dtype if self.input_u8 else x.dtype
        quantize = self._quantizer(scale, zero)
        if self.add:
            self._fast[(tuple(x.shape), x.dtype)] = self._bound_add(quantize, x.shape, dtype)
            return
        if self.out_qparams is not None:
            out_dtype, (out_scale, out_zero) = torch.uint8, self.out_qparams
        else:
            out_dtype, out_scale, out_zero = self._float_out(dtype), 1.0, 0
        if isinstance(k, OneDNNInt8Conv):
            call = ops.bound_qconv(
                scale,
                zero,
                k.packed_for(x.shape),
                k.w_scale,
                k.w_zero,
                k.bias_for(out_dtype),
                k.geometry,
                out_dtype,
                self.relu,
                out_scale,
                out_zero,
            )
        else:
            bias = k.bias_bf16 if out_dtype == torch.bfloat16 else k.bias
            call = ops.bound_qlinear(
                scale,
                zero,
                k.packed,
                k.w_scale,
                k.w_zero,
                bias,
                out_dtype,
                self.relu,
                out_scale,
                out_zero,
            )
        cast = out_dtype not in (torch.uint8, dtype)

        def run(x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
            out = call(quantize(x))
            return out.to(dtype) if cast else out

        self._fast[(tuple(x.shape), x.dtype)] = run

    def _quantizer(self, scale: float, zero: int) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.input_u8:
            return lambda x: x
        grid, channels_last = self.kernel.grid, isinstance(self.kernel, OneDNNInt8Conv)
        return lambda x: grid.to_u8(x, scale, zero, channels_last)

    def _bound_add(
        self,
        quantize: Callable[[torch.Tensor], torch.Tensor],
        shape: torch.Size,
        dtype: torch.dtype,
    ) -> Callable[..., torch.Tensor]:
        k = self.kernel
        assert isinstance(k, OneDNNInt8Conv) and k.grid.scale is not None
        assert k.grid.zero is not None
        if self.accum_qparams is not None and self.out_qparams is not None:  # uint8 residual
            (accum_scale, accum_zero), (out_scale, out_zero) = self.accum_qparams, self.out_qparams
            out_dtype, bias, u8 = torch.uint8, k.bias, True
        else:
            accum_scale, accum_zero, out_scale, out_zero = 1.0, 0, 1.0, 0
            out_dtype, u8 = self._float_out(dtype), False
            bias = k.bias_for(out_dtype)
        call = ops.bound_qconv_add(
            k.grid.scale,
            k.grid.zero,
            k.packed_for(shape),
            k.w_scale,
            k.w_zero,
            bias,
            k.geometry,
            accum_scale,
            accum_zero,
            self.relu,
            out_dtype,
            out_scale,
            out_zero,
        )
        clone = self.clone_accum

        def run(x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
            accum = other if u8 else other.to(out_dtype)
            accum = accum.contiguous(memory_format=torch.channels_last)
            if accum is other and clone:  # oneDNN writes its result into the residual
                accum = accum.clone(memory_format=torch.channels_last)
            out = call(quantize(x), accum)
            return out if out.dtype in (torch.uint8, dtype) else out.to(dtype)

        return run

    def _general(self, x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
        kernel = self.kernel
        if self._unfusable(x):
            return self._finish(
                kernel(self._float_input(x), relu=self.relu and not self.add), other
            )
        dtype = self.float_dtype if self.input_u8 else x.dtype
        q, scale, zero = self._quantized_input(x)
        if self.add:
            if other is not None and self._accumulates(q, other):
                return self._conv_add(q, scale, zero, other, dtype)
            out = self._call(q, scale, zero, self._float_out(dtype), 1.0, 0, relu=False)
            return self._finish(out.to(dtype), other)
        if self.out_qparams is not None:
            return self._call(q, scale, zero, torch.uint8, *self.out_qparams, relu=self.relu)
        out = self._call(q, scale, zero, self._float_out(dtype), 1.0, 0, relu=self.relu)
        return out if out.dtype == dtype else out.to(dtype)

    def _call(
        self,
        q: torch.Tensor,
        scale: float,
        zero: int,
        out_dtype: torch.dtype,
        out_scale: float,
        out_zero: int,
        relu: bool,
    ) -> torch.Tensor:
        k = self.kernel
        if isinstance(k, OneDNNInt8Conv):
            bias = k.bias_for(out_dtype)
            return ops.qconv(
                q,
                scale,
                zero,
                k.packed_for(q.shape) if isinstance(k, OneDNNInt8Conv) else k.packed,
                k.w_scale,
                k.w_zero,
                bias,
                k.geometry,
                out_dtype,
                relu,
                out_scale,
                out_zero,
            )
        bias = k.bias_bf16 if out_dtype == torch.bfloat16 else k.bias
        return ops.qlinear(
            q,
            scale,
            zero,
            k.packed_for(q.shape) if isinstance(k, OneDNNInt8Conv) else k.packed,
            k.w_scale,
            k.w_zero,
            bias,
            out_dtype,
            relu,
            out_scale,
            out_zero,
        )

    def _conv_add(
        self, q: torch.Tensor, scale: float, zero: int, other: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        k = self.kernel
        assert isinstance(k, OneDNNInt8Conv)
        if self.accum_qparams is not None and self.out_qparams is not None:
            accum = other.contiguous(memory_format=torch.channels_last)  # uint8 residual
            (accum_scale, accum_zero), (out_scale, out_zero) = self.accum_qparams, self.out_qparams
            bias = k.bias
        else:
            out_dtype = self._float_out(dtype)
            accum = other.to(out_dtype).contiguous(memory_format=torch.channels_last)
            accum_scale, accum_zero, out_scale, out_zero = 1.0, 0, 1.0, 0
            bias = k.bias_for(out_dtype)
        if accum is other and self.clone_accum:  # oneDNN writes its result into the residual
            accum = accum.clone(memory_format=torch.channels_last)
        out = ops.qconv_add(
            q,
            scale,
            zero,
            k.packed_for(q.shape) if isinstance(k, OneDNNInt8Conv) else k.packed,
            k.w_scale,
            k.w_zero,
            bias,
            k.geometry,
            accum,
            accum_scale,
            accum_zero,
            self.relu,
            out_scale,
            out_zero,
        )
        return out if out.dtype in (torch.uint8, dtype) else out.to(dtype)

    # --- helpers ----------------------------------------------------------------------------
    def _unfusable(self, x: torch.Tensor) -> bool:
        k = self.kernel
        if isinstance(k, OneDNNInt8Linear):  # per token, or few rows (the kernel's own path)
            return k.per_token or (k.few_rows and x.numel() <= FEW_ROWS * x.shape[-1])
        return x.ndim == k.spatial + 1  # an unbatched input

    def _float_out(self, dtype: torch.dtype) -> torch.dtype:
        return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32

    def _quantized_input(self, x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        grid = self.kernel.grid
        if self.input_u8:
            assert grid.scale is not None and grid.zero is not None
            return x, grid.scale, grid.zero
        scale, zero = grid.qparams(x)
        channels_last = isinstance(self.kernel, OneDNNInt8Conv)
        return grid.to_u8(x, scale, zero, channels_last), scale, zero

    def _float_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_u8:
            return x
        grid = self.kernel.grid
        assert grid.scale is not None and grid.zero is not None
        return ((x.float() - grid.zero) * grid.scale).to(self.float_dtype)

    def _accumulates(self, q: torch.Tensor, other: torch.Tensor) -> bool:
        """Whether oneDNN can add ``other`` in its epilogue: a 2-d conv output's exact shape."""
        k = self.kernel
        if not isinstance(k, OneDNNInt8Conv) or k.spatial != 2 or other.ndim != 4:
            return False
        if (self.accum_qparams is not None) != (other.dtype == torch.uint8):
            return False
        return tuple(other.shape) == _conv_out_shape(q.shape, k)

    def _finish(self, out: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
        """The add, ReLU and uint8 output done step by step, where oneDNN cannot fuse them."""
        if self.add and other is not None:
            if other.dtype == torch.uint8 and self.accum_qparams is not None:
                accum_scale, accum_zero = self.accum_qparams
                other = (other.float() - accum_zero) * accum_scale
            out = out + other.to(out.dtype)
        if self.relu:
            out = torch.relu(out)
        if self.out_qparams is not None:
            scale, zero = self.out_qparams
            return torch.clamp(torch.round(out.float() / scale) + zero, 0, 255).to(torch.uint8)
        return out


def _conv_out_shape(shape: torch.Size, kernel: OneDNNInt8Conv) -> tuple[int, ...]:
    layer = kernel.layer
    assert isinstance(layer, nn.Conv2d)
    stride, padding, dilation, _ = kernel.geometry
    sizes = [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, p, d, k, s in zip(
            shape[2:], padding, dilation, layer.kernel_size, stride, strict=True
        )
    ]
    return (shape[0], layer.out_channels, *sizes)


def describe(layer: IntLayer) -> str:
    """What fusion gave a layer, e.g. ``"add+relu, uint8 in, uint8 out"``."""
    ops_ = "+".join(w for w, on in (("add", layer.add), ("relu", layer.relu)) if on)
    tags = [ops_] if ops_ else []
    tags += ["uint8 in"] if layer.input_u8 else []
    tags += ["uint8 out"] if layer.out_qparams is not None else []
    return ", ".join(tags)


class QuantizeU8(nn.Module):
    """One quantize pass shared by several int8 layers that read the same float value on the
    same static grid (a ResNet block input read by its first conv and its downsample)."""

    def __init__(self, grid: ActivationGrid) -> None:
        super().__init__()
        self.grid = grid

    def extra_repr(self) -> str:
        return f"uint8 @ {self.grid.scale:.4g}, zero point {self.grid.zero}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.grid.scale is not None and self.grid.zero is not None
        return self.grid.to_u8(x, self.grid.scale, self.grid.zero, channels_last=x.ndim == 4)
