"""``lowbit.compile``: turn a converted or loaded model into its fastest runnable form, and say
which kernel each layer got.

Backends:

- ``"torch"``: each layer on the best registered kernel (:mod:`lowbit.nn.kernels`), plus graph
  fusion (:mod:`lowbit.runtime.fusion`) when torch.fx can trace the model;
- ``"onnxruntime"``: the model exported to ONNX QDQ and run by an onnxruntime session;
- ``"reference"``: lowbit's float simulation, the yardstick the others are measured against;
- ``"auto"``: with example inputs, every candidate that agrees with the simulation is timed
  on them and the fastest wins; without, ``"torch"``.

With example inputs, every result is checked against the simulation (output SQNR); a
configuration below ``min_sqnr_db`` is replaced by a more exact one (no uint8 hand-off, then no
bfloat16 kernels), and the report says so. Nothing lowbit cannot run in integer is an error:
it stays on the float path with a note.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.table import Table
from torch import nn
from torch.utils._pytree import tree_leaves

from lowbit.api import quantized_layers
from lowbit.nn import QModule
from lowbit.runtime.fusion import FusionResult, fuse
from lowbit.spec import SpecError

__all__ = ["BACKENDS", "CompileReport", "LayerKernel", "compile", "kernel_report"]

BACKENDS = ("auto", "torch", "onnxruntime", "reference")
REPORT_ATTR = "lowbit_report"
Inputs = torch.Tensor | tuple[Any, ...] | Mapping[str, Any]


@dataclass(frozen=True)
class LayerKernel:
    """One quantized layer: the kernel it runs and what was fused into it."""

    name: str
    kind: str
    kernel: str
    fused: str = ""
    note: str = ""


@dataclass
class CompileReport:
    """What :func:`compile` did: the backend, each layer's kernel, the agreement with the
    simulation on the example inputs, the timings behind an ``"auto"`` choice, and notes."""

    backend: str
    layers: list[LayerKernel] = field(default_factory=list)
    sqnr_db: float | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def table(self) -> Table:
        """A rich Table, one row per layer."""
        title = f"lowbit.compile: {self.backend}"
        if self.sqnr_db is not None:
            title += f" (output SQNR against the simulation {self.sqnr_db:.1f} dB)"
        table = Table(title=title)
        for column in ("layer", "kind", "kernel", "fused", "note"):
            table.add_column(column)
        for row in self.layers:
            table.add_row(row.name, row.kind, row.kernel, row.fused, row.note)
        return table

    def __str__(self) -> str:
        lines = [f"backend: {self.backend}"]
        if self.sqnr_db is not None:
            lines.append(f"output SQNR against the simulation: {self.sqnr_db:.1f} dB")
        for name, ms in self.timings_ms.items():
            lines.append(f"  {name}: {ms:.3f} ms")
        for row in self.layers:
            extra = f" [{row.fused}]" if row.fused else ""
            note = f" ({row.note})" if row.note else ""
            lines.append(f"{row.name}: {row.kind} -> {row.kernel}{extra}{note}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _call(model: nn.Module, inputs: Inputs) -> Any:
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


def _flat(output: Any) -> torch.Tensor:
    """Every floating-point tensor of a model output, flattened into one float64 vector."""
    if isinstance(output, Mapping):
        output = list(output.values())
    leaves = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
    floats = [t.detach().double().reshape(-1) for t in leaves if t.is_floating_point()]
    if not floats:
        raise TypeError("the model's output holds no floating-point tensor to compare")
    return torch.cat(floats)


def _sqnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    noise = (reference - test).pow(2).sum().item()
    signal = reference.pow(2).sum().item()
    if noise == 0.0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise)).item() if signal else float("-inf")


def _median_ms(fn: Callable[[], Any], runs: int = 5) -> float:
    fn()  # warm-up: kernels prepare (prepack) on their first call
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def _layers(model: nn.Module) -> dict[str, QModule]:
    layers = quantized_layers(model)
    if not layers:
        raise SpecError(
            f"{type(model).__name__} has no quantized layer: lowbit.compile takes a model from "
            "lowbit.quantize / lowbit.convert or lowbit.load"
        )
    unfrozen = [name for name, layer in layers.items() if not layer.frozen]
    if unfrozen:
        raise SpecError(
            f"layer {unfrozen[0]!r} is not converted: call lowbit.convert(model) (or "
            "lowbit.quantize) before lowbit.compile"
        )
    return layers


def _model_dtype(layers: dict[str, QModule]) -> torch.dtype:
    return next(iter(layers.values())).weight.dtype


def _set_all(layers: dict[str, QModule], kernel: str | None, exact_only: bool) -> None:
    for layer in layers.values():
        layer.set_kernel(kernel, exact_only=exact_only)


def kernel_report(model: nn.Module, dtype: torch.dtype | None = None) -> CompileReport:
    """Which kernel each quantized layer of ``model`` runs on (for inputs of ``dtype``, by
    default the model's own), and what fusion gave it when the model came from
    :func:`compile`.

    >>> import lowbit
    >>> q = lowbit.quantize(nn.Sequential(nn.Linear(8, 8)), "w8a16")
    >>> [row.kind for row in kernel_report(q).layers]
    ['linear']
    """
    compiled = getattr(model, REPORT_ATTR, None)
    if isinstance(compiled, CompileReport):
        return compiled
    layers = _layers(model)
    dtype = dtype or _model_dtype(layers)
    return CompileReport("torch", _rows(layers, dtype, {}))


def _rows(
    layers: dict[str, QModule], dtype: torch.dtype, fused: dict[str, str]
) -> list[LayerKernel]:
    rows = []
    for name, layer in layers.items():
        choice = layer.kernel_choice(dtype)
        note = ""
        if choice.name == "reference":  # why every integer kernel passed, in the registry order
            note = "float path; " + "; ".join(f"{k}: {why}" for k, why in choice.passed_over)
        elif not choice.kernel.exact:
            note = "activations in bfloat16"
        rows.append(LayerKernel(name, layer.kind, choice.name, fused.get(name, ""), note))
    return rows


def _reference(
    model: nn.Module, layers: dict[str, QModule], inputs: Inputs
) -> tuple[torch.Tensor, dict[str, tuple[float, float]]]:
    """The simulation's output on ``inputs``, and the range of every layer's output."""
    ranges: dict[str, tuple[float, float]] = {}

    def record(name: str, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.is_floating_point() and output.numel():
            lo, hi = float(output.min()), float(output.max())
            old = ranges.get(name, (lo, hi))
            ranges[name] = (min(lo, old[0]), max(hi, old[1]))

    _set_all(layers, "reference", False)
    hooks = [
        layer.register_forward_hook(lambda m, i, o, name=name: record(name, o))
        for name, layer in layers.items()
    ]
    try:
        with torch.no_grad():
            output = _flat(_call(model, inputs))
    finally:
        for hook in hooks:
            hook.remove()
    return output, ranges


def _torch_backend(
    model: nn.Module,
    layers: dict[str, QModule],
    dtype: torch.dtype,
    fuse_graph: bool,
    handoff: bool,
    exact_only: bool,
    ranges: dict[str, tuple[float, float]] | None = None,
) -> tuple[nn.Module, CompileReport]:
    _set_all(layers, None, exact_only)
    result = fuse(model, dtype, handoff, ranges) if fuse_graph else FusionResult(model, False)
    report = CompileReport("torch", _rows(layers, dtype, result.fused), notes=list(result.notes))
    if exact_only:
        report.notes.append("kernels that compute in bfloat16 were passed over (exact only)")
    if fuse_graph and result.traced and not handoff:
        report.notes.append("uint8 hand-off between layers off")
    return result.module, report


def _check(module: nn.Module, inputs: Inputs, reference: torch.Tensor) -> float:
    with torch.no_grad():
        return _sqnr(reference, _flat(_call(module, inputs)))


def _compile_torch(
    model: nn.Module,
    layers: dict[str, QModule],
    dtype: torch.dtype,
    inputs: Inputs | None,
    reference: torch.Tensor | None,
    fuse_graph: bool,
    handoff: bool,
    min_sqnr_db: float,
    ranges: dict[str, tuple[float, float]] | None = None,
) -> tuple[nn.Module, CompileReport]:
    # most integer first: uint8 hand-off (if asked), then float hand-off, then exact kernels
    tries = [(True, False)] if handoff and fuse_graph else []
    tries += [(False, False), (False, True)]
    failures: list[str] = []
    for use_handoff, exact_only in tries:
        module, report = _torch_backend(
            model, layers, dtype, fuse_graph, use_handoff, exact_only, ranges
        )
        if inputs is None or reference is None:
            return module, report
        report.sqnr_db = _check(module, inputs, reference)
        if report.sqnr_db >= min_sqnr_db:
            report.notes = failures + report.notes
            return module, report
        failures.append(
            f"{'uint8 hand-off' if use_handoff else 'bfloat16 kernels'} gave "
            f"{report.sqnr_db:.1f} dB < {min_sqnr_db} dB against the simulation: turned off"
        )
    _set_all(layers, "reference", False)
    report = CompileReport("reference", _rows(layers, dtype, {}), float("inf"))
    report.notes = failures + ["no integer configuration reached min_sqnr_db: the simulation"]
    return model, report


def _compile_ort(
    model: nn.Module, inputs: Inputs | None, reference: torch.Tensor | None
) -> tuple[nn.Module, CompileReport]:
    if inputs is None:
        raise ValueError(
            'backend="onnxruntime" needs example_inputs: the model is exported to ONNX by '
            "tracing it on them; pass lowbit.compile(model, backend=..., example_inputs=x)"
        )
    from lowbit.runtime.ort import onnxruntime_module

    module = onnxruntime_module(model, inputs)
    report = CompileReport("onnxruntime", notes=["the whole model runs in one onnxruntime session"])
    if reference is not None:
        report.sqnr_db = _check(module, inputs, reference)
    return module, report


def compile(  # noqa: A001  # the verb users look for, as torch.compile
    model: nn.Module,
    backend: str = "auto",
    example_inputs: Inputs | None = None,
    *,
    min_sqnr_db: float = 35.0,
    fuse: bool = True,
    integer_handoff: bool = True,
) -> nn.Module:
    """The fastest runnable form of a converted (or loaded) ``model``; its kernels are listed
    by :func:`kernel_report` (``lowbit.kernel_report(compiled)``).

    ``example_inputs`` (a tensor, a tuple of positional inputs or a dict of keyword inputs)
    lets compile check every candidate against lowbit's simulation (output SQNR at least
    ``min_sqnr_db``) and, with ``backend="auto"``, time them. The ``"torch"`` backend shares
    the model's layers (it sets their kernels), so compile the model you will run.

    >>> import lowbit
    >>> net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> x = torch.randn(8, 16)
    >>> q = lowbit.quantize(net, "w8a8", data=[x])
    >>> fast = lowbit.compile(q, "torch", example_inputs=x)
    >>> lowbit.kernel_report(fast).sqnr_db > 35
    True
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown: use one of {', '.join(BACKENDS)}")
    layers = _layers(model)
    dtype = _model_dtype(layers)
    reference: torch.Tensor | None = None
    ranges: dict[str, tuple[float, float]] | None = None
    if example_inputs is not None:
        reference, ranges = _reference(model, layers, example_inputs)
    if backend == "reference":
        _set_all(layers, "reference", False)
        module, report = model, CompileReport("reference", _rows(layers, dtype, {}))
    elif backend == "torch" or (backend == "auto" and example_inputs is None):
        module, report = _compile_torch(
            model,
            layers,
            dtype,
            example_inputs,
            reference,
            fuse,
            integer_handoff,
            min_sqnr_db,
            ranges,
        )
    elif backend == "onnxruntime":
        module, report = _compile_ort(model, example_inputs, reference)
    else:
        module, report = _auto(
            model,
            layers,
            dtype,
            example_inputs,
            reference,
            fuse,
            integer_handoff,
            min_sqnr_db,
            ranges,
        )
    setattr(module, REPORT_ATTR, report)
    return module


