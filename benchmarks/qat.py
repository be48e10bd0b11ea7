"""Quantization-aware training figures: the ResNet at w4a4/w2a4/w8a8/binary, an MNIST MLP from
scratch with int8 gradients, and two-process DDP with the int8/int4 gradient hooks.

    .venv/bin/python -m benchmarks.qat [--only resnet timing binary mnist ddp] [--out FILE]

Everything on the full test sets (Fashion-MNIST / MNIST, 10k images). The ResNet starts from the
cached FP32 weights (`lowbit demo` trains them once). Accuracies are of the converted model on
the integer kernels. Sections merge into the JSON file as they finish; `--only` reruns some.
Times are wall-clock on this machine: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import lowbit
from lowbit.data import (
    evaluate,
    load_fashion_mnist,
    load_mnist,
    pretrained_resnet_fashion_mnist,
)
from lowbit.data.zoo import MLP
from lowbit.distributed import compress_gradients, run_local
from lowbit.export import write_json
from lowbit.qat import QatSchedule, accuracy_on, train_qat

OUT = Path("benchmarks/results/qat.json")
# recipe, epochs, peak learning rate (QAT starts from trained weights: 20x below their 0.2)
RESNET_RUNS = [
    ("w4a4-lsq", 3, 0.01),
    ("w2a4-lsq", 5, 0.01),
    ("w8a8-qat", 1, 0.005),
]
BINARY_RUN = ("w1a8-binary", 3, 0.005)
DDP_RECIPE, DDP_EPOCHS = "w4a4-lsq", 2


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _float_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """One float training epoch in the same loop (the 2x reference)."""
    run = train_qat(model, None, x, y, QatSchedule(epochs=1, lr=0.005))
    return {"seconds": run.history[0].seconds}


def _resnet_run(
    model: nn.Module,
    recipe: str,
    epochs: int,
    lr: float,
    data: tuple[torch.Tensor, ...],
    fp32: float,
) -> dict[str, Any]:
    tx, ty, vx, vy = data
    schedule = QatSchedule(epochs=epochs, lr=lr)
    # no training: the same recipe's ranges from calibration alone (round to nearest)
    calib = [tx[i : i + 128] for i in range(0, schedule.calibration, 128)]
    rtn = evaluate(lowbit.convert(lowbit.prepare_qat(model, recipe, calib).eval()), vx, vy)
    run = train_qat(model, recipe, tx, ty, schedule, evaluate=accuracy_on(vx, vy), progress=True)
    converted = evaluate(lowbit.convert(run.model), vx, vy)
    return {
        "recipe": recipe,
        "epochs": epochs,
        "lr": lr,
        "no_training": rtn,
        "per_epoch": [r.accuracy for r in run.history],
        "best_epoch": run.best_epoch,
        "converted": converted,
        "drop_points": 100 * (fp32 - converted),
        "epoch_seconds": [r.seconds for r in run.history],
    }


def resnet(only_binary: bool = False) -> dict[str, Any]:
    model = pretrained_resnet_fashion_mnist(progress=True)
    tx, ty = load_fashion_mnist("train")
    vx, vy = load_fashion_mnist("test")
    fp32 = evaluate(model, vx, vy)
    result: dict[str, Any] = {"fp32": fp32}
    if not only_binary:
        result["float_epoch"] = _float_epoch(model, tx, ty)
    runs = [BINARY_RUN] if only_binary else RESNET_RUNS
    rows = [_resnet_run(model, r, e, lr, (tx, ty, vx, vy), fp32) for r, e, lr in runs]
    result["runs"] = rows
    return result


def timing() -> dict[str, Any]:
    """One training epoch each, back to back in the same loop: float, w4a4-lsq, w8a8-qat."""
    model = pretrained_resnet_fashion_mnist(progress=True)
    tx, ty = load_fashion_mnist("train")
    out: dict[str, Any] = {}
    for name in ("float", "w4a4-lsq", "w8a8-qat"):
        recipe = None if name == "float" else name
        run = train_qat(model, recipe, tx, ty, QatSchedule(epochs=1, lr=0.005))
        out[name] = run.history[0].seconds
    for name in ("w4a4-lsq", "w8a8-qat"):
        out[f"{name}_vs_float"] = out[name] / out["float"]
    return out


def mnist(epochs: int = 10, lr: float = 0.05) -> dict[str, Any]:
    tx, ty = load_mnist("train")
    vx, vy = load_mnist("test")
    torch.manual_seed(0)
    mlp = MLP(784, (256,), 10)
    schedule = QatSchedule(epochs=epochs, lr=lr, weight_decay=5e-4, label_smoothing=0.0)
    out: dict[str, Any] = {"epochs": epochs, "lr": lr}
    for name, recipe in (("fp32", None), ("w8a8-qat", "w8a8-qat")):
        run = train_qat(mlp, recipe, tx, ty, schedule, evaluate=accuracy_on(vx, vy))
        final = run.model if recipe is None else lowbit.convert(run.model)
        out[name] = {
            "accuracy": evaluate(final, vx, vy),
            "epoch_seconds": sum(r.seconds for r in run.history) / epochs,
        }
    out["drop_points"] = 100 * (out["fp32"]["accuracy"] - out["w8a8-qat"]["accuracy"])
    return out


def _ddp_worker(rank: int, bits: int | None) -> dict[str, Any]:
    model = pretrained_resnet_fashion_mnist()
    tx, ty = load_fashion_mnist("train")
    states: list[Any] = []

    def wrap(prepared: nn.Module) -> nn.Module:
        ddp = DistributedDataParallel(prepared)
        states.append(compress_gradients(ddp, bits=bits))
        return ddp

    schedule = QatSchedule(epochs=DDP_EPOCHS, lr=0.01)
    run = train_qat(model, DDP_RECIPE, tx, ty, schedule, wrap=wrap, progress=rank == 0)
    frozen = lowbit.convert(run.model)
    checksum = sum(float(v.double().sum()) for v in frozen.state_dict().values())
    result = {"checksum": checksum, "epoch_seconds": [r.seconds for r in run.history]}
    result.update(bytes_sent=states[0].bytes_sent, fp32_bytes=states[0].fp32_bytes)
    if rank == 0:
        vx, vy = load_fashion_mnist("test")
        result["accuracy"] = evaluate(frozen, vx, vy)
    return result


def ddp() -> dict[str, Any]:
    out: dict[str, Any] = {"recipe": DDP_RECIPE, "epochs": DDP_EPOCHS, "nproc": 2}
    for name, bits in (("fp32", None), ("int8", 8), ("int4", 4)):
        start = time.perf_counter()
        r0, r1 = run_local(_ddp_worker, nproc=2, args=(bits,), threads=1, timeout_s=3600)
        out[name] = {
            "accuracy": r0["accuracy"],
            "bytes_sent": r0["bytes_sent"],
            "fp32_bytes": r0["fp32_bytes"],
            "ratio": r0["bytes_sent"] / r0["fp32_bytes"],
            "epoch_seconds": r0["epoch_seconds"],
            "ranks_identical": r0["checksum"] == r1["checksum"],
            "total_seconds": time.perf_counter() - start,
        }
    return out


def _print(results: dict[str, Any]) -> None:
    console = Console(width=150)
    res = results.get("resnet")
    if res:
        t = Table(title=f"Fashion-MNIST ResNet QAT (FP32 {_pct(res['fp32'])}%, 10k test images)")
        for col in ("recipe", "epochs", "no training", "per epoch", "converted", "drop", "s/epoch"):
            t.add_column(col, justify="right")
        float_s = res.get("float_epoch", {}).get("seconds")
        for row in res.get("runs", []) + res.get("binary", []):
            per = sum(row["epoch_seconds"]) / len(row["epoch_seconds"])
            ratio = f" ({per / float_s:.2f}x float)" if float_s else ""
            t.add_row(
                row["recipe"],
                str(row["epochs"]),
                _pct(row["no_training"]),
                " ".join(_pct(a) for a in row["per_epoch"]),
                _pct(row["converted"]),
                f"{row['drop_points']:+.2f}",
                f"{per:.1f}{ratio}",
            )
        if float_s:
            t.add_row("float epoch", "1", "", "", "", "", f"{float_s:.1f}")
        console.print(t)
    tm = results.get("timing")
    if tm:
        t = Table(title="One ResNet training epoch (60k images), the same loop")
        for col in ("training", "seconds", "vs float"):
            t.add_column(col, justify="right")
        t.add_row("float", f"{tm['float']:.1f}", "1.00")
        for name in ("w4a4-lsq", "w8a8-qat"):
            t.add_row(name, f"{tm[name]:.1f}", f"{tm[name + '_vs_float']:.2f}x")
        console.print(t)
    m = results.get("mnist")
    if m:
        t = Table(title=f"MNIST MLP 784-256-10 from scratch, {m['epochs']} epochs")
        for col in ("training", "test top-1 %", "s/epoch"):
            t.add_column(col, justify="right")
        for name in ("fp32", "w8a8-qat"):
            t.add_row(name, _pct(m[name]["accuracy"]), f"{m[name]['epoch_seconds']:.1f}")
        console.print(t)
    d = results.get("ddp")
    if d:
        t = Table(title=f"DDP, 2 processes, {d['recipe']} QAT {d['epochs']} epochs, ResNet")
        for col in ("all-reduce", "top-1 %", "bytes sent", "vs fp32", "s/epoch", "ranks same"):
            t.add_column(col, justify="right")
        for name in ("fp32", "int8", "int4"):
            r = d[name]
            t.add_row(
                name,
                _pct(r["accuracy"]),
                f"{r['bytes_sent'] / 1e6:.1f} MB",
                f"{r['ratio']:.3f}",
                " ".join(f"{s:.0f}" for s in r["epoch_seconds"]),
                str(r["ranks_identical"]),
            )
        console.print(t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["resnet", "timing", "mnist", "ddp", "binary"],
        default=None,
    )
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    out = Path(args.out)
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    sections = args.only or ["resnet", "timing", "binary", "mnist", "ddp"]
    for section in sections:
        if section == "resnet":
            binary = results.get("resnet", {}).get("binary", [])
            results["resnet"] = resnet() | {"binary": binary}
        elif section == "binary":
            res = results.setdefault("resnet", {})
            got = resnet(only_binary=True)
            res["fp32"] = got["fp32"]
            res["binary"] = got["runs"]
        elif section == "timing":
            results["timing"] = timing()
        elif section == "mnist":
            results["mnist"] = mnist()
        else:
            results["ddp"] = ddp()
        results["torch_threads"] = torch.get_num_threads()
        write_json(out, results)
        print(f"{section} done; wrote {out}")
    _print(results)


if __name__ == "__main__":
    main()
