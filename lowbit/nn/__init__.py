"""Quantized modules, registered per float class."""

from lowbit.nn.attention import QMultiheadAttention
from lowbit.nn.containers import (
    FLOAT_CHILDREN,
    FUSED_PATHS,
    disable_fused_path,
    kept_float_by_parent,
)
from lowbit.nn.conv_transpose import QConvTranspose1d, QConvTranspose2d
from lowbit.nn.embedding import QEmbedding
from lowbit.nn.hf_conv1d import QHFConv1DBase
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
from lowbit.nn.layers import QConv1d, QConv2d, QConv3d, QLinear
from lowbit.nn.module import (
    LAZY_QMODULES,
    QMODULE_KINDS,
    QMODULES,
    QModule,
    qmodule_class,
    register_lazy_qmodule,
    register_qmodule,
)
from lowbit.nn.parent import QParent
from lowbit.nn.qtensor import LAYOUTS, Layout, QTensor, register_layout
from lowbit.nn.quantizer import Quantizer
from lowbit.nn.rnn import QGRU, QLSTM, QRNN
from lowbit.nn.rnn_cells import QGRUCell, QLSTMCell, QRNNCell
from lowbit.nn.swap import (
    adopt_subclass,
    fold_weight_norm,
    twin_class,
    unswappable_layers,
    unswappable_reason,
)

__all__ = [
    "FLOAT_CHILDREN",
    "FUSED_PATHS",
    "KERNELS",
    "LAZY_QMODULES",
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
    "QConv3d",
    "QConvTranspose1d",
    "QConvTranspose2d",
    "QEmbedding",
    "QHFConv1DBase",
    "QLinear",
    "QGRU",
    "QGRUCell",
    "QLSTM",
    "QLSTMCell",
    "QMultiheadAttention",
    "QParent",
    "QRNN",
    "QRNNCell",
    "QMODULES",
    "QModule",
    "Quantizer",
    "disable_fused_path",
    "kept_float_by_parent",
    "qmodule_class",
    "register_lazy_qmodule",
    "register_qmodule",
    "unswappable_layers",
    "adopt_subclass",
    "fold_weight_norm",
    "twin_class",
    "unswappable_reason",
]
