"""The Fashion-MNIST SmallResNet (the demo's model) at batch 32 and batch 1: lowbit w8a8 next to
torch FP32, torch.ao FX static int8 (x86) and onnxruntime static QDQ, in one process.

    .venv/bin/python -m benchmarks.resnet [--runs 30] [--quick]

Every quantized row uses the same 512 calibration images from the training set; accuracy is
top-1 on the full 10k test set for every row. lowbit's rows are the ``.lowbit`` file loaded
back and compiled (torch backend: oneDNN int8 with fused ReLU/residual add and uint8 between
layers, checked against lowbit's simulation; onnxruntime backend: the exported QDQ model).
Writes benchmarks/results/resnet.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import lowbit
from benchmarks import anchors
from benchmarks.harness import Row, measure, save, setup, torch_save_bytes
from lowbit.data import (
    SmallResNet,
    calibration_batches,
    load_fashion_mnist,
    pretrained_resnet_fashion_mnist,
)

Run = Callable[[torch.Tensor], torch.Tensor]


def _accuracy(run: Run, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        logits = torch.cat([run(x[i : i + 500]) for i in range(0, len(x), 500)])
    return float((logits.argmax(1) == y).float().mean())


def _lowbit(
    model: nn.Module, calibration: list[torch.Tensor], example: torch.Tensor, folder: Path
) -> list[tuple[Row, Run]]:
    start = time.perf_counter()
    qmodel = lowbit.quantize(model, "w8a8", data=calibration)
    seconds = time.perf_counter() - start
    path = lowbit.save(qmodel, folder / "w8a8.lowbit")
    size = path.stat().st_size

    def fresh() -> nn.Module:
        return lowbit.load(path, SmallResNet(widths=(16, 32, 64)))

    out: list[tuple[Row, Run]] = []
    fast = lowbit.compile(fresh(), "torch", example_inputs=example)
    report = lowbit.kernel_report(fast)
    notes = [f"SQNR against the simulation {report.sqnr_db:.1f} dB", *report.notes]
    out.append(
        (Row("", "lowbit", "w8a8", "torch", file_bytes=size, quantize_s=seconds, notes=notes), fast)
    )
    eager = fresh()  # the loaded model as it comes, each layer on its kernel, unfused
    out.append(
        (Row("", "lowbit", "w8a8", "torch, unfused", file_bytes=size, quantize_s=seconds), eager)
    )
    try:
        ort = lowbit.compile(fresh(), "onnxruntime", example_inputs=example)
    except (ImportError, RuntimeError, ValueError, TypeError) as err:
        print(f"lowbit on onnxruntime skipped: {err}")
    else:
        out.append(
            (Row("", "lowbit", "w8a8", "onnxruntime", file_bytes=size, quantize_s=seconds), ort)
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="timed rounds (median), >= 20")
    parser.add_argument("--quick", action="store_true", help="3 rounds, for a smoke test")
    args = parser.parse_args()
    setup()
    warnings.filterwarnings("ignore")
    runs = 3 if args.quick else max(args.runs, 20)
    model = pretrained_resnet_fashion_mnist(progress=True).eval()
    train_x, _ = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    calibration = list(calibration_batches(train_x, n=512))
    batches = {"batch 32": test_x[:32].clone(), "batch 1": test_x[32:33].clone()}
    candidates: list[tuple[Row, Run]] = [
        (
            Row("", "torch", "fp32", "eager", file_bytes=torch_save_bytes(model), quantize_s=0.0),
            model,
        )
    ]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        candidates += anchors.fp32_onnxruntime(model, calibration[0], folder)
        candidates += anchors.torch_ao_static(model, calibration)
        candidates += anchors.onnxruntime_static(model, calibration, folder)
        candidates += _lowbit(model, calibration, calibration[0][:64], folder)
        accuracy = {id(run): _accuracy(run, test_x, test_y) for _, run in candidates}
        rows = measure(
            "ResNet", candidates, batches, lambda run, x: (accuracy[id(run)], "top-1"), runs
        )
        rows += _head_to_head(candidates, batches["batch 32"], accuracy, runs)
    save("resnet", rows, {"calibration_images": 512, "test_images": len(test_x), "runs": runs})


def _head_to_head(
    candidates: list[tuple[Row, Run]], x: torch.Tensor, accuracy: dict[int, float], runs: int
) -> list[Row]:
    """lowbit's compiled model against each int8 anchor alone: two models alternating keep
    their weights and buffers hot in cache, where seven alternating do not, and the ranking
    can differ between the two settings."""
    ours = next(c for c in candidates if c[0].toolkit == "lowbit" and c[0].backend == "torch")
    rows = []
    for other in candidates:
        if other[0].toolkit in ("torch.ao", "onnxruntime") and other[0].method != "fp32":
            pair = [ours, other]
            for row in measure(
                "ResNet batch 32, head to head,",
                pair,
                {"": x},
                lambda run, x: (accuracy[id(run)], "top-1"),
                runs,
            ):
                row.benchmark = f"ResNet batch 32, lowbit vs {other[0].toolkit} alone"
                rows.append(row)
    return rows


if __name__ == "__main__":
    main()
