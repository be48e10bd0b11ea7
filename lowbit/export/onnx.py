"""Export a converted lowbit model to a standard QDQ ONNX file (onnxruntime and others).

torch's TorchScript exporter traces the model with each frozen layer in an export mode (its
forward swapped, for the export only, for a ``torch.autograd.Function`` that computes lowbit's
simulation and whose ``symbolic`` leaves a placeholder node); each placeholder is then replaced
by standard ONNX computing the same from the layer's integers (:mod:`lowbit.export.onnx_ops`).
The rest of the model (ReLU, residual adds, pooling, float layers) is exported by torch.
"""

from __future__ import annotations

import copy
import io
import itertools
import logging
import secrets
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lowbit
from lowbit.api import quantized_layers
from lowbit.export.atomic import atomic_path
from lowbit.nn import Kernel, QModule, choose_kernel

__all__ = ["OnnxExportError", "OnnxInputError", "OnnxNotInstalledError", "export_onnx"]

log = logging.getLogger(__name__)

DEFAULT_OPSET = 21  # int4 and blocked (per-group) DequantizeLinear need 21
_MIN_OPSET = 13  # per-axis DequantizeLinear
_TORCH_MAX_OPSET = 20  # torch's TorchScript exporter; later opsets are converted up by onnx
# int4_format="auto" writes 4-bit Linear weights as com.microsoft::MatMulNBits. Measured with
# onnxruntime 1.31 on this project's 2-core CPU (intra_op_num_threads=2, ORT_ENABLE_ALL), MLP
# 1024-4096-4096-1024 with ReLU, w4a16 (int4 per-group 32, asymmetric), 9 interleaved rounds,
# medians (noisy shared machine; the gap is far above the noise):
#   batch 1:  qdq 194.6 ms, matmulnbits 5.3 ms;  batch 64: qdq 239.2 ms, matmulnbits 55.3 ms.
# Why: onnxruntime rewrites int4 blocked DequantizeLinear -> MatMul into MatMulNBits only when
# nothing else claims the MatMul first; its MatMul+Add(+Relu) -> (Fused)Gemm fusion does, for
# every biased hidden layer, which then runs in float on weights dequantized at every call.
# MatMulNBits also holds per-channel 4-bit weights behind a quantized input (w4a8). The QDQ
# form is standard ONNX (any runtime, opset 21); onnxruntime-only MatMulNBits is not.
INT4_FORMAT_AUTO = "matmulnbits"
_DOMAIN = "lowbit"  # of the placeholder nodes, lowbit::QLayer
EXPORTED_KINDS = ("linear", "conv1d", "conv2d", "conv3d", "embedding", "hf_conv1d")


def _simulation(layer: QModule) -> Kernel:
    """The layer's reference kernel (each kind has its own: an embedding's looks rows up)."""
    view = layer.view()
    return choose_kernel(view, torch.float32, torch.device("cpu"), prefer="reference").kernel(layer)


class OnnxExportError(ValueError):
    """A model, layer or option :func:`export_onnx` cannot export; the message says the fix."""


class OnnxInputError(TypeError):
    """``example_inputs`` that are not a tensor, a tuple of tensors or a dict of tensors."""


class OnnxNotInstalledError(ImportError):
    """onnx (or onnxruntime) is not installed."""


def require_onnx(*names: str) -> None:
    """Raise :class:`OnnxNotInstalledError` unless the packages ``names`` can be imported."""
    for name in names or ("onnx",):
        try:
            __import__(name)
        except ImportError:
            message = f"{name} is not installed (ONNX export and runtime need it): "
            raise OnnxNotInstalledError(message + "pip install 'lowbit[onnx]'") from None


# --- export mode: each frozen layer traced as one placeholder ------------------------------
@dataclass
class _Call:
    name: str  # the layer's qualified name (the prefix of its ONNX names)
    layer: QModule
    rank: int  # of its input (and output)


_CALLS: dict[str, _Call] = {}  # placeholder key -> call; filled only during an export


