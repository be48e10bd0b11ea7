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
the math is in pure functions (:mod:`lowbit.algorithms.hessian`: the layer as a matrix, its
Hessian, the sweep). ``refit_groups`` (off by default) refits each per_group grid as the
sweep reaches it, like the reference without static groups, and stores the new qparams.
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
    Refit,
    gptq_solve,
    grid_matrices,
    input_columns,
    matrix_to_weight,
    num_groups,
    unsupported_reason,
    weight_matrix,
)
from lowbit.nn import QModule
from lowbit.observers import make_observer
from lowbit.spec import PerGroup

__all__ = [
    "GPTQConfig",
    "GPTQ",
    "GPTQLayer",
    "GPTQResult",
]

RETRY_DAMP = 10.0  # a Cholesky failure retries once with this many times the damping


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ's arguments (``args:`` of a recipe naming ``algorithm: gptq``).

    ``damp``: added to the Hessian's diagonal, as a fraction of its mean; ``block_size``:
    columns per lazy batch; ``act_order``: round the most active input columns first;
    ``min_samples``: calibration samples required; ``budget_s``: time budget in seconds (the
    layers left when it is spent keep round-to-nearest, with a note); ``refit_groups``: refit
    each per_group grid from the updated weights as the sweep reaches it (needs
    ``act_order: false``; the calibrated grid is kept otherwise).

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
    refit_groups: bool = False

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
        if self.refit_groups and self.act_order:
            raise ValueError(
                "refit_groups needs act_order: false (a refitted group must be contiguous "
                "columns); set one of them to false"
            )
        if self.budget_s is not None and not self.budget_s > 0:
            raise ValueError(
                f"budget_s must be a positive number of seconds or null, got {self.budget_s}"
            )


@dataclass
class GPTQResult:
    """What :meth:`GPTQLayer.solve` chose: integers in the weight's shape, the loss, notes,
    and the refitted qparams (quantizer shapes) when ``refit_groups`` changed them."""

    integers: torch.Tensor
    loss: float
    notes: list[str]
    qparams: tuple[torch.Tensor, torch.Tensor] | None = None


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

    def _refit(self) -> Refit | None:
        wq = self.layer.weight_quantizer
        assert wq is not None
        gran = wq.spec.gran
        if not self.config.refit_groups or not isinstance(gran, PerGroup):
            return None
        if self.layer.kind == "hf_conv1d":  # its groups run along outputs, not input columns
            return None

        def fit(cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            observer = make_observer(wq.spec)
            observer(cols)  # (rows, <= group_size): one group per row
            scale, zero = observer.qparams()  # (rows, 1)
            return scale.reshape(-1), zero.reshape(-1).float()  # (rows,)

        return gran.group_size, fit

    def _solve_all(self, damp: float) -> GPTQResult:
        layer, wq = self.layer, self.layer.weight_quantizer
        assert wq is not None
        w = weight_matrix(layer, layer.weight.detach().float())  # (groups, rows, cols)
        scale, zero = grid_matrices(layer)
        h, cfg, refit = self._check(), self.config, self._refit()
        qmin, qmax = wq.spec.qdtype.qmin, wq.spec.qdtype.qmax
        sweeps = [
            gptq_solve(
                w[g],
                h[g],
                scale[g],
                zero[g],
                qmin,
                qmax,
                damp,
                cfg.block_size,
                cfg.act_order,
                refit,
            )
            for g in range(w.shape[0])
        ]
        q = matrix_to_weight(layer, torch.stack([sw.integers for sw in sweeps]))
        result = GPTQResult(q, sum(sw.loss for sw in sweeps), [])
        if refit is not None:
            size = refit[0]
            new_s = matrix_to_weight(layer, torch.stack([sw.scale for sw in sweeps]))
            new_z = matrix_to_weight(layer, torch.stack([sw.zero for sw in sweeps]))
            first = slice(None, None, size)  # each group's first column holds its qparams
            result.qparams = (
                new_s.reshape(q.shape[0], -1)[:, first],  # (out, groups)
                new_z.reshape(q.shape[0], -1)[:, first].round().to(torch.int32),
            )
        elif cfg.refit_groups:
            result.notes.append(
                f"{self.name}: refit_groups applies to per_group Linear/Conv weights; it keeps "
                "its calibrated grid"
            )
        return result

    def solve(self) -> GPTQResult:
        """The integers GPTQ chooses for the layer's weight on its calibrated grid; a
        Hessian that Cholesky refuses is retried once with more damping (noted), then an
        :class:`AlgorithmError` naming the layer."""
        damp = self.config.damp
        try:
            return self._solve_all(damp)
        except torch.linalg.LinAlgError:
            pass
        more = min(damp * RETRY_DAMP, 0.99)
        try:
            result = self._solve_all(more)
        except torch.linalg.LinAlgError:
            raise AlgorithmError(
                f"gptq: layer {self.name!r}: the Cholesky factorisation of its Hessian failed "
                f"with damp={damp:g} and again with damp={more:g}; raise damp in the recipe's "
                "args, or give more (and more varied) calibration samples"
            ) from None
        note = f"{self.name}: Cholesky failed with damp={damp:g}; solved with damp={more:g}"
        result.notes.insert(0, note)
        return result


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
        if result.qparams is not None:
            assert layer.weight_quantizer is not None
            layer.weight_quantizer.set_qparams(*result.qparams)
        set_rounded_weight(layer, result.integers)
        loop.loss(result.loss)
        for note in result.notes:
            add_note(model, "gptq", note)
