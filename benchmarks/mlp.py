"""MLP 1024-4096-4096-1024 at batch 64 and batch 1: lowbit next to torch, torch.ao, torchao
and onnxruntime, in one process, on the same inputs.

    .venv/bin/python benchmarks/mlp.py [--runs 30] [--quick]

Rows: FP32 eager and FP32 onnxruntime; torch.ao dynamic int8; torchao int8 dynamic, int8
weight-only (float32, as its users run it eagerly) and int4 weight-only (its CPU path, on a
bfloat16 copy of the model); onnxruntime ``quantize_dynamic``; lowbit ``w8a8-dynamic``,
``w8a8``, ``w8a16``, ``w4a16`` and ``w4a16-g128`` on each backend (the loaded ``.lowbit`` file
compiled for torch, and exported to onnxruntime). Quality is the cosine similarity of the
output with FP32's on held-out random inputs (the weights are random). Writes
benchmarks/results/mlp.json.
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
from benchmarks.harness import Row, cosine, measure, save, setup, torch_save_bytes

SIZES = (1024, 4096, 4096, 1024)
LOWBIT_RECIPES = ("w8a8-dynamic", "w8a8", "w8a16", "w4a16", "w4a16-g128")


def build_mlp() -> nn.Module:
    """The float MLP (Linear-ReLU-Linear-ReLU-Linear), random weights, eval mode."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(SIZES) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def _timed(fn: Callable[[], nn.Module | Callable]) -> tuple[nn.Module | Callable, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _lowbit_rows(
    model: nn.Module,
    recipe: str,
    calibration: list[torch.Tensor],
    batches: dict[str, torch.Tensor],
    folder: Path,
) -> list[tuple[Row, Callable[[torch.Tensor], torch.Tensor]]]:
    """(row, run) per backend: torch (compiled, checked against the simulation) and
    onnxruntime; the model is the one loaded back from its .lowbit file."""
    qmodel, seconds = _timed(lambda: lowbit.quantize(model, recipe, data=calibration))
    path = lowbit.save(qmodel, folder / f"{recipe}.lowbit")
    with torch.device("meta"):
        skeleton = build_mlp()
    loaded = lowbit.load(path, skeleton)
    out = []
    example = batches["batch 64"]
    fast = lowbit.compile(loaded, "torch", example_inputs=example)
    report = lowbit.kernel_report(fast)
    kernels = sorted({r.kernel for r in report.layers})
    row = Row(
        "",
        "lowbit",
        recipe,
        "torch",
        file_bytes=path.stat().st_size,
        quantize_s=seconds,
        notes=[f"kernels: {', '.join(kernels)}", *report.notes],
    )
    out.append((row, fast))
    try:
        ort = lowbit.compile(lowbit.load(path, skeleton), "onnxruntime", example_inputs=example)
    except (ImportError, RuntimeError, ValueError, TypeError) as err:
        print(f"lowbit {recipe} on onnxruntime skipped: {err}")
    else:
        out.append(
            (
                Row(
                    "",
                    "lowbit",
                    recipe,
                    "onnxruntime",
                    file_bytes=path.stat().st_size,
                    quantize_s=seconds,
                ),
                ort,
            )
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
    model = build_mlp()
    gen = torch.Generator().manual_seed(1)
    calibration = [torch.randn(64, SIZES[0], generator=gen) for _ in range(4)]
    batches = {
        "batch 64": torch.randn(64, SIZES[0], generator=gen),
        "batch 1": torch.randn(1, SIZES[0], generator=gen),
    }
    fp32_bytes = torch_save_bytes(model)
    candidates: list[tuple[Row, Callable[[torch.Tensor], torch.Tensor]]] = [
        (Row("", "torch", "fp32", "eager", file_bytes=fp32_bytes, quantize_s=0.0), model)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for row, run in anchors.fp32_onnxruntime(model, batches["batch 64"], folder):
            candidates.append((row, run))
        candidates += anchors.torch_ao_dynamic(model)
        candidates += anchors.torchao_rows(model)
        candidates += anchors.onnxruntime_dynamic(model, batches["batch 64"], folder)
        for recipe in LOWBIT_RECIPES:
            candidates += _lowbit_rows(model, recipe, calibration, batches, folder)
        references = {id(x): model(x).detach() for x in batches.values()}

        def quality(
            run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
        ) -> tuple[float, str]:
            return cosine(references[id(x)], run(x).float()), "cosine"

        rows = measure("MLP", candidates, batches, quality, runs)
    save("mlp", rows, {"sizes": SIZES, "runs": runs})


if __name__ == "__main__":
    main()