@contextmanager
def _untraced() -> Iterator[None]:
    """Run the simulation inside the autograd.Function without recording it in the trace
    (the tracer cannot map the layer's tensors there). torch has no public switch for this."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)  # type: ignore[attr-defined]


class _LayerOp(torch.autograd.Function):
    """Forward: lowbit's simulation of the layer. Symbolic: one ``lowbit::QLayer`` node."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, key: str) -> torch.Tensor:
        with _untraced():
            return _simulation(_CALLS[key].layer)(x)

    @staticmethod
    def symbolic(g: Any, x: Any, key: str) -> Any:
        out = g.op(f"{_DOMAIN}::QLayer", x, key_s=key)
        call = _CALLS[key]
        if call.layer.kind == "embedding":  # int64 indices in, one float row per index out
            out.setType(x.type().with_dtype(torch.float32).with_sizes([None] * (call.rank + 1)))
        else:
            out.setType(x.type().with_sizes([None] * call.rank))  # dims stay dynamic
        return out


@contextmanager
def _export_mode(layers: dict[str, QModule]) -> Iterator[dict[str, _Call]]:
    """Swap each layer's forward for the placeholder op; restored (and keys dropped) after."""
    session, calls, saved = secrets.token_hex(4), {}, {}

    def placeholder(name: str, layer: QModule) -> Callable[[torch.Tensor], torch.Tensor]:
        counter = itertools.count()

        def forward(x: torch.Tensor) -> torch.Tensor:
            with _untraced():  # shape checks only: no TracerWarning about them
                layer._check_input(x)
            key = f"{session}:{name}#{next(counter)}"
            calls[key] = _CALLS[key] = _Call(name, layer, x.ndim)
            out: torch.Tensor = _LayerOp.apply(x, key)
            return out

        return forward

    try:
        for name, layer in layers.items():
            saved[name] = layer.__dict__.get("forward")
            layer.__dict__["forward"] = placeholder(name or layer.label, layer)
        yield calls
    finally:
        for name, layer in layers.items():
            layer.__dict__.pop("forward", None)
            if saved.get(name) is not None:
                layer.__dict__["forward"] = saved[name]
        for key in calls:
            _CALLS.pop(key, None)


# --- checks and inputs ----------------------------------------------------------------------
def _converted_layers(model: nn.Module) -> dict[str, QModule]:
    if not isinstance(model, nn.Module):
        raise OnnxInputError(f"export_onnx takes a torch.nn.Module, got {type(model).__name__}")
    from lowbit.runtime.fusion import IntLayer

    fused = [name for name, m in model.named_modules() if isinstance(m, IntLayer)]
    if fused:
        raise OnnxExportError(
            f"{fused[0]!r} is a fused oneDNN layer from lowbit.compile: export the converted "
            "model itself (the one you passed to lowbit.compile)"
        )
    layers = quantized_layers(model)
    if not layers:
        raise OnnxExportError(
            f"{type(model).__name__} has no quantized layer: quantize it first with "
            "lowbit.quantize(model, recipe, data=...) (or load a .lowbit file)"
        )
    for name, layer in layers.items():
        iq = layer.input_quantizer
        if (layer.weight_quantizer is not None and not layer.frozen) or (
            iq is not None and iq.observing
        ):
            raise OnnxExportError(
                f"layer {name!r} is not converted (still fake-quantized or calibrating): call "
                "lowbit.convert(model) after lowbit.calibrate, or use lowbit.quantize"
            )
        if layer.kind not in EXPORTED_KINDS:
            why = f"{layer.kind} layers have no ONNX export yet; keep them float with a rule"
            raise OnnxExportError(f"layer {name!r}: {why}")
    return layers


def _inputs(example_inputs: Any) -> tuple[tuple[torch.Tensor, ...], list[str], bool]:
    """Positional tensors, their ONNX names, and whether they are keyword arguments."""
    keyword = isinstance(example_inputs, Mapping)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not keyword and not isinstance(example_inputs, (tuple, list)):
        raise OnnxInputError(
            f"example_inputs is a {type(example_inputs).__name__}: pass a tensor, a tuple of "
            "tensors (positional inputs) or a dict of tensors (keyword inputs)"
        )
    values = tuple(example_inputs.values() if keyword else example_inputs)
    names = [f"input_{i}" for i in range(len(values))] if len(values) > 1 else ["input"]
    names = [str(k) for k in example_inputs] if keyword else names
    pairs = zip(names, values, strict=True)
    wrong = [(n, type(v).__name__) for n, v in pairs if not torch.is_tensor(v)]
    if wrong or not values:
        raise OnnxInputError(
            f"example input {wrong[0][0]!r} is a {wrong[0][1]}: give tensors only"
            if wrong
            else "example_inputs is empty: give the tensors the model takes"
        )
    return values, names, keyword


