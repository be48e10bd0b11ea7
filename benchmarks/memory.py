"""How much memory a loaded model takes: the process's resident memory growth when loading the
MLP 1024-4096-4096-1024 as ``.lowbit`` files, against building the FP32 MLP; and the files'
sizes against the FP32 weights.

    .venv/bin/python -m benchmarks.memory

Each measurement runs in a fresh Python process (``VmRSS`` from /proc before and after), so
nothing of one is counted in another. The ``.lowbit`` loads build the architecture on the meta
device (``with torch.device("meta")``), so no float weight is ever allocated; growth is read
after loading and again after the first forward pass (when kernels prepare their packed
weights). Writes benchmarks/results/memory.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import lowbit
from benchmarks.harness import RESULTS, machine, setup
from benchmarks.mlp import build_mlp
from lowbit.export import write_json

RECIPES = ("w8a16", "w8a8-dynamic", "w4a16", "w4a16-g128")

_CHILD = r"""
import gc, json, sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
import torch, lowbit
from benchmarks.mlp import build_mlp
torch.set_num_threads(2)
x = torch.randn(1, 1024)
def tiny():
    return torch.nn.Sequential(torch.nn.Linear(1024, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
# warm up on a tiny model first, so one-time costs (lazy imports, torch's meta-device
# machinery, kernel self-tests) are not counted against the model being measured
if sys.argv[1] == "fp32":
    tiny()(x)
else:
    with torch.device("meta"):
        small = tiny()
    with torch.no_grad():
        lowbit.load(sys.argv[2], small)(x)
gc.collect(); before = rss()
if sys.argv[1] == "fp32":
    model = build_mlp()
else:
    with torch.device("meta"):
        skeleton = build_mlp()
    model = lowbit.load(sys.argv[1], skeleton)
gc.collect(); loaded = rss()
with torch.no_grad():
    model(x)
gc.collect(); after = rss()
print(json.dumps({"load": loaded - before, "first_forward": after - before}))
"""


def _measure(target: str, warmup: str = "") -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, target, warmup],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    setup()
    model = build_mlp()
    fp32_weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    fp32 = _measure("fp32")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        calibration = [torch.randn(64, 1024)]
        tiny = nn.Sequential(nn.Linear(1024, 64), nn.ReLU(), nn.Linear(64, 64))
        for recipe in RECIPES:
            folder = Path(tmp)
            path = lowbit.save(
                lowbit.quantize(model, recipe, data=calibration), folder / f"{recipe}.lowbit"
            )
            small = lowbit.quantize(tiny, recipe, data=[calibration[0]])
            grown = _measure(str(path), str(lowbit.save(small, folder / f"tiny-{recipe}.lowbit")))
            rows.append(
                {
                    "recipe": recipe,
                    "file_bytes": path.stat().st_size,
                    "file_vs_fp32": path.stat().st_size / fp32_weight_bytes,
                    "load_bytes": grown["load"],
                    "load_vs_fp32": grown["load"] / fp32["load"],
                    "first_forward_bytes": grown["first_forward"],
                    "first_forward_vs_fp32": grown["first_forward"] / fp32["first_forward"],
                }
            )
    table = Table(title="MLP 1024-4096-4096-1024: memory and file size against FP32")
    for col in (
        "recipe",
        "file MiB",
        "file / fp32",
        "RSS after load",
        "/ fp32",
        "after 1st forward",
        "/ fp32",
    ):
        table.add_column(col, justify="left" if col == "recipe" else "right")
    mib = 2**20
    table.add_row(
        "fp32",
        f"{fp32_weight_bytes / mib:.1f}",
        "1.000",
        f"{fp32['load'] / mib:.1f}",
        "1.000",
        f"{fp32['first_forward'] / mib:.1f}",
        "1.000",
    )
    for r in rows:
        table.add_row(
            r["recipe"],
            f"{r['file_bytes'] / mib:.1f}",
            f"{r['file_vs_fp32']:.3f}",
            f"{r['load_bytes'] / mib:.1f}",
            f"{r['load_vs_fp32']:.3f}",
            f"{r['first_forward_bytes'] / mib:.1f}",
            f"{r['first_forward_vs_fp32']:.3f}",
        )
    Console(width=140).print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "memory.json"
    write_json(
        path,
        {
            "machine": machine(),
            "fp32_weight_bytes": fp32_weight_bytes,
            "fp32_growth": fp32,
            "rows": rows,
            "lowbit": lowbit.__version__,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
