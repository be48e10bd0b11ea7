"""PTQ on Fashion-MNIST: lowbit recipes next to torch.ao and onnxruntime int8, same data.

    .venv/bin/python benchmarks/ptq_fashion_mnist.py [--recipes w8a8,w8a8-dynamic] [--out F]

Prints one table and writes JSON (default: out/bench/ptq_fashion_mnist.json). Every row uses the
same cached FP32 SmallResNet, the same 512 calibration images from the training set and the full
10k test set. Quantization and evaluation (10k images, batches of 1000) times are wall-clock on
this machine (torch threads as shown). File
size: the .lowbit file for lowbit, torch.save of the state dict for torch.ao, the quantized
.onnx file for onnxruntime (its quantization time includes the ONNX export).
"""

from __future__ import annotations

import argparse
import io
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from lowbit.data import (
    calibration_batches,
    load_fashion_mnist,
    pretrained_resnet_fashion_mnist,
)
from lowbit.demo import DEMO_RECIPES, batched_logits, evaluate_recipe
from lowbit.export import write_json
from lowbit.report.metrics import sqnr_db


def torch_save_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: how a torch.ao model is usually shipped."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def torch_ao_static(model: nn.Module, calibration: list[torch.Tensor]) -> nn.Module:
    """torch.ao FX graph mode, x86 backend: int8 per-channel weights, uint8 static activations."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(model.eval(), get_default_qconfig_mapping("x86"), (calibration[0],))
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)
    return convert_fx(prepared)


def torch_ao_dynamic(model: nn.Module, calibration: list[torch.Tensor]) -> nn.Module:
    """torch.ao dynamic int8 (only Linear layers are supported by it; convs stay float)."""
    return torch.ao.quantization.quantize_dynamic(model.eval(), {nn.Linear}, dtype=torch.qint8)


def onnxruntime_static(
    model: nn.Module, calibration: list[torch.Tensor], folder: Path
) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """onnxruntime quantize_static: QDQ, int8 per-channel weights, uint8 activations (min-max).

    Returns a function from inputs to logits and the quantized .onnx file's size in bytes.
    """
    import onnxruntime as ort
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

    float_path, pre_path, q_path = (folder / f"{n}.onnx" for n in ("fp32", "pre", "int8"))
    torch.onnx.export(
        model.eval(),
        (calibration[0],),
        str(float_path),
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
        dynamo=False,
    )
    quant_pre_process(str(float_path), str(pre_path))
    quantize_static(
        str(pre_path),
        str(q_path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    session = ort.InferenceSession(str(q_path), providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])

    return run, q_path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(DEMO_RECIPES))
    parser.add_argument("--out", default="out/bench/ptq_fashion_mnist.json")
    parser.add_argument("--calibration-images", type=int, default=512)
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)

    model = pretrained_resnet_fashion_mnist(progress=True).eval()
    train_x, _ = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    calibration = list(calibration_batches(train_x, n=args.calibration_images))
    start = time.perf_counter()
    fp32_logits = batched_logits(model, test_x)
    fp32_eval = time.perf_counter() - start
    fp32_acc = float((fp32_logits.argmax(1) == test_y).float().mean())
    fp32_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())

    def row(toolkit: str, method: str, run: Callable, seconds: float, size: int) -> dict:
        """Evaluate ``run`` on the test set, timed, against the FP32 logits."""
        start = time.perf_counter()
        logits = batched_logits(run, test_x)
        eval_seconds = time.perf_counter() - start
        acc = float((logits.argmax(1) == test_y).float().mean())
        return {
            "toolkit": toolkit,
            "method": method,
            "accuracy": acc,
            "delta_points": 100 * (acc - fp32_acc),
            "sqnr_db": sqnr_db(fp32_logits, logits),
            "quantize_seconds": seconds,
            "eval_seconds": eval_seconds,
            "file_bytes": size,
        }

    rows = [
        {
            "toolkit": "torch",
            "method": "fp32",
            "accuracy": fp32_acc,
            "delta_points": 0.0,
            "sqnr_db": None,  # the reference itself
            "quantize_seconds": 0.0,
            "eval_seconds": fp32_eval,
            "file_bytes": torch_save_bytes(model),
        }
    ]
    for recipe in args.recipes.split(","):
        r = evaluate_recipe(
            model,
            recipe,
            calibration,
            (test_x, test_y),
            (fp32_acc, fp32_logits, fp32_bytes),
            out.parent,
        )
        rows.append(
            {
                "toolkit": "lowbit",
                "method": recipe,
                "accuracy": r.accuracy,
                "delta_points": r.delta_points,
                "sqnr_db": r.sqnr_db,
                "quantize_seconds": r.quantize_seconds,
                "eval_seconds": r.eval_seconds,
                "file_bytes": r.file_bytes,
            }
        )
    for name, fn in (
        ("static int8 (fx, x86)", torch_ao_static),
        ("dynamic int8 (Linear only)", torch_ao_dynamic),
    ):
        start = time.perf_counter()
        qmodel = fn(model, calibration)
        seconds = time.perf_counter() - start
        rows.append(row("torch.ao", name, qmodel, seconds, torch_save_bytes(qmodel)))
    try:
        start = time.perf_counter()
        run, size = onnxruntime_static(model, calibration, out.parent)
        seconds = time.perf_counter() - start
        rows.append(
            row("onnxruntime", "static QDQ (w int8 per-channel, a uint8)", run, seconds, size)
        )
    except ImportError as err:
        print(f"onnxruntime rows skipped: {err} (pip install onnx onnxruntime)")

    table = Table(title=f"Fashion-MNIST SmallResNet PTQ (fp32 top-1 {100 * fp32_acc:.2f}%)")
    columns = ("toolkit", "method", "top-1 %", "Δ pts", "SQNR dB", "quantize s", "eval s")
    for col in (*columns, "file KiB"):
        table.add_column(col)
    for r in rows:
        size = f"{r['file_bytes'] / 1024:.1f}" if r["file_bytes"] else "—"
        table.add_row(
            r["toolkit"],
            r["method"],
            f"{100 * r['accuracy']:.2f}",
            f"{r['delta_points']:+.2f}",
            "—" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}",
            f"{r['quantize_seconds']:.2f}",
            f"{r['eval_seconds']:.2f}",
            size,
        )
    Console(width=140).print(table)
    payload = {
        "fp32_accuracy": fp32_acc,
        "fp32_param_bytes": fp32_bytes,
        "calibration_images": args.calibration_images,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    write_json(out, payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