def _auto(
    model: nn.Module,
    layers: dict[str, QModule],
    dtype: torch.dtype,
    inputs: Inputs | None,
    reference: torch.Tensor | None,
    fuse_graph: bool,
    handoff: bool,
    min_sqnr_db: float,
    ranges: dict[str, tuple[float, float]] | None = None,
) -> tuple[nn.Module, CompileReport]:
    assert inputs is not None
    module, report = _compile_torch(
        model, layers, dtype, inputs, reference, fuse_graph, handoff, min_sqnr_db, ranges
    )
    with torch.no_grad():
        timings = {"torch": _median_ms(lambda: _call(module, inputs))}
    best, best_report = module, report
    try:
        ort_module, ort_report = _compile_ort(model, inputs, reference)
    except (ImportError, RuntimeError, ValueError, TypeError) as err:
        report.notes.append(f"onnxruntime not tried: {str(err).splitlines()[0][:160]}")
    else:
        if ort_report.sqnr_db is not None and ort_report.sqnr_db >= min_sqnr_db:
            with torch.no_grad():
                timings["onnxruntime"] = _median_ms(lambda: _call(ort_module, inputs))
            if timings["onnxruntime"] < timings["torch"]:
                best, best_report = ort_module, ort_report
                ort_report.layers = report.layers
        else:
            report.notes.append(
                f"onnxruntime gave {ort_report.sqnr_db} dB against the simulation: not used"
            )
    best_report.timings_ms = timings
    best_report.notes.append(
        "auto: "
        + ", ".join(f"{k} {v:.2f} ms" for k, v in timings.items())
        + f" on the example inputs; picked {best_report.backend}"
    )
    return best, best_report
