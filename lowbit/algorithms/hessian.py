"""A layer as the matrix product second-order PTQ methods (GPTQ) work on: ``Y = W X``.

Each supported layer is seen as ``groups`` independent matrices ``W_g`` of shape
``(rows, cols)`` multiplying input columns ``X_g`` of ``cols`` features: a Linear is one
``(out, in)`` matrix over its input rows; a Conv1d/Conv2d is its weight flattened to
``(out, C*kh*kw)`` over the unfolded input patches (the same ``(c, kh, kw)`` order, so a
per_group grid runs along the same flattened row as :func:`lowbit.primitives.blocks`); a
grouped or depthwise conv is one matrix per group, since the output channels of group ``g``
see only its input channels. transformers' ``Conv1D`` is a Linear with its weight stored
transposed. The Hessian of the layer-wise squared error, ``H_g = 2 X_g X_gᵀ / n``, is
accumulated batch by batch (:class:`Hessian`), so memory stays one ``(cols, cols)`` matrix per
group whatever the calibration set's size.

The rest is the GPTQ math on that matrix, in pure functions: :func:`prepare_hessian` (dead
inputs, activation order, damping), :func:`gptq_sweep` (the column-by-column rounding with
error feedback in lazy blocks) and :func:`gptq_solve` (both, for one matrix).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.nn import QModule
from lowbit.primitives import dequantize

__all__ = [
    "MATRIX_KINDS",
    "unsupported_reason",
    "num_groups",
    "input_columns",
    "weight_matrix",
    "matrix_to_weight",
    "grid_matrices",
    "Hessian",
    "Refit",
    "Sweep",
    "prepare_hessian",
    "gptq_sweep",
    "gptq_solve",
]

Refit = tuple[int, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]
"""``(group_size, fit)``: refit each group's grid from its ``(rows, group_size)`` weights."""

MATRIX_KINDS = ("linear", "hf_conv1d", "conv1d", "conv2d")
"""Layer kinds seen as matrices here; other kinds (conv3d, transposed convs, embeddings) are
not (an embedding's input is indices: it has no Hessian)."""


def unsupported_reason(layer: QModule) -> str | None:
    """Why ``layer`` cannot be seen as ``W X`` here, or None when it can.

    >>> import lowbit
    >>> m = lowbit.prepare(nn.Sequential(nn.Embedding(4, 2), nn.Linear(2, 2)), "w4a16-g128")
    >>> unsupported_reason(m[1]) is None, unsupported_reason(m[0])
    (True, 'embedding layers are not supported (kinds: linear, hf_conv1d, conv1d, conv2d)')
    """
    if layer.kind not in MATRIX_KINDS:
        return f"{layer.kind} layers are not supported (kinds: {', '.join(MATRIX_KINDS)})"
    return None


def num_groups(layer: QModule) -> int:
    """Independent weight matrices of ``layer``: a conv's ``groups``, else 1.

    >>> import lowbit
    >>> m = lowbit.prepare(nn.Sequential(nn.Conv2d(4, 4, 3, groups=4)), "w8a16")
    >>> num_groups(m[0])
    4
    """
    return int(getattr(layer, "groups", 1)) if layer.kind in ("conv1d", "conv2d") else 1


def _patches(conv: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """A Conv1d/Conv2d input as its receptive-field patches, ``(N*L, C*kh*kw)``."""
    dims = len(conv.kernel_size)
    if x.ndim == dims + 1:  # unbatched input
        x = x.unsqueeze(0)  # (1, C, ...)
    pads = list(conv._reversed_padding_repeated_twice)
    if any(pads):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pads, mode=mode)
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    if dims == 1:  # a Conv1d is a Conv2d of height 1
        x = x.unsqueeze(-2)  # (N, C, 1, L)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (N, C*kh*kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (N*L, C*kh*kw)


def input_columns(layer: QModule, x: torch.Tensor) -> torch.Tensor:
    """What each of the layer's weight matrices multiplies, as ``(groups, n, cols)`` rows.

    >>> import lowbit
    >>> m = lowbit.prepare(nn.Sequential(nn.Conv2d(4, 6, 3, groups=2)), "w8a16")
    >>> input_columns(m[0], torch.randn(2, 4, 5, 5)).shape  # 2 images x 9 positions
    torch.Size([2, 18, 18])
    """
    x = x.detach().float()
    if layer.kind in ("linear", "hf_conv1d"):
        return x.reshape(1, -1, x.shape[-1])  # (1, tokens, in)
    assert isinstance(layer, nn.modules.conv._ConvNd), layer.kind
    rows = _patches(layer, x)  # (n, C*k)
    groups = num_groups(layer)
    rows = rows.view(rows.shape[0], groups, -1)  # (n, groups, C/groups*k)
    return rows.transpose(0, 1)  # (groups, n, C/groups*k)


