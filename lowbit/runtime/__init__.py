"""Integer execution: real int8/int4 CPU kernels for converted layers, and the choice between them.

Importing this package registers its kernels with :mod:`lowbit.nn.kernels`; ``import lowbit``
does, so a converted or loaded model runs on them from its first call.
"""

from lowbit.runtime import conv as _conv  # noqa: F401  # registers the Conv kernels
from lowbit.runtime import linear as _linear  # noqa: F401  # registers the Linear kernels
from lowbit.runtime.compile import BACKENDS, compile, kernel_report
from lowbit.runtime.opscheck import self_test
from lowbit.runtime.report import CompileReport, LayerKernel

__all__ = ["BACKENDS", "CompileReport", "LayerKernel", "compile", "kernel_report", "self_test"]
