"""The other toolkits, set up the way their own documentation does: torch FP32 on
onnxruntime, torch.ao (dynamic and FX static, x86), torchao (int8 dynamic, int8 and int4
weight-only) and onnxruntime's own quantizer (dynamic and static QDQ).

Each function returns ``(Row, run)`` pairs: a row template (toolkit, method, backend, file
size, time to quantize) and a function from a batch to the output.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.harness import THREADS, Row, torch_save_bytes

__all__ = [
    "export_fp32",
    "fp32_onnxruntime",
    "onnxruntime_dynamic",
    "onnxruntime_static",
    "ort_run",
    "torch_ao_dynamic",
    "torch_ao_static",
    "torch_save_bytes",
    "torchao_models",
    "torchao_rows",
]

Run = Callable[[torch.Tensor], torch.Tensor]


def _session(path: Path) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as OrtModule
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_run(path: Path) -> Callable[..., torch.Tensor]:
    """A function running the ONNX file at ``path``: ``run(x)`` for a model whose one input is
    named ``x``, or ``run({name: tensor})``; returns the first output."""
    session = _session(path)

    def run(x: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        feed = {k: v.numpy() for k, v in x.items()} if isinstance(x, dict) else {"x": x.numpy()}
        return torch.from_numpy(session.run(None, feed)[0])  # type: ignore[attr-defined]

    return run


def export_fp32(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """The float model as ONNX with a dynamic batch dimension."""
    torch.onnx.export(
        model.eval(),
        (example,),
        str(path),
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
        dynamo=False,
    )
    return path


def fp32_onnxruntime(
    model: nn.Module, example: torch.Tensor, folder: Path
) -> list[tuple[Row, Run]]:
    """The FP32 model on onnxruntime (a second float baseline)."""
    path = export_fp32(model, example, folder / "fp32.onnx")
    return [
        (
            Row(
                "",
                "onnxruntime",
                "fp32",
                "onnxruntime",
                file_bytes=path.stat().st_size,
                quantize_s=0.0,
            ),
            ort_run(path),
        )
    ]


def torch_ao_dynamic(model: nn.Module) -> list[tuple[Row, Run]]:
    """torch.ao ``quantize_dynamic``: int8 weights, per-batch uint8 activations (fbgemm)."""
    start = time.perf_counter()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, torch.qint8)
    seconds = time.perf_counter() - start
    return [
        (
            Row(
                "",
                "torch.ao",
                "dynamic int8",
                "eager",
                file_bytes=torch_save_bytes(q),
                quantize_s=seconds,
            ),
            q,
        )
    ]


def torch_ao_static(model: nn.Module, calibration: Iterable[torch.Tensor]) -> list[tuple[Row, Run]]:
    """torch.ao FX graph mode, x86 backend: int8 per-channel weights, uint8 static inputs."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    batches = list(calibration)
    start = time.perf_counter()
    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(
        copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (batches[0],)
    )
    with torch.no_grad():
        for batch in batches:
            prepared(batch)
    q = convert_fx(prepared)
    seconds = time.perf_counter() - start
    return [
        (
            Row(
                "",
                "torch.ao",
                "static int8 (FX, x86)",
                "eager",
                file_bytes=torch_save_bytes(q),
                quantize_s=seconds,
            ),
            q,
        )
    ]


TORCHAO_METHODS = ("int8 dynamic", "int8 weight-only", "int4 weight-only g128")


def _linear_except(names: list[str]) -> Callable[[nn.Module, str], bool]:
    """A torchao ``filter_fn``: Linear layers, except those ``names``."""
    return lambda m, fqn: isinstance(m, nn.Linear) and fqn not in names


