"""Run a converted model in onnxruntime: :class:`OrtModule` wraps an InferenceSession as a
``torch.nn.Module``, :func:`onnxruntime_module` exports a model (``export_onnx``) and loads it.

This is the ``"onnxruntime"`` backend of :func:`lowbit.compile`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.export.onnx import OnnxInputError, export_onnx, require_onnx

__all__ = ["OrtModule", "onnxruntime_module"]

_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
# onnxruntime fuses MatMul + Add into a float Gemm before its QDQ pass can turn
# DynamicQuantizeLinear -> DequantizeLinear -> MatMul into DynamicQuantizeMatMul: with it on, a
# dynamic w8a8 MLP 1024-4096-4096-1024 ran 276 ms at batch 1, with it off 10.9 ms (static w8a8,
# which fuses into QGemm either way: 11.4 ms). So it is off for graphs with dynamic inputs.
_DYNAMIC_OFF = ["MatMulAddFusion"]


class OrtModule(nn.Module):
    """An onnxruntime session (CPU, ``ORT_ENABLE_ALL``, ``torch.get_num_threads()`` threads)
    called like the model it was exported from: torch tensors in (positional in the graph's
    input order, or by input name), torch tensors out (one output: a tensor; several: a tuple).
    Floating inputs are cast to the graph's input type (float32), and float outputs back to the
    floating dtype of the first input (a bfloat16 model gives bfloat16 outputs).

    >>> import tempfile, lowbit
    >>> from lowbit.export.onnx import export_onnx
    >>> net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    >>> q = lowbit.quantize(net, "w8a8", data=[torch.randn(32, 16)])
    >>> with tempfile.TemporaryDirectory() as d:
    ...     ort_net = OrtModule(export_onnx(q, torch.randn(1, 16), f"{d}/net.onnx"))
    >>> ort_net.input_names, ort_net(torch.randn(5, 16)).shape
    (['input'], torch.Size([5, 4]))
    """

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        super().__init__()
        require_onnx("onnx", "onnxruntime")
        import onnx
        import onnxruntime as ort

        self.path = Path(path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        # onnxruntime's workers spin after each run by default, which takes the cores from
        # torch's own work in the same process (pre- and post-processing, other layers)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        graph = onnx.load(str(self.path), load_external_data=False).graph
        dynamic = any(node.op_type == "DynamicQuantizeLinear" for node in graph.node)
        self.session = ort.InferenceSession(
            str(self.path),
            options,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=_DYNAMIC_OFF if dynamic else None,
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._types = {i.name: _NUMPY_TYPES.get(i.type) for i in self.session.get_inputs()}

    def extra_repr(self) -> str:
        return f"{self.path.name}: inputs {self.input_names}, outputs {self.output_names}"

    def _feeds(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if len(args) > len(self.input_names):
            raise OnnxInputError(
                f"{len(args)} positional inputs for a graph with inputs {self.input_names}; "
                "pass one tensor per graph input"
            )
        named = dict(zip(self.input_names, args, strict=False))
        for name, value in kwargs.items():
            if name not in self.input_names or name in named:
                raise OnnxInputError(
                    f"input {name!r} is unknown or given twice; the graph's inputs are "
                    f"{self.input_names}"
                )
            named[name] = value
        missing = [n for n in self.input_names if n not in named]
        if missing:
            raise OnnxInputError(f"missing inputs {missing}; the graph takes {self.input_names}")
        feeds = {}
        for name, value in named.items():
            if not isinstance(value, torch.Tensor):
                raise OnnxInputError(f"input {name!r} is a {type(value).__name__}, not a tensor")
            array = value.detach().cpu()
            array = array.float() if array.dtype == torch.bfloat16 else array  # numpy has none
            feeds[name] = array.numpy().astype(self._types[name] or array.numpy().dtype)
        return feeds

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        floats = [t.dtype for t in tensors if t.dtype.is_floating_point]
        dtype = floats[0] if floats else torch.float32
        outputs = self.session.run(None, self._feeds(args, kwargs))
        out = [torch.from_numpy(np.asarray(o)) for o in outputs]
        out = [t.to(dtype) if t.dtype.is_floating_point else t for t in out]
        return out[0] if len(out) == 1 else tuple(out)


def onnxruntime_module(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...] | Mapping[str, torch.Tensor],
    *,
    folder: str | Path | None = None,
) -> OrtModule:
    """Export a converted ``model`` with :func:`~lowbit.export.onnx.export_onnx` (traced on
    ``example_inputs``) to ``folder/model.onnx`` (by default a temporary folder, removed once
    the session holds the model) and load it as an :class:`OrtModule`.

    >>> import lowbit
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    >>> x = torch.randn(2, 1, 6, 6)
    >>> q = lowbit.quantize(net, "w8a8", data=[x])
    >>> fast = onnxruntime_module(q, x)
    >>> for layer in lowbit.quantized_layers(q).values():
    ...     layer.set_kernel("reference")
    >>> lowbit.sqnr_db(q(x), fast(x)) > 35
    True
    """
    require_onnx("onnx", "onnxruntime")
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        return OrtModule(export_onnx(model, example_inputs, Path(folder) / "model.onnx"))
    with tempfile.TemporaryDirectory(prefix="lowbit-onnx-") as tmp:
        return OrtModule(export_onnx(model, example_inputs, Path(tmp) / "model.onnx"))
