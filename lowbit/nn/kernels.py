"""How a frozen layer runs: a registry of kernels per layer kind, and the reference kernel.

A frozen :class:`~lowbit.nn.module.QModule` does not compute anything itself: on its first call
for an input dtype and device it asks :func:`choose_kernel` for the first registered kernel, in
priority order, that can run it, prepares it once (packing the weight the way the kernel wants)
and calls it from then on. The reference kernel here always can: it is lowbit's simulation
(dequantized weight, fake-quantized input, the float op). ``lowbit.runtime`` registers the
integer kernels; new ones plug in without touching the modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeVar

import torch

from lowbit.nn.qtensor import QTensor
from lowbit.spec import QuantSpec

if TYPE_CHECKING:
    from lowbit.nn.module import QModule

__all__ = [
    "LayerView",
    "Kernel",
    "KERNELS",
    "KernelChoice",
    "ReferenceKernel",
    "register_kernel",
    "choose_kernel",
    "kernel_names",
    "as_float",
]


@dataclass(frozen=True)
class LayerView:
    """What kernel choice may depend on: the layer's kind, specs and weight shape.

    A frozen layer gives one (:meth:`QModule.view`); so does a file header, which is how
    ``lowbit inspect`` says which kernel each layer of a file would run on this machine.
    """

    kind: str
    label: str
    weight_spec: QuantSpec | None
    input_spec: QuantSpec | None
    weight_shape: tuple[int, ...]
    extra: tuple[tuple[str, str], ...] = ()  # kind-specific facts, e.g. a conv's padding mode

    def get(self, key: str, default: str = "") -> str:
        """One of the ``extra`` facts."""
        return dict(self.extra).get(key, default)


class Kernel:
    """One way to run a frozen layer; subclasses are registered with :func:`register_kernel`.

    ``unsupported`` says why the kernel cannot run a layer (None when it can); ``__init__``
    prepares it (packing, prepacking); ``__call__`` runs it on an input in the caller's dtype.
    """

    name: ClassVar[str] = "kernel"
    priority: ClassVar[int] = 0
    # True: the same integers and float32 arithmetic as the simulation (agreement limited by
    # float rounding order); False: it rounds activations to a narrower float (bfloat16)
    exact: ClassVar[bool] = True

    def __init__(self, layer: QModule) -> None:
        self.layer = layer

    @classmethod
    def unsupported(cls, view: LayerView, dtype: torch.dtype, device: torch.device) -> str | None:
        """None when this kernel runs the layer ``view`` describes on inputs of ``dtype`` on
        ``device``; otherwise the reason, in a few words."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


KERNELS: dict[str, list[type[Kernel]]] = {}
K = TypeVar("K", bound=type[Kernel])


def register_kernel(*kinds: str) -> Callable[[K], K]:
    """Register a kernel class for layer kinds (``"linear"``, ``"conv2d"``, ...).

    Candidates are tried from the highest ``priority`` down; the reference kernel has the
    lowest, so it is the fallback.

    >>> [k.name for k in KERNELS["linear"]][-1]
    'reference'
    """

    def decorator(cls: K) -> K:
        for kind in kinds:
            found = KERNELS.setdefault(kind, [])
            found[:] = [k for k in found if k.name != cls.name] + [cls]
            found.sort(key=lambda k: -k.priority)
        return cls

    return decorator


@dataclass(frozen=True)
class KernelChoice:
    """The kernel picked for a layer and, for each better-ranked one passed over, why."""

    kernel: type[Kernel]
    passed_over: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        """The chosen kernel's name."""
        return self.kernel.name


def kernel_names(kind: str) -> list[str]:
    """Names of the kernels registered for a layer kind, best first.

    >>> kernel_names("conv2d")[-1]
    'reference'
    """
    return [k.name for k in KERNELS.get(kind, [])]


def choose_kernel(
    view: LayerView,
    dtype: torch.dtype,
    device: torch.device,
    prefer: str | None = None,
    exact_only: bool = False,
) -> KernelChoice:
    """The best kernel that can run the layer ``view`` describes on ``dtype``/``device`` inputs.

    ``prefer`` names one kernel to use when it can run the layer (``"reference"`` runs the
    simulation); otherwise the registry order decides. ``exact_only`` passes over kernels
    that round activations to a narrower float than the simulation (``Kernel.exact``).

    >>> from lowbit.nn import QLinear
    >>> from lowbit.spec import QuantSpec
    >>> q = QLinear.from_float(torch.nn.Linear(4, 2), QuantSpec("int8"))
    >>> q.freeze()
    >>> choose_kernel(q.view(), torch.float32, torch.device("cpu"), prefer="reference").name
    'reference'
    """
    layer = view
    candidates = KERNELS.get(layer.kind, [])
    if prefer is not None:
        names = [k.name for k in candidates]
        if prefer not in names:
            raise ValueError(
                f"{layer.label}: no kernel named {prefer!r} for {layer.kind} layers; "
                f"available: {names}"
            )
        preferred = [k for k in candidates if k.name == prefer]
        candidates = preferred + [k for k in candidates if k.name != prefer]
    passed: list[tuple[str, str]] = []
    for cls in candidates:
        reason = cls.unsupported(view, dtype, device)
        if reason is None and exact_only and not cls.exact:
            reason = "rounds activations to bfloat16 (exact kernels only)"
        if reason is None:
            return KernelChoice(cls, tuple(passed))
        passed.append((cls.name, reason))
    raise RuntimeError(f"{layer.label}: no kernel can run a {layer.kind} layer: {passed}")


class ReferenceKernel(Kernel):
    """lowbit's simulation: fake-quantized input, dequantized weight and bias, the float op.

    Always correct and always available (any dtype, device, bit width and granularity), so
    it is the fallback for everything the integer kernels refuse; it is also what the
    integer kernels are tested against.
    """

    name = "reference"
    priority = -1000

    @classmethod
    def unsupported(cls, view: LayerView, dtype: torch.dtype, device: torch.device) -> str | None:
        return None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if layer.input_quantizer is not None:
            x = layer.input_quantizer(x)
        weight = as_float(layer.weight, x.dtype)
        assert weight is not None
        return layer.float_forward(x, weight, as_float(layer.bias, x.dtype))


def as_float(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A weight or bias as a plain float tensor of ``dtype`` (dequantized when quantized)."""
    if t is None:
        return None
    return t.dequantize(dtype) if isinstance(t, QTensor) else t.to(dtype)


register_kernel("linear", "conv1d", "conv2d")(ReferenceKernel)
