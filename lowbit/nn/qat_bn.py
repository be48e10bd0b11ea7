"""Batch norm inside quantization-aware training: the quantizer sees the folded weight.

A Conv (or Linear) followed by a batch norm trains as one unit (Jacob et al., 2018, the
"folded" form torch.ao calls ConvBn). With ``f = gamma / sqrt(running_var + eps)`` the
weight that is fake-quantized is ``W * f`` (per output channel), exactly the weight the
converted model holds after folding. In training mode the layer's output is divided by ``f``
again and the batch norm runs on it with batch statistics (so its running statistics keep
learning and gradients see the batch normalisation); once the batch norm is frozen (after
``freeze_bn_after`` training steps, or in eval mode) the output is the folded layer's own,
``conv(x, q(W * f)) + (b - mean) * f + beta``, so converting changes nothing.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["bn_factor", "folded_bias", "channel_view"]


def bn_factor(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """``gamma / sqrt(running_var + eps)`` per channel (gamma 1 without affine).

    >>> bn = nn.BatchNorm1d(2); bn.running_var.fill_(4.0)
    tensor([4., 4.])
    >>> [round(v, 3) for v in bn_factor(bn).tolist()]
    [0.5, 0.5]
    """
    assert bn.running_var is not None
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    return gamma / std


def folded_bias(
    bn: nn.modules.batchnorm._BatchNorm, bias: torch.Tensor | None, factor: torch.Tensor
) -> torch.Tensor:
    """``(b - running_mean) * f + beta``: the folded layer's bias.

    >>> bn = nn.BatchNorm1d(1).eval(); bn.running_mean.fill_(1.0)
    tensor([1.])
    >>> folded_bias(bn, torch.tensor([3.0]), bn_factor(bn)).tolist()[0] > 1.99
    True
    """
    assert bn.running_mean is not None
    b = bias if bias is not None else torch.zeros_like(bn.running_mean)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(b)
    return (b - bn.running_mean) * factor + beta


def channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over an output of ``ndim`` dims, channels
    at dim 1: ``(1, C, 1, ...)``.

    >>> tuple(channel_view(torch.ones(3), 4).shape)
    (1, 3, 1, 1)
    """
    return t.reshape(1, -1, *([1] * (ndim - 2)))  # (1, C, 1, ...)


def weight_view(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A per-output-channel vector shaped to broadcast over ``weight`` (out channels first).

    >>> tuple(weight_view(torch.ones(8), torch.zeros(8, 3, 3, 3)).shape)
    (8, 1, 1, 1)
    """
    return t.reshape(-1, *([1] * (weight.ndim - 1)))  # (out, 1, ...)
