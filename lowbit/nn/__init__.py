"""Quantized modules, registered per float class."""

from lowbit.nn.layers import QConv1d, QConv2d, QLinear
from lowbit.nn.module import QMODULES, QModule, qmodule_class, register_qmodule
from lowbit.nn.quantizer import Quantizer

__all__ = [
    "QConv1d",
    "QConv2d",
    "QLinear",
    "QMODULES",
    "QModule",
    "Quantizer",
    "qmodule_class",
    "register_qmodule",
]
