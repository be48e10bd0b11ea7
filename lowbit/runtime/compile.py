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
configuration below ``min_sqnr_db`` (at the output, or layer by layer where the model
amplifies float rounding: see :mod:`lowbit.runtime.check`) is replaced by a more exact one (no
uint8 hand-off, then no bfloat16 kernels), and the report says so. Nothing lowbit cannot run
in integer is an error: it stays on the float path with a note.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.api import quantized_layers
from lowbit.nn import QModule
from lowbit.runtime import inductor
from lowbit.runtime.activation import LastInput
from lowbit.runtime.check import (
    Inputs,
    Reference,
    call,
    flat,
    layer_agreement,
    reference_run,
    set_all,
    sqnr,
)
from lowbit.runtime.fusion import FusionResult, fuse
from lowbit.runtime.linear import OneDNNInt8Linear
from lowbit.runtime.report import CompileReport, LayerKernel
from lowbit.spec import SpecError

__all__ = ["BACKENDS", "CompileReport", "LayerKernel", "compile", "kernel_report"]

BACKENDS = ("auto", "torch", "onnxruntime", "reference")
REPORT_ATTR = "lowbit_report"


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


def _share_token_inputs(
    layers: dict[str, QModule], dtype: torch.dtype, use_inductor: bool = False
) -> list[LastInput]:
    """Give the per-token int8 layers of one grid a shared :class:`LastInput`, so a tensor read
    by several of them (query, key, value) is quantized once, and their per-token passes
    compiled by inductor when asked; returns the caches (cleared at every forward pass)."""
    caches: dict[object, LastInput] = {}
    for layer in layers.values():
        if not layer.frozen:
            continue
        kernel = layer.kernel_for(dtype)
        if isinstance(kernel, OneDNNInt8Linear) and kernel.per_token:
            kernel.shared = caches.setdefault(kernel.grid.spec, LastInput())
            kernel.use_inductor(use_inductor)
    return list(caches.values())


class _ClearCaches:
    """A forward pre-hook clearing the shared per-token caches as a forward pass begins."""

    def __init__(self, caches: list[LastInput]) -> None:
        self.caches = caches

    def __call__(self, module: nn.Module, args: Any) -> None:
        for cache in self.caches:
            cache.clear()


def _clear_each_forward(module: nn.Module, caches: list[LastInput]) -> None:
    """Hook ``module`` (once) so its shared caches never outlive one forward pass."""
    old = getattr(module, _CLEAR_ATTR, None)
    if old is not None:
        old.remove()
    if caches:
        setattr(module, _CLEAR_ATTR, module.register_forward_pre_hook(_ClearCaches(caches)))


_CLEAR_ATTR = "_lowbit_clear_caches"


@dataclass
class _Job:
    """One call of :func:`compile`: the model, its layers and the options."""

    model: nn.Module
    layers: dict[str, QModule]
    dtype: torch.dtype
    inputs: Inputs | None
    reference: Reference | None
    fuse: bool
    handoff: bool
    min_sqnr_db: float
    inductor: bool


def _torch_backend(
    job: _Job, handoff: bool, exact_only: bool
) -> tuple[nn.Module, CompileReport, bool]:
    """The torch backend in one configuration; the flag says whether uint8 hand-off was
    really applied (it needs a model torch.fx can trace)."""
    layers, dtype, use_inductor = job.layers, job.dtype, job.inductor
    set_all(layers, None, exact_only)
    notes = []
    if use_inductor and inductor.available() is not None:
        notes.append(f"inductor not used: {inductor.available()}")
        use_inductor = False
    caches = _share_token_inputs(layers, dtype, use_inductor)
    if caches and use_inductor:
        notes.append("per-token quantization and rescaling compiled by inductor")
    ranges = job.reference.ranges if job.reference is not None else None
    unfused = FusionResult(job.model, False)
    result = fuse(job.model, dtype, handoff, ranges) if job.fuse else unfused
    report = CompileReport("torch", _rows(layers, dtype, result.fused), notes=list(result.notes))
    report.notes += notes
    _clear_each_forward(result.module, caches)
    if exact_only:
        report.notes.append("kernels that compute in bfloat16 were passed over (exact only)")
    if job.fuse and result.traced and not handoff:
        report.notes.append("uint8 hand-off between layers off")
    return result.module, report, handoff and result.traced


def _output_sqnr(module: nn.Module, inputs: Inputs, reference: Reference) -> float:
    with torch.no_grad():
        return sqnr(reference.output, flat(call(module, inputs)))


