"""GPTQ (Frantar et al., 2022): choose each weight's integer so that the layer's output on
calibration inputs stays close, using the inverse Hessian of the layer-wise squared error.

Columns of ``W`` (one input feature each) are rounded one at a time; the rounding error of a
column is spread over the columns not yet rounded, weighted by the inverse Hessian (from its
Cholesky factor, in lazy batches of ``block_size`` columns). With ``act_order`` the columns go
in order of decreasing Hessian diagonal (the most active inputs first). The grid stays the
calibrated one ("static groups": every weight's scale and zero point come from calibration),
so GPTQ only picks integers and act-order works with per-group scales as it does per channel.

Layers run one after another (``weight_layers`` order): each layer's Hessian comes from what
it receives with every layer before it already rounded by GPTQ, one model pass per layer, so
memory stays one ``(cols, cols)`` matrix whatever the model. The per-layer object keeps the
reference implementation's shape: :class:`GPTQLayer` with ``add_batch(x)`` and ``solve()``;
the math is in pure functions (:func:`prepare_hessian`, :func:`gptq_sweep`, :func:`gptq_solve`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.algorithms.base import (
    AlgorithmBase,
    AlgorithmError,
    LayerLoop,
    add_note,
    register_algorithm,
    require_data,
    set_rounded_weight,
    weight_layers,
)
from lowbit.algorithms.capture import capture_inputs
from lowbit.algorithms.hessian import (
    Hessian,
    grid_matrices,
    input_columns,
    matrix_to_weight,
    num_groups,
    unsupported_reason,
    weight_matrix,
)
from lowbit.nn import QModule

__all__ = [
    "GPTQConfig",
    "GPTQ",
    "GPTQLayer",
    "GPTQResult",
    "prepare_hessian",
    "gptq_sweep",
    "gptq_solve",
]

RETRY_DAMP = 10.0  # a Cholesky failure retries once with this many times the damping


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ's arguments (``args:`` of a recipe naming ``algorithm: gptq``).

    ``damp``: added to the Hessian's diagonal, as a fraction of its mean; ``block_size``:
    columns per lazy batch; ``act_order``: round the most active input columns first;
    ``min_samples``: calibration samples required; ``budget_s``: time budget in seconds (the
    layers left when it is spent keep round-to-nearest, with a note).

    >>> GPTQConfig(damp=0.05).act_order
    True
    >>> GPTQConfig(damp=2.0)
    Traceback (most recent call last):
    ...
    ValueError: damp must be in (0, 1) (a fraction of the Hessian's mean diagonal), got 2.0
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    min_samples: int = 16
    budget_s: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.damp < 1.0:
            raise ValueError(
                "damp must be in (0, 1) (a fraction of the Hessian's mean diagonal), "
                f"got {self.damp}"
            )
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(
                f"block_size must be a positive integer, e.g. 128; got {self.block_size!r}"
            )
        if not isinstance(self.act_order, bool):
            raise ValueError(f"act_order must be true or false, got {self.act_order!r}")
        if not isinstance(self.min_samples, int) or self.min_samples < 1:
            raise ValueError(f"min_samples must be a positive integer, got {self.min_samples!r}")
        if self.budget_s is not None and not self.budget_s > 0:
            raise ValueError(
                f"budget_s must be a positive number of seconds or null, got {self.budget_s}"
            )


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


def gptq_sweep(
    w: torch.Tensor,
    hinv: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    qmin: int,
    qmax: int,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round ``w`` (rows, cols) column by column on the grid ``scale``/``zero`` (rows, cols),
    spreading each column's error over the later ones through ``hinv``, the upper Cholesky
    factor of the inverse Hessian. Returns the integers (rows, cols) and the loss
    ``sum (w - q)^2 / hinv_ii^2 / 2``.

    >>> w = torch.tensor([[0.4, 0.4]]); ones = torch.ones(1, 2)
    >>> hinv = torch.linalg.cholesky(torch.linalg.inv(torch.tensor([[1.0, 0.9], [0.9, 1.0]])),
    ...                              upper=True)
    >>> gptq_sweep(w, hinv, ones, 0 * ones, -8, 7)[0].tolist()  # round-to-nearest gives [0, 0]
    [[0, 1]]
    """
    w = w.clone()
    q = torch.zeros_like(w)
    loss = torch.zeros((), device=w.device)
    cols = w.shape[1]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()  # (rows, b)
        err = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]  # (b, b)
        for i in range(i2 - i1):
            col, s, z, d = w1[:, i], scale[:, i1 + i], zero[:, i1 + i], h1[i, i]
            qi = torch.clamp(torch.round(col / s) + z, qmin, qmax)
            q[:, i1 + i] = qi
            e = (col - (qi - z) * s) / d
            loss += (e * e).sum() / 2
            w1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)  # (rows, 1) * (1, b-i)
            err[:, i] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]  # (rows, b) @ (b, cols-i2)
    return q.to(torch.int32), loss


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
) -> tuple[torch.Tensor, float]:
    """GPTQ integers for one ``(rows, cols)`` matrix ``w`` with Hessian ``h`` (cols, cols) on
    the per-element grid ``scale``/``zero``; raises ``torch.linalg.LinAlgError`` when the
    damped Hessian is not positive definite.

    >>> g = torch.Generator().manual_seed(0)
    >>> x, w = torch.randn(64, 8, generator=g), torch.randn(4, 8, generator=g)
    >>> s, z = torch.full((4, 8), 0.5), torch.zeros(4, 8)
    >>> q, loss = gptq_solve(w, 2 * x.T @ x / 64, s, z, -8, 7)
    >>> rtn = torch.clamp(torch.round(w / s), -8, 7)
    >>> err = lambda q: ((x @ (w - q * s).T) ** 2).sum().item()
    >>> err(q.float()) < err(rtn)
    True
    """
    hd, wp, perm = prepare_hessian(h.float(), w.float(), damp, act_order)
    chol = torch.linalg.cholesky(hd)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    qp, loss = gptq_sweep(
        wp, hinv, scale[:, perm].float(), zero[:, perm].float(), qmin, qmax, block_size
    )
    q = torch.empty_like(qp)
    q[:, perm] = qp
    return q, float(loss)


