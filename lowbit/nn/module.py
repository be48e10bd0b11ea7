"""QModule: the mixin every quantized layer shares, and the registry from float classes to it.

A QModule lives in two states. Prepared (``frozen`` False) it fake-quantizes its float weight
and input in float, with a straight-through gradient: that is what calibration, algorithms and
training see. Frozen (after :meth:`QModule.freeze`, which ``convert()`` calls, or after
``load()``) its ``weight`` is a :class:`~lowbit.nn.qtensor.QTensor` (its ``bias`` too when the
input is static) and its forward runs whichever registered kernel suits the input
(:mod:`lowbit.nn.kernels`). The module owns how its frozen form is written to and read from a
``state_dict``, so files, checkpoints and copies all go through the same two methods.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, cast

import torch
from torch import nn

from lowbit.nn.kernels import Kernel, KernelChoice, LayerView, choose_kernel
from lowbit.nn.parent import QParent
from lowbit.nn.qat_bn import bn_factor, channel_view, folded_bias, weight_view
from lowbit.nn.qat_ops import quantize_gradient
from lowbit.nn.qtensor import QTensor
from lowbit.nn.quantizer import Quantizer
from lowbit.nn.state import read_bias, read_weight, write_qtensor
from lowbit.nn.tied import WeightTies
from lowbit.spec import PerChannel, PerGroup, PerTensor, QuantSpec, SpecError

__all__ = [
    "QModule",
    "register_qmodule",
    "register_lazy_qmodule",
    "qmodule_class",
    "QMODULES",
    "QMODULE_KINDS",
    "LAZY_QMODULES",
]

QMODULES: dict[type[nn.Module], type[QModule] | type[QParent]] = {}
QMODULE_KINDS: dict[str, type[QModule]] = {}
# (module, qualified name) of a float class in a package lowbit does not import -> a function
# building its quantized class; resolved by identity on first sight (see qmodule_class)
Builder = Callable[[type[nn.Module]], "type[QModule]"]
LAZY_QMODULES: dict[tuple[str, str], Builder] = {}
T = TypeVar("T", bound="type[QModule] | type[QParent]")


def register_qmodule(float_cls: type[nn.Module]) -> Callable[[T], T]:
    """Register a quantized class as the replacement for ``float_cls`` (and its subclasses).

    >>> from lowbit.nn import QLinear
    >>> QMODULES[torch.nn.Linear] is QLinear, QMODULE_KINDS["linear"] is QLinear
    (True, True)
    """

    def decorator(qcls: T) -> T:
        QMODULES[float_cls] = qcls
        if issubclass(qcls, QModule):  # a QParent is no layer of a file: its children are
            QMODULE_KINDS[qcls.kind] = qcls
        return qcls

    return decorator


def register_lazy_qmodule(module: str, qualname: str) -> Callable[[Builder], Builder]:
    """Register a builder of the quantized class for the float class ``module.qualname`` of a
    package lowbit does not import (transformers: slow to import). The first time
    :func:`qmodule_class` meets that class, already imported by the user, it checks the class
    is the very object ``sys.modules[module].qualname``, builds its twin and registers it.

    >>> ("transformers.pytorch_utils", "Conv1D") in LAZY_QMODULES
    True
    """

    def decorator(build: Builder) -> Builder:
        LAZY_QMODULES[(module, qualname)] = build
        return build

    return decorator


def _lazy_twin(cls: type) -> type[QModule] | None:
    build = LAZY_QMODULES.get((cls.__module__, cls.__qualname__))
    if build is None:
        return None
    found: Any = sys.modules.get(cls.__module__)
    for part in cls.__qualname__.split("."):
        found = getattr(found, part, None)
    if found is not cls:  # the same names on another class: not the one registered
        return None
    qcls = build(cls)
    register_qmodule(cls)(qcls)
    return qcls


def qmodule_class(module: nn.Module) -> type[QModule] | type[QParent] | None:
    """The quantized class for ``module`` (by its type, then its bases), or None.

    >>> qmodule_class(torch.nn.Conv2d(1, 1, 1)).__name__
    'QConv2d'
    >>> qmodule_class(torch.nn.ReLU()) is None
    True
    """
    if isinstance(module, (QModule, QParent)):
        return None
    for cls in type(module).__mro__:
        if cls in QMODULES:
            return QMODULES[cls]
        qcls = _lazy_twin(cls)
        if qcls is not None:
            return qcls
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
    if weight.device.type != "meta" and not torch.isfinite(weight).all():
        raise ValueError(
            f"{name}: the weight holds NaN or Inf values; fix or retrain the float model first"
        )


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
    """Replace parameter or buffer ``name`` by a non-persistent buffer (the module writes its
    quantized tensors to the state_dict itself)."""
    module._parameters.pop(name, None)
    module._buffers.pop(name, None)
    module.__dict__.pop(name, None)
    module.register_buffer(name, value, persistent=False)


class QModule(nn.Module):
    """Mixin for quantized layers: a weight quantizer, an optional input quantizer, freeze().

    Subclasses also inherit from the float class, set ``kind`` and implement ``_float_args``
    and ``float_forward``.
    """

    kind: ClassVar[str] = ""
    # methods of the float class its computation relies on: a subclass overriding one of
    # them computes something else, and stays float (lowbit.nn.swap.unswappable_reason)
    float_methods: ClassVar[tuple[str, ...]] = ("forward",)
    weight: torch.Tensor
    bias: torch.Tensor | None
    weight_quantizer: Quantizer | None
    input_quantizer: Quantizer | None
    frozen: bool
    layer_name: str = ""  # the qualified name prepare() found it under; "" when built by hand
    kernel_preference: str | None = None  # a kernel name to use when it can; None: the best
    exact_kernels_only: bool = False  # True: skip kernels that round activations to bfloat16
    _runners: dict[tuple[torch.dtype, str], Kernel]
    generation: int  # bumped whenever the prepared kernels are dropped
    gradient_spec: QuantSpec | None = None  # quantize the gradients passed back (training)
    qat_bn: nn.modules.batchnorm._BatchNorm | None  # a batch norm trained folded (QAT)
    bn_freeze_after: int | None = None  # training steps after which qat_bn's stats freeze

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        weight: QuantSpec | None,
        input: QuantSpec | None = None,
        name: str = "",
    ) -> QModule:
        """Wrap a float layer, sharing its parameters, with the given weight and input specs
        (``gradient_spec``, set afterwards, quantizes the gradients it passes back)."""
        label = name or type(module).__name__
        if weight is not None:
            _check_weight_spec(label, cast(torch.Tensor, module.weight), weight)
        if input is not None and isinstance(input.gran, PerGroup):
            raise SpecError(f"{label}: per_group is for weights only; use per_tensor for input")
        qmod = torch.nn.utils.skip_init(cls, **cls._float_args(module), device="meta")
        qmod.train(module.training)
        qmod.weight = module.weight
        qmod.bias = getattr(module, "bias", None)  # an Embedding has none
        shape = tuple(cast(torch.Tensor, module.weight).shape)
        qmod.weight_quantizer = Quantizer(weight, shape) if weight is not None else None
        qmod.input_quantizer = Quantizer(input) if input is not None else None
        qmod.gradient_spec = None
        qmod.register_module("qat_bn", None)
        qmod.frozen = False
        qmod.layer_name = label
        qmod._runners = {}
        qmod.generation = 0
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

    @classmethod
    def float_unsupported(cls, module: nn.Module) -> str | None:
        """Why this float layer cannot get a quantized twin (a setting the twin cannot
        reproduce), or None when it can."""
        return None

    def float_forward(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """The float layer's computation with the given weight and bias."""
        raise NotImplementedError

    # --- prepared (fake-quant) state -------------------------------------------------------
    def weight_to_quantize(self) -> torch.Tensor:
        """The float weight the weight quantizer sees: the layer's own, or folded with the
        batch norm it trains with (``W * gamma / sqrt(var + eps)``, see :mod:`lowbit.nn.qat_bn`)."""
        if self.qat_bn is None:
            return self.weight
        return self.weight * weight_view(bn_factor(self.qat_bn), self.weight)

    def update_weight_qparams(self) -> None:
        """Observe the current float weight and fix the weight qparams from it."""
        if self.weight_quantizer is not None and not self.frozen:
            self.weight_quantizer.observe_tensor(self.weight_to_quantize().detach())

    def quantized_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The weight as the quantized layer uses it: fake-quantized float (STE gradient)
        while prepared, dequantized integers once frozen. ``weight`` replaces the layer's
        own float weight (a folded one); the layer's own gets its gradient quantized when
        the layer has a gradient spec."""
        if isinstance(self.weight, QTensor):
            return self.weight.dequantize()
        if weight is None:
            weight = self.weight
            if self.gradient_spec is not None:
                weight = quantize_gradient(weight, self.gradient_spec)
        wq = self.weight_quantizer
        if wq is None or not wq.enabled:
            return weight
        if wq.scale is None or wq.observing:
            self.update_weight_qparams()
        return wq(weight)

    def _conv_bn_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The prepared forward of a layer training with its batch norm folded in."""
        bn = self.qat_bn
        assert bn is not None
        wq = self.weight_quantizer
        frozen = self.bn_freeze_after is not None and wq is not None
        if frozen and wq is not None and wq.steps >= (self.bn_freeze_after or 0):
            bn.train(False)  # running statistics frozen from now on
        factor = bn_factor(bn)
        weight = self.weight
        if self.gradient_spec is not None:
            weight = quantize_gradient(weight, self.gradient_spec)
        folded = self.quantized_weight(weight * weight_view(factor, weight)).to(x.dtype)
        if not bn.training:
            return self.float_forward(x, folded, folded_bias(bn, self.bias, factor).to(x.dtype))
        y = self.float_forward(x, folded, None)
        y = y / channel_view(factor, y.ndim).to(
            y.dtype
        )  # the unfolded output, quantization noise kept
        if self.bias is not None:
            y = y + channel_view(self.bias, y.ndim).to(y.dtype)
        out: torch.Tensor = bn(y)
        return out

    def fold_qat_bn(self) -> None:
        """Fold the batch norm this layer trained with into its weight and bias (running
        statistics) and drop it; the weight quantizer keeps its qparams."""
        bn = self.qat_bn
        if bn is None:
            return
        with torch.no_grad():
            factor = bn_factor(bn)
            weight = self.weight * weight_view(factor, self.weight)
            bias = folded_bias(bn, self.bias, factor)
        self.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
        self.bias = nn.Parameter(bias.to(weight.dtype), requires_grad=self.weight.requires_grad)
        self.qat_bn = None

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

    def freeze(
        self, generator: torch.Generator | None = None, ties: WeightTies | None = None
    ) -> None:
        """Replace the float weight by a :class:`QTensor` (integers, fixed scales); the bias
        becomes int32 at scale ``s_w * s_x`` when the input is statically quantized.
        A weight spec with ``rounding: stochastic`` draws its roundings from ``generator``
        (torch's default one when None). With ``ties`` (convert() passes them), a float
        weight shared with a layer frozen before, with the same spec and qparams, becomes
        that layer's very QTensor. Idempotent.
        """
        wq = self.weight_quantizer
        if self.frozen:
            return
        if self.input_quantizer is not None and self.input_quantizer.observing:
            raise RuntimeError(
                "convert() before calibration: run lowbit.calibrate(model, data) first so the "
                "input quantizers have ranges"
            )
        self.fold_qat_bn()
        if self.input_quantizer is not None:
            self.input_quantizer.make_fixed()
        if wq is not None and wq.range == "minmax":  # follow the final weight
            wq.set_qparams(*Quantizer.range_of(self.weight.detach(), wq.spec))
        if wq is not None:
            wq.make_fixed()
        if wq is None:  # input-only: the weight stays float, the input's grid is fixed
            if self.input_quantizer is not None:
                self.input_quantizer.observer = None
            self.frozen = True
            self._reset_runners()
            return
        if wq.scale is None:
            self.update_weight_qparams()
        assert wq.scale is not None and wq.zero_point is not None
        qweight = ties.frozen_for(self, wq.spec, wq.scale, wq.zero_point) if ties else None
        if qweight is None:
            qweight = QTensor.quantize(self.weight, wq.spec, wq.scale, wq.zero_point, generator)
            if ties is not None:
                ties.remember(self, wq.spec, wq.scale, wq.zero_point, qweight)
        if self._int_bias_possible():
            iq = self.input_quantizer
            assert self.bias is not None and iq is not None and iq.scale is not None
            qbias = QTensor.bias(self.bias, qweight.scale * iq.scale)
            if qbias is not None:  # else a value does not fit int32: the bias stays float
                _set_tensor(self, "bias", qbias)
        _set_tensor(self, "weight", qweight)
        wq.clear_qparams()
        if self.input_quantizer is not None:
            self.input_quantizer.observer = None
        self.frozen = True
        self._reset_runners()

    # --- frozen state: kernels -------------------------------------------------------------
    def _reset_runners(self) -> None:
        """Drop the prepared kernels; ``generation`` tells fused graphs built on the old ones."""
        self._runners = {}
        self.generation = getattr(self, "generation", 0) + 1

    def view(self) -> LayerView:
        """Kind, specs and weight shape: what the choice of a kernel depends on."""
        wq, iq = self.weight_quantizer, self.input_quantizer
        return LayerView(
            kind=self.kind,
            label=self.label,
            weight_spec=wq.spec if wq is not None else None,
            input_spec=iq.spec if iq is not None else None,
            weight_shape=tuple(self.weight.shape),
            extra=self._view_extra(),
        )

    def _view_extra(self) -> tuple[tuple[str, str], ...]:
        """Kind-specific facts a kernel may need to decide (see :class:`LayerView`)."""
        return ()

    def kernel_choice(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> KernelChoice:
        """The kernel this frozen layer runs for inputs of ``dtype`` on ``device``, and why
        the better-ranked ones were passed over."""
        return choose_kernel(
            self.view(),
            dtype,
            torch.device(device),
            self.kernel_preference,
            self.exact_kernels_only,
        )

    def set_kernel(self, name: str | None, exact_only: bool | None = None) -> None:
        """Use kernel ``name`` where it can run this layer (``"reference"``: the simulation);
        None goes back to the best available. ``exact_only`` skips the kernels that round
        activations to bfloat16 (None leaves that setting as it is)."""
        if name is not None:  # raises for an unknown name
            choose_kernel(self.view(), torch.float32, torch.device("cpu"), prefer=name)
        self.kernel_preference = name
        if exact_only is not None:
            self.exact_kernels_only = exact_only
        self._reset_runners()

    def runner(self, x: torch.Tensor) -> Kernel:
        """The prepared kernel for ``x``'s dtype and device (chosen and prepared on first use).

        An input that needs a gradient runs the reference kernel (the integer kernels are
        inference-only), so a frozen layer stays differentiable with respect to its input.
        """
        if x.requires_grad and torch.is_grad_enabled():
            return self.kernel_for(x.dtype, x.device, grad=True)
        return self.kernel_for(x.dtype, x.device)

    def kernel_for(
        self, dtype: torch.dtype, device: torch.device | str = "cpu", grad: bool = False
    ) -> Kernel:
        """The prepared kernel for inputs of ``dtype`` on ``device`` (cached on the layer)."""
        device = torch.device(device)
        key = (dtype, "grad" if grad else device.type)
        found = self._runners.get(key)
        if found is None:
            prefer = "reference" if grad else self.kernel_preference
            choice = choose_kernel(self.view(), dtype, device, prefer, self.exact_kernels_only)
            found = choice.kernel(self)
            self._runners[key] = found
        return found

    @property
    def kernel_name(self) -> str:
        """Name of the kernel a float32 CPU input runs on (``"prepared"`` before freezing)."""
        return self.kernel_choice().name if self.frozen else "prepared"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.frozen:
            return self.runner(x)(x)
        if self.gradient_spec is not None:
            x = quantize_gradient(x, self.gradient_spec)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        if self.qat_bn is not None:
            return self._conv_bn_forward(x)
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return self.float_forward(x, self.quantized_weight().to(x.dtype), bias)

    def _apply(self, fn: Any, recurse: bool = True) -> QModule:
        self._reset_runners()  # .to(), .half(), ...: prepared kernels hold the old tensors
        super()._apply(fn, recurse)
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_runners"] = {}  # prepacked kernel data is rebuilt on first use, never copied
        return state

    # --- state_dict: the module owns its frozen form -----------------------------------------
    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in ("weight", "bias"):
            value = getattr(self, name)
            if isinstance(value, QTensor):
                destination.update(write_qtensor(value, prefix + name + "."))

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
        if prefix + "weight.qdata" in state_dict:
            try:
                self._restore_frozen(state_dict, prefix)
            except ValueError as err:
                error_msgs.append(f"{prefix or self.label}: {err}")
                return
        elif self.frozen and isinstance(self.weight, QTensor):
            missing_keys.append(prefix + "weight.qdata")
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _restore_frozen(self, state: dict[str, Any], prefix: str) -> None:
        """Become frozen from the tensors ``_save_to_state_dict`` wrote (consumed from
        ``state``); shapes and ranges are checked against this layer's own weight."""
        wq = self.weight_quantizer
        if wq is None:
            raise ValueError(
                "the file holds a quantized weight but this layer's recipe keeps "
                "its weight in float"
            )
        weight = self.weight
        qweight = read_weight(state, prefix + "weight.", wq.spec, weight.shape, weight.dtype)
        if prefix + "bias.qdata" in state:
            if self.bias is None:
                raise ValueError("the file holds a bias but this layer has none")
            bias = self.bias
            _set_tensor(self, "bias", read_bias(state, prefix + "bias.", bias.shape, bias.dtype))
        _set_tensor(
            self,
            "weight",
            qweight.to(weight.device if weight.device.type != "meta" else qweight.device),
        )
        wq.clear_qparams()
        if self.input_quantizer is not None:
            self.input_quantizer.observer = None
            self.input_quantizer.observing = False
        self.frozen = True
        self._reset_runners()
