"""Post-training quantization algorithms, one file each, selected by ``algorithm:`` in a recipe.

Importing this package registers every algorithm (``lowbit`` itself imports it, so a recipe
naming one always resolves).
"""

from lowbit.algorithms.base import (
    Algorithm,
    AlgorithmBase,
    AlgorithmError,
    LayerLoop,
    register_algorithm,
    weight_layers,
)
from lowbit.algorithms.capture import Captured, capture_inputs, quantizers_disabled, run_all

__all__ = [
    "Algorithm",
    "AlgorithmBase",
    "AlgorithmError",
    "Captured",
    "LayerLoop",
    "capture_inputs",
    "quantizers_disabled",
    "register_algorithm",
    "run_all",
    "weight_layers",
]
from lowbit.algorithms import adaround as adaround  # noqa: E402,F401
from lowbit.algorithms import awq as awq  # noqa: E402,F401
from lowbit.algorithms import bias_correction as bias_correction  # noqa: E402,F401
from lowbit.algorithms import cle as cle  # noqa: E402,F401
from lowbit.algorithms import gptq as gptq  # noqa: E402,F401
from lowbit.algorithms import smoothquant as smoothquant  # noqa: E402,F401