@dataclass
class GPTQResult:
    """What :meth:`GPTQLayer.solve` chose: integers in the weight's shape, the loss, notes."""

    integers: torch.Tensor
    loss: float
    notes: list[str]


class GPTQLayer:
    """One layer's GPTQ state: feed it the layer's inputs with :meth:`add_batch`, then
    :meth:`solve`.

    >>> import lowbit
    >>> m = lowbit.prepare(nn.Sequential(nn.Linear(8, 4)), "w4a16")
    >>> m[0].update_weight_qparams()
    >>> state = GPTQLayer(m[0], "0")
    >>> state.add_batch(torch.randn(32, 8))
    >>> state.solve().integers.shape
    torch.Size([4, 8])
    """

    def __init__(self, layer: QModule, name: str, config: GPTQConfig | None = None) -> None:
        reason = unsupported_reason(layer)
        if reason is not None:
            raise AlgorithmError(f"gptq: layer {name!r}: {reason}")
        self.layer, self.name = layer, name
        self.config = config or GPTQConfig()
        cols = weight_matrix(layer, layer.weight).shape[-1]
        self.hessian = Hessian(num_groups(layer), cols, device=layer.weight.device)

    @property
    def rows(self) -> int:
        """Input rows (tokens, patch positions) seen so far."""
        return self.hessian.rows

    def add_batch(self, x: torch.Tensor) -> None:
        """Fold one input of the layer into its Hessian (after the layer's own input
        quantizer, since that is what its weight multiplies)."""
        iq = self.layer.input_quantizer
        if iq is not None:
            x = iq(x)
        self.hessian.add(input_columns(self.layer, x))

    def _check(self) -> torch.Tensor:
        h = self.hessian.matrix
        if self.rows == 0:
            raise AlgorithmError(
                f"gptq: layer {self.name!r} saw no input; run calibration data that reaches it"
            )
        if not torch.isfinite(h).all():
            raise AlgorithmError(
                f"gptq: layer {self.name!r}: the Hessian of its calibration inputs has NaN or "
                "Inf values (its inputs overflow or are NaN); check the calibration data and "
                "the layers before it"
            )
        return h

    def _solve_all(self, damp: float) -> tuple[torch.Tensor, float]:
        layer, wq = self.layer, self.layer.weight_quantizer
        assert wq is not None
        w = weight_matrix(layer, layer.weight.detach().float())  # (groups, rows, cols)
        scale, zero = grid_matrices(layer)
        h, cfg = self._check(), self.config
        qmin, qmax = wq.spec.qdtype.qmin, wq.spec.qdtype.qmax
        parts, total = [], 0.0
        for g in range(w.shape[0]):
            q, loss = gptq_solve(
                w[g], h[g], scale[g], zero[g], qmin, qmax, damp, cfg.block_size, cfg.act_order
            )
            parts.append(q)
            total += loss
        return matrix_to_weight(layer, torch.stack(parts)), total

    def solve(self) -> GPTQResult:
        """The integers GPTQ chooses for the layer's weight on its calibrated grid; a
        Hessian that Cholesky refuses is retried once with more damping (noted), then an
        :class:`AlgorithmError` naming the layer."""
        damp = self.config.damp
        try:
            q, loss = self._solve_all(damp)
            return GPTQResult(q, loss, [])
        except torch.linalg.LinAlgError:
            pass
        more = min(damp * RETRY_DAMP, 0.99)
        try:
            q, loss = self._solve_all(more)
        except torch.linalg.LinAlgError:
            raise AlgorithmError(
                f"gptq: layer {self.name!r}: the Cholesky factorisation of its Hessian failed "
                f"with damp={damp:g} and again with damp={more:g}; raise damp in the recipe's "
                "args, or give more (and more varied) calibration samples"
            ) from None
        note = f"{self.name}: Cholesky failed with damp={damp:g}; solved with damp={more:g}"
        return GPTQResult(q, loss, [note])


