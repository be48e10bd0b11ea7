"""What every side-by-side benchmark shares: interleaved timing, rows, the table and the JSON.

Timing: every candidate gets ``warmup`` calls, then ``runs`` rounds in which each candidate is
called ``settle`` times untimed and once timed, in turn, so drift of a shared 2-core machine
(frequency, a neighbour's load) hits all of them alike, while the untimed calls let the
previous candidate's runtime (OpenMP or onnxruntime threads still spinning) go quiet; the
figure is each candidate's median over the rounds. Same process, same inputs, the same number
of threads for torch and onnxruntime (whose workers do not spin).
"""

from __future__ import annotations

import copy
import io
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from lowbit.export import write_json

RESULTS = Path(__file__).parent / "results"
THREADS = 2


def setup() -> None:
    """Same threads everywhere; compile caches kept out of the home folder."""
    torch.set_num_threads(THREADS)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(".cache/inductor").resolve()))


def machine() -> dict[str, Any]:
    """Where the numbers come from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "threads": THREADS,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def time_interleaved(
    candidates: dict[str, Callable[[], Any]], warmup: int = 5, runs: int = 30, settle: int = 1
) -> dict[str, float]:
    """Median milliseconds per candidate, measured round-robin (see the module docstring)."""
    with torch.no_grad():
        for fn in candidates.values():
            for _ in range(warmup):
                fn()
        samples: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(runs):
            for name, fn in candidates.items():
                for _ in range(settle):
                    fn()
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    return {name: 1000.0 * statistics.median(times) for name, times in samples.items()}


@dataclass
class Row:
    """One line of a benchmark table."""

    benchmark: str  # e.g. "MLP batch 64"
    toolkit: str  # torch, torch.ao, torchao, onnxruntime, lowbit
    method: str  # fp32, w8a8, dynamic int8, ...
    backend: str  # eager, onnxruntime, compiled, ...
    latency_ms: float = float("nan")
    file_bytes: int | None = None
    quality: float | None = None  # accuracy (0..1) or cosine similarity
    quality_name: str = ""
    quantize_s: float | None = None
    speedup_eager: float | None = None  # FP32 eager latency / this latency
    speedup_best_fp32: float | None = None  # fastest FP32 baseline / this latency
    notes: list[str] = field(default_factory=list)


Quality = Callable[[Callable[[Any], Any], Any], tuple[float, str]]


def measure(
    name: str,
    candidates: list[tuple[Row, Callable[[Any], Any]]],
    batches: dict[str, Any],
    quality: Quality,
    runs: int,
) -> list[Row]:
    """One row per candidate and batch: ``quality(run, batch)`` gives (value, name), and the
    candidates of each batch are timed together (:func:`time_interleaved`)."""
    rows: list[Row] = []
    for bench, x in batches.items():
        group = []
        fns = {}
        for i, (template, run) in enumerate(candidates):
            row = copy.deepcopy(template)
            row.benchmark = f"{name} {bench}"
            with torch.no_grad():
                row.quality, row.quality_name = quality(run, x)
            group.append(row)
            fns[str(i)] = lambda run=run, x=x: run(x)
        medians = time_interleaved(fns, runs=runs)
        for i, row in enumerate(group):
            row.latency_ms = medians[str(i)]
        rows += group
    return rows


def add_speedups(rows: list[Row]) -> None:
    """Fill both speed-up columns per benchmark, from its fp32 rows."""
    for bench in {r.benchmark for r in rows}:
        group = [r for r in rows if r.benchmark == bench]
        fp32 = [r for r in group if r.method == "fp32"]
        eager = [r.latency_ms for r in fp32 if r.backend == "eager"]
        best = min((r.latency_ms for r in fp32), default=float("nan"))
        for r in group:
            if eager:
                r.speedup_eager = eager[0] / r.latency_ms
            r.speedup_best_fp32 = best / r.latency_ms


def file_size(write: Callable[[Path], Path | None]) -> int:
    """Bytes of the file ``write`` produces in a temporary folder."""
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "model"
        written = write(target) or target
        return Path(written).stat().st_size


def torch_save_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``, how torch.ao/torchao models are shipped."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None or value != value else format(value, spec)


def table(rows: list[Row], title: str) -> Table:
    """The rows as a rich table."""
    out = Table(title=title)
    for col in (
        "benchmark",
        "toolkit",
        "method",
        "backend",
        "ms",
        "× fp32 eager",
        "× best fp32",
        "file MiB",
        "quality",
        "quantize s",
    ):
        out.add_column(
            col, justify="left" if col in ("benchmark", "toolkit", "method", "backend") else "right"
        )
    for r in rows:
        quality = "—" if r.quality is None else f"{r.quality_name} {r.quality:.4f}"
        size = None if r.file_bytes is None else r.file_bytes / 2**20
        out.add_row(
            r.benchmark,
            r.toolkit,
            r.method,
            r.backend,
            _fmt(r.latency_ms, ".3f"),
            _fmt(r.speedup_eager, ".2f"),
            _fmt(r.speedup_best_fp32, ".2f"),
            _fmt(size, ".2f"),
            quality,
            _fmt(r.quantize_s, ".1f"),
        )
    return out


def markdown(rows: list[Row]) -> str:
    """The rows as one Markdown table."""
    head = (
        "| benchmark | toolkit | method | backend | ms | × fp32 eager | × best fp32 | "
        "file MiB | quality | quantize s |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        quality = "" if r.quality is None else f"{r.quality_name} {r.quality:.4f}"
        size = "" if r.file_bytes is None else f"{r.file_bytes / 2**20:.2f}"
        lines.append(
            f"| {r.benchmark} | {r.toolkit} | {r.method} | {r.backend} | {r.latency_ms:.3f} | "
            f"{_fmt(r.speedup_eager, '.2f')} | {_fmt(r.speedup_best_fp32, '.2f')} | {size} | "
            f"{quality} | {_fmt(r.quantize_s, '.1f')} |"
        )
    return "\n".join(lines)


def save(name: str, rows: list[Row], extra: dict[str, Any] | None = None) -> Path:
    """Print the table and write ``benchmarks/results/<name>.json``."""
    add_speedups(rows)
    Console(width=160).print(table(rows, name))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    write_json(path, {"machine": machine(), **(extra or {}), "rows": [asdict(r) for r in rows]})
    print(f"wrote {path}")
    return path


def cosine(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Cosine similarity of two outputs, flattened, in float64."""
    a, b = reference.double().flatten(), test.double().flatten()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))
