"""What the quantized twins made of child layers share (LSTM, GRU, RNN, attention).

A twin (:class:`~lowbit.nn.parent.QParent`) turns each weight matrix of its float module into a
child :class:`~lowbit.nn.layers.QLinear` sharing the float parameter until convert
(:func:`linear_child`), drops the float module's own parameters (:func:`drop_parameters`) and,
for recurrent layers, quantizes activations dynamically (:func:`dynamic_input_spec`).
:class:`ChildAliases` keeps the float names readable (``lstm.weight_ih_l0``) and lets a float
``state_dict`` load into the prepared twin.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from torch import nn

from lowbit.nn.layers import QLinear
from lowbit.nn.parent import QParent
from lowbit.spec import PerTensor, PerToken, QuantSpec

__all__ = ["ChildAliases", "dynamic_input_spec", "dynamic_note", "linear_child", "drop_parameters"]

_ALIAS = re.compile(r"(weight|bias)_(\w+)")  # weight_ih_l0 -> child ih_l0, its weight


def dynamic_note(label: str, spec: QuantSpec | None) -> list[str]:
    """The note prepare() records when a recurrent layer makes a static input spec dynamic.

    >>> dynamic_note("lstm", QuantSpec("int8"))[0][:45]
    'lstm: activations quantized dynamically (int8'
    >>> dynamic_note("lstm", None)
    []
    """
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


def drop_parameters(module: nn.Module) -> None:
    """Remove the float module's own parameters (its twin's children hold them now).

    >>> cell = nn.GRUCell(2, 3)
    >>> drop_parameters(cell)
    >>> list(cell.parameters())
    []
    """
    for name in list(module._parameters):
        del module._parameters[name]


class ChildAliases(QParent):
    """Reads of the float parameter names (``weight_ih_l0``, ``bias_hh``) answer with the
    child's tensor (``ih_l0.weight``, ``hh.bias``): a float Parameter while prepared, a
    :class:`~lowbit.nn.qtensor.QTensor` once frozen. A float ``state_dict`` loads into the
    prepared twin: its keys are renamed onto the children.

    >>> from lowbit.nn import QGRUCell
    >>> q = QGRUCell.from_float(nn.GRUCell(2, 3), QuantSpec("int8"), None)
    >>> q.weight_ih is q.ih.weight, q.bias_hh is q.hh.bias
    (True, True)
    """

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
