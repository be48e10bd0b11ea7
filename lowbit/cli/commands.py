"""`lowbit ...`: a thin command line over the API.

lowbit quantize --model MOD:FACTORY|hf:DIR [--weights CKPT] [--data MOD:CALLABLE] --recipe R
                --out FILE
lowbit eval --model MOD:FACTORY|hf:DIR [--weights CKPT] --quantized FILE --data MOD:CALLABLE
lowbit export FILE --model MOD:FACTORY --example SHAPE|MOD:CALLABLE --out model.onnx
lowbit inspect FILE
lowbit qat --model resnet|mlp|MOD:FACTORY --data fashion-mnist|mnist|MOD:CALLABLE --recipe R
           --epochs N --out FILE [--nproc 2 [--grad-bits 8|4]]
lowbit recipes
lowbit demo

``MOD`` is imported from ``--app-dir`` (default: the current folder), which goes at the END
of ``sys.path``: a file there named like an installed package (``sympy.py``) cannot replace it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from lowbit.cli.inputs import (
    UsageError,
    build_data,
    build_model,
    check_output_path,
    import_object,
    os_error_message,
    write_error,
)
from lowbit.cli.qat_command import add_qat_parser

__all__ = ["main", "build_parser"]


def _cmd_quantize(args: argparse.Namespace, console: Console) -> None:
    from safetensors import SafetensorError

    from lowbit.api import quantize
    from lowbit.config import load_recipe
    from lowbit.export import save

    recipe = load_recipe(args.recipe)  # a bad recipe or --out fails before any work
    out = check_output_path(args.out)
    if not out.suffix:  # save() appends .lowbit
        check_output_path(out.with_suffix(".lowbit"))
    model = build_model(args.model, args.weights, args.app_dir)
    data = build_data(args.data, args.app_dir) if args.data else None
    start = time.perf_counter()
    qmodel = quantize(model, recipe, data=data, num_batches=args.num_batches)
    elapsed = time.perf_counter() - start
    try:
        path = save(qmodel, args.out)
    except (OSError, SafetensorError) as err:
        raise write_error(err, "--out", args.out) from None
    console.print(
        f"quantized with {args.recipe!s} in {elapsed:.1f} s; wrote {path} "
        f"({path.stat().st_size / 1024:.1f} KiB)"
    )


def _cmd_eval(args: argparse.Namespace, console: Console) -> None:
    from lowbit.export import load
    from lowbit.report.evaluate import evaluate
    from lowbit.runtime import compile, kernel_report

    float_model = build_model(args.model, args.weights, args.app_dir)
    qmodel = load(args.quantized, float_model)  # in eval mode; float_model is not changed
    data = build_data(args.data, args.app_dir)
    if not data:
        raise UsageError("--data gave no batches")
    first = data[0]
    example = first[0] if isinstance(first, (tuple, list)) else first
    runnable = compile(qmodel, args.backend, example_inputs=example)
    trained = args.weights is not None or args.model.startswith("hf:")
    result = evaluate(runnable, data, reference=float_model if trained else None)
    report = kernel_report(runnable)
    parts = [f"{result.examples} examples in {result.seconds:.2f} s ({report.backend} backend)"]
    if result.top1 is not None:
        ref = result.reference_top1
        parts.append(
            f"top-1 accuracy: {100 * result.top1:.2f}%"
            + (f" (float {100 * ref:.2f}%)" if ref is not None else "")
        )
    if result.sqnr_db is not None and result.cosine is not None:
        parts.append(
            f"output SQNR {result.sqnr_db:.1f} dB, cosine {result.cosine:.4f} against float"
        )
    elif not trained:
        parts.append("give --weights (or --model hf:DIR) to compare outputs against float")
    console.print("; ".join(parts))


def _example_inputs(spec: str, app_dir: str = ".") -> Any:
    """``1,3,224,224`` (a random float32 tensor of that shape) or ``MOD:CALLABLE``."""
    if ":" in spec:
        made = import_object(spec, app_dir)
        return made() if callable(made) else made
    try:
        shape = [int(d) for d in spec.split(",")]
    except ValueError:
        raise UsageError(
            f"--example {spec!r} is neither a shape such as 1,3,224,224 nor MOD:CALLABLE"
        ) from None
    if not shape or min(shape) < 1:
        raise UsageError(f"--example {spec!r}: every dimension must be a positive integer")
    return torch.randn(shape)


def _cmd_export(args: argparse.Namespace, console: Console) -> None:
    from lowbit.export import load
    from lowbit.export.onnx import export_onnx

    check_output_path(args.out)
    qmodel = load(args.file, build_model(args.model, None, args.app_dir))
    try:
        path = export_onnx(qmodel, _example_inputs(args.example, args.app_dir), args.out)
    except OSError as err:
        raise write_error(err, "--out", args.out) from None
    console.print(f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB)")


def _cmd_inspect(args: argparse.Namespace, console: Console) -> None:
    from lowbit.export import print_inspect

    print_inspect(args.file, console=console)


def _cmd_recipes(args: argparse.Namespace, console: Console) -> None:
    from lowbit.config import list_recipes, load_recipe

    table = Table(title="shipped recipes")
    table.add_column("name", style="bold")
    table.add_column("algorithms")
    table.add_column("what it does")
    for name, description in list_recipes().items():
        steps = " → ".join(step for step, _ in load_recipe(name).steps) or "—"
        table.add_row(name, steps, description)
    console.print(table)


def _cmd_demo(args: argparse.Namespace, console: Console) -> None:
    from lowbit.demo import run_demo

    run_demo(
        recipes=args.recipes.split(",") if args.recipes else None,
        out_dir=Path(args.out_dir),
        calibration_images=args.calibration_images,
        console=console,
    )


def _app_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--app-dir",
        default=".",
        help="folder holding the MOD of --model/--data (default: the current folder); it is "
        "searched after the installed packages, never instead of them",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lowbit`` command.

    >>> build_parser().parse_args(["inspect", "m.lowbit"]).file
    'm.lowbit'
    """
    parser = argparse.ArgumentParser(prog="lowbit", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and write a packed .lowbit file")
    q.add_argument(
        "--model",
        required=True,
        help="MOD:FACTORY returning an nn.Module, or hf:DIR (a save_pretrained folder)",
    )
    q.add_argument("--weights", help="float state dict (.safetensors or torch file)")
    q.add_argument("--data", help="MOD:CALLABLE returning calibration batches")
    q.add_argument("--recipe", default="w8a8", help="shipped name or YAML path")
    q.add_argument("--num-batches", type=int, default=None, help="calibration batches to use")
    q.add_argument("--out", required=True, help="output .lowbit file")
    _app_dir_option(q)
    q.set_defaults(run=_cmd_quantize)

    e = sub.add_parser(
        "eval", help="a .lowbit file on real batches: output SQNR/cosine against float, top-1"
    )
    e.add_argument(
        "--model", required=True, help="MOD:FACTORY of the float architecture, or hf:DIR"
    )
    e.add_argument("--weights", help="the float model's state dict (to compare against float)")
    e.add_argument("--quantized", required=True, help=".lowbit file")
    e.add_argument(
        "--data",
        required=True,
        help="MOD:CALLABLE returning batches: tensors, (inputs, labels) or dicts of inputs",
    )
    e.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "onnxruntime", "reference"],
        help="how the model runs (lowbit.compile); reference is the float simulation",
    )
    _app_dir_option(e)
    e.set_defaults(run=_cmd_eval)

    x = sub.add_parser("export", help="write a .lowbit file as an ONNX QDQ model")
    x.add_argument("file", help=".lowbit file")
    x.add_argument(
        "--model", required=True, help="MOD:FACTORY of the float architecture, or hf:DIR"
    )
    x.add_argument(
        "--example", required=True, help="input shape (1,1,28,28) or MOD:CALLABLE giving inputs"
    )
    x.add_argument("--out", required=True, help="output .onnx file")
    _app_dir_option(x)
    x.set_defaults(run=_cmd_export)

    i = sub.add_parser(
        "inspect",
        help="per-layer table of a .lowbit file: quantized layers, float leftovers and why",
    )
    i.add_argument("file")
    i.set_defaults(run=_cmd_inspect)

    add_qat_parser(sub)

    r = sub.add_parser("recipes", help="list the shipped recipes")
    r.set_defaults(run=_cmd_recipes)

    d = sub.add_parser("demo", help="quantize a Fashion-MNIST ResNet with several recipes")
    d.add_argument("--recipes", help="comma-separated recipe names (default: the main set)")
    d.add_argument("--out-dir", default="out/demo", help="where the .lowbit files go")
    d.add_argument("--calibration-images", type=int, default=512)
    d.set_defaults(run=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lowbit`` console script; returns the exit status.

    A user mistake prints one line on stderr and returns 2, never a traceback:

    >>> main(["inspect", "no-such-file.lowbit"])
    2
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    # Piped output (CI logs, files) gets a wide table instead of rich's 80-column default.
    console = Console() if sys.stdout.isatty() else Console(width=140)
    run: Callable[[argparse.Namespace, Console], None] = args.run
    try:
        run(args, console)
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line, never a traceback (--debug shows it)
        if args.debug:
            raise
        print(f"lowbit {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


def _one_line(err: Exception) -> str:
    """The first line of an error's message; where the message alone does not say what to
    do, what to do."""
    if isinstance(err, OSError) and not isinstance(err, UsageError):
        return os_error_message(err)
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(err, (UsageError, ValueError, TypeError, RuntimeError)) and first:
        return first
    return (
        f"{type(err).__name__}: {first or 'no message'} (unexpected; rerun with --debug to "
        "see where it came from)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
