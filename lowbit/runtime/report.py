"""What ``lowbit.compile`` did, layer by layer: the report it attaches to the compiled model."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.table import Table

__all__ = ["LayerKernel", "CompileReport"]


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
    sqnr_db: float | None = None  # the model's output against the simulation's
    layer_sqnr_db: float | None = None  # the worst layer on its own inputs, when measured
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
        if self.layer_sqnr_db is not None:
            lines.append(f"worst layer against the simulation: {self.layer_sqnr_db:.1f} dB")
        for name, ms in self.timings_ms.items():
            lines.append(f"  {name}: {ms:.3f} ms")
        for row in self.layers:
            extra = f" [{row.fused}]" if row.fused else ""
            note = f" ({row.note})" if row.note else ""
            lines.append(f"{row.name}: {row.kind} -> {row.kernel}{extra}{note}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)
