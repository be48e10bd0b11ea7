"""Run every side-by-side benchmark, then write one Markdown table of all their rows.

    .venv/bin/python -m benchmarks.run_all [--quick]     (``make bench``)

Runs benchmarks/mlp.py, resnet.py, bert.py, memory.py and agreement.py one after another
(each in its own process, so none is timed while another runs), then reads their JSON and
writes benchmarks/results/summary.md. Takes about 12 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.harness import RESULTS, Row, markdown

BENCHMARKS = ("mlp", "resnet", "bert")


def _memory_table(data: dict) -> str:
    lines = [
        "| recipe | file MiB | file / fp32 | RSS growth after load | / fp32 | after 1st forward "
        "| / fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    mib = 2**20
    fp32 = data["fp32_growth"]
    lines.append(
        f"| fp32 | {data['fp32_weight_bytes'] / mib:.1f} | 1.000 | "
        f"{fp32['load'] / mib:.1f} | 1.000 | {fp32['first_forward'] / mib:.1f} | 1.000 |"
    )
    for r in data["rows"]:
        lines.append(
            f"| {r['recipe']} | {r['file_bytes'] / mib:.1f} | {r['file_vs_fp32']:.3f} | "
            f"{r['load_bytes'] / mib:.1f} | {r['load_vs_fp32']:.3f} | "
            f"{r['first_forward_bytes'] / mib:.1f} | {r['first_forward_vs_fp32']:.3f} |"
        )
    return "\n".join(lines)


def summary() -> Path:
    """benchmarks/results/summary.md from the JSON files present."""
    parts = ["# lowbit benchmarks", ""]
    machine = None
    for name in BENCHMARKS:
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        machine = machine or data.get("machine")
        rows = [Row(**{k: v for k, v in r.items()}) for r in data["rows"]]
        parts += [f"## {name}", "", markdown(rows), ""]
    memory = RESULTS / "memory.json"
    if memory.is_file():
        parts += [
            "## memory (MLP 1024-4096-4096-1024)",
            "",
            _memory_table(json.loads(memory.read_text())),
            "",
        ]
    agreement = RESULTS / "agreement.json"
    if agreement.is_file():
        lines = [
            "| recipe | mode | SQNR dB | top-1 agreement % | kernels |",
            "|---|---|---|---|---|",
        ]
        for r in json.loads(agreement.read_text())["rows"]:
            lines.append(
                f"| {r['recipe']} | {r['mode']} | {r['sqnr_db']:.1f} | "
                f"{100 * r['top1_agreement']:.2f} | {', '.join(r['kernels'])} |"
            )
        parts += [
            "## integer execution against the simulation (Fashion-MNIST, 10k)",
            "",
            "\n".join(lines),
            "",
        ]
    if machine:
        parts.insert(
            2,
            f"Measured on {machine['cpu']}, {machine['threads']} threads, torch "
            f"{machine['torch']}. Latency: median of interleaved rounds (see "
            "benchmarks/harness.py).\n",
        )
    out = RESULTS / "summary.md"
    out.write_text("\n".join(parts))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed rounds (smoke test)")
    args = parser.parse_args()
    extra = ["--quick"] if args.quick else []
    for name in (*BENCHMARKS, "memory", "agreement"):
        quick = extra if name in BENCHMARKS else []
        command = [sys.executable, "-m", f"benchmarks.{name}", *quick]
        print(f"== {' '.join(command[1:])}", flush=True)
        subprocess.run(command, check=True)
    print(f"wrote {summary()}")


if __name__ == "__main__":
    main()
