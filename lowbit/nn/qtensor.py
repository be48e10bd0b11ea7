"""QTensor: a frozen quantized tensor that still looks like the float tensor it replaced.

A converted layer's ``weight`` (and its int32 ``bias``) is a :class:`QTensor`: integer data,
scale, zero point and the grid they live on, in one object that ``convert()`` and ``load()``
both produce. It reports the float tensor's shape, dtype and device, so model code that reads
``layer.weight.dtype`` or ``layer.weight.shape`` keeps working; any torch op applied to it sees
the dequantized float tensor (computed on the fly, never stored). Kernels read ``qdata``,
``scale`` and ``zero_point`` directly.

The integer data lives in a *layout*: ``plain`` (one integer per element, the logical shape),
``packed`` (sub-byte values packed into a flat uint8 tensor, :func:`~lowbit.primitives.pack_bits`)
or a kernel's own layout registered by ``lowbit.runtime`` (for example the CPU int4 matmul's).
Every layout converts back to ``plain`` exactly, which is what files store.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.utils._pytree import tree_map_only

from lowbit.primitives import (
    dequantize,
    pack_bits,
    qparam_shape,
    quantize,
    storage_dtype,
    unpack_bits,
)
from lowbit.spec import Granularity, PerChannel, PerTensor, QDtype, QuantSpec

__all__ = [
    "QTensor",
    "Layout",
    "LAYOUTS",
    "register_layout",
    "compact_zero_point",
    "INT32",
]

INT32 = "int32"  # the grid of a quantized bias: int32 at scale s_w * s_x, zero point 0


@dataclass(frozen=True)
class Layout:
    """How a layout turns its stored integers back into plain ones (logical shape).

    ``unpack(qdata, qdtype, shape)`` returns the integers in the storage dtype of ``qdtype``.
    """

    name: str
    unpack: Callable[[torch.Tensor, QDtype | None, tuple[int, ...]], torch.Tensor]


LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout) -> Layout:
    """Make ``layout`` known to every QTensor (kernels register the layouts they pack into).

    >>> "packed" in LAYOUTS and "plain" in LAYOUTS
    True
    """
    LAYOUTS[layout.name] = layout
    return layout


def _plain(qdata: torch.Tensor, qdtype: QDtype | None, shape: tuple[int, ...]) -> torch.Tensor:
    return qdata.reshape(shape)


def _packed(qdata: torch.Tensor, qdtype: QDtype | None, shape: tuple[int, ...]) -> torch.Tensor:
    assert qdtype is not None, "an int32 bias is never packed"
    return unpack_bits(qdata, qdtype, math.prod(shape)).reshape(shape)


register_layout(Layout("plain", _plain))
register_layout(Layout("packed", _packed))


def _storage_for(qdtype: QDtype | None) -> str:
    """The layout a freshly quantized tensor is kept in: packed below 8 bits, plain otherwise."""
    return "packed" if qdtype is not None and qdtype.storage_bits < 8 else "plain"


def compact_zero_point(zero: torch.Tensor, qdtype: QDtype | None) -> torch.Tensor:
    """Zero points in the grid's own storage dtype (one byte each for up to 8 bits), which
    they always fit; per-group int4 weights then carry 1 byte of zero point per group, not 4."""
    if qdtype is None:
        return zero
    if zero.numel() and (int(zero.min()) < qdtype.qmin or int(zero.max()) > qdtype.qmax):
        return zero.to(torch.int32)
    return zero.to(storage_dtype(qdtype))


class QTensor(torch.Tensor):
    """Integer data + scale + zero point + grid, shaped and typed like the float tensor.

    >>> w = torch.randn(4, 8)
    >>> qt = QTensor.quantize(w, QuantSpec("int4", "per_channel"))
    >>> qt.shape, qt.dtype, qt.layout_name, qt.qdata.numel()  # two int4 values per byte
    (torch.Size([4, 8]), torch.float32, 'packed', 16)
    >>> (qt + 0).sub(w).abs().max().item() < 0.5  # ops see the dequantized tensor
    True
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    qdtype: QDtype | None
    granularity: Granularity
    layout_name: str
    spec: QuantSpec | None
    __torch_function__: ClassVar[Any] = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(
        cls,
        qdata: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        qdtype: QDtype | None,
        granularity: Granularity,
        shape: tuple[int, ...] | torch.Size,
        dtype: torch.dtype,
        layout_name: str = "plain",
        spec: QuantSpec | None = None,
    ) -> QTensor:
        out: QTensor = torch.Tensor._make_wrapper_subclass(
            cls, tuple(shape), dtype=dtype, device=qdata.device, requires_grad=False
        )
        return out

    def __init__(
        self,
        qdata: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        qdtype: QDtype | None,
        granularity: Granularity,
        shape: tuple[int, ...] | torch.Size,
        dtype: torch.dtype,
        layout_name: str = "plain",
        spec: QuantSpec | None = None,
    ) -> None:
        if layout_name not in LAYOUTS:
            raise ValueError(f"QTensor: unknown layout {layout_name!r}; known: {sorted(LAYOUTS)}")
        self.qdata = qdata
        self.scale = scale
        self.zero_point = zero_point
        self.qdtype = qdtype
        self.granularity = granularity
        self.layout_name = layout_name
        self.spec = spec

    # --- construction --------------------------------------------------------------------
    @classmethod
    def quantize(
        cls,
        x: torch.Tensor,
        spec: QuantSpec,
        scale: torch.Tensor | None = None,
        zero_point: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> QTensor:
        """Quantize ``x`` with ``spec`` (qparams from its min/max unless given), rounding as
        ``spec.rounding`` says (stochastic rounding draws from ``generator``).

        >>> qt = QTensor.quantize(torch.tensor([[-1.0, 0.5]]), QuantSpec("int8"))
        >>> qt.int_repr().tolist(), round(qt.scale.item() * 127, 6)
        ([[-127, 64]], 1.0)
        """
        from lowbit.primitives import choose_qparams, minmax

        x = x.detach()
        if scale is None or zero_point is None:
            lo, hi = minmax(x.float(), spec.gran)
            scale, zero_point = choose_qparams(lo, hi, spec.qdtype, spec.symmetric)
        scale = scale.detach().float().reshape(qparam_shape(x.shape, spec.gran))
        zero_point = zero_point.detach().to(torch.int32).reshape(scale.shape)
        q = quantize(x.float(), scale, zero_point, spec.qdtype, spec.gran, spec.rounding, generator)
        return cls.from_int(q, scale, zero_point, spec.qdtype, spec.gran, x.dtype, spec=spec)

    @classmethod
    def from_int(
        cls,
        q: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        qdtype: QDtype | None,
        granularity: Granularity,
        dtype: torch.dtype,
        spec: QuantSpec | None = None,
    ) -> QTensor:
        """Wrap plain integers ``q`` (logical shape), packing them when they are sub-byte.

        >>> q = torch.tensor([[1, -2]], dtype=torch.int8)
        >>> qt = QTensor.from_int(q, torch.tensor(0.5), torch.tensor(0), QDtype(4), PerTensor(),
        ...                       torch.float32)
        >>> qt.dequantize().tolist()
        [[0.5, -1.0]]
        """
        layout = _storage_for(qdtype)
        data = pack_bits(q, qdtype) if layout == "packed" and qdtype is not None else q
        zero_point = compact_zero_point(zero_point, qdtype)
        return cls(data, scale, zero_point, qdtype, granularity, q.shape, dtype, layout, spec)

    @classmethod
    def bias(cls, bias: torch.Tensor, scale: torch.Tensor) -> QTensor | None:
        """An int32 bias at ``scale`` (``s_w * s_x``, per output channel or one value), or
        None when a value does not fit int32 at its scale (a pruned or BN-zeroed channel has
        a tiny weight scale): such a bias stays float.

        >>> qb = QTensor.bias(torch.tensor([0.3, -1.0]), torch.tensor([0.1, 0.1]))
        >>> qb.qdata.tolist(), qb.dequantize().tolist()
        ([3, -10], [0.30000001192092896, -1.0])
        >>> QTensor.bias(torch.tensor([8.0]), torch.tensor([3e-9])) is None
        True
        """
        scale = scale.detach().float().reshape(-1)
        if scale.numel() == 1:
            scale = scale.reshape(())
        gran: Granularity = PerTensor() if scale.ndim == 0 else PerChannel(0)
        q = torch.round(bias.detach().double() / scale.double())  # float64: exact int32 range
        if q.numel() and float(q.abs().max()) > 2**31 - 1:
            return None
        zero = torch.zeros(scale.shape, dtype=torch.int32)
        return cls(q.to(torch.int32), scale, zero, None, gran, bias.shape, bias.dtype, "plain")

    # --- reading -------------------------------------------------------------------------
    def int_repr(self) -> torch.Tensor:
        """The integers in the logical shape (int8/uint8/int16/int32), whatever the layout.

        >>> QTensor.quantize(torch.tensor([[2.0, -2.0]]), QuantSpec("int2")).int_repr().tolist()
        [[1, -1]]
        """
        return LAYOUTS[self.layout_name].unpack(self.qdata, self.qdtype, tuple(self.shape))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float tensor: ``(q - zero_point) * scale`` in ``dtype`` (default: its own).

        >>> qt = QTensor.quantize(torch.tensor([[1.0, -1.0]]), QuantSpec("int8"))
        >>> qt.dequantize(torch.bfloat16).dtype
        torch.bfloat16
        """
        q = self.int_repr()
        if self.qdtype is None:  # int32 bias: zero point 0 by construction
            out = q.double() * self.scale.double().reshape(-1 if self.scale.ndim else ())
            return out.to(dtype or self.dtype)
        return dequantize(q, self.scale, self.zero_point, self.granularity).to(dtype or self.dtype)

    @property
    def symmetric_zero(self) -> bool:
        """Whether every zero point is 0 (the grid is symmetric around zero)."""
        return not bool(self.zero_point.any())

    def storage_nbytes(self) -> int:
        """Bytes held in memory: integer data, scales and zero points.

        >>> QTensor.quantize(torch.randn(64, 64), QuantSpec("int4", "per_channel")).storage_nbytes()
        2368
        """
        return sum(t.numel() * t.element_size() for t in (self.qdata, self.scale, self.zero_point))

    def with_layout(self, layout_name: str, qdata: torch.Tensor) -> QTensor:
        """The same tensor with its integers stored in another layout (same values)."""
        return QTensor(
            qdata,
            self.scale,
            self.zero_point,
            self.qdtype,
            self.granularity,
            self.shape,
            self.dtype,
            layout_name,
            self.spec,
        )

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        grid = str(self.qdtype) if self.qdtype is not None else INT32
        return (
            f"QTensor({grid}, {self.granularity.kind}, shape={tuple(self.shape)}, "
            f"dtype={self.dtype}, layout={self.layout_name})"
        )

    # --- torch integration ---------------------------------------------------------------
    def __tensor_flatten__(self) -> tuple[list[str], tuple[Any, ...]]:
        meta = (self.qdtype, self.granularity, self.shape, self.dtype, self.layout_name, self.spec)
        return ["qdata", "scale", "zero_point"], meta

    @staticmethod
    def __tensor_unflatten__(
        inner: dict[str, torch.Tensor], meta: tuple[Any, ...], outer_size: Any, outer_stride: Any
    ) -> QTensor:
        qdtype, gran, shape, dtype, layout, spec = meta
        return QTensor(
            inner["qdata"],
            inner["scale"],
            inner["zero_point"],
            qdtype,
            gran,
            shape,
            dtype,
            layout,
            spec,
        )

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype) -> QTensor:
        return QTensor(
            fn(self.qdata),
            fn(self.scale),
            fn(self.zero_point),
            self.qdtype,
            self.granularity,
            self.shape,
            dtype,
            self.layout_name,
            self.spec,
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> QTensor:
        if id(self) in memo:
            return memo[id(self)]
        out = self._map(lambda t: t.clone(), self.dtype)
        memo[id(self)] = out
        return out

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]  # torch's stub is a plain function
        cls,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        if _writes_into_qtensor(func, args, kwargs):
            raise RuntimeError(
                f"cannot write into a frozen quantized weight ({func}): it holds integers; "
                "load a .lowbit file with lowbit.load, or quantize the float model again"
            )
        plain_args, plain_kwargs = tree_map_only(QTensor, lambda t: t.dequantize(), (args, kwargs))
        return func(*plain_args, **plain_kwargs)


def _writes_into_qtensor(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether ``func`` mutates one of its QTensor arguments (``copy_``, ``mul_``,
    ``zero_``, ``nn.init.*``...): done on a dequantized copy it would silently do nothing."""
    schema = getattr(func, "_schema", None)
    if schema is None or not schema.is_mutable:
        return False
    for i, argument in enumerate(schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(argument.name)
        alias = argument.alias_info
        if isinstance(value, QTensor) and alias is not None and alias.is_write:
            return True
    return False


def _detach(t: QTensor) -> QTensor:
    return t._map(lambda x: x, t.dtype)


def _clone(t: QTensor, memory_format: Any = None) -> QTensor:
    return t._map(lambda x: x.clone(), t.dtype)


def _to_copy(
    t: QTensor,
    dtype: torch.dtype | None = None,
    layout: Any = None,
    device: torch.device | None = None,
    pin_memory: bool | None = None,
    non_blocking: bool = False,
    memory_format: Any = None,
) -> QTensor:
    """``.to(dtype)`` changes the dtype the tensor reads as; ``.to(device)`` moves the data."""
    if dtype is not None and not (dtype.is_floating_point or dtype == t.dtype):
        raise TypeError(
            f"a quantized weight reads as a float tensor; it cannot become {dtype}: use "
            "weight.int_repr() for its integers"
        )
    if device is None:
        return t._map(lambda x: x, dtype or t.dtype)
    return t._map(lambda x: x.to(device, non_blocking=non_blocking), dtype or t.dtype)


_HANDLERS: dict[Any, Callable[..., Any]] = {
    torch.ops.aten.detach.default: _detach,
    torch.ops.aten.clone.default: _clone,
    torch.ops.aten._to_copy.default: _to_copy,
}
