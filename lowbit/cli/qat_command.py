"""``lowbit qat``: quantization-aware training from the command line, on 1 or N processes.

``--model`` is a zoo name (``resnet``, ``mobilenet``: the cached Fashion-MNIST FP32 models;
``mlp``: an untrained MLP 784-256-10) or ``MOD:FACTORY`` (with ``--weights``); ``--data`` a
shipped dataset (``fashion-mnist``, ``mnist``) or ``MOD:CALLABLE`` returning
``((train_x, train_y), (test_x, test_y))`` tensors. After every epoch the accuracy on the test
split is printed and, when it is the best so far, the converted model is written to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import torch
from rich.console import Console
from torch import nn

from lowbit.cli.inputs import UsageError, build_model, check_output_path, import_object

__all__ = ["QatOptions", "add_qat_parser", "run_qat"]

ZOO_MODELS = ("resnet", "mobilenet", "mlp")
DATASETS = ("fashion-mnist", "mnist")


@dataclasses.dataclass(frozen=True)
class QatOptions:
    """What ``lowbit qat`` was asked to do (plain values: it travels to spawned ranks).

    >>> QatOptions(model="mlp", data="mnist", recipe="w8a8-qat", out="m.lowbit").epochs
    3
    """

    model: str
    data: str
    recipe: str
    out: str
    weights: str | None = None
    epochs: int = 3
    lr: float = 0.01
    batch_size: int = 128
    calibration: int = 512
    nproc: int = 1
    grad_bits: int | None = None
    app_dir: str = "."
    progress: bool = True


def _model(options: QatOptions) -> nn.Module:
    from lowbit.data import pretrained_mobilenet_fashion_mnist, pretrained_resnet_fashion_mnist
    from lowbit.data.zoo import MLP

    if options.model in ZOO_MODELS:
        if options.weights:
            raise UsageError(f"--model {options.model} brings its own weights; drop --weights")
        if options.model == "resnet":
            return pretrained_resnet_fashion_mnist(progress=options.progress)
        if options.model == "mobilenet":
            return pretrained_mobilenet_fashion_mnist(progress=options.progress)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return MLP(784, (256,), 10)
    if ":" not in options.model:
        raise UsageError(
            f"--model {options.model!r}: use a zoo model ({', '.join(ZOO_MODELS)}) or "
            "MOD:FACTORY returning an nn.Module"
        )
    return build_model(options.model, options.weights, options.app_dir)


def _tensor_pair(value: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(t, torch.Tensor) for t in value)
        or len(value[0]) != len(value[1])
    ):
        raise UsageError(
            f"--data: the {what} split must be (inputs, labels), two tensors of the same length"
        )
    return value[0], value[1]


def _data(options: QatOptions) -> tuple[torch.Tensor, ...]:
    from lowbit.data import load_fashion_mnist, load_mnist

    if options.data in DATASETS:
        load = load_fashion_mnist if options.data == "fashion-mnist" else load_mnist
        return (*load("train"), *load("test"))
    if ":" not in options.data:
        raise UsageError(
            f"--data {options.data!r}: use a shipped dataset ({', '.join(DATASETS)}) or "
            "MOD:CALLABLE returning ((train_x, train_y), (test_x, test_y))"
        )
    make = import_object(options.data, options.app_dir)
    value = make() if callable(make) else make
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise UsageError(
            f"--data {options.data!r} must return ((train_x, train_y), (test_x, test_y))"
        )
    return (*_tensor_pair(value[0], "training"), *_tensor_pair(value[1], "test"))


def _train(rank: int, options: QatOptions) -> dict[str, Any]:
    """One rank's whole job (rank 0 prints and writes the file)."""
    from torch.nn.parallel import DistributedDataParallel

    from lowbit.api import convert
    from lowbit.distributed import compress_gradients
    from lowbit.export import save
    from lowbit.qat import EpochRecord, QatSchedule, accuracy_on, train_qat

    console = Console(width=120)
    model = _model(options)
    tx, ty, vx, vy = _data(options)
    traffic: list[Any] = []

    def wrap(prepared: nn.Module) -> nn.Module:
        ddp = DistributedDataParallel(prepared)
        traffic.append(compress_gradients(ddp, bits=options.grad_bits))
        return ddp

    def report(record: EpochRecord, trained: nn.Module, best: bool) -> None:
        if rank != 0:
            return
        saved = ""
        if best:
            path = save(convert(trained), options.out)
            saved = f"; best so far, wrote {path}"
        accuracy = 100 * (record.accuracy or 0.0)
        console.print(
            f"epoch {record.epoch}/{options.epochs}: loss {record.loss:.4f}, test top-1 "
            f"{accuracy:.2f}% (fake-quantized), {record.seconds:.1f} s{saved}"
        )

    schedule = QatSchedule(
        epochs=options.epochs,
        lr=options.lr,
        batch_size=options.batch_size,
        calibration=options.calibration,
    )
    run = train_qat(
        model,
        options.recipe,
        tx,
        ty,
        schedule,
        evaluate=accuracy_on(vx, vy),
        wrap=wrap if options.nproc > 1 else None,
        progress=options.progress and rank == 0,
        on_epoch=report,
    )
    result: dict[str, Any] = {"best_epoch": run.best_epoch, "best": run.best_accuracy}
    if traffic:
        result["ratio"] = traffic[0].ratio
    return result


