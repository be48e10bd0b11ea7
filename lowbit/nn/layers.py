"""Quantized Linear and Conv layers, registered against their float classes."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.nn.kernels import ReferenceKernel, register_kernel
from lowbit.nn.module import QModule, register_qmodule

__all__ = ["QLinear", "QConv1d", "QConv2d", "QConv3d"]


@register_qmodule(nn.Linear)
class QLinear(QModule, nn.Linear):  # type: ignore[misc]  # Linear infers bias as Parameter
    """A Linear layer with quantized weight and (optionally) quantized input.

    >>> import torch
    >>> from lowbit.spec import QuantSpec
    >>> q = QLinear.from_float(torch.nn.Linear(4, 2), QuantSpec("int8", "per_channel"))
    >>> q(torch.randn(3, 4)).shape
    torch.Size([3, 2])
    """

    kind = "linear"

    @classmethod
    def _float_args(cls, module: nn.Module) -> dict[str, Any]:
        assert isinstance(module, nn.Linear)
        return {
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
        }

    def float_forward(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self.label}: expected an input with {self.in_features} features in its "
                f"last dimension, got shape {tuple(x.shape)}; feed the model inputs of the "
                "shape it was built for"
            )


def _check_conv_input(layer: nn.modules.conv._ConvNd, name: str, x: torch.Tensor) -> None:
    dims = len(layer.kernel_size)  # 1 for Conv1d, 2 for Conv2d, 3 for Conv3d
    if x.ndim not in (dims + 1, dims + 2) or x.shape[-dims - 1] != layer.in_channels:
        raise ValueError(
            f"{name}: expected an (N, C={layer.in_channels}, "
            f"{', '.join('DHW'[3 - dims :])}) input, got shape {tuple(x.shape)}; feed the model "
            "inputs of the shape it was built for"
        )


def _conv_args(module: nn.Module) -> dict[str, Any]:
    assert isinstance(module, nn.modules.conv._ConvNd)
    return {
        "in_channels": module.in_channels,
        "out_channels": module.out_channels,
        "kernel_size": module.kernel_size,
        "stride": module.stride,
        "padding": module.padding,
        "dilation": module.dilation,
        "groups": module.groups,
        "bias": module.bias is not None,
        "padding_mode": module.padding_mode,
    }


class _QConvNd(QModule):
    """What QConv1d, QConv2d and QConv3d share: float args, the conv call, the input check."""

    float_methods = ("forward", "_conv_forward")

    @classmethod
    def _float_args(cls, module: nn.Module) -> dict[str, Any]:
        return _conv_args(module)

    def float_forward(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        assert isinstance(self, nn.modules.conv._ConvNd)
        return self._conv_forward(x, weight, bias)

    def _check_input(self, x: torch.Tensor) -> None:
        assert isinstance(self, nn.modules.conv._ConvNd)
        _check_conv_input(self, self.label, x)

    def _view_extra(self) -> tuple[tuple[str, str], ...]:
        assert isinstance(self, nn.modules.conv._ConvNd)
        padding = self.padding if isinstance(self.padding, str) else "explicit"
        return (
            ("padding", padding),
            ("padding_mode", self.padding_mode),
            ("groups", str(self.groups)),
        )


@register_qmodule(nn.Conv2d)
class QConv2d(_QConvNd, nn.Conv2d):
    """A Conv2d (grouped and depthwise included) with quantized weight and input.

    >>> import torch
    >>> from lowbit.spec import QuantSpec
    >>> q = QConv2d.from_float(torch.nn.Conv2d(4, 4, 3, groups=4), QuantSpec("int8"))
    >>> q(torch.randn(1, 4, 8, 8)).shape
    torch.Size([1, 4, 6, 6])
    """

    kind = "conv2d"


@register_qmodule(nn.Conv1d)
class QConv1d(_QConvNd, nn.Conv1d):
    """A Conv1d with quantized weight and input.

    >>> import torch
    >>> from lowbit.spec import QuantSpec
    >>> q = QConv1d.from_float(torch.nn.Conv1d(2, 3, 3), QuantSpec("int8"))
    >>> q(torch.randn(1, 2, 10)).shape
    torch.Size([1, 3, 8])
    """

    kind = "conv1d"


@register_qmodule(nn.Conv3d)
class QConv3d(_QConvNd, nn.Conv3d):
    """A Conv3d with quantized weight and input (the reference kernel runs it).

    >>> import torch
    >>> from lowbit.spec import QuantSpec
    >>> q = QConv3d.from_float(torch.nn.Conv3d(2, 3, 3), QuantSpec("int8"))
    >>> q(torch.randn(1, 2, 4, 5, 6)).shape
    torch.Size([1, 3, 2, 3, 4])
    """

    kind = "conv3d"


register_kernel("conv3d")(ReferenceKernel)
