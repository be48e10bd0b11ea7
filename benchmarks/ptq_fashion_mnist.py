"""PTQ on Fashion-MNIST: lowbit recipes next to torch.ao and onnxruntime int8, same data.

    .venv/bin/python -m benchmarks.ptq_fashion_mnist [--recipes w8a8,w8a8-dynamic] [--out F]

Prints one table and writes JSON (default: out/bench/ptq_fashion_mnist.json). Every row uses the
same cached FP32 SmallResNet, the same 512 calibration images from the training set and the full
10k test set. Quantization and evaluation (10k images, batches of 1000) times are wall-clock on
this machine (torch threads as shown). File
size: the .lowbit file for lowbit, torch.save of the state dict for torch.ao, the quantized
.onnx file for onnxruntime (its quantization time includes the ONNX export).
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from benchmarks import anchors
from lowbit.data import (
    calibration_batches,
    load_fashion_mnist,
    pretrained_resnet_fashion_mnist,
)
from lowbit.demo import DEMO_RECIPES, batched_logits, evaluate_recipe
from lowbit.export import write_json
from lowbit.report.metrics import sqnr_db


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
            "file_bytes": anchors.torch_save_bytes(model),
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
    anchor_rows = anchors.torch_ao_static(model, calibration) + anchors.torch_ao_dynamic(model)
    try:
        anchor_rows += anchors.onnxruntime_static(model, calibration, out.parent)
    except ImportError as err:
        print(f"onnxruntime rows skipped: {err} (pip install onnx onnxruntime)")
    for template, run in anchor_rows:
        rows.append(
            row(
                template.toolkit,
                template.method,
                run,
                template.quantize_s or 0.0,
                template.file_bytes or 0,
            )
        )

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
