"""The quantized twin of transformers' ``Conv1D`` (GPT-2's Linear: ``y = x @ W + b``).

Its weight is ``(in, out)``, the transpose of a Linear's, and model code expects that shape,
so the frozen weight keeps it: the recipe's ``per_channel`` (one scale per output channel,
axis 0 of a Linear weight) is axis 1 here. ``per_group`` groups consecutive values of each
stored row, here outputs of one input: a valid grid of the same size, though not the
input-wise grouping of a Linear. Per-tensor and per-channel layers run on the Linear
kernels of :mod:`lowbit.runtime.linear`, which read them through :func:`as_linear_view` and
:meth:`QHFConv1DBase.linear_weight` (the same integers seen as ``(out, in)``, no copy: the
frozen integers are kept in ``(out, in)`` memory order behind their ``(in, out)`` shape).

transformers is slow to import, so lowbit never imports it: the twin is built and registered
the first time :func:`~lowbit.nn.module.qmodule_class` meets the very class
``transformers.pytorch_utils.Conv1D`` in a model (see ``register_lazy_qmodule``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from lowbit.nn.kernels import LayerView, ReferenceKernel, register_kernel
from lowbit.nn.module import QMODULE_KINDS, QModule, register_lazy_qmodule
from lowbit.nn.qtensor import QTensor
from lowbit.spec import Granularity, PerChannel, QuantSpec

__all__ = ["QHFConv1DBase", "conv1d_twin", "as_linear_view", "KIND"]

KIND = "hf_conv1d"


def _linear_gran(gran: Granularity) -> Granularity:
    """The granularity of the transposed weight: per channel along axis 1 -> axis 0."""
    if isinstance(gran, PerChannel) and gran.axis in (1, -1):
        return PerChannel(0)
    return gran


def as_linear_view(view: LayerView) -> LayerView:
    """A Conv1D layer's view as the ``(out, in)`` Linear view the Linear kernels decide on
    (a per-group weight keeps its grouping, which those kernels refuse).

    >>> spec = QuantSpec("int8", "per_channel:1")
    >>> v = as_linear_view(LayerView(KIND, "c_attn", spec, None, (64, 192)))
    >>> v.kind, v.weight_shape, v.weight_spec.gran
    ('linear', (192, 64), PerChannel(axis=0, kind='per_channel'))
    """
    spec = view.weight_spec
    if spec is not None:
        spec = dataclasses.replace(spec, granularity=_linear_gran(spec.gran))
    shape = tuple(reversed(view.weight_shape))
    return dataclasses.replace(view, kind="linear", weight_spec=spec, weight_shape=shape)


class QHFConv1DBase(QModule):
    """What the quantized ``Conv1D`` does; :func:`conv1d_twin` mixes it with the float class.

    >>> from transformers.pytorch_utils import Conv1D
    >>> from lowbit.nn import qmodule_class
    >>> layer = Conv1D(6, 4)  # nf (out), nx (in): weight (4, 6)
    >>> q = qmodule_class(layer).from_float(layer, QuantSpec("int8", "per_channel"))
    >>> q.freeze()
    >>> q.weight.shape, q.weight.scale.shape, q.linear_weight().shape
    (torch.Size([4, 6]), torch.Size([6]), torch.Size([6, 4]))
    """

    kind = KIND
    nf: int
    nx: int

    def __init__(
        self,
        nf: int,
        nx: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Module.__init__(self)  # Conv1D's own __init__ takes no device (skip_init needs one)
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf, device=device, dtype=dtype))  # (in, out)
        self.bias = nn.Parameter(torch.empty(nf, device=device, dtype=dtype))

    __repr__ = nn.Module.__repr__  # Conv1D's own shows neither the quantizers nor the state

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}"

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        weight: QuantSpec | None,
        input: QuantSpec | None = None,
        name: str = "",
    ) -> QModule:
        """Wrap a float Conv1D; per output channel (axis 0 in the recipe) becomes axis 1."""
        if weight is not None and weight.gran == PerChannel(0):
            weight = dataclasses.replace(weight, granularity=PerChannel(1))
        return super().from_float(module, weight, input, name)

    @classmethod
    def _float_args(cls, module: nn.Module) -> dict[str, Any]:
        return {"nf": int(getattr(module, "nf")), "nx": int(getattr(module, "nx"))}  # noqa: B009

    def float_forward(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # (tokens, in)
        out = rows @ weight if bias is None else torch.addmm(bias, rows, weight)  # (tokens, out)
        return out.view(*x.shape[:-1], self.nf)

    def linear_weight(self) -> QTensor:
        """The frozen weight as the ``(out, in)`` QTensor of the equivalent Linear: the same
        integers (a view of them when stored one per byte), scales and zero points."""
        w = self.weight
        assert isinstance(w, QTensor) and w.spec is not None, f"{self.label} is not frozen"
        spec = dataclasses.replace(w.spec, granularity=_linear_gran(w.granularity))
        ints = w.int_repr().t().contiguous()  # (out, in): qdata itself for plain integers
        shape = (self.nf, self.nx)
        return QTensor(ints, w.scale, w.zero_point, w.qdtype, spec.gran, shape, w.dtype, spec=spec)

    def _out_in_order(self) -> None:
        """Keep plain integers in (out, in) memory order, so :meth:`linear_weight` is a view
        that the Linear kernels take without a copy."""
        w = self.weight
        if not isinstance(w, QTensor) or w.layout_name != "plain" or w.qdata.ndim != 2:
            return
        if not w.qdata.t().is_contiguous():
            self.weight = w.with_layout("plain", w.qdata.t().contiguous().t())  # (in, out) view

    def freeze(self, *args: Any, **kwargs: Any) -> None:
        super().freeze(*args, **kwargs)
        self._out_in_order()

    def _restore_frozen(self, state: dict[str, Any], prefix: str) -> None:
        super()._restore_frozen(state, prefix)
        self._out_in_order()

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim == 0 or x.shape[-1] != self.nx:
            raise ValueError(
                f"{self.label}: expected an input with {self.nx} features in its last "
                f"dimension, got shape {tuple(x.shape)}; feed the model inputs of the shape "
                "it was built for"
            )


@register_lazy_qmodule("transformers.pytorch_utils", "Conv1D")
def conv1d_twin(float_cls: type[nn.Module]) -> type[QModule]:
    """The quantized class for transformers' ``Conv1D`` (a subclass of it, so ``isinstance``
    checks in model code keep working).

    >>> from transformers.pytorch_utils import Conv1D
    >>> from lowbit.nn import qmodule_class
    >>> qcls = qmodule_class(Conv1D(8, 4))
    >>> issubclass(qcls, Conv1D), qcls.kind
    (True, 'hf_conv1d')
    """
    return type("QConv1D", (QHFConv1DBase, float_cls), {"__module__": __name__})


register_kernel(KIND)(ReferenceKernel)
# the kind is known to file headers (lowbit inspect, load) before any Conv1D has been seen;
# the twin built on first sight takes its place
QMODULE_KINDS.setdefault(KIND, QHFConv1DBase)