def _leaves(out: Any, name: str = "output") -> list[tuple[str, torch.Tensor]]:
    """The tensors of a model output (nested tuples, lists, dicts), with output names."""
    if isinstance(out, torch.Tensor):
        return [(name, out)]
    if isinstance(out, Mapping):
        names = {k: str(k) if name == "output" else f"{name}.{k}" for k in out}
        return [pair for k, v in out.items() for pair in _leaves(v, names[k])]
    items = enumerate(out) if isinstance(out, (tuple, list)) else ()
    return [pair for i, v in items for pair in _leaves(v, f"{name}_{i}")]


@contextmanager
def _flat_forward(model: nn.Module, keys: list[str] | None) -> Iterator[None]:
    """For the export only: ``model`` takes positional tensors (rebuilding keyword inputs) and
    returns a flat tuple of tensors (the TorchScript exporter names inputs by position)."""
    inner, saved = model.forward, model.__dict__.get("forward")

    def forward(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = inner(**dict(zip(keys, tensors, strict=True))) if keys else inner(*tensors)
        return tuple(t for _, t in _leaves(out))

    model.__dict__["forward"] = forward
    try:
        yield
    finally:
        model.__dict__.pop("forward", None)
        if saved is not None:
            model.__dict__["forward"] = saved


def _as_float32(
    model: nn.Module, args: tuple[torch.Tensor, ...], notes: list[str]
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A float32 copy of a bf16/fp16/fp64 model (QDQ and onnxruntime's CPU kernels are fp32)."""
    tensors = itertools.chain(model.parameters(), model.buffers(), args)
    found = {t.dtype for t in tensors if t.dtype.is_floating_point} - {torch.float32}
    if not found:
        return model, args
    names = ", ".join(sorted(str(d).removeprefix("torch.") for d in found))
    notes.append(f"the model computes in {names}: exported in float32 (inputs and outputs)")
    try:
        model = copy.deepcopy(model).float()
    except Exception as err:  # a model deepcopy refuses: say so rather than mutate it
        raise OnnxExportError(
            f"cannot make a float32 copy of this {names} model ({err}); convert it with "
            "model.float() before export_onnx"
        ) from None
    return model, tuple(a.float() if a.dtype.is_floating_point else a for a in args)


# --- the ONNX graph ---------------------------------------------------------------------------
def _rewrite(proto: Any, calls: dict[str, _Call], opset: int, int4_format: str) -> list[str]:
    """Replace each placeholder by the layer's nodes; returns the notes."""
    from onnx import helper

    from lowbit.export.onnx_ops import Emitter, emit_layer

    graph = proto.graph
    taken = {i.name for i in graph.initializer} | {n.name for n in graph.node}
    taken |= {v for n in graph.node for v in (*n.input, *n.output)}
    nodes, notes, domains = [], [], set()
    shared: dict[str, dict[str, str]] = {}
    for node in graph.node:
        if node.domain != _DOMAIN:
            nodes.append(node)
            continue
        call = calls[helper.get_attribute_value(node.attribute[0]).decode()]
        g = Emitter(opset, taken, call.name, shared=shared.setdefault(call.name, {}))
        try:
            emit_layer(g, call.layer, node.input[0], node.output[0], call.rank, int4_format)
        except ValueError as err:
            raise OnnxExportError(f"cannot export {err}") from None
        nodes += g.nodes
        graph.initializer.extend(g.initializers)
        notes += [n for n in g.notes if n not in notes]
        domains |= g.domains
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.ClearField("value_info")  # torch's, with made-up dim names around the placeholders
    imports = [o for o in proto.opset_import if o.domain != _DOMAIN]
    imports += [helper.make_opsetid(d, 1) for d in sorted(domains)]
    proto.ClearField("opset_import")
    proto.opset_import.extend(imports)
    needed = helper.find_min_ir_version_for(list(imports), ignore_unknown=True)
    proto.ir_version = max(proto.ir_version, needed)
    return notes


def _target(path: str | Path) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise OnnxExportError(f"{str(path)!r}: its folder does not exist; create it first")
    if path.is_dir():
        raise OnnxExportError(f"{str(path)!r} is a folder; give a file name such as model.onnx")
    return path


def _check_options(opset: int | None, int4_format: str) -> tuple[int, str]:
    from onnx.defs import onnx_opset_version

    from lowbit.export.onnx_ops import INT4_FORMATS

    opset = DEFAULT_OPSET if opset is None else opset
    if not isinstance(opset, int) or not _MIN_OPSET <= opset <= onnx_opset_version():
        raise OnnxExportError(
            f"opset={opset!r} is out of range: use {_MIN_OPSET} to {onnx_opset_version()} "
            f"(per-channel DequantizeLinear needs 13, int4 needs 21; default {DEFAULT_OPSET})"
        )
    if int4_format not in INT4_FORMATS:
        raise OnnxExportError(
            f"int4_format={int4_format!r} is unknown: use one of {', '.join(INT4_FORMATS)}"
        )
    return opset, INT4_FORMAT_AUTO if int4_format == "auto" else int4_format


def export_onnx(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...] | Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    opset: int | None = None,
    int4_format: str = "auto",
) -> Path:
    """Write a converted ``model`` as a QDQ ONNX file at ``path`` (atomically); returns it.

    ``example_inputs`` (a tensor, a tuple of positional tensors or a dict of keyword
    tensors) are traced; dimension 0 of every input and output is a dynamic batch. Inputs are
    named ``input`` (``input_0``, ... for several, the keys for a dict), outputs ``output``
    (``output_0``, ... or the keys of a dict output). ``opset`` defaults to 21.
    ``int4_format`` writes 4-bit Linear weights as ``"qdq"`` (int4 blocked
    DequantizeLinear -> MatMul, standard ONNX) or ``"matmulnbits"``
    (``com.microsoft::MatMulNBits``, onnxruntime only); ``"auto"`` picks MatMulNBits.
    A bfloat16/float16 model is exported in float32. A weight ONNX cannot hold as integers
    at ``opset`` is written as float, logged as a warning and listed in the file's
    ``lowbit.notes`` metadata. onnxruntime fuses dynamic inputs (``DynamicQuantizeLinear``)
    into integer kernels only with its ``MatMulAddFusion`` optimizer off, which
    :class:`lowbit.runtime.ort.OrtModule` does.

    >>> import tempfile, onnx, lowbit
    >>> net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    >>> q = lowbit.quantize(net, "w8a8", data=[torch.randn(32, 16)])
    >>> with tempfile.TemporaryDirectory() as d:
    ...     graph = onnx.load(export_onnx(q, torch.randn(2, 16), f"{d}/net.onnx")).graph
    >>> sorted({node.op_type for node in graph.node})
    ['Add', 'DequantizeLinear', 'MatMul', 'QuantizeLinear', 'Relu']
    >>> sorted({init.data_type for init in graph.initializer if "weight_quantized" in init.name})
    [3]
    """
    require_onnx("onnx")
    import onnx
    from onnx import version_converter

    path = _target(path)
    opset, int4_format = _check_options(opset, int4_format)
    _converted_layers(model)
    args, input_names, keyword = _inputs(example_inputs)
    notes: list[str] = []
    model, args = _as_float32(model, args, notes)
    layers = _converted_layers(model)
    buffer = io.BytesIO()
    with _export_mode(layers) as calls, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
        kwargs = dict(zip(input_names, args, strict=True))
        outputs = _leaves(model(**kwargs) if keyword else model(*args))
        if not outputs:
            raise OnnxExportError("the model returns no tensor: nothing to export")
        output_names = [name for name, _ in outputs]
        batched = [*zip(input_names, args, strict=True), *outputs]
        options: dict[str, Any] = {"input_names": input_names, "output_names": output_names}
        options["dynamic_axes"] = {name: {0: "batch"} for name, t in batched if t.ndim}
        try:
            with _flat_forward(model, input_names if keyword else None):
                torch.onnx.export(
                    model, args, buffer,  # type: ignore[arg-type]  # it writes to a BytesIO
                    dynamo=False, opset_version=min(opset, _TORCH_MAX_OPSET),
                    custom_opsets={_DOMAIN: 1}, **options,
                )  # fmt: skip
        except (RuntimeError, TypeError) as err:  # tracing failures
            line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise OnnxExportError(
                f"torch.onnx could not trace {type(model).__name__} ({line}); the model must "
                "be traceable with torch.jit.trace (no data-dependent Python control flow)"
            ) from err
        proto = onnx.load_from_string(buffer.getvalue())
        if opset > _TORCH_MAX_OPSET:
            proto = version_converter.convert_version(proto, opset)
        notes += _rewrite(proto, calls, opset, int4_format)
    proto.producer_name, proto.producer_version = "lowbit", lowbit.__version__
    meta = {"lowbit.int4_format": int4_format, "lowbit.notes": "\n".join(notes)}
    onnx.helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, tmp)
    for note in notes:
        log.warning("export_onnx: %s", note)
    return path