def run_qat(options: QatOptions, console: Console) -> dict[str, Any]:
    """Check the options, train on ``options.nproc`` processes, print the summary.

    >>> run_qat(QatOptions("mlp", "mnist", "w8a8-qat", "x.lowbit", epochs=0), Console())
    Traceback (most recent call last):
    lowbit.cli.inputs.UsageError: --epochs 0: train at least 1 epoch
    """
    from lowbit.config import load_recipe
    from lowbit.distributed import run_local

    if options.epochs < 1:
        raise UsageError(f"--epochs {options.epochs}: train at least 1 epoch")
    if options.nproc < 1:
        raise UsageError(f"--nproc {options.nproc}: use 1 or more processes")
    if options.grad_bits is not None and options.nproc == 1:
        raise UsageError("--grad-bits compresses DDP's all-reduce: give --nproc 2 or more")
    load_recipe(options.recipe)  # a bad recipe or --out fails before any work
    check_output_path(options.out)
    if options.nproc == 1:
        result = _train(0, options)
    else:
        result = run_local(_train, nproc=options.nproc, args=(options,), timeout_s=None)[0]
    line = f"best epoch {result['best_epoch']}: {100 * (result['best'] or 0):.2f}%"
    if "ratio" in result:
        line += f"; gradients sent {result['ratio']:.3f}x the bytes of float32 all-reduce"
    console.print(line + f"; {options.out}")
    return result


def _cmd_qat(args: argparse.Namespace, console: Console) -> None:
    given = vars(args)  # every QatOptions field but progress is a flag of the same name
    fields = [f.name for f in dataclasses.fields(QatOptions) if f.name in given]
    options = QatOptions(**{name: given[name] for name in fields})
    run_qat(options, console)


def add_qat_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``lowbit qat`` to the command's subparsers.

    >>> parser = argparse.ArgumentParser(); sub = parser.add_subparsers()
    >>> add_qat_parser(sub).prog.endswith("qat")
    True
    """
    p: argparse.ArgumentParser = sub.add_parser(
        "qat", help="quantization-aware training; writes the best epoch as a .lowbit file"
    )
    p.add_argument("--model", required=True, help=f"{', '.join(ZOO_MODELS)} or MOD:FACTORY")
    p.add_argument("--weights", help="float state dict for MOD:FACTORY")
    p.add_argument(
        "--data",
        required=True,
        help=f"{', '.join(DATASETS)} or MOD:CALLABLE returning "
        "((train_x, train_y), (test_x, test_y))",
    )
    p.add_argument("--recipe", default="w4a4-lsq", help="shipped name or YAML path")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.01, help="peak learning rate (cosine decay)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch (all processes)")
    p.add_argument("--calibration", type=int, default=512, help="images that start the ranges")
    p.add_argument("--nproc", type=int, default=1, help="processes (DDP on gloo, this machine)")
    p.add_argument(
        "--grad-bits",
        type=int,
        choices=[8, 4],
        default=None,
        help="send DDP gradients as int8/int4 with error feedback (default: float32)",
    )
    p.add_argument("--out", required=True, help="output .lowbit file (the best epoch)")
    p.add_argument("--app-dir", default=".", help="folder holding MOD of --model/--data")
    p.set_defaults(run=_cmd_qat)
    return p
