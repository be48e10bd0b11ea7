"""Fuzzing load with a few hundred mutations of a small valid file: every outcome must be a
CheckpointError naming the file, or a load whose outputs equal the original model's.

Mutations (seeded, so a failure reproduces): bit flips anywhere in the file, truncations,
edits, deletions and insertions of lowbit's JSON fields and swaps of two of its values (most
re-signed, so they get past the checksum to the checks behind it), edits of the safetensors
tensor entries, invalid quantization parameters (re-signed), and a few crafted headers.
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from crafting import sign_text, split, write_raw
from safetensors.torch import load_file, save_file
from torch import nn

import lowbit
from lowbit.export import CheckpointError

POOL: list[Any] = [
    None, True, False, 0, -1, 1, 3, 2**31, 2**64, 10**30, -(10**30), 0.5, -0.0, 1e308,
    "", "x", "int4", "uint8", "int99", "per_group:0", "per_channel:99", "per_token", "nearest",
    "entropy", "linear", "float16", "__metadata__", [], [1, 2], ["a", "b"], [[[]]], {},
    {"a": 1}, {"dtype": "int8"}, "a" * 5000, [0] * 9, [-1, 4],
]  # fmt: skip
BAD_QPARAMS = [float("nan"), float("inf"), -1.0, 0.0, -1e-30]


def _build(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 4))


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a JSON value (objects by key, lists by index), itself excluded."""
    out = []
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else []
    )
    for key, child in items:
        out.append((*path, key))
        out += _paths(child, (*path, key))
    return out


