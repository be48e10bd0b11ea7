"""What a ``.lowbit`` file holds, layer by layer, read from its header alone (no tensor data).

Names and other text from the file are printed as plain text: control characters (terminal
escape sequences) are shown escaped and rich markup (``[bold]``...) is printed as written.
A weight stored once for several layers (tied) counts once in the totals.
"""

from __future__ import annotations

import io
import math
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lowbit.export.header import Header, LayerInfo, read_header
from lowbit.nn import LayerView, choose_kernel
from lowbit.spec import QuantSpec, SpecError

__all__ = [
    "LayerRow",
    "FileSummary",
    "FloatRow",
    "plain",
    "inspect",
    "summarize",
    "inspect_table",
    "format_inspect",
    "print_inspect",
]

_LAYER_KEYS = (
    "weight.qdata",
    "weight.scale",
    "weight.zero_point",
    "weight",
    "bias",
    "bias.qdata",
    "bias.scale",
    "input_quantizer.scale",
    "input_quantizer.zero_point",
)
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3"}


@dataclass(frozen=True)
class LayerRow:
    """One quantized layer of a file: its dtype, bits, granularity, bytes on disk and the
    kernel it runs on this machine (for float32 inputs on the CPU).

    ``bytes`` counts the packed weight, scales, zero points, bias and input qparams;
    ``fp32_bytes`` is the same layer's weight and bias in float32.
    """

    name: str
    kind: str
    dtype: str
    bits: int
    granularity: str
    weight_shape: tuple[int, ...]
    bytes: int
    fp32_bytes: int
    kernel: str


