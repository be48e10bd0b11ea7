"""Time the FP32 SmallResNet training that `lowbit demo` does once, and its test accuracy.

    .venv/bin/python benchmarks/train_resnet.py [--out out/bench/train_resnet.json]

Trains from scratch with the shipped recipe (lowbit.data.FASHION_RESNET_RECIPE) into a temporary
cache folder, so the user's cache is neither used nor touched, then evaluates on the full 10k
Fashion-MNIST test set. Prints one table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lowbit.data import (
    FASHION_RESNET_RECIPE,
    evaluate,
    load_fashion_mnist,
    pretrained_resnet_fashion_mnist,
)
from lowbit.export import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/bench/train_resnet.json")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        model = pretrained_resnet_fashion_mnist(cache_dir=cache, progress=True)
        seconds = time.perf_counter() - start
    x, y = load_fashion_mnist("test")
    accuracy = evaluate(model, x, y)
    result = {
        "recipe": dataclasses.asdict(FASHION_RESNET_RECIPE),
        "train_seconds": seconds,  # includes loading the 60k training images
        "test_accuracy": accuracy,
        "torch_threads": torch.get_num_threads(),
    }
    table = Table(title="FP32 SmallResNet on Fashion-MNIST")
    for col in ("epochs", "train s", "test top-1 %", "torch threads"):
        table.add_column(col, justify="right")
    table.add_row(
        str(FASHION_RESNET_RECIPE.epochs),
        f"{seconds:.1f}",
        f"{100 * accuracy:.2f}",
        str(torch.get_num_threads()),
    )
    Console(width=140).print(table)
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
