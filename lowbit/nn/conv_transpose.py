"""Quantized ConvTranspose1d and ConvTranspose2d (the reference kernel runs them).

A transposed convolution's weight is ``(in, out/groups, *kernel)``, so the recipe's
``per_channel`` (one scale per output channel, axis 0 of a Linear or Conv weight) means axis 1
here when ``groups`` is 1. A grouped layer has no single axis of output channels (output
channel ``j`` of every group shares index ``j`` on axis 1), so it gets one scale per input
channel (axis 0), each of which feeds one group only. ``groups``, ``output_padding`` and the
``output_size`` argument of ``forward`` work as in float.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.nn.kernels import ReferenceKernel, as_float, register_kernel
from lowbit.nn.layers import _check_conv_input
from lowbit.nn.module import QModule, register_qmodule
from lowbit.spec import PerChannel, QuantSpec

__all__ = ["QConvTranspose1d", "QConvTranspose2d", "transpose_weight_spec"]

_OPS = {1: F.conv_transpose1d, 2: F.conv_transpose2d}


def transpose_weight_spec(spec: QuantSpec, groups: int) -> QuantSpec:
    """The spec a transposed conv's ``(in, out/groups, *k)`` weight gets for a recipe's
    ``spec``: per output channel becomes axis 1 (groups 1) or per input channel (grouped).

    >>> transpose_weight_spec(QuantSpec("int8", "per_channel"), groups=1).gran
    PerChannel(axis=1, kind='per_channel')
    """
    gran = spec.gran
    if not isinstance(gran, PerChannel) or gran.axis != 0:
        return spec  # per tensor, per group, or an axis the recipe names explicitly
    return dataclasses.replace(spec, granularity=PerChannel(1 if groups == 1 else 0))


class _QConvTransposeNd(QModule):
    """What QConvTranspose1d and QConvTranspose2d share."""

    float_methods = ("forward", "_output_padding")

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        weight: QuantSpec | None,
        input: QuantSpec | None = None,
        name: str = "",
    ) -> QModule:
        """Wrap a float transposed conv; the weight's per-channel axis is mapped to its
        output channels (see :func:`transpose_weight_spec`)."""
        assert isinstance(module, nn.modules.conv._ConvTransposeNd)
        if weight is not None:
            weight = transpose_weight_spec(weight, module.groups)
        return super().from_float(module, weight, input, name)

    @classmethod
    def _float_args(cls, module: nn.Module) -> dict[str, Any]:
        assert isinstance(module, nn.modules.conv._ConvTransposeNd)
        return {
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "kernel_size": module.kernel_size,
            "stride": module.stride,
            "padding": module.padding,
            "output_padding": module.output_padding,
            "groups": module.groups,
            "bias": module.bias is not None,
            "dilation": module.dilation,
            "padding_mode": module.padding_mode,
        }

    def _int_bias_possible(self) -> bool:
        return False  # per input channel weight scales do not give per output bias scales

    def _check_input(self, x: torch.Tensor) -> None:
        assert isinstance(self, nn.modules.conv._ConvTransposeNd)
        _check_conv_input(self, self.label, x)

    def _transposed(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        output_size: list[int] | None,
    ) -> torch.Tensor:
        assert isinstance(self, nn.modules.conv._ConvTransposeNd)
        dims = len(self.kernel_size)
        padding = cast(tuple[int, ...], self.padding)  # transposed convs take sizes only
        output_padding = self._output_padding(
            x,
            output_size,
            list(self.stride),
            list(padding),
            list(self.kernel_size),
            dims,
            list(self.dilation),
        )
        return _OPS[dims](
            x, weight, bias, self.stride, padding, output_padding, self.groups, self.dilation
        )

    def float_forward(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return self._transposed(x, weight, bias, None)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if output_size is None:
            return super().forward(x)
        # kernels take one input: with output_size this runs the reference kernel's arithmetic
        self._check_input(x)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        weight = as_float(self.weight, x.dtype) if self.frozen else self.quantized_weight()
        assert weight is not None
        return self._transposed(x, weight.to(x.dtype), as_float(self.bias, x.dtype), output_size)


@register_qmodule(nn.ConvTranspose1d)
class QConvTranspose1d(_QConvTransposeNd, nn.ConvTranspose1d):
    """A ConvTranspose1d with quantized weight and input.

    >>> up = torch.nn.ConvTranspose1d(2, 3, 3, stride=2)
    >>> q = QConvTranspose1d.from_float(up, QuantSpec("int8", "per_channel"))
    >>> q(torch.randn(1, 2, 5)).shape, q.weight_quantizer.spec.gran.axis
    (torch.Size([1, 3, 11]), 1)
    """

    kind = "conv_transpose1d"


@register_qmodule(nn.ConvTranspose2d)
class QConvTranspose2d(_QConvTransposeNd, nn.ConvTranspose2d):
    """A ConvTranspose2d with quantized weight and input; ``output_size`` works as in float.

    >>> q = QConvTranspose2d.from_float(torch.nn.ConvTranspose2d(2, 4, 3, stride=2, groups=2),
    ...                                 QuantSpec("int8"))
    >>> q(torch.randn(1, 2, 4, 4), output_size=[10, 10]).shape
    torch.Size([1, 4, 10, 10])
    """

    kind = "conv_transpose2d"


register_kernel("conv_transpose1d", "conv_transpose2d")(ReferenceKernel)