@dataclass(frozen=True)
class FloatRow:
    """Tensors a file stores in float, grouped by the module that holds them, with the reason
    the model kept that module in float (from the file's header where the model said why)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    bytes: int
    reason: str


@dataclass(frozen=True)
class FileSummary:
    """A file's layers and totals: file bytes against the float32 size of the same parameters.

    ``rows`` are the quantized layers, ``float_rows`` everything stored in float (layers kept
    float, norms, embeddings a recipe left alone, buffers), so leftovers show by size.
    """

    path: Path
    rows: list[LayerRow]
    file_bytes: int
    fp32_bytes: int
    float_rows: list[FloatRow] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """How many times smaller the file is than float32 (``fp32_bytes / file_bytes``)."""
        return self.fp32_bytes / self.file_bytes if self.file_bytes else math.inf


def plain(text: str) -> str:
    r"""``text`` safe to print in a rich table: control and format characters (escape
    sequences, bidi overrides) written as ``\xNN`` / ``\uNNNN``, rich markup escaped.

    >>> print(plain("fc1\x1b[2J[bold]x"))
    fc1\x1b[2J\[bold]x
    """
    out = []
    for char in text:
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return escape("".join(out))


def _layer_keys(name: str) -> list[str]:
    prefix = f"{name}." if name else ""
    return [prefix + key for key in _LAYER_KEYS]


def _row(header: Header, index: int) -> LayerRow:
    info = header.layers[index]
    entries = {key: header.tensors[key] for key in _layer_keys(info.name) if key in header.tensors}
    prefix = f"{info.name}." if info.name else ""
    bias = entries.get(prefix + "bias") or entries.get(prefix + "bias.qdata")
    bias_numel = math.prod(bias.shape) if bias is not None else 0
    spec = info.weight_spec or {}
    return LayerRow(
        name=info.name,
        kind=info.kind,
        dtype=info.dtype,
        bits=info.bits,
        granularity=str(spec.get("granularity", "-")),
        weight_shape=info.weight_shape,
        bytes=sum(entry.nbytes for entry in entries.values()),
        fp32_bytes=4 * (math.prod(info.weight_shape) + bias_numel),
        kernel=_kernel(info),
    )


def _kernel(info: LayerInfo) -> str:
    """The kernel a float32 CPU input of this layer runs on here."""
    try:
        view = LayerView(
            kind=info.kind,
            label=info.name,
            weight_spec=QuantSpec.from_dict(info.weight_spec) if info.weight_spec else None,
            input_spec=QuantSpec.from_dict(info.input_spec) if info.input_spec else None,
            weight_shape=info.weight_shape,
        )
        return choose_kernel(view, torch.float32, torch.device("cpu")).name
    except (SpecError, RuntimeError, ValueError):
        return "?"


def summarize(path: str | Path) -> FileSummary:
    """Per-layer rows plus the file size against the float32 size of the same parameters.

    >>> import tempfile, torch
    >>> from lowbit.api import quantize
    >>> from lowbit.export import save
    >>> q = quantize(torch.nn.Sequential(torch.nn.Linear(256, 256)), "w4a16")
    >>> with tempfile.TemporaryDirectory() as d:
    ...     s = summarize(save(q, f"{d}/m"))
    >>> s.ratio > 4
    True
    """
    header = read_header(path)
    rows = [_row(header, i) for i in range(len(header.layers))]
    owned = {key for info in header.layers for key in _layer_keys(info.name)}
    leftovers = sum(
        4 * math.prod(entry.shape) if entry.dtype in _FLOAT_DTYPES else entry.nbytes
        for key, entry in header.tensors.items()
        if key not in owned
    )
    tied = sum(  # a weight stored once for several layers counts once
        4 * math.prod(row.weight_shape)
        for row in rows
        if f"{row.name}.weight" in header.ties or row.name in header.ties
    )
    fp32 = sum(row.fp32_bytes for row in rows) - tied + leftovers
    return FileSummary(header.path, rows, header.file_size, fp32, _float_rows(header, owned))


_DTYPE_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def _float_rows(header: Header, owned: set[str]) -> list[FloatRow]:
    """The tensors no quantized layer owns, grouped by module, biggest first."""
    groups: dict[str, list[str]] = {}
    for key in header.tensors:
        if key not in owned:
            groups.setdefault(key.rpartition(".")[0], []).append(key)
    rows = []
    for module, keys in groups.items():
        entries = [header.tensors[k] for k in keys]
        weight = header.tensors.get(f"{module}.weight" if module else "weight")
        biggest = weight or max(entries, key=lambda e: e.nbytes)
        reason = header.kept_float.get(module) or (
            "not a layer lowbit quantizes (norms, buffers, positional tables, ...)"
        )
        rows.append(
            FloatRow(
                name=module,
                dtype=_DTYPE_NAMES.get(biggest.dtype, biggest.dtype.lower()),
                shape=tuple(biggest.shape),
                bytes=sum(e.nbytes for e in entries),
                reason=reason,
            )
        )
    return sorted(rows, key=lambda r: -r.bytes)


def inspect(path: str | Path) -> list[LayerRow]:
    """One row per quantized layer of a ``.lowbit`` file, from its header only.

    >>> import tempfile, torch
    >>> from lowbit.api import quantize
    >>> from lowbit.export import save
    >>> q = quantize(torch.nn.Sequential(torch.nn.Linear(64, 8, bias=False)), "w4a16")
    >>> with tempfile.TemporaryDirectory() as d:
    ...     rows = inspect(save(q, f"{d}/m"))
    >>> [(r.name, r.dtype, r.bits, r.granularity, r.bytes) for r in rows]  # 256 + 64 + 8
    [('0', 'int4', 4, 'per_group:32', 328)]
    """
    return summarize(path).rows


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def inspect_table(path: str | Path) -> Table:
    """A rich Table of :func:`summarize`'s rows and totals.

    >>> import tempfile, torch
    >>> from lowbit.api import quantize
    >>> from lowbit.export import save
    >>> q = quantize(torch.nn.Sequential(torch.nn.Linear(64, 8)), "w8a16")
    >>> with tempfile.TemporaryDirectory() as d:
    ...     table = inspect_table(save(q, f"{d}/m"))
    >>> table.row_count
    1
    """
    summary = summarize(path)
    table = Table(title=plain(summary.path.name), show_footer=True)
    table.add_column("layer", footer="total (file)")
    table.add_column("kind")
    table.add_column("dtype")
    table.add_column("bits", justify="right")
    table.add_column("granularity")
    table.add_column("shape")
    table.add_column("on disk", justify="right", footer=_kib(summary.file_bytes))
    table.add_column("fp32", justify="right", footer=_kib(summary.fp32_bytes))
    table.add_column("ratio", justify="right", footer=f"{summary.ratio:.2f}x")
    table.add_column("kernel / why float")
    for row in summary.rows:
        ratio = row.fp32_bytes / row.bytes if row.bytes else math.inf
        table.add_row(
            plain(row.name),
            plain(row.kind),
            plain(row.dtype),
            str(row.bits),
            plain(row.granularity),
            "x".join(map(str, row.weight_shape)),
            _kib(row.bytes),
            _kib(row.fp32_bytes),
            f"{ratio:.2f}x",
            plain(row.kernel),
        )
    for frow in summary.float_rows:
        table.add_row(
            plain(frow.name or "(model)"),
            "float",
            plain(frow.dtype),
            "",
            "",
            "x".join(map(str, frow.shape)),
            _kib(frow.bytes),
            "",
            "",
            plain(frow.reason),
        )
    return table


def format_inspect(path: str | Path, width: int = 120) -> str:
    """The per-layer table as plain text, with totals and the compression ratio.

    >>> import tempfile, torch
    >>> from lowbit.api import quantize
    >>> from lowbit.export import save
    >>> q = quantize(torch.nn.Sequential(torch.nn.Linear(64, 8)), "w8a16")
    >>> with tempfile.TemporaryDirectory() as d:
    ...     text = format_inspect(save(q, f"{d}/m"))
    >>> "int8" in text and "total (file)" in text
    True
    """
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    console.print(inspect_table(path))
    out = console.file
    assert isinstance(out, io.StringIO)
    return out.getvalue()


def print_inspect(path: str | Path, console: Console | None = None) -> None:
    """Print the per-layer table of a ``.lowbit`` file to ``console`` (default: stdout).

    >>> import tempfile, torch
    >>> from lowbit.api import quantize
    >>> from lowbit.export import save
    >>> q = quantize(torch.nn.Sequential(torch.nn.Linear(64, 8)), "w8a16")
    >>> with tempfile.TemporaryDirectory() as d:
    ...     print_inspect(save(q, f"{d}/m"), Console(file=io.StringIO()))
    """
    (console or Console()).print(inspect_table(path))
