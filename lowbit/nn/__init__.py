"""Quantized modules, registered per float class."""

from lowbit.nn.containers import (
    FLOAT_CHILDREN,
    FUSED_PATHS,
    disable_fused_path,
    kept_float_by_parent,
)
from lowbit.nn.kernels import (
    KERNELS,
    Kernel,
    KernelChoice,
    LayerView,
    ReferenceKernel,
    as_float,
    choose_kernel,
    kernel_names,
    register_kernel,
)
from lowbit.nn.layers import QConv1d, QConv2d, QLinear
from lowbit.nn.module import QMODULE_KINDS, QMODULES, QModule, qmodule_class, register_qmodule
from lowbit.nn.qtensor import LAYOUTS, Layout, QTensor, register_layout
from lowbit.nn.quantizer import Quantizer

__all__ = [
    "FLOAT_CHILDREN",
    "FUSED_PATHS",
    "KERNELS",
    "LAYOUTS",
    "Kernel",
    "KernelChoice",
    "LayerView",
    "Layout",
    "QMODULE_KINDS",
    "QTensor",
    "ReferenceKernel",
    "as_float",
    "choose_kernel",
    "kernel_names",
    "register_kernel",
    "register_layout",
    "QConv1d",
    "QConv2d",
    "QLinear",
    "QMODULES",
    "QModule",
    "Quantizer",
    "disable_fused_path",
    "kept_float_by_parent",
    "qmodule_class",
    "register_qmodule",
]