def _get(node: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        node = node[key]
    return node


class Fuzzer:
    """Mutations of one valid file, each written to its own path and loaded once."""

    def __init__(self, src: Path, folder: Path, seed: int) -> None:
        self.src, self.folder, self.rng = src, folder, random.Random(seed)
        self.data = src.read_bytes()
        self.raw, self.meta, self.body = split(src)
        self.tensors = load_file(src)
        self.n = 0

    def _path(self) -> Path:
        self.n += 1
        return self.folder / f"m{self.n}.lowbit"

    def _write_meta(self, meta: dict[str, Any], signed: bool) -> Path:
        if signed:
            meta = sign_text(meta, self.tensors)
        try:
            text = json.dumps(meta)
        except (TypeError, ValueError):
            text = "{}"
        return write_raw(self._path(), self.raw, self.body, meta_text=text)

    def flip(self) -> Path:
        data = bytearray(self.data)
        for _ in range(self.rng.randint(1, 3)):
            data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
        path = self._path()
        path.write_bytes(bytes(data))
        return path

    def truncate(self) -> Path:
        path = self._path()
        path.write_bytes(self.data[: self.rng.randrange(len(self.data))])
        return path

    def field(self, signed: bool = True) -> Path:
        meta = copy.deepcopy(self.meta)
        path = self.rng.choice(_paths(meta))
        parent, key = _get(meta, path[:-1]), path[-1]
        action = self.rng.random()
        if action < 0.15 and isinstance(parent, dict):
            del parent[key]
        elif action < 0.25 and isinstance(parent, dict):
            parent[self.rng.choice(["extra", "name", "ties", "kept_float"])] = self.rng.choice(POOL)
        else:
            parent[key] = copy.deepcopy(self.rng.choice(POOL))
        return self._write_meta(meta, signed)

    def swap(self) -> Path:
        meta = copy.deepcopy(self.meta)
        while True:  # two values, neither inside the other
            a, b = self.rng.sample(_paths(meta), 2)
            if a[: len(b)] != b and b[: len(a)] != a:
                break
        pa, pb = _get(meta, a[:-1]), _get(meta, b[:-1])
        pa[a[-1]], pb[b[-1]] = pb[b[-1]], pa[a[-1]]
        return self._write_meta(meta, signed=True)

    def entry(self) -> Path:
        raw = copy.deepcopy(self.raw)
        name = self.rng.choice([k for k in raw if k != "__metadata__"])
        field = self.rng.choice(["dtype", "shape", "data_offsets"])
        if self.rng.random() < 0.5:
            other = self.rng.choice([k for k in raw if k != "__metadata__"])
            raw[name][field] = copy.deepcopy(raw[other][field])
        else:
            raw[name][field] = copy.deepcopy(self.rng.choice(POOL))
        return write_raw(self._path(), raw, self.body)

    def qparams(self) -> Path:
        tensors = dict(self.tensors)
        keys = [k for k in tensors if k.endswith(("scale", "zero_point"))]
        key = self.rng.choice(keys)
        t = tensors[key].clone()
        kind = self.rng.random()
        if kind < 0.6 and t.is_floating_point():
            t.view(-1)[self.rng.randrange(t.numel())] = self.rng.choice(BAD_QPARAMS)
        elif kind < 0.8:
            t = t.reshape(-1)[: max(t.numel() - 1, 0)].clone() if t.numel() > 1 else t.expand(3)
        else:
            t = t.double() if not t.is_floating_point() else t.to(torch.int32) + 1000
        tensors[key] = t.contiguous()
        meta = sign_text(self.meta, tensors)
        path = self._path()
        save_file(tensors, str(path), metadata={"lowbit": json.dumps(meta)})
        return path

    def crafted(self) -> list[Path]:
        text = json.dumps(self.meta)
        edits = [
            text.replace('"args": {}', '"args": ' + "[" * 30000 + "]" * 30000),
            text.replace('"qbias": true', '"qbias": NaN', 1),
            text.replace('"qbias": true', '"qbias": 1e999', 1),
            text.replace('"qbias": true', '"qbias": ' + "7" * 6000, 1),
            text.replace('"qbias": true', '"qbias": true, "qbias": true', 1),
            text[: len(text) // 2],
            "[]",
            json.dumps({**self.meta, "layers": self.meta["layers"] * 2}),
        ]
        return [write_raw(self._path(), self.raw, self.body, meta_text=e) for e in edits]


def _outcome(path: Path, reference: nn.Module, x: torch.Tensor) -> str:
    try:
        back = lowbit.load(path, _build(7))
    except CheckpointError as err:
        assert repr(str(path)) in str(err), f"{path.name}: the message does not name the file"
        return "refused"
    if torch.equal(back(x), reference(x)):
        return "loaded, same outputs"
    return "loaded, DIFFERENT outputs"


@pytest.mark.parametrize("recipe", ["w8a8", "w4a16"])
def test_fuzzed_files_are_refused_or_load_correctly(
    recipe: str, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    q = lowbit.quantize(_build(0), recipe, data=[torch.randn(8, 8)])
    src = lowbit.save(q, tmp_path / "base.lowbit")
    fuzz = Fuzzer(src, tmp_path, seed=0 if recipe == "w8a8" else 1)
    makers: list[tuple[str, Callable[[], Path], int]] = [
        ("bit flips", fuzz.flip, 60),
        ("truncations", fuzz.truncate, 20),
        ("field edits, re-signed", fuzz.field, 60),
        ("field edits, unsigned", lambda: fuzz.field(signed=False), 10),
        ("value swaps, re-signed", fuzz.swap, 30),
        ("tensor entries", fuzz.entry, 20),
        ("bad qparams, re-signed", fuzz.qparams, 20),
    ]
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    counts: Counter[str] = Counter()
    failures: list[str] = []
    start = time.perf_counter()
    jobs = [(kind, maker) for kind, maker, n in makers for _ in range(n)]
    jobs += [("crafted headers", path) for path in fuzz.crafted()]  # type: ignore[misc]
    for kind, make in jobs:
        path = make if isinstance(make, Path) else make()
        try:
            outcome = _outcome(path, q, x)
        except Exception as err:  # anything but a CheckpointError is a bug
            outcome = f"uncaught {type(err).__name__}"
            failures.append(f"{kind}, {path.name}: {type(err).__name__}: {str(err)[:300]}")
        if outcome.endswith("DIFFERENT outputs"):
            failures.append(f"{kind}, {path.name}: loaded with different outputs")
        counts[outcome] += 1
        counts[kind] += 1
        path.unlink()
    elapsed = time.perf_counter() - start
    summary = f"{len(jobs)} mutations of a {recipe} file in {elapsed:.1f} s: {dict(counts)}"
    print(summary)
    record_property("fuzz", summary)
    assert not failures, "\n".join(failures[:10])
    assert counts["refused"] > len(jobs) // 2  # most mutations break the file
