"""Quantized LSTM, GRU and RNN (and their cells), as torch.ao's dynamic quantization defines them.

Every weight matrix becomes a child :class:`~lowbit.nn.layers.QLinear` (``ih_l0``,
``hh_l0``, ``hr_l0`` for an LSTM's projection, ``ih_l0_reverse``, ...; ``ih`` and ``hh`` for
a cell) holding int8 (or narrower) weights per gate row, with the float bias; the gate math
stays float. Per layer and direction the whole input sequence goes through ``ih`` as one
GEMM (its input quantized once, over the whole sequence), then each step sends the hidden
state through ``hh`` (quantized again at every step). Prepared and frozen modules run the
same children in the same order, so the simulation and the integer kernels agree.

Activations of a recurrent layer are always quantized dynamically: a hidden state has no
fixed range to calibrate. A recipe with a static input spec (``w8a8``) therefore gets its
dynamic twin here (same dtype and symmetry, one scale per tensor, computed at every call);
a weight-only recipe (``w8a16``, ``w4a16``) keeps the activations float.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from lowbit.nn.layers import QLinear
from lowbit.nn.module import register_qmodule
from lowbit.nn.parent import QParent
from lowbit.spec import PerTensor, PerToken, QuantSpec

__all__ = [
    "QLSTM",
    "QGRU",
    "QRNN",
    "QLSTMCell",
    "QGRUCell",
    "QRNNCell",
    "dynamic_input_spec",
    "linear_child",
    "drop_parameters",
]

_ALIAS = re.compile(r"(weight|bias)_(\w+)")
Step = Callable[[torch.Tensor, list[torch.Tensor], str], list[torch.Tensor]]


def _dynamic_note(label: str, spec: QuantSpec | None) -> list[str]:
    if spec is None or spec.dynamic:
        return []
    return [
        f"{label}: activations quantized dynamically ({spec.qdtype}, one scale per tensor at "
        "every call) instead of the recipe's static spec: a recurrent hidden state has no "
        "fixed range to calibrate"
    ]


def dynamic_input_spec(spec: QuantSpec | None) -> QuantSpec | None:
    """The input spec a recurrent layer uses: ``spec`` when dynamic or None; a static spec
    becomes dynamic (same dtype and symmetry, per tensor unless it was per token).

    >>> dynamic_input_spec(QuantSpec("int8", symmetric=False)).dynamic
    True
    >>> dynamic_input_spec(None) is None
    True
    """
    if spec is None or spec.dynamic:
        return spec
    gran = spec.gran if isinstance(spec.gran, PerToken) else PerTensor()
    return dataclasses.replace(
        spec, dynamic=True, granularity=gran, observer="minmax", observer_args=()
    )


def linear_child(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    wspec: QuantSpec | None,
    ispec: QuantSpec | None,
    name: str,
) -> QLinear:
    """A QLinear named ``name`` sharing ``weight`` and ``bias`` (float parameters of the
    float module) until it is frozen.

    >>> w = nn.Parameter(torch.randn(6, 4))
    >>> q = linear_child(w, None, QuantSpec("int8", "per_channel"), None, "lstm.ih_l0")
    >>> q.weight is w, q.label
    (True, 'lstm.ih_l0')
    """
    out_features, in_features = weight.shape
    lin = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    lin.weight = weight  # the float module's Parameter
    lin.bias = bias  # type: ignore[assignment]
    qlin = QLinear.from_float(lin, wspec, ispec, name)
    assert isinstance(qlin, QLinear)
    return qlin


class _Aliases(QParent):
    """Reads of the float parameter names (``weight_ih_l0``, ``bias_hh``) answer with the
    child's tensor (``ih_l0.weight``, ``hh.bias``): a float Parameter while prepared, a
    :class:`~lowbit.nn.qtensor.QTensor` once frozen. A float ``state_dict`` loads into the
    prepared twin: its keys are renamed onto the children."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            match = _ALIAS.fullmatch(name)
            children = self.__dict__.get("_modules", {})
            if match is None or match.group(2) not in children:
                raise
            return getattr(children[match.group(2)], match.group(1))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            match = _ALIAS.fullmatch(key[len(prefix) :])
            if match is not None and match.group(2) in self._modules:
                state_dict[f"{prefix}{match.group(2)}.{match.group(1)}"] = state_dict.pop(key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def drop_parameters(module: nn.Module) -> None:
    """Remove the float module's own parameters (its twin's children hold them now).

    >>> cell = nn.GRUCell(2, 3)
    >>> drop_parameters(cell)
    >>> list(cell.parameters())
    []
    """
    for name in list(module._parameters):
        del module._parameters[name]


def _lstm_cell(
    gi: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    hh: nn.Module,
    hr: nn.Module | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step from the precomputed input projection ``gi`` (with its bias)."""
    i, f, g, o = (gi + hh(h)).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return (hr(h) if hr is not None else h), c


def _gru_cell(gi: torch.Tensor, h: torch.Tensor, hh: nn.Module) -> torch.Tensor:
    """One GRU step: ``n = tanh(gi_n + r * (W_hn h + b_hn))`` as torch computes it."""
    gh = hh(h)
    i_r, i_z, i_n = gi.chunk(3, dim=-1)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def _rnn_cell(gi: torch.Tensor, h: torch.Tensor, hh: nn.Module, nonlinearity: str) -> torch.Tensor:
    pre = gi + hh(h)
    return torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)


# --- whole sequences -----------------------------------------------------------------------
class _QRNNBase(_Aliases):
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
        qmod.notes = _dynamic_note(label, input)
        for suffix in qmod._suffixes():
            bias_ih = getattr(module, f"bias_ih{suffix}") if module.bias else None
            bias_hh = getattr(module, f"bias_hh{suffix}") if module.bias else None
            w_ih, w_hh = (
                getattr(module, f"weight_ih{suffix}"),
                getattr(module, f"weight_hh{suffix}"),
            )
            qmod.add_module(
                f"ih{suffix}", linear_child(w_ih, bias_ih, weight, ispec, f"{label}.ih{suffix}")
            )
            qmod.add_module(
                f"hh{suffix}", linear_child(w_hh, bias_hh, weight, ispec, f"{label}.hh{suffix}")
            )
            if module.proj_size > 0:
                w_hr = getattr(module, f"weight_hr{suffix}")
                qmod.add_module(
                    f"hr{suffix}", linear_child(w_hr, None, weight, ispec, f"{label}.hr{suffix}")
                )
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
    def _check_state(self, states: list[torch.Tensor], batch: int) -> None:
        layers = self.num_layers * (2 if self.bidirectional else 1)
        for index, (state, size) in enumerate(zip(states, self._state_sizes(), strict=True)):
            expected = (layers, batch, size)
            if tuple(state.shape) != expected:
                which = f"hx[{index}]" if len(states) > 1 else "hx"
                raise RuntimeError(
                    f"{self.float_name}: expected {which} of shape {list(expected)} (num_layers * "
                    f"num_directions, batch, size), got {list(state.shape)}; pass initial "
                    "states shaped like the module's outputs, or None for zeros"
                )

    def forward(self, input: Any, hx: Any = None) -> tuple[Any, Any]:  # noqa: A002  # torch's name
        """The float module's forward: same arguments, same return structure."""
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            sizes = [int(b) for b in batch_sizes]
            batch, is_batched = sizes[0], True
        else:
            if not isinstance(input, torch.Tensor) or input.dim() not in (2, 3):
                got = f"{input.dim()}D" if isinstance(input, torch.Tensor) else type(input).__name__
                raise ValueError(
                    f"{self.float_name}: Expected input to be 2D or 3D, got {got} instead; pass "
                    "(seq, batch, features), (batch, seq, features) with batch_first, or "
                    "(seq, features)"
                )
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            if self.batch_first:
                input = input.transpose(0, 1)
            steps, batch = input.shape[0], input.shape[1]
            if steps == 0:
                raise ValueError(
                    f"{self.float_name}: the input sequence is empty; pass at least one step"
                )
            data = input.reshape(steps * batch, input.shape[2])
            sizes = [batch] * steps
            sorted_indices = unsorted_indices = None
        if data.shape[-1] != self.input_size:
            raise RuntimeError(
                f"{self.float_name}: input.size(-1) must be equal to input_size. Expected "
                f"{self.input_size}, got {data.shape[-1]}"
            )
        layers = self.num_layers * (2 if self.bidirectional else 1)
        if hx is None:
            states = [
                torch.zeros(layers, batch, size, dtype=data.dtype, device=data.device)
                for size in self._state_sizes()
            ]
        else:
            states = self._hidden_in(hx)
            want = 3 if is_batched else 2
            if any(s.dim() != want for s in states):
                raise RuntimeError(
                    f"{self.float_name}: for {'batched' if want == 3 else 'unbatched'} "
                    f"{want + 1}-D input the initial states must be {want}-D, got "
                    f"{[s.dim() for s in states]}-D tensors"
                )
            if not is_batched:
                states = [s.unsqueeze(1) for s in states]
            self._check_state(states, batch)
            if sorted_indices is not None:
                states = [s.index_select(1, sorted_indices) for s in states]
        out, finals = self._run(data, sizes, states)
        if packed:
            if unsorted_indices is not None:
                finals = [s.index_select(1, unsorted_indices) for s in finals]
            return PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices), (
                self._hidden_out(finals)
            )
        output = out.reshape(len(sizes), batch, -1)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            finals = [s.squeeze(1) for s in finals]
        return output, self._hidden_out(finals)

    def _run(
        self, data: torch.Tensor, sizes: list[int], states: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """All layers and directions over a packed sequence (``data`` holds step ``t``'s
        ``sizes[t]`` rows after those of earlier steps; a padded batch has equal sizes)."""
        directions = 2 if self.bidirectional else 1
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        finals: list[list[torch.Tensor]] = [[] for _ in states]
        x = data
        for layer in range(self.num_layers):
            outs = []
            for direction in range(directions):
                suffix = f"_l{layer}{'_reverse' if direction else ''}"
                gi = getattr(self, f"ih{suffix}")(x)  # the whole sequence, one GEMM
                current = [s[layer * directions + direction] for s in states]  # (batch, size)
                rows: list[torch.Tensor] = [x] * len(sizes)
                order = range(len(sizes) - 1, -1, -1) if direction else range(len(sizes))
                for t in order:
                    b = sizes[t]
                    new = self._step(
                        gi[offsets[t] : offsets[t] + b], [s[:b] for s in current], suffix
                    )
                    rows[t] = new[0]
                    # rows past b: sequences that ended (forward) or not begun (reverse) keep theirs
                    current = [
                        n if b == len(s) else torch.cat([n, s[b:]])
                        for n, s in zip(new, current, strict=True)
                    ]
                outs.append(torch.cat(rows))
                for final, state in zip(finals, current, strict=True):
                    final.append(state)
            x = outs[0] if directions == 1 else torch.cat(outs, dim=-1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        return x, [torch.stack(f) for f in finals]


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
        h, c = _lstm_cell(gi, state[0], state[1], getattr(self, f"hh{suffix}"), hr)
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
        return [_gru_cell(gi, state[0], getattr(self, f"hh{suffix}"))]


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
        return [_rnn_cell(gi, state[0], getattr(self, f"hh{suffix}"), self.nonlinearity)]


# --- cells ---------------------------------------------------------------------------------
class _QCellBase(_Aliases):
    """What the quantized cells share: children ``ih`` and ``hh``, input checks."""

    float_name: ClassVar[str] = ""
    input_size: int
    hidden_size: int
    bias: bool

    @classmethod
    def _float_args(cls, module: nn.Module) -> dict[str, Any]:
        assert isinstance(module, nn.RNNCellBase)
        return {
            "input_size": module.input_size,
            "hidden_size": module.hidden_size,
            "bias": module.bias,
        }

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        weight: QuantSpec | None,
        input: QuantSpec | None = None,
        name: str = "",
    ) -> QParent:
        assert isinstance(module, nn.RNNCellBase)
        label = name or type(module).__name__
        qmod = cls(**cls._float_args(module), device="meta")
        drop_parameters(qmod)
        ispec = dynamic_input_spec(input)
        qmod.notes = _dynamic_note(label, input)
        bias_ih = module.bias_ih if module.bias else None
        bias_hh = module.bias_hh if module.bias else None
        qmod.add_module("ih", linear_child(module.weight_ih, bias_ih, weight, ispec, f"{label}.ih"))
        qmod.add_module("hh", linear_child(module.weight_hh, bias_hh, weight, ispec, f"{label}.hh"))
        qmod.train(module.training)
        return qmod

    def _batched(
        self, input: torch.Tensor, hx: list[torch.Tensor] | None, states: int
    ) -> tuple[torch.Tensor, list[torch.Tensor], bool]:
        """``input`` (batch, features) and the states (batch, hidden), zeros when not given;
        and whether the input had a batch dimension."""
        if not isinstance(input, torch.Tensor) or input.dim() not in (1, 2):
            got = f"{input.dim()}D" if isinstance(input, torch.Tensor) else type(input).__name__
            raise ValueError(
                f"{self.float_name}: Expected input to be 1D or 2D, got {got} instead; pass "
                "(batch, features) or (features,)"
            )
        for index, value in enumerate(hx or []):
            if value.dim() not in (1, 2):
                raise ValueError(
                    f"{self.float_name}: Expected hx[{index}] to be 1D or 2D, got "
                    f"{value.dim()}D instead"
                )
        if input.shape[-1] != self.input_size:
            raise RuntimeError(
                f"{self.float_name}: input has inconsistent input_size: got {input.shape[-1]} "
                f"expected {self.input_size}"
            )
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(
                input.shape[0], self.hidden_size, dtype=input.dtype, device=input.device
            )
            return input, [zeros] * states, is_batched
        states_in = hx if is_batched else [h.unsqueeze(0) for h in hx]
        for value in states_in:
            if tuple(value.shape) != (input.shape[0], self.hidden_size):
                raise RuntimeError(
                    f"{self.float_name}: hidden state of shape {list(value.shape)} does not match "
                    f"(batch={input.shape[0]}, hidden_size={self.hidden_size})"
                )
        return input, states_in, is_batched


@register_qmodule(nn.LSTMCell)
class QLSTMCell(_QCellBase, nn.LSTMCell):
    """nn.LSTMCell with quantized ``weight_ih`` / ``weight_hh``.

    >>> import torch
    >>> from lowbit.spec import QuantSpec
    >>> q = QLSTMCell.from_float(torch.nn.LSTMCell(4, 8), QuantSpec("int8"), None)
    >>> h, c = q(torch.randn(3, 4))
    >>> h.shape, c.shape
    (torch.Size([3, 8]), torch.Size([3, 8]))
    """

    float_name = "LSTMCell"

    def forward(
        self,
        input: torch.Tensor,
        hx: tuple[torch.Tensor, torch.Tensor] | None = None,  # noqa: A002
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The float cell's forward: ``(h_1, c_1)``."""
        x, (h, c), is_batched = self._batched(input, list(hx) if hx is not None else None, 2)
        h, c = _lstm_cell(self.ih(x), h, c, self.hh, None)
        return (h, c) if is_batched else (h.squeeze(0), c.squeeze(0))


@register_qmodule(nn.GRUCell)
class QGRUCell(_QCellBase, nn.GRUCell):
    """nn.GRUCell with quantized ``weight_ih`` / ``weight_hh``.

    >>> import torch
    >>> from lowbit.spec import QuantSpec
    >>> q = QGRUCell.from_float(torch.nn.GRUCell(4, 8), QuantSpec("int8"), None)
    >>> q(torch.randn(4)).shape
    torch.Size([8])
    """

    float_name = "GRUCell"

    def forward(self, input: torch.Tensor, hx: torch.Tensor | None = None) -> torch.Tensor:  # noqa: A002
        """The float cell's forward: ``h_1``."""
        x, (h,), is_batched = self._batched(input, [hx] if hx is not None else None, 1)
        out = _gru_cell(self.ih(x), h, self.hh)
        return out if is_batched else out.squeeze(0)


@register_qmodule(nn.RNNCell)
class QRNNCell(_QCellBase, nn.RNNCell):
    """nn.RNNCell (tanh or relu) with quantized ``weight_ih`` / ``weight_hh``.

    >>> import torch
    >>> from lowbit.spec import QuantSpec
    >>> q = QRNNCell.from_float(torch.nn.RNNCell(4, 8), QuantSpec("int8"), None)
    >>> q(torch.randn(2, 4)).shape
    torch.Size([2, 8])
    """

    float_name = "RNNCell"
    nonlinearity: str

    @classmethod
    def _float_args(cls, module: nn.Module) -> dict[str, Any]:
        assert isinstance(module, nn.RNNCell)
        return {**super()._float_args(module), "nonlinearity": module.nonlinearity}

    def forward(self, input: torch.Tensor, hx: torch.Tensor | None = None) -> torch.Tensor:  # noqa: A002
        """The float cell's forward: ``h_1``."""
        x, (h,), is_batched = self._batched(input, [hx] if hx is not None else None, 1)
        out = _rnn_cell(self.ih(x), h, self.hh, self.nonlinearity)
        return out if is_batched else out.squeeze(0)
