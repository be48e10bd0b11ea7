"""`lowbit ...`: a thin command line over the API.

lowbit quantize --model MOD:FACTORY [--weights CKPT] --data MOD:CALLABLE --recipe R --out FILE
lowbit eval --model MOD:FACTORY --quantized FILE --data MOD:CALLABLE [--backend auto]
lowbit export FILE --model MOD:FACTORY --example SHAPE|MOD:CALLABLE --out model.onnx
lowbit inspect FILE
lowbit recipes
lowbit demo
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

__all__ = ["main", "import_object", "load_state_dict_file", "build_parser"]


class UsageError(Exception):
    """A mistake on the command line; printed as one line, exit status 2."""


def import_object(spec: str) -> Any:
    """Import ``"package.module:attr"`` (uvicorn style) and return the attribute.

    >>> import_object("lowbit.data.zoo:MLP").__name__
    'MLP'
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{spec!r} is not MODULE:NAME (for example mypkg.models:create_model)")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UsageError(f"cannot import module {module_name!r} from {spec!r}: {err}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"module {module_name!r} has no attribute {attr!r} (from {spec!r})")
        obj = getattr(obj, part)
    return obj


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a float state dict from ``.safetensors`` or a torch file (``weights_only=True``).

    >>> load_state_dict_file("missing.pt")
    Traceback (most recent call last):
    ...
    lowbit.cli.UsageError: weights file 'missing.pt' does not exist
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for foreign files
        raise UsageError(
            f"cannot read weights {str(path)!r} safely ({str(err).splitlines()[0]}); save a "
            "state_dict with torch.save(model.state_dict(), ...) or as .safetensors"
        ) from None
    if not isinstance(state, dict):
        raise UsageError(f"weights file {str(path)!r} holds no state dict")
    return state


def _build_model(factory: str, weights: str | None) -> nn.Module:
    make = import_object(factory)
    try:
        model = make() if callable(make) and not isinstance(make, nn.Module) else make
    except TypeError as err:
        raise UsageError(f"{factory!r} must be callable with no arguments ({err})") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"{factory!r} returned {type(model).__name__}, not a torch nn.Module")
    if weights:
        try:
            result = model.load_state_dict(load_state_dict_file(weights), strict=False)
        except RuntimeError as err:  # torch lists every size mismatch on its own line
            details = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
            raise UsageError(
                f"weights {weights!r} do not fit {type(model).__name__}: "
                f"{details[0] if details else err}"
                + (f" (and {len(details) - 1} more)" if len(details) > 1 else "")
            ) from None
        if result.missing_keys or result.unexpected_keys:
            raise UsageError(
                f"weights {weights!r} do not fit {type(model).__name__}: missing "
                f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
            )
    return model.eval()


def _build_data(spec: str) -> list[Any]:
    make = import_object(spec)
    data = make() if callable(make) else make
    if not hasattr(data, "__iter__"):
        raise UsageError(f"{spec!r} gave {type(data).__name__}, not an iterable of batches")
    return list(data) if not isinstance(data, list) else data


def _cmd_quantize(args: argparse.Namespace, console: Console) -> None:
    from lowbit.api import quantize
    from lowbit.export import save

    model = _build_model(args.model, args.weights)
    data = _build_data(args.data) if args.data else None
    start = time.perf_counter()
    qmodel = quantize(model, args.recipe, data=data, num_batches=args.num_batches)
    elapsed = time.perf_counter() - start
    path = save(qmodel, args.out)
    console.print(
        f"quantized with {args.recipe!s} in {elapsed:.1f} s; wrote {path} "
        f"({path.stat().st_size / 1024:.1f} KiB)"
    )


def _top1(model: nn.Module, data: Iterable[Any]) -> tuple[float, int]:
    correct = total = 0
    with torch.no_grad():
        for batch in data:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise UsageError("eval needs (inputs, labels) batches from --data")
            logits = model(batch[0])
            correct += int((logits.argmax(dim=1) == batch[1]).sum())
            total += int(batch[1].numel())
    if total == 0:
        raise UsageError("--data gave no batches")
    return correct / total, total


