"""The main job: quantize a Fashion-MNIST ResNet with several recipes and show what it cost."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from tqdm.auto import tqdm

from lowbit.api import quantize
from lowbit.data import (
    calibration_batches,
    load_fashion_mnist,
    pretrained_resnet_fashion_mnist,
    save_weights,
)
from lowbit.export import load, save, write_json
from lowbit.report.metrics import sqnr_db
from lowbit.runtime import compile, kernel_report

__all__ = [
    "DemoRow",
    "DEMO_RECIPES",
    "batched_logits",
    "run_demo",
    "evaluate_recipe",
    "scrambled_copy",
]

DEMO_RECIPES = ("w8a8", "w8a8-pertensor", "w8a8-dynamic", "w8a16", "w4a8", "w4a16", "w2a8")


@dataclass
class DemoRow:
    """One line of the demo table."""

    recipe: str
    accuracy: float
    delta_points: float
    file_bytes: int
    compression: float
    sqnr_db: float
    quantize_seconds: float
    eval_seconds: float  # the loaded, compiled model over the whole test set, batches of 1000
    path: str
    kernels: str = ""  # the kernels its layers run on (lowbit.compile, torch backend)


def scrambled_copy(model: nn.Module) -> nn.Module:
    """A model of the same architecture with freshly initialised weights (nothing shared).

    >>> m = torch.nn.Linear(2, 2)
    >>> torch.equal(scrambled_copy(m).weight, m.weight)
    False
    """
    fresh = copy.deepcopy(model)
    torch.manual_seed(12345)
    for module in fresh.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    return fresh


def batched_logits(
    model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = 1000
) -> torch.Tensor:
    """Outputs of ``model`` (a module, put in eval mode, or any function) over ``x`` in batches,
    without gradients.

    >>> batched_logits(torch.nn.Linear(3, 2), torch.randn(2500, 3)).shape
    torch.Size([2500, 2])
    """
    if isinstance(model, nn.Module):
        model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def _fp32_bytes(model: nn.Module, folder: Path) -> int:
    path = folder / "fp32.safetensors"
    save_weights(model, path)  # atomic, like every file lowbit writes
    return path.stat().st_size


def evaluate_recipe(
    model: nn.Module,
    recipe: str,
    calibration: list[torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    reference: tuple[float, torch.Tensor, int],
    out_dir: Path,
) -> DemoRow:
    """Quantize ``model`` with ``recipe``, save, load into a fresh copy, compile it (torch
    backend, checked against lowbit's simulation on the first calibration batch) and evaluate
    it on ``test``.

    ``reference`` is (fp32 accuracy, fp32 logits on ``test``, fp32 file bytes).

    >>> import tempfile
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 4)).eval()
    >>> x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    >>> logits = net(x).detach()
    >>> acc = float((logits.argmax(1) == y).float().mean())
    >>> with tempfile.TemporaryDirectory() as d:
    ...     row = evaluate_recipe(net, "w8a8", [x[:32]], (x, y), (acc, logits, 400), Path(d))
    >>> row.recipe, row.sqnr_db > 30, abs(row.delta_points) < 5
    ('w8a8', True, True)
    """
    fp32_acc, fp32_logits, fp32_bytes = reference
    start = time.perf_counter()
    qmodel = quantize(model, recipe, data=calibration)
    seconds = time.perf_counter() - start
    path = save(qmodel, out_dir / f"{recipe}.lowbit")
    loaded = compile(load(path, scrambled_copy(model)), "torch", example_inputs=calibration[0])
    kernels = sorted({row.kernel for row in kernel_report(loaded).layers})
    batched_logits(loaded, test[0][:1000])  # warm-up: kernels prepare on their first call
    start = time.perf_counter()
    logits = batched_logits(loaded, test[0])
    eval_seconds = time.perf_counter() - start
    acc = float((logits.argmax(dim=1) == test[1]).float().mean())
    size = path.stat().st_size
    return DemoRow(
        recipe=recipe,
        accuracy=acc,
        delta_points=100.0 * (acc - fp32_acc),
        file_bytes=size,
        compression=fp32_bytes / size,
        sqnr_db=sqnr_db(fp32_logits, logits),
        quantize_seconds=seconds,
        eval_seconds=eval_seconds,
        path=str(path),
        kernels=", ".join(kernels),
    )


def _table(rows: list[DemoRow], fp32_acc: float, fp32_bytes: int, fp32_eval: float) -> Table:
    table = Table(title="Fashion-MNIST SmallResNet, full 10k test set")
    columns = ("recipe", "top-1 %", "Δ pts", "file KiB", "× smaller", "SQNR dB", "quantize s")
    for col in (*columns, "eval s", "× faster", "kernels"):
        table.add_column(
            col,
            justify="left" if col in ("recipe", "kernels") else "right",
            no_wrap=col != "kernels",
        )
    table.add_row(
        "fp32",
        f"{100 * fp32_acc:.2f}",
        "—",
        f"{fp32_bytes / 1024:.1f}",
        "1.0x",
        "—",
        "—",
        f"{fp32_eval:.2f}",
        "1.0x",
        "torch float32",
    )
    for r in rows:
        table.add_row(
            r.recipe,
            f"{100 * r.accuracy:.2f}",
            f"{r.delta_points:+.2f}",
            f"{r.file_bytes / 1024:.1f}",
            f"{r.compression:.1f}x",
            f"{r.sqnr_db:.1f}",
            f"{r.quantize_seconds:.2f}",
            f"{r.eval_seconds:.2f}",
            f"{fp32_eval / r.eval_seconds:.1f}x",
            r.kernels,
        )
    return table


def run_demo(
    recipes: Sequence[str] | None = None,
    out_dir: Path = Path("out/demo"),
    calibration_images: int = 512,
    console: Console | None = None,
) -> list[DemoRow]:
    """Train (or load the cached) FP32 ResNet, quantize it per recipe, print and return rows.

    Writes ``<recipe>.lowbit`` files and ``results.json`` into ``out_dir``. Takes minutes the
    first time (training), about a minute after that, so no doctest runs it::

        rows = run_demo(["w8a8"], out_dir=Path("/tmp/lowbit-demo"))
    """
    console = console or Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    model = pretrained_resnet_fashion_mnist(progress=True).eval()
    train_x, _ = load_fashion_mnist("train")
    test = load_fashion_mnist("test")
    calibration = list(calibration_batches(train_x, n=calibration_images))
    batched_logits(model, test[0][:1000])  # warm-up, as for every quantized model
    start = time.perf_counter()
    fp32_logits = batched_logits(model, test[0])
    fp32_eval = time.perf_counter() - start
    fp32_acc = float((fp32_logits.argmax(dim=1) == test[1]).float().mean())
    fp32_bytes = _fp32_bytes(model, out_dir)
    reference = (fp32_acc, fp32_logits, fp32_bytes)
    rows = []
    for recipe in tqdm(list(recipes or DEMO_RECIPES), desc="recipes"):
        rows.append(evaluate_recipe(model, recipe, calibration, test, reference, out_dir))
    console.print(_table(rows, fp32_acc, fp32_bytes, fp32_eval))
    write_json(
        out_dir / "results.json",
        {
            "fp32": {"accuracy": fp32_acc, "file_bytes": fp32_bytes, "eval_seconds": fp32_eval},
            "calibration_images": calibration_images,
            "torch_threads": torch.get_num_threads(),
            "rows": [asdict(r) for r in rows],
        },
    )
    console.print(f"files: {out_dir.resolve()} (one .lowbit per recipe, results.json)")
    return rows
