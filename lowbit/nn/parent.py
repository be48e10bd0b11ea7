"""QParent: the quantized twin of a float module that holds several weight matrices.

``nn.LSTM``, ``nn.GRU`` and ``nn.MultiheadAttention`` keep their weights as several raw
parameters (``weight_ih_l0``, ``weight_hh_l0``, ..., ``in_proj_weight``) and use them inside
one functional call. Their quantized twins turn each matrix into a child
:class:`~lowbit.nn.layers.QLinear` and route the computation through those children, so
calibration, ``convert()``, kernel choice, ``save()`` and ``load()`` handle every matrix as a
quantized layer of its own (named ``lstm.ih_l0``, ``attn.q_proj``, ...). The parent holds no
quantized tensor itself; ``prepare()`` swaps it in like any quantized layer.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from lowbit.spec import QuantSpec

__all__ = ["QParent"]


class QParent(nn.Module):
    """Mixin for quantized twins made of quantized children (subclasses also inherit from
    the float class and implement :meth:`from_float`).

    >>> from lowbit.nn import QParent, qmodule_class
    >>> import torch
    >>> issubclass(qmodule_class(torch.nn.LSTM(2, 2)), QParent)
    True
    """

    kind: ClassVar[str] = ""
    notes: list[str]  # what from_float changed in the recipe's specs, for PreparedInfo.notes

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        weight: QuantSpec | None,
        input: QuantSpec | None = None,
        name: str = "",
    ) -> QParent:
        """The twin of ``module``: its weight matrices become child quantized layers with
        the given weight and input specs (sharing the float parameters until convert)."""
        raise NotImplementedError
