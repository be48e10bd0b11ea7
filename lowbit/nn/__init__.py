"""Quantized modules, registered per float class."""

from lowbit.nn.containers import (
    FLOAT_CHILDREN,
    FUSED_PATHS,
    disable_fused_path,
    kept_float_by_parent,
)
from lowbit.nn.layers import QConv1d, QConv2d, QLinear
from lowbit.nn.module import QMODULES, QModule, qmodule_class, register_qmodule
from lowbit.nn.quantizer import Quantizer

__all__ = [
    "FLOAT_CHILDREN",
    "FUSED_PATHS",
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
