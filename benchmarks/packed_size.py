""".lowbit file size against the theoretical packed size, per shipped recipe, on two models.

    .venv/bin/python benchmarks/packed_size.py [--out out/bench/packed_size.json]

Theoretical size (lowbit.theoretical_size): numel x bits / 8 per integer weight and asymmetric
weight zero point, plus scales, activation qparams, biases and float leftovers at their dtype.
The file adds the safetensors header and lowbit's JSON header. Needs no dataset: sizes do not
depend on the weights' values.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import lowbit
from lowbit.data import SmallResNet
from lowbit.export import write_json

RECIPES = ("w8a8", "w8a8-pertensor", "w8a16", "w4a8", "w4a16", "w2a8")


def models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Name -> (float model, a calibration batch)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512)
    )
    return {
        "MLP 3x512x512": (mlp.eval(), torch.randn(64, 512)),
        "SmallResNet 16-32-64": (
            SmallResNet(widths=(16, 32, 64)).eval(),
            torch.randn(16, 1, 28, 28),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/bench/packed_size.json")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, (model, batch) in models().items():
            fp32 = sum(p.numel() * p.element_size() for p in model.state_dict().values())
            for recipe in RECIPES:
                qmodel = lowbit.quantize(model, recipe, data=[batch])
                size = lowbit.save(qmodel, Path(folder) / "m.lowbit").stat().st_size
                theory = lowbit.theoretical_size(qmodel)
                rows.append(
                    {
                        "model": name,
                        "recipe": recipe,
                        "file_bytes": size,
                        "theoretical_bytes": theory,
                        "over_theory_percent": 100 * (size - theory) / theory,
                        "fp32_bytes": fp32,
                        "compression": fp32 / size,
                    }
                )
    table = Table(title=".lowbit file size against the theoretical packed size")
    for col in ("model", "recipe", "file KiB", "theory KiB", "over theory", "× smaller than fp32"):
        table.add_column(col, justify="left" if col in ("model", "recipe") else "right")
    for r in rows:
        table.add_row(
            r["model"],
            r["recipe"],
            f"{r['file_bytes'] / 1024:.1f}",
            f"{r['theoretical_bytes'] / 1024:.1f}",
            f"{r['over_theory_percent']:.2f}%",
            f"{r['compression']:.2f}x",
        )
    Console(width=140).print(table)
    write_json(out, {"rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
