"""Quantized LSTMCell, GRUCell and RNNCell, and the step math the sequence layers share.

A cell's ``weight_ih`` and ``weight_hh`` become child :class:`~lowbit.nn.layers.QLinear`
layers ``ih`` and ``hh`` (int8 per gate row, float biases, activations quantized dynamically at
every call, as torch.ao's dynamic cells do); the gate math stays float.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from lowbit.nn.children import (
    ChildAliases,
    drop_parameters,
    dynamic_input_spec,
    dynamic_note,
    linear_child,
)
from lowbit.nn.module import register_qmodule
from lowbit.nn.parent import QParent
from lowbit.spec import QuantSpec

__all__ = ["QLSTMCell", "QGRUCell", "QRNNCell", "lstm_step", "gru_step", "rnn_step"]


def lstm_step(
    gi: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    hh: nn.Module,
    hr: nn.Module | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step from the input projection ``gi`` (bias included, ``(batch, 4 * hidden)``):
    the new ``(h, c)``, ``h`` projected by ``hr`` when the LSTM has ``proj_size``.

    >>> hh = nn.Linear(2, 8)
    >>> h, c = lstm_step(torch.zeros(3, 8), torch.zeros(3, 2), torch.zeros(3, 2), hh, None)
    >>> h.shape, c.shape
    (torch.Size([3, 2]), torch.Size([3, 2]))
    """
    i, f, g, o = (gi + hh(h)).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return (hr(h) if hr is not None else h), c


def gru_step(gi: torch.Tensor, h: torch.Tensor, hh: nn.Module) -> torch.Tensor:
    """One GRU step: ``n = tanh(gi_n + r * (W_hn h + b_hn))`` as torch computes it.

    >>> gru_step(torch.zeros(3, 6), torch.ones(3, 2), nn.Linear(2, 6)).shape
    torch.Size([3, 2])
    """
    gh = hh(h)
    i_r, i_z, i_n = gi.chunk(3, dim=-1)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def rnn_step(gi: torch.Tensor, h: torch.Tensor, hh: nn.Module, nonlinearity: str) -> torch.Tensor:
    """One Elman RNN step, ``tanh`` or ``relu``.

    >>> rnn_step(torch.zeros(1, 2), torch.zeros(1, 2), nn.Linear(2, 2), "relu").shape
    torch.Size([1, 2])
    """
    pre = gi + hh(h)
    return torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)


class _QCellBase(ChildAliases):
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
        qmod.notes = dynamic_note(label, input)
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
        h, c = lstm_step(self.ih(x), h, c, self.hh, None)
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
        out = gru_step(self.ih(x), h, self.hh)
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
        out = rnn_step(self.ih(x), h, self.hh, self.nonlinearity)
        return out if is_batched else out.squeeze(0)