def _cmd_eval(args: argparse.Namespace, console: Console) -> None:
    from lowbit.export import load
    from lowbit.runtime import compile, kernel_report

    model = _build_model(args.model, None)
    qmodel = load(args.quantized, model)  # in eval mode
    data = _build_data(args.data)
    example = data[0][0] if data and isinstance(data[0], (tuple, list)) else None
    runnable = compile(qmodel, args.backend, example_inputs=example)
    start = time.perf_counter()
    acc, total = _top1(runnable, data)
    seconds = time.perf_counter() - start
    report = kernel_report(runnable)
    console.print(
        f"top-1 accuracy: {100 * acc:.2f}% on {total} examples in {seconds:.2f} s "
        f"({report.backend} backend)"
    )


def _example_inputs(spec: str) -> Any:
    """``1,3,224,224`` (a random float32 tensor of that shape) or ``MOD:CALLABLE``."""
    if ":" in spec:
        made = import_object(spec)
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

    qmodel = load(args.file, _build_model(args.model, None))
    path = export_onnx(qmodel, _example_inputs(args.example), args.out)
    console.print(f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB)")


def _cmd_inspect(args: argparse.Namespace, console: Console) -> None:
    from lowbit.export import print_inspect

    print_inspect(args.file, console=console)


def _cmd_recipes(args: argparse.Namespace, console: Console) -> None:
    from lowbit.config import list_recipes

    table = Table(title="shipped recipes")
    table.add_column("name", style="bold")
    table.add_column("what it does")
    for name, description in list_recipes().items():
        table.add_row(name, description)
    console.print(table)


def _cmd_demo(args: argparse.Namespace, console: Console) -> None:
    from lowbit.demo import run_demo

    run_demo(
        recipes=args.recipes.split(",") if args.recipes else None,
        out_dir=Path(args.out_dir),
        calibration_images=args.calibration_images,
        console=console,
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
    q.add_argument("--model", required=True, help="MOD:FACTORY returning an nn.Module")
    q.add_argument("--weights", help="float state dict (.safetensors or torch file)")
    q.add_argument("--data", help="MOD:CALLABLE returning calibration batches")
    q.add_argument("--recipe", default="w8a8", help="shipped name or YAML path")
    q.add_argument("--num-batches", type=int, default=None, help="calibration batches to use")
    q.add_argument("--out", required=True, help="output .lowbit file")
    q.set_defaults(run=_cmd_quantize)

    e = sub.add_parser("eval", help="top-1 accuracy of a .lowbit file on (inputs, labels)")
    e.add_argument("--model", required=True, help="MOD:FACTORY of the float architecture")
    e.add_argument("--quantized", required=True, help=".lowbit file")
    e.add_argument("--data", required=True, help="MOD:CALLABLE returning (inputs, labels)")
    e.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "onnxruntime", "reference"],
        help="how the model runs (lowbit.compile); reference is the float simulation",
    )
    e.set_defaults(run=_cmd_eval)

    x = sub.add_parser("export", help="write a .lowbit file as an ONNX QDQ model")
    x.add_argument("file", help=".lowbit file")
    x.add_argument("--model", required=True, help="MOD:FACTORY of the float architecture")
    x.add_argument(
        "--example", required=True, help="input shape (1,1,28,28) or MOD:CALLABLE giving inputs"
    )
    x.add_argument("--out", required=True, help="output .onnx file")
    x.set_defaults(run=_cmd_export)

    i = sub.add_parser("inspect", help="per-layer table of a .lowbit file")
    i.add_argument("file")
    i.set_defaults(run=_cmd_inspect)

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
    except (UsageError, ValueError, TypeError, RuntimeError, OSError) as err:
        if args.debug:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"lowbit {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
