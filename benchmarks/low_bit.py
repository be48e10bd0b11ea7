"""Low-bit PTQ: lowbit's algorithm recipes next to round-to-nearest at the same bits and the
anchors that support the setting, on the same data in one run.

    .venv/bin/python -m benchmarks.low_bit [--models resnet,mobilenet,gpt] [--quick]

- resnet, mobilenet: the cached Fashion-MNIST SmallResNet / MobileNetV2-style net, 512
  calibration images from the training split, top-1 on the full 10k test set. Anchors:
  torch.ao static int8 (FX, x86) and onnxruntime static QDQ (int8; int4 weights with uint8 or
  uint4 activations, where onnxruntime quantizes them).
- gpt: the cached character-level TinyGPT, 128 windows of 128 characters from the training
  plays as calibration, perplexity on the held-out play. Anchor: torchao int4 weight-only g128.

Every lowbit algorithm recipe gets a round-to-nearest twin: the same recipe (same specs, same
first/last layers) with ``algorithm: null``. Prints one table per model and writes
benchmarks/results/low_bit.json. Quantize times are wall-clock on this machine: run it alone.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import lowbit
import lowbit.data
from benchmarks import anchors
from benchmarks.harness import RESULTS, machine, setup
from lowbit.demo import batched_logits
from lowbit.export import write_json

# model -> (setting, lowbit algorithm recipes, shipped round-to-nearest recipe or None)
SETTINGS: dict[str, list[tuple[str, list[str], str | None]]] = {
    "resnet": [
        ("w4a8", ["w4a8-adaround"], "w4a8"),
        ("w4a4", ["w4a4-adaround"], None),
        ("w2a8", ["w2a8-brecq"], "w2a8"),
    ],
    "mobilenet": [
        ("w8a8", [], "w8a8"),
        ("w4a8", ["w4a8-adaround"], "w4a8"),
    ],
    "gpt": [
        ("w4a16", ["w4a16-gptq", "w4a16-awq"], "w4a16-g128"),
        ("w3a16", ["w3a16-gptq"], None),
    ],
}
ORT_SETTINGS = {
    "w8a8": ("QInt8", "QUInt8"),
    "w4a8": ("QInt4", "QUInt8"),
    "w4a4": ("QInt4", "QUInt4"),
}


@dataclass
class Row:
    """One model, one method: quality next to FP32 and the time it took to quantize."""

    model: str
    setting: str
    toolkit: str
    method: str
    metric: str  # "top-1 %" or "perplexity"
    value: float
    fp32: float
    delta: float  # points for accuracy, percent for perplexity (relative)
    quantize_s: float
    note: str = ""


def like_torchao(recipe: str | lowbit.Recipe) -> lowbit.Recipe:
    """``recipe`` with the layers torchao's CPU int4 path leaves alone kept float: the
    embeddings and ``lm_head`` (84 outputs: not a multiple of 16), for a like-for-like row.

    >>> like_torchao("w4a16-g128").embedding is None
    True
    """
    data = lowbit.load_recipe(recipe).to_dict()
    name = data["name"]
    data.update(
        embedding=None,
        rules=[{"match": "lm_head", "config": None}, *data["rules"]],
        name=f"{name} (embeddings, lm_head float)",
    )
    return lowbit.Recipe.from_dict(data)


def rtn_twin(recipe: str) -> lowbit.Recipe:
    """``recipe`` with its algorithms removed: the same specs, rounded to nearest.

    >>> rtn_twin("w8a8").steps
    ()
    """
    data = lowbit.load_recipe(recipe).to_dict()
    data.update(algorithm=None, args={}, name=f"{data['name']} (RTN twin)")
    return lowbit.Recipe.from_dict(data)


@dataclass
class Task:
    """A model with its data and its metric."""

    name: str
    model: nn.Module
    calibration: list[Any]
    score: Callable[[Callable[..., torch.Tensor]], float]  # higher is better for accuracy
    metric: str
    example: torch.Tensor | None = None


def image_task(name: str, quick: bool) -> Task:
    """A cached Fashion-MNIST model, 512 calibration images, top-1 on the test set."""
    if name == "resnet":
        model = lowbit.data.pretrained_resnet_fashion_mnist(progress=True)
    else:
        model = lowbit.data.pretrained_mobilenet_fashion_mnist(progress=True)
    train_x, _ = lowbit.data.load_fashion_mnist("train")
    test_x, test_y = lowbit.data.load_fashion_mnist("test")
    if quick:
        test_x, test_y = test_x[:2000], test_y[:2000]
    calibration = list(lowbit.data.calibration_batches(train_x, n=512, batch_size=64))

    def score(run: Callable[..., torch.Tensor]) -> float:
        logits = batched_logits(run, test_x)
        return 100.0 * float((logits.argmax(1) == test_y).float().mean())

    return Task(name, model.eval(), calibration, score, "top-1 %", calibration[0])


def gpt_task(quick: bool) -> Task:
    """The cached TinyGPT, 128 calibration windows, held-out perplexity."""
    from lowbit.data import perplexity, pretrained_tiny_gpt, text_calibration_batches

    model = pretrained_tiny_gpt(progress=True).eval()
    held_out = lowbit.data.load_shakespeare("test")
    if quick:
        held_out = held_out[: 128 * 200]
    calibration = text_calibration_batches(8, 16, 128)

    def score(run: Callable[..., torch.Tensor]) -> float:
        return perplexity(run, held_out)

    return Task("gpt", model, calibration, score, "perplexity")


def _delta(task: Task, value: float, fp32: float) -> float:
    if task.metric == "perplexity":
        return 100.0 * (value / fp32 - 1.0)
    return value - fp32


def _lowbit_row(task: Task, setting: str, recipe: str | lowbit.Recipe, fp32: float) -> Row:
    label = recipe if isinstance(recipe, str) else recipe.name
    start = time.perf_counter()
    q = lowbit.quantize(task.model, recipe, data=task.calibration)
    seconds = time.perf_counter() - start
    value = task.score(q)
    print(f"  {task.name} {label}: {value:.3f} ({seconds:.1f} s)", flush=True)
    return Row(
        task.name,
        setting,
        "lowbit",
        label,
        task.metric,
        value,
        fp32,
        _delta(task, value, fp32),
        seconds,
    )


def _anchor_rows(task: Task, setting: str, fp32: float, folder: Path) -> list[Row]:
    found: list[tuple[anchors.Row, Callable[..., torch.Tensor]]] = []
    if task.metric == "perplexity":
        if setting == "w4a16":
            found = anchors.torchao_rows(task.model, ("int4 weight-only g128",))
    else:
        if setting == "w8a8":
            found += anchors.torch_ao_static(task.model, task.calibration)
        if setting in ORT_SETTINGS:
            try:
                found += anchors.onnxruntime_static(
                    task.model, task.calibration, folder, *ORT_SETTINGS[setting]
                )
            except Exception as err:  # an anchor that cannot do the setting is shown, not fatal
                print(f"  onnxruntime {setting} skipped: {type(err).__name__}: {err}")
    rows = []
    for template, run in found:
        value = task.score(run)
        rows.append(
            Row(
                task.name,
                setting,
                template.toolkit,
                template.method,
                task.metric,
                value,
                fp32,
                _delta(task, value, fp32),
                template.quantize_s or 0.0,
            )
        )
    return rows


def _specs(recipe: lowbit.Recipe) -> dict[str, Any]:
    """What a recipe quantizes, without its name and description."""
    return recipe.to_dict() | {"name": "", "description": ""}


def run_task(task: Task, folder: Path) -> list[Row]:
    """FP32, then per setting: the anchors, the shipped RTN recipe, each algorithm recipe
    and its RTN twin."""
    fp32 = task.score(task.model)
    rows = [Row(task.name, "fp32", "torch", "fp32", task.metric, fp32, fp32, 0.0, 0.0)]
    for setting, recipes, shipped in SETTINGS[task.name]:
        rows += _anchor_rows(task, setting, fp32, folder)
        if shipped is not None:
            rows.append(_lowbit_row(task, setting, shipped, fp32))
        for recipe in recipes:
            if recipe not in lowbit.list_recipes():
                print(f"  {recipe}: not a shipped recipe (yet); skipped")
                continue
            twin = rtn_twin(recipe)
            if shipped is None or _specs(twin) != _specs(lowbit.load_recipe(shipped)):
                rows.append(_lowbit_row(task, setting, twin, fp32))
            rows.append(_lowbit_row(task, setting, recipe, fp32))
        if task.metric == "perplexity" and setting == "w4a16":  # the torchao row's coverage
            for name in ("w4a16-g128", "w4a16-gptq"):
                rows.append(_lowbit_row(task, setting, like_torchao(name), fp32))
    return rows


def table(rows: list[Row], title: str) -> Table:
    """The rows of one model as a rich table."""
    out = Table(title=title)
    for col in ("setting", "toolkit", "method", "value", "Δ vs fp32", "quantize s"):
        out.add_column(col)
    for r in rows:
        unit = "%" if r.metric == "perplexity" else " pts"
        out.add_row(
            r.setting,
            r.toolkit,
            r.method,
            f"{r.value:.3f}",
            f"{r.delta:+.2f}{unit}",
            f"{r.quantize_s:.1f}",
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet,mobilenet,gpt")
    parser.add_argument("--quick", action="store_true", help="2k test images / 200 windows")
    parser.add_argument("--out", default=str(RESULTS / "low_bit.json"))
    args = parser.parse_args(argv)
    setup()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    folder = Path("out/bench/low_bit")
    folder.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    for name in args.models.split(","):
        task = gpt_task(args.quick) if name == "gpt" else image_task(name, args.quick)
        rows = run_task(task, folder)
        metric = rows[0].metric
        Console(width=140).print(table(rows, f"{name}: {metric}, fp32 {rows[0].value:.3f}"))
        _merge(out, task.name, rows, args.quick)  # each model as it finishes
    print(f"wrote {out}")
    return 0


def _merge(path: Path, model: str, rows: list[Row], quick: bool) -> None:
    """Write ``rows`` into the JSON at ``path``, replacing that model's earlier rows (other
    models' rows stay: models can be re-run one at a time)."""
    kept: list[dict[str, Any]] = []
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("quick") == quick:
            kept = [r for r in old.get("rows", []) if r.get("model") != model]
    new = kept + [asdict(r) for r in rows]
    write_json(path, {"machine": machine(), "quick": quick, "rows": new})


if __name__ == "__main__":
    raise SystemExit(main())
