"""lowbit: quantize PyTorch models into really smaller, really faster low-bit models.

The whole life cycle in one call, then a packed file on disk:

>>> import tempfile, torch, lowbit
>>> net = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
>>> qnet = lowbit.quantize(net, "w8a8", data=[torch.randn(32, 16)])
>>> with tempfile.TemporaryDirectory() as d:
...     back = lowbit.load(lowbit.save(qnet, f"{d}/net.lowbit"), net)
>>> x = torch.randn(2, 16)
>>> torch.equal(back(x), qnet(x)), lowbit.sqnr_db(net(x), qnet(x)) > 20
(True, True)
"""

__version__ = "0.1.0"  # first: lowbit.export reads it while the names below are imported

from lowbit import algorithms  # registers every PTQ algorithm (recipes name them)
from lowbit.api import calibrate, convert, prepare, prepared_info, quantize, quantized_layers
from lowbit.config import QuantConfig, Recipe, RecipeError, Rule, list_recipes, load_recipe
from lowbit.export import CheckpointError, inspect, load, save, theoretical_size
from lowbit.export.onnx import export_onnx
from lowbit.qat import fit, prepare_qat
from lowbit.report.metrics import sqnr_db
from lowbit.report.summary import ModelSummary, summary
from lowbit.runtime import CompileReport, compile, kernel_report
from lowbit.runtime import self_test as runtime_self_test
from lowbit.spec import PerChannel, PerGroup, PerTensor, QDtype, QuantSpec, SpecError

__all__ = [
    "CheckpointError",
    "CompileReport",
    "ModelSummary",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "QDtype",
    "QuantConfig",
    "QuantSpec",
    "Recipe",
    "RecipeError",
    "Rule",
    "SpecError",
    "__version__",
    "algorithms",
    "calibrate",
    "compile",
    "convert",
    "export_onnx",
    "fit",
    "inspect",
    "kernel_report",
    "list_recipes",
    "load",
    "load_recipe",
    "prepare",
    "prepare_qat",
    "prepared_info",
    "quantize",
    "quantized_layers",
    "runtime_self_test",
    "save",
    "sqnr_db",
    "summary",
    "theoretical_size",
]