def weight_matrix(layer: QModule, w: torch.Tensor) -> torch.Tensor:
    """A tensor of the layer's weight shape as its ``(groups, rows, cols)`` matrices.

    >>> import lowbit
    >>> m = lowbit.prepare(nn.Sequential(nn.Conv2d(4, 6, 3, groups=2)), "w8a16")
    >>> weight_matrix(m[0], m[0].weight).shape
    torch.Size([2, 3, 18])
    """
    if layer.kind == "hf_conv1d":
        return w.t().unsqueeze(0)  # (1, out, in)
    groups = num_groups(layer)
    return w.reshape(groups, w.shape[0] // groups, -1)  # (groups, out/groups, C/groups*k)


def matrix_to_weight(layer: QModule, m: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`weight_matrix`: ``(groups, rows, cols)`` back to the weight's shape.

    >>> import lowbit
    >>> m = lowbit.prepare(nn.Sequential(nn.Conv2d(4, 6, 3, groups=2)), "w8a16")
    >>> w = m[0].weight.detach()
    >>> torch.equal(matrix_to_weight(m[0], weight_matrix(m[0], w)), w)
    True
    """
    if layer.kind == "hf_conv1d":
        return m[0].t().contiguous()  # (in, out)
    return m.reshape(layer.weight.shape)


def grid_matrices(layer: QModule) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibrated weight grid, one scale and one zero point per weight element, as
    ``(groups, rows, cols)`` float matrices (whatever the granularity: per tensor, channel or
    group), so a column of the matrix rounds on its own grid.

    >>> import lowbit
    >>> m = lowbit.prepare(nn.Sequential(nn.Linear(8, 2)), "w4a16")
    >>> m[0].update_weight_qparams(); s, z = grid_matrices(m[0])
    >>> s.shape, bool((s[0, :, 0] == m[0].weight_quantizer.scale.flatten()).all())
    (torch.Size([1, 2, 8]), True)
    """
    wq = layer.weight_quantizer
    assert wq is not None
    if wq.scale is None:
        layer.update_weight_qparams()
    assert wq.scale is not None and wq.zero_point is not None
    shape, gran = layer.weight.shape, wq.spec.gran
    ones = torch.ones(shape, dtype=torch.int32, device=wq.scale.device)
    scale = dequantize(ones, wq.scale, torch.zeros_like(wq.zero_point), gran)  # (1 - 0) * s
    zero = -dequantize(ones - 1, torch.ones_like(wq.scale), wq.zero_point, gran)  # -(0 - z)
    return weight_matrix(layer, scale), weight_matrix(layer, zero)


class Hessian:
    """The running ``2 X Xᵀ / n`` of one layer's input columns, one matrix per group.

    >>> h = Hessian(groups=1, cols=3)
    >>> h.add(torch.ones(1, 4, 3)); h.add(torch.zeros(1, 4, 3))
    >>> h.rows, [round(v, 4) for v in h.matrix[0, 0].tolist()]  # 2 * 4 / 8
    (8, [1.0, 1.0, 1.0])
    """

    def __init__(self, groups: int, cols: int, device: torch.device | None = None) -> None:
        self.matrix = torch.zeros(groups, cols, cols, device=device)  # (groups, cols, cols)
        self.rows = 0

    def add(self, columns: torch.Tensor) -> None:
        """Fold in a ``(groups, n, cols)`` batch of input rows (a running mean)."""
        n = int(columns.shape[1])
        if n == 0:
            return
        total = self.rows + n
        self.matrix.mul_(self.rows / total)
        x = columns.to(self.matrix.device, torch.float32) * (2.0 / total) ** 0.5
        self.matrix.baddbmm_(x.transpose(1, 2), x)  # (groups, cols, n) @ (groups, n, cols)
        self.rows = total


def prepare_hessian(
    h: torch.Tensor, w: torch.Tensor, damp: float, act_order: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The damped Hessian, the weight with dead inputs zeroed, and the column order.

    A dead input (never nonzero: Hessian diagonal 0) gets diagonal 1 and its weight column 0;
    ``act_order`` sorts columns by decreasing diagonal. Returns ``(h, w, perm)`` already
    permuted (``w[:, perm]``).

    >>> h, w, perm = prepare_hessian(torch.diag(torch.tensor([1.0, 0.0, 4.0])),
    ...                              torch.ones(2, 3), damp=0.01, act_order=True)
    >>> perm.tolist(), w[0].tolist()
    ([2, 0, 1], [1.0, 1.0, 0.0])
    """
    h, w = h.clone(), w.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    else:
        perm = torch.arange(h.shape[0], device=h.device)
    h = h[perm][:, perm]
    w = w[:, perm]
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += damp * torch.mean(torch.diagonal(h))
    return h, w, perm


class Sweep(NamedTuple):
    """What a GPTQ sweep chose: integers (rows, cols), the loss, and the per-element grid it
    rounded on (the one given, or the refitted one)."""

    integers: torch.Tensor
    loss: float
    scale: torch.Tensor
    zero: torch.Tensor


def gptq_sweep(
    w: torch.Tensor,
    hinv: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    qmin: int,
    qmax: int,
    block_size: int = 128,
    refit: Refit | None = None,
) -> Sweep:
    """Round ``w`` (rows, cols) column by column on the grid ``scale``/``zero`` (rows, cols),
    spreading each column's error over the later ones through ``hinv``, the upper Cholesky
    factor of the inverse Hessian. The loss is ``sum (w - q)^2 / hinv_ii^2 / 2``.

    ``refit=(group_size, fit)`` refits each group's grid when the sweep reaches its first
    column, from the group's weights as the earlier updates left them: ``fit`` maps the
    ``(rows, group_size)`` columns to a ``(rows,)`` scale and zero point. ``block_size`` must
    then be a multiple of ``group_size`` (a group never straddles two blocks).

    >>> w = torch.tensor([[0.4, 0.4]]); ones = torch.ones(1, 2)
    >>> hinv = torch.linalg.cholesky(torch.linalg.inv(torch.tensor([[1.0, 0.9], [0.9, 1.0]])),
    ...                              upper=True)
    >>> gptq_sweep(w, hinv, ones, 0 * ones, -8, 7).integers.tolist()  # nearest: [[0, 0]]
    [[0, 1]]
    """
    w, scale, zero = w.clone(), scale.clone(), zero.clone()
    q = torch.zeros_like(w)
    loss = torch.zeros((), device=w.device)
    cols = w.shape[1]
    if refit is not None and block_size % refit[0]:
        raise ValueError(f"block_size {block_size} must be a multiple of the group size {refit[0]}")
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()  # (rows, b)
        err = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]  # (b, b)
        for i in range(i2 - i1):
            j = i1 + i
            if refit is not None and j % refit[0] == 0:
                s_new, z_new = refit[1](w1[:, i : i + refit[0]])  # (rows,), (rows,)
                scale[:, j : j + refit[0]] = s_new.unsqueeze(1)
                zero[:, j : j + refit[0]] = z_new.unsqueeze(1)
            col, s, z, d = w1[:, i], scale[:, j], zero[:, j], h1[i, i]
            qi = torch.clamp(torch.round(col / s) + z, qmin, qmax)
            q[:, j] = qi
            e = (col - (qi - z) * s) / d
            loss += (e * e).sum() / 2
            w1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)  # (rows, 1) * (1, b-i)
            err[:, i] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]  # (rows, b) @ (b, cols-i2)
    return Sweep(q.to(torch.int32), float(loss), scale, zero)


def gptq_solve(
    w: torch.Tensor,
    h: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    qmin: int,
    qmax: int,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    refit: Refit | None = None,
) -> Sweep:
    """GPTQ integers for one ``(rows, cols)`` matrix ``w`` with Hessian ``h`` (cols, cols) on
    the per-element grid ``scale``/``zero`` (see :func:`gptq_sweep` for ``refit``, which
    needs the natural column order: ``act_order=False``); raises
    ``torch.linalg.LinAlgError`` when the damped Hessian is not positive definite.

    >>> g = torch.Generator().manual_seed(0)
    >>> x, w = torch.randn(64, 8, generator=g), torch.randn(4, 8, generator=g)
    >>> s, z = torch.full((4, 8), 0.5), torch.zeros(4, 8)
    >>> q = gptq_solve(w, 2 * x.T @ x / 64, s, z, -8, 7).integers
    >>> rtn = torch.clamp(torch.round(w / s), -8, 7)
    >>> err = lambda q: ((x @ (w - q * s).T) ** 2).sum().item()
    >>> err(q.float()) < err(rtn)
    True
    """
    if refit is not None and act_order:
        raise ValueError("refitting group grids needs act_order=False (groups are contiguous)")
    hd, wp, perm = prepare_hessian(h.float(), w.float(), damp, act_order)
    chol = torch.linalg.cholesky(hd)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    if refit is not None:
        block_size = -(-block_size // refit[0]) * refit[0]  # a multiple of the group size
    out = gptq_sweep(
        wp, hinv, scale[:, perm].float(), zero[:, perm].float(), qmin, qmax, block_size, refit
    )
    inverse = torch.argsort(perm)
    return Sweep(out.integers[:, inverse], out.loss, out.scale[:, inverse], out.zero[:, inverse])