def _accept(
    report: CompileReport,
    layers: dict[str, QModule],
    reference: Reference,
    floor: float,
    handoff: bool,
) -> bool:
    """Whether the configuration agrees with the simulation: its output does, or (without
    uint8 hand-off, whose rounding is a real change) every layer does on its own inputs."""
    if report.sqnr_db is not None and report.sqnr_db >= floor:
        return True
    if handoff:
        return False
    report.layer_sqnr_db, worst = layer_agreement(layers, reference)
    if report.layer_sqnr_db < floor:
        return False
    report.notes.append(
        f"the model's output differs from the simulation's by {report.sqnr_db:.1f} dB while "
        f"every layer agrees on its own inputs (worst {worst}: {report.layer_sqnr_db:.1f} dB): "
        "the model amplifies float rounding differences, as it would between two machines"
    )
    return True


def _compile_torch(job: _Job) -> tuple[nn.Module, CompileReport]:
    # most integer first: uint8 hand-off (if asked), then float hand-off, then exact kernels
    tries = [(True, False)] if job.handoff and job.fuse else []
    tries += [(False, False), (False, True)]
    failures: list[str] = []
    for handoff, exact_only in tries:
        module, report, handoff = _torch_backend(job, handoff, exact_only)
        if job.inputs is None or job.reference is None:
            return module, report
        report.sqnr_db = _output_sqnr(module, job.inputs, job.reference)
        if _accept(report, job.layers, job.reference, job.min_sqnr_db, handoff):
            report.notes = failures + report.notes
            return module, report
        failures.append(
            f"{'uint8 hand-off' if handoff else 'bfloat16 kernels'} gave "
            f"{report.sqnr_db:.1f} dB < {job.min_sqnr_db} dB against the simulation: turned off"
        )
    set_all(job.layers, "reference", False)
    report = CompileReport("reference", _rows(job.layers, job.dtype, {}), float("inf"))
    report.notes = failures + ["no integer configuration reached min_sqnr_db: the simulation"]
    return job.model, report


def _compile_ort(
    model: nn.Module, inputs: Inputs | None, reference: Reference | None
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
        report.sqnr_db = _output_sqnr(module, inputs, reference)
    return module, report


def compile(  # noqa: A001  # the verb users look for, as torch.compile
    model: nn.Module,
    backend: str = "auto",
    example_inputs: Inputs | None = None,
    *,
    min_sqnr_db: float = 35.0,
    fuse: bool = True,
    integer_handoff: bool = True,
    inductor: bool = False,
) -> nn.Module:
    """The fastest runnable form of a converted (or loaded) ``model``; its kernels are listed
    by :func:`kernel_report` (``lowbit.kernel_report(compiled)``).

    ``example_inputs`` (a tensor, a tuple of positional inputs or a dict of keyword inputs)
    lets compile check every candidate against lowbit's simulation (output SQNR at least
    ``min_sqnr_db``, or every layer at least that on its own inputs) and, with
    ``backend="auto"``, time them. The ``"torch"`` backend shares the model's layers (it sets
    their kernels), so compile the model you will run. ``inductor=True`` compiles the
    per-token activation passes with torch.compile (:mod:`lowbit.runtime.inductor`: needs a
    C++ compiler; the first compile takes tens of seconds).

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
    reference = None
    if example_inputs is not None:
        reference = reference_run(model, layers, example_inputs)
    job = _Job(
        model,
        layers,
        _model_dtype(layers),
        example_inputs,
        reference,
        fuse,
        integer_handoff,
        min_sqnr_db,
        inductor,
    )
    if backend == "reference":
        set_all(layers, "reference", False)
        module, report = model, CompileReport("reference", _rows(layers, job.dtype, {}))
    elif backend == "torch" or (backend == "auto" and example_inputs is None):
        module, report = _compile_torch(job)
    elif backend == "onnxruntime":
        module, report = _compile_ort(model, example_inputs, reference)
    else:
        module, report = _auto(job)
    setattr(module, REPORT_ATTR, report)
    return module


def _auto(job: _Job) -> tuple[nn.Module, CompileReport]:
    inputs = job.inputs
    assert inputs is not None
    module, report = _compile_torch(job)
    with torch.no_grad():
        timings = {report.backend: _median_ms(lambda: call(module, inputs))}
    best, best_report = module, report
    try:
        ort_module, ort_report = _compile_ort(job.model, inputs, job.reference)
    except (ImportError, RuntimeError, ValueError, TypeError) as err:
        report.notes.append(f"onnxruntime not tried: {str(err).splitlines()[0][:160]}")
    else:
        ort_ok = ort_report.sqnr_db is not None and (
            ort_report.sqnr_db >= job.min_sqnr_db
            or report.layer_sqnr_db is not None
            and ort_report.sqnr_db >= (report.sqnr_db or 0.0) - 1.0
        )
        if ort_ok:
            with torch.no_grad():
                timings["onnxruntime"] = _median_ms(lambda: call(ort_module, inputs))
            if timings["onnxruntime"] < timings[report.backend]:
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