class _Reached(Exception):
    """Raised by the input hook to end a forward pass once the target layer has its input."""


def _accumulate(
    model: nn.Module, name: str, layer: QModule, state: GPTQLayer, data: Sequence[Any]
) -> None:
    """Feed ``state`` every input ``layer`` receives over ``data``. When the first batch
    calls the layer exactly once, later batches stop right after it (the rest of the model
    cannot change its input); a layer called several times per batch gets whole passes."""
    calls = 0

    def count(_name: str, x: torch.Tensor, _y: Any) -> None:
        nonlocal calls
        calls += 1
        state.add_batch(x)

    def stop(_name: str, x: torch.Tensor, _y: Any) -> None:
        state.add_batch(x)
        raise _Reached

    with capture_inputs(model, {name: layer}, data[:1], on_input=count):
        pass
    if calls != 1:
        with capture_inputs(model, {name: layer}, data[1:], on_input=count):
            return
    for batch in data[1:]:
        try:
            with capture_inputs(model, {name: layer}, [batch], on_input=stop):
                pass
        except _Reached:
            pass


@register_algorithm("gptq", GPTQConfig)
class GPTQ(AlgorithmBase):
    """GPTQ over every supported weight layer of a prepared, calibrated model, in order.

    >>> import lowbit
    >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> q = lowbit.quantize(net, "w4a16-gptq", data=[torch.randn(32, 8)])
    >>> q(torch.randn(3, 8)).shape
    torch.Size([3, 2])
    """

    stage = "quantized"
    config: GPTQConfig

    def apply(self, model: nn.Module, data: Sequence[Any] | None) -> None:
        """Round every supported layer with GPTQ, one model pass per layer."""
        batches = require_data(data, "gptq", self.config.min_samples)
        layers, skipped = {}, []
        for name, layer in weight_layers(model).items():
            reason = unsupported_reason(layer)
            if reason is None:
                layers[name] = layer
            else:
                skipped.append(f"{name} ({layer.kind})")
        if skipped:
            add_note(
                model,
                "gptq",
                f"{len(skipped)} layer(s) keep round-to-nearest, of kinds "
                f"GPTQ does not handle: {', '.join(skipped)}",
            )
        loop = LayerLoop("gptq", layers, self.config.budget_s, self.progress)
        for name, layer in loop:
            self._layer(model, name, layer, batches, loop)
        loop.note_skipped(model)

    def _layer(
        self, model: nn.Module, name: str, layer: QModule, data: Sequence[Any], loop: LayerLoop
    ) -> None:
        state = GPTQLayer(layer, name, self.config)
        _accumulate(model, name, layer, state, data)
        if state.rows == 0:
            add_note(
                model, "gptq", f"{name}: no calibration input reached it; keeps round-to-nearest"
            )
            return
        result = state.solve()
        set_rounded_weight(layer, result.integers)
        loop.loss(result.loss)
        for note in result.notes:
            add_note(model, "gptq", note)
