"""Integer execution against lowbit's own simulation, on the full Fashion-MNIST test set.

    .venv/bin/python -m benchmarks.agreement

The demo's SmallResNet quantized with each recipe, run once on the simulation (every layer on
the reference kernel) and once on the kernels it gets, eagerly and compiled (fused, uint8
between layers); output SQNR and top-1 agreement over the 10k test images, with the kernels
used. Writes benchmarks/results/agreement.json.
"""

from __future__ import annotations

import warnings

import torch
from rich.console import Console
from rich.table import Table

import lowbit
from benchmarks.harness import RESULTS, machine, setup
from lowbit.data import calibration_batches, load_fashion_mnist, pretrained_resnet_fashion_mnist
from lowbit.export import write_json

RECIPES = ("w8a8", "w8a8-pertensor", "w8a8-dynamic", "w8a16", "w4a8", "w4a16")


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i : i + 500]) for i in range(0, len(x), 500)])


def main() -> None:
    setup()
    warnings.filterwarnings("ignore")
    model = pretrained_resnet_fashion_mnist(progress=True).eval()
    train_x, _ = load_fashion_mnist("train")
    test_x, _ = load_fashion_mnist("test")
    calibration = list(calibration_batches(train_x, n=512))
    rows = []
    for recipe in RECIPES:
        qmodel = lowbit.quantize(model, recipe, data=calibration)
        simulated = _logits(lowbit.compile(qmodel, "reference"), test_x)
        for mode in ("eager", "compiled"):
            if mode == "eager":
                run = lowbit.compile(qmodel, "torch", fuse=False)
            else:
                run = lowbit.compile(qmodel, "torch", example_inputs=calibration[0])
            out = _logits(run, test_x)
            kernels = sorted({r.kernel for r in lowbit.kernel_report(run).layers})
            rows.append(
                {
                    "recipe": recipe,
                    "mode": mode,
                    "sqnr_db": lowbit.sqnr_db(simulated, out),
                    "top1_agreement": float((out.argmax(1) == simulated.argmax(1)).float().mean()),
                    "kernels": kernels,
                }
            )
    table = Table(title="integer execution against the simulation, Fashion-MNIST test set (10k)")
    for col in ("recipe", "mode", "SQNR dB", "top-1 agreement %", "kernels"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["recipe"],
            r["mode"],
            f"{r['sqnr_db']:.1f}",
            f"{100 * r['top1_agreement']:.2f}",
            ", ".join(r["kernels"]),
        )
    Console(width=140).print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "agreement.json"
    write_json(path, {"machine": machine(), "test_images": len(test_x), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
