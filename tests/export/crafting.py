"""Build damaged and crafted ``.lowbit`` files from a good one (imported by the tests)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lowbit.export.checkpoint import file_checksum


def split(src: Path) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """The safetensors JSON header, lowbit's JSON and the data section of ``src``."""
    data = src.read_bytes()
    n = int.from_bytes(data[:8], "little")
    raw = json.loads(data[8 : 8 + n])
    return raw, json.loads(raw["__metadata__"]["lowbit"]), data[8 + n :]


def write_raw(path: Path, raw: dict[str, Any], body: bytes, meta_text: str | None = None) -> Path:
    """A file from a safetensors JSON header (``meta_text`` replaces lowbit's JSON verbatim)."""
    raw = dict(raw)
    if meta_text is not None:
        raw["__metadata__"] = {"lowbit": meta_text}
    text = json.dumps(raw).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + body)
    return path


def craft(
    src: Path,
    dst: Path,
    header: Callable[[dict[str, Any]], None] | None = None,
    tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
    sign: bool = True,
) -> Path:
    """``src`` with its lowbit JSON and/or tensors edited; ``sign``: a checksum made valid again,
    so the file reaches the checks behind the checksum (what a crafted file would do)."""
    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["lowbit"])
    state = load_file(src)
    if header is not None:
        header(meta)
    if tensors is not None:
        tensors(state)
    if sign:
        meta["checksum"] = {"algorithm": "sha256", "value": file_checksum(meta, state)}
    save_file(state, str(dst), metadata={"lowbit": json.dumps(meta)})
    return dst


def sign_text(meta: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``meta`` with a checksum valid for ``state``."""
    return {**meta, "checksum": {"algorithm": "sha256", "value": file_checksum(meta, state)}}
