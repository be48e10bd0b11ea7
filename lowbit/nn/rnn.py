"""Quantized LSTM, GRU and RNN, as torch.ao's dynamic quantization defines them.

Every weight matrix becomes a child :class:`~lowbit.nn.layers.QLinear` (``ih_l0``,
``hh_l0``, ``hr_l0`` for an LSTM's projection, ``ih_l0_reverse``, ...) holding int8 (or
narrower) weights per gate row, with the float bias; the gate math stays float (the cells are
in :mod:`lowbit.nn.rnn_cells`). Per layer and direction the whole input sequence goes
through ``ih`` as one GEMM (its input quantized once, over the whole sequence), then each step
sends the hidden state through ``hh`` (quantized again at every step). Prepared and frozen
modules run the same children in the same order, so the simulation and the integer kernels
agree.

Activations of a recurrent layer are always quantized dynamically: a hidden state has no
fixed range to calibrate. A recipe with a static input spec (``w8a8``) therefore gets its
dynamic twin here (same dtype and symmetry, one scale per tensor, computed at every call);
a weight-only recipe (``w8a16``, ``w4a16``) keeps the activations float.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from lowbit.nn.children import (
    ChildAliases,
    drop_parameters,
    dynamic_input_spec,
    dynamic_note,
    linear_child,
)
from lowbit.nn.module import register_qmodule
from lowbit.nn.parent import QParent
from lowbit.nn.rnn_cells import gru_step, lstm_step, rnn_step
from lowbit.spec import QuantSpec

__all__ = ["QLSTM", "QGRU", "QRNN"]


class _QRNNBase(ChildAliases):
    """What QLSTM, QGRU and QRNN share: children per layer and direction, input handling,
    the loop over time steps (padded and packed sequences alike)."""

    float_name: ClassVar[str] = ""  # the float class's name in messages, e.g. "LSTM"
    input_size: int
    hidden_size: int
    num_layers: int
    bias: bool
    batch_first: bool
    dropout: float
    bidirectional: bool
    proj_size: int

    @classmethod
    def _float_args(cls, module: nn.Module) -> dict[str, Any]:
        assert isinstance(module, nn.RNNBase)
        return {
            "input_size": module.input_size,
            "hidden_size": module.hidden_size,
            "num_layers": module.num_layers,
            "bias": module.bias,
            "batch_first": module.batch_first,
            "dropout": module.dropout,
            "bidirectional": module.bidirectional,
        }

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        weight: QuantSpec | None,
        input: QuantSpec | None = None,
        name: str = "",
    ) -> QParent:
        assert isinstance(module, nn.RNNBase)
        label = name or type(module).__name__
        with warnings.catch_warnings():  # dropout with one layer: torch warned the user already
            warnings.simplefilter("ignore")
            qmod = cls(**cls._float_args(module), device="meta")
        assert isinstance(qmod, _QRNNBase)
        drop_parameters(qmod)
        ispec = dynamic_input_spec(input)
        qmod.notes = dynamic_note(label, input)
        for suffix in qmod._suffixes():
            for part in ("ih", "hh", "hr") if module.proj_size > 0 else ("ih", "hh"):
                has_bias = module.bias and part != "hr"  # the projection has no bias
                child = linear_child(
                    getattr(module, f"weight_{part}{suffix}"),
                    getattr(module, f"bias_{part}{suffix}") if has_bias else None,
                    weight,
                    ispec,
                    f"{label}.{part}{suffix}",
                )
                qmod.add_module(f"{part}{suffix}", child)
        qmod.train(module.training)
        return qmod

    def _init_flat_weights(self) -> None:
        """Hold no list of weights (RNNBase's, for cuDNN): the children own them, and a list
        kept here would keep the float weights alive after convert."""
        self._flat_weights: list[torch.Tensor | None] = []
        self._flat_weight_refs: list[Any] = []

    def _update_flat_weights(self) -> None:
        """Nothing to update (see :meth:`_init_flat_weights`)."""

    def _suffixes(self) -> list[str]:
        directions = ("", "_reverse") if self.bidirectional else ("",)
        return [f"_l{layer}{d}" for layer in range(self.num_layers) for d in directions]

    # --- per-kind pieces ---------------------------------------------------------------------
    def _state_sizes(self) -> list[int]:
        """Sizes of the state tensors: [h] for GRU and RNN, [h, c] for LSTM."""
        return [self.hidden_size]

    def _step(self, gi: torch.Tensor, state: list[torch.Tensor], suffix: str) -> list[torch.Tensor]:
        raise NotImplementedError

    def _hidden_in(self, hx: Any) -> list[torch.Tensor]:
        """The initial state as a list of tensors (the user's hx or zeros are given)."""
        return [hx]

    def _hidden_out(self, states: list[torch.Tensor]) -> Any:
        return states[0]

    # --- forward ---------------------------------------------------------------------------
    def _flatten(self, input: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
        """A padded input as packed rows ``(seq * batch, features)``, the batch size and
        whether it had a batch dimension."""
        if not isinstance(input, torch.Tensor) or input.dim() not in (2, 3):
            got = f"{input.dim()}D" if isinstance(input, torch.Tensor) else type(input).__name__
            raise ValueError(
                f"{self.float_name}: Expected input to be 2D or 3D, got {got} instead; pass "
                "(seq, batch, features), (batch, seq, features) with batch_first, or "
                "(seq, features)"
            )
        is_batched = input.dim() == 3
        if not is_batched:
            input = input.unsqueeze(0 if self.batch_first else 1)
        if self.batch_first:
            input = input.transpose(0, 1)  # (seq, batch, features)
        steps, batch, features = input.shape
        if steps == 0:
            raise ValueError(
                f"{self.float_name}: the input sequence is empty; pass one step or more"
            )
        if features != self.input_size:
            raise RuntimeError(
                f"{self.float_name}: input.size(-1) must be equal to input_size. Expected "
                f"{self.input_size}, got {features}"
            )
        return input.reshape(steps * batch, features), batch, is_batched  # (seq * batch, in)

    def _initial(
        self, hx: Any, data: torch.Tensor, batch: int, is_batched: bool
    ) -> list[torch.Tensor]:
        """The initial states, each ``(num_layers * directions, batch, size)``: zeros, or the
        user's ``hx`` checked against torch's rules."""
        layers = self.num_layers * (2 if self.bidirectional else 1)
        if hx is None:
            return [
                torch.zeros(layers, batch, size, dtype=data.dtype, device=data.device)
                for size in self._state_sizes()
            ]
        states = self._hidden_in(hx)
        want = 3 if is_batched else 2
        if any(s.dim() != want for s in states):
            raise RuntimeError(
                f"{self.float_name}: for {'batched' if want == 3 else 'unbatched'} "
                f"{want + 1}-D input the initial states must be {want}-D, got "
                f"{[s.dim() for s in states]}-D tensors"
            )
        if not is_batched:
            states = [s.unsqueeze(1) for s in states]  # (layers, 1, size)
        for index, (state, size) in enumerate(zip(states, self._state_sizes(), strict=True)):
            if tuple(state.shape) != (layers, batch, size):
                which = f"hx[{index}]" if len(states) > 1 else "hx"
                raise RuntimeError(
                    f"{self.float_name}: expected {which} of shape {[layers, batch, size]} "
                    f"(num_layers * num_directions, batch, size), got {list(state.shape)}; pass "
                    "initial states shaped like the module's outputs, or None for zeros"
                )
        return states

    def forward(self, input: Any, hx: Any = None) -> tuple[Any, Any]:  # noqa: A002  # torch's name
        """The float module's forward: same arguments, same return structure."""
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            if data.shape[-1] != self.input_size:
                raise RuntimeError(
                    f"{self.float_name}: input.size(-1) must be equal to input_size. Expected "
                    f"{self.input_size}, got {data.shape[-1]}"
                )
            sizes = [int(b) for b in batch_sizes]
            states = self._initial(hx, data, sizes[0], True)
            if hx is not None and sorted_indices is not None:
                states = [s.index_select(1, sorted_indices) for s in states]
            out, finals = self._run(data, sizes, states)
            if unsorted_indices is not None:
                finals = [s.index_select(1, unsorted_indices) for s in finals]
            packed = PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices)
            return packed, self._hidden_out(finals)
        data, batch, is_batched = self._flatten(input)
        steps = data.shape[0] // batch
        out, finals = self._run(data, [batch] * steps, self._initial(hx, data, batch, is_batched))
        output = out.reshape(steps, batch, -1)  # (seq, batch, directions * hidden)
        if self.batch_first:
            output = output.transpose(0, 1)  # (batch, seq, directions * hidden)
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            finals = [s.squeeze(1) for s in finals]
        return output, self._hidden_out(finals)

    def _run(
        self, data: torch.Tensor, sizes: list[int], states: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """All layers and directions over a packed sequence: ``data`` holds step ``t``'s
        ``sizes[t]`` rows after those of earlier steps (a padded batch has equal sizes)."""
        directions = 2 if self.bidirectional else 1
        finals: list[list[torch.Tensor]] = [[] for _ in states]
        x = data  # (rows, features)
        for layer in range(self.num_layers):
            outs = []
            for direction in range(directions):
                index = layer * directions + direction
                out, last = self._direction(
                    x,
                    f"_l{layer}{'_reverse' if direction else ''}",
                    sizes,
                    bool(direction),
                    [s[index] for s in states],
                )
                outs.append(out)
                for final, state in zip(finals, last, strict=True):
                    final.append(state)
            x = outs[0] if directions == 1 else torch.cat(outs, dim=-1)  # (rows, dirs * hidden)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        return x, [torch.stack(f) for f in finals]  # each (layers * dirs, batch, size)

    def _direction(
        self,
        x: torch.Tensor,
        suffix: str,
        sizes: list[int],
        reverse: bool,
        state: list[torch.Tensor],
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One layer in one direction: the outputs ``(rows, hidden)`` and the last states."""
        gi = getattr(self, f"ih{suffix}")(x)  # (rows, gates * hidden): the whole sequence at once
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        rows: list[torch.Tensor] = [x] * len(sizes)
        for t in range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes)):
            b = sizes[t]
            new = self._step(gi[offsets[t] : offsets[t] + b], [s[:b] for s in state], suffix)
            rows[t] = new[0]  # (b, hidden)
            # rows past b: sequences that ended (forward) or have not begun (reverse) keep theirs
            state = [
                n if b == len(s) else torch.cat([n, s[b:]]) for n, s in zip(new, state, strict=True)
            ]
        return torch.cat(rows), state


@register_qmodule(nn.LSTM)
class QLSTM(_QRNNBase, nn.LSTM):
    """nn.LSTM with quantized weight matrices (``proj_size`` included), float gate math.

    >>> import torch
    >>> from lowbit.spec import QuantSpec
    >>> lstm = torch.nn.LSTM(4, 8, num_layers=2, bidirectional=True)
    >>> spec = QuantSpec("int8", "per_channel")
    >>> q = QLSTM.from_float(lstm, spec, QuantSpec("int8", dynamic=True))
    >>> out, (h, c) = q(torch.randn(5, 3, 4))
    >>> out.shape, h.shape, c.shape
    (torch.Size([5, 3, 16]), torch.Size([4, 3, 8]), torch.Size([4, 3, 8]))
    """

    float_name = "LSTM"

    @classmethod
    def _float_args(cls, module: nn.Module) -> dict[str, Any]:
        assert isinstance(module, nn.LSTM)
        return {**super()._float_args(module), "proj_size": module.proj_size}

    def _state_sizes(self) -> list[int]:
        return [self.proj_size or self.hidden_size, self.hidden_size]

    def _hidden_in(self, hx: Any) -> list[torch.Tensor]:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError(
                f"LSTM: hx must be a tuple (h_0, c_0), got {type(hx).__name__}; pass both "
                "initial states or None"
            )
        return [hx[0], hx[1]]

    def _hidden_out(self, states: list[torch.Tensor]) -> Any:
        return states[0], states[1]

    def _step(self, gi: torch.Tensor, state: list[torch.Tensor], suffix: str) -> list[torch.Tensor]:
        hr = getattr(self, f"hr{suffix}") if self.proj_size > 0 else None
        h, c = lstm_step(gi, state[0], state[1], getattr(self, f"hh{suffix}"), hr)
        return [h, c]


@register_qmodule(nn.GRU)
class QGRU(_QRNNBase, nn.GRU):
    """nn.GRU with quantized weight matrices, float gate math.

    >>> import torch
    >>> from lowbit.spec import QuantSpec
    >>> q = QGRU.from_float(torch.nn.GRU(4, 8, batch_first=True), QuantSpec("int8"), None)
    >>> out, h = q(torch.randn(3, 5, 4))
    >>> out.shape, h.shape
    (torch.Size([3, 5, 8]), torch.Size([1, 3, 8]))
    """

    float_name = "GRU"

    def _step(self, gi: torch.Tensor, state: list[torch.Tensor], suffix: str) -> list[torch.Tensor]:
        return [gru_step(gi, state[0], getattr(self, f"hh{suffix}"))]


@register_qmodule(nn.RNN)
class QRNN(_QRNNBase, nn.RNN):
    """nn.RNN (tanh or relu) with quantized weight matrices.

    >>> import torch
    >>> from lowbit.spec import QuantSpec
    >>> q = QRNN.from_float(torch.nn.RNN(4, 8, nonlinearity="relu"), QuantSpec("int8"), None)
    >>> q(torch.randn(5, 4))[0].shape
    torch.Size([5, 8])
    """

    float_name = "RNN"
    nonlinearity: str

    @classmethod
    def _float_args(cls, module: nn.Module) -> dict[str, Any]:
        assert isinstance(module, nn.RNN)
        return {**super()._float_args(module), "nonlinearity": module.nonlinearity}

    def _step(self, gi: torch.Tensor, state: list[torch.Tensor], suffix: str) -> list[torch.Tensor]:
        return [rnn_step(gi, state[0], getattr(self, f"hh{suffix}"), self.nonlinearity)]
