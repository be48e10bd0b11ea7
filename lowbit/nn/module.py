"""QModule: the mixin every quantized layer shares, and the registry from float classes to it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
from torch import nn

from lowbit.nn.quantizer import Quantizer
from lowbit.primitives import dequantize, quantize
from lowbit.spec import PerChannel, PerGroup, PerTensor, QuantSpec, SpecError

__all__ = ["QModule", "register_qmodule", "qmodule_class", "QMODULES"]

QMODULES: dict[type[nn.Module], type[QModule]] = {}
T = TypeVar("T", bound="type[QModule]")


def register_qmodule(float_cls: type[nn.Module]) -> Callable[[T], T]:
    """Register a quantized class as the replacement for ``float_cls`` (and its subclasses).

    >>> from lowbit.nn import QLinear
    >>> QMODULES[torch.nn.Linear] is QLinear
    True
    """

    def decorator(qcls: T) -> T:
        QMODULES[float_cls] = qcls
        return qcls

    return decorator


def qmodule_class(module: nn.Module) -> type[QModule] | None:
    """The quantized class for ``module`` (by its type, then its bases), or None.

    >>> qmodule_class(torch.nn.Conv2d(1, 1, 1)).__name__
    'QConv2d'
    >>> qmodule_class(torch.nn.ReLU()) is None
    True
    """
    if isinstance(module, QModule):
        return None
    for cls in type(module).__mro__:
        if cls in QMODULES:
            return QMODULES[cls]
    return None


def _check_weight_spec(name: str, weight: torch.Tensor, spec: QuantSpec) -> None:
    gran = spec.gran
    if spec.dynamic:
        raise SpecError(f"{name}: weights cannot be dynamic; set dynamic: false for the weight")
    if isinstance(gran, PerChannel) and not -weight.ndim <= gran.axis < weight.ndim:
        raise SpecError(
            f"{name}: per_channel axis={gran.axis} does not exist on its {weight.ndim}-d weight "
            f"{tuple(weight.shape)}; use axis 0 (output channels)"
        )
    if not torch.isfinite(weight).all():
        raise ValueError(
            f"{name}: the weight holds NaN or Inf values; fix or retrain the float model first"
        )


class QModule(nn.Module):
    """Mixin for quantized layers: a weight quantizer, an optional input quantizer, freeze().

    Subclasses also inherit from the float class and implement ``_float_args`` and
    ``_forward_with``.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    weight_quantizer: Quantizer | None
    input_quantizer: Quantizer | None
    frozen: bool
    qweight: torch.Tensor
    qbias: torch.Tensor
    layer_name: str = ""  # the qualified name prepare() found it under; "" when built by hand

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        weight: QuantSpec | None,
        input: QuantSpec | None = None,
        name: str = "",
    ) -> QModule:
        """Wrap a float layer, sharing its parameters, with the given weight and input specs."""
        label = name or type(module).__name__
        if weight is not None:
            _check_weight_spec(label, cast(torch.Tensor, module.weight), weight)
        if input is not None and isinstance(input.gran, PerGroup):
            raise SpecError(f"{label}: per_group is for weights only; use per_tensor for input")
        qmod = torch.nn.utils.skip_init(cls, **cls._float_args(module))
        qmod.train(module.training)
        qmod.weight = module.weight
        qmod.bias = module.bias
        qmod.weight_quantizer = Quantizer(weight) if weight is not None else None
        qmod.input_quantizer = Quantizer(input) if input is not None else None
        qmod.frozen = False
        qmod.layer_name = label
        return qmod

    @property
    def label(self) -> str:
        """The layer's qualified name in its model, or its class name when it has none."""
        return self.layer_name or type(self).__name__

    def _check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming the layer when ``x`` cannot be this layer's input."""

    @classmethod
    def _float_args(cls, module: nn.Module) -> dict[str, Any]:
        raise NotImplementedError

    def _forward_with(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        raise NotImplementedError

    # --- weights -------------------------------------------------------------------------
    def update_weight_qparams(self) -> None:
        """Observe the current float weight and fix the weight qparams from it."""
        if self.weight_quantizer is not None and not self.frozen:
            self.weight_quantizer.observe_tensor(self.weight.detach())

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the quantized layer uses it (fake-quantized float, STE gradient)."""
        wq = self.weight_quantizer
        if self.frozen:
            assert wq is not None and wq.scale is not None and wq.zero_point is not None
            return dequantize(self.qweight, wq.scale, wq.zero_point, wq.spec.gran)
        if wq is None or not wq.enabled:
            return self.weight
        if wq.scale is None:
            self.update_weight_qparams()
        return wq(self.weight)

    def effective_bias(self) -> torch.Tensor | None:
        """The bias used in forward: int32 * s_w * s_x after freezing with static input."""
        if self.frozen and getattr(self, "qbias", None) is not None:
            return self.qbias.float() * self._bias_scale()
        return self.bias

    def _bias_scale(self) -> torch.Tensor:
        wq, iq = self.weight_quantizer, self.input_quantizer
        assert wq is not None and iq is not None and wq.scale is not None
        assert iq.scale is not None
        return (wq.scale * iq.scale).reshape(-1)  # (out,) or ()

    def _int_bias_possible(self) -> bool:
        wq, iq = self.weight_quantizer, self.input_quantizer
        return (
            self.bias is not None
            and wq is not None
            and iq is not None
            and not iq.spec.dynamic
            and isinstance(iq.spec.gran, PerTensor)
            and (isinstance(wq.spec.gran, PerTensor) or wq.spec.gran == PerChannel(0))
        )

    def freeze(self) -> None:
        """Replace the float weight by integers (``qweight``) with fixed scales; bias to int32
        at scale ``s_w * s_x`` when the input is statically quantized. Idempotent."""
        wq = self.weight_quantizer
        if self.frozen or wq is None:
            return
        if self.input_quantizer is not None and self.input_quantizer.observing:
            raise RuntimeError(
                "convert() before calibration: run lowbit.calibrate(model, data) first so the "
                "input quantizers have ranges"
            )
        if wq.scale is None:
            self.update_weight_qparams()
        assert wq.scale is not None and wq.zero_point is not None
        wq.observer = None
        q = quantize(self.weight.detach(), wq.scale, wq.zero_point, wq.spec.qdtype, wq.spec.gran)
        del self.weight
        self.register_buffer("qweight", q)
        if self._int_bias_possible():
            assert self.bias is not None
            qbias = torch.round(self.bias.detach() / self._bias_scale()).to(torch.int32)
            del self.bias
            self.bias = None
            self.register_buffer("qbias", qbias)
        if self.input_quantizer is not None:
            self.input_quantizer.observer = None
        self.frozen = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return self._forward_with(x, self.quantized_weight(), self.effective_bias())