def torchao_models(
    model: nn.Module, methods: tuple[str, ...] = TORCHAO_METHODS
) -> list[tuple[Row, nn.Module, torch.dtype]]:
    """torchao 0.18 on the CPU: int8 dynamic (per-token), int8 weight-only (float32, eager)
    and int4 weight-only (its prototype CPU path, in bfloat16 as that kernel wants); each
    with the dtype its inputs must have."""
    try:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    except ImportError as err:
        print(f"torchao rows skipped: {err}")
        return []
    configs: dict[str, tuple[object, torch.dtype]] = {
        "int8 dynamic": (Int8DynamicActivationInt8WeightConfig(), torch.float32),
        "int8 weight-only": (Int8WeightOnlyConfig(), torch.float32),
        "int4 weight-only g128": (PrototypeInt4WeightOnlyConfig(group_size=128), torch.bfloat16),
    }
    out = []
    for method in methods:
        config, dtype = configs[method]
        start = time.perf_counter()
        q = copy.deepcopy(model).to(dtype)
        skipped = [
            name
            for name, m in q.named_modules()
            if isinstance(m, nn.Linear) and m.out_features % 16 and "int4" in method
        ]
        try:  # torchao's CPU int4 kernel needs N % 16 == 0: other Linears stay in bfloat16
            quantize_(q, config, filter_fn=_linear_except(skipped))
        except (RuntimeError, NotImplementedError, AssertionError) as err:
            print(f"torchao {method} skipped: {err}")
            continue
        seconds = time.perf_counter() - start
        backend = "eager" if dtype == torch.float32 else "eager, bfloat16"
        label = method + (f" ({', '.join(skipped)} bf16)" if skipped else "")
        row = Row("", "torchao", label, backend, file_bytes=torch_save_bytes(q), quantize_s=seconds)
        out.append((row, q, dtype))
    return out


def torchao_rows(
    model: nn.Module, methods: tuple[str, ...] = TORCHAO_METHODS
) -> list[tuple[Row, Run]]:
    """:func:`torchao_models` (of ``methods``) as runnable rows (inputs cast to each model's
    dtype)."""
    out: list[tuple[Row, Run]] = []
    for row, q, dtype in torchao_models(model, methods):

        def run(x: torch.Tensor, q: nn.Module = q, dtype: torch.dtype = dtype) -> torch.Tensor:
            return q(x.to(dtype) if x.is_floating_point() else x).float()

        out.append((row, run))
    return out


def onnxruntime_dynamic(
    model: nn.Module, example: torch.Tensor, folder: Path
) -> list[tuple[Row, Run]]:
    """onnxruntime ``quantize_dynamic``: int8 weights, per-tensor uint8 activations."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    start = time.perf_counter()
    fp32 = export_fp32(model, example, folder / "dyn_fp32.onnx")
    q_path = folder / "dyn_int8.onnx"
    quantize_dynamic(str(fp32), str(q_path), weight_type=QuantType.QInt8)
    seconds = time.perf_counter() - start
    return [
        (
            Row(
                "",
                "onnxruntime",
                "dynamic int8",
                "onnxruntime",
                file_bytes=q_path.stat().st_size,
                quantize_s=seconds,
            ),
            ort_run(q_path),
        )
    ]


def onnxruntime_static(
    model: nn.Module,
    calibration: list[torch.Tensor],
    folder: Path,
    weight_type: str = "QInt8",
    activation_type: str = "QUInt8",
) -> list[tuple[Row, Run]]:
    """onnxruntime ``quantize_static``: QDQ, per-channel weights of ``weight_type`` (a
    ``QuantType`` name: QInt8, QInt4, ...), activations of ``activation_type``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"x": batch.numpy()}

    start = time.perf_counter()
    fp32 = export_fp32(model, calibration[0], folder / "static_fp32.onnx")
    tag = f"{weight_type}_{activation_type}".lower()
    pre, q_path = folder / "static_pre.onnx", folder / f"static_{tag}.onnx"
    quant_pre_process(str(fp32), str(pre))
    quantize_static(
        str(pre),
        str(q_path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=getattr(QuantType, activation_type),
        weight_type=getattr(QuantType, weight_type),
        calibrate_method=CalibrationMethod.MinMax,
    )
    seconds = time.perf_counter() - start
    method = "static QDQ int8"
    if (weight_type, activation_type) != ("QInt8", "QUInt8"):
        method = f"static QDQ w:{weight_type[1:].lower()} a:{activation_type[1:].lower()}"
    return [
        (
            Row(
                "",
                "onnxruntime",
                method,
                "onnxruntime",
                file_bytes=q_path.stat().st_size,
                quantize_s=seconds,
            ),
            ort_run(q_path),
        )
    ]
