"""The ``.lowbit`` file header: a safetensors header whose ``__metadata__`` carries lowbit's JSON.

A ``.lowbit`` file is a plain safetensors file::

    [8 bytes: little-endian u64 N][N bytes: JSON header][tensor data]

The JSON header maps each tensor name to ``{"dtype", "shape", "data_offsets"}`` (offsets relative
to the start of the data) and holds ``"__metadata__"``: ``{"lowbit": JSON}``, one key, because
safetensors writes metadata keys in no fixed order and a file must be the same bytes every time.
Everything here is checked from bytes and JSON only; nothing is unpickled or executed.

The checksum is sha256 over the tensors in name-sorted order; for each tensor it hashes the
UTF-8 name, a NUL byte, the byte count as a little-endian u64, then the raw bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit.spec import QDtype

__all__ = [
    "CheckpointError",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LayerInfo",
    "TensorEntry",
    "Header",
    "read_header",
    "checksum",
]

FORMAT_NAME = "lowbit"
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = frozenset({2})
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_RESAVE = "re-save it with lowbit.save(model, path)"


class CheckpointError(ValueError):
    """A ``.lowbit`` file (or a model given to save/load) that cannot be used; the message names
    the file, the field and the fix."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in the file: safetensors dtype, shape, data byte range."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Bytes the tensor takes on disk."""
        return self.end - self.begin


@dataclass(frozen=True)
class LayerInfo:
    """What the header says about one quantized layer (``weight_spec`` None: float weight).

    ``kind`` is the quantized layer's registered kind (``"linear"``, ``"conv2d"``, ...) and
    ``weight_dtype`` the float dtype the weight reads as (``"float32"``, ``"bfloat16"``, ...).
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    weight_dtype: str
    weight_spec: dict[str, Any] | None
    input_spec: dict[str, Any] | None
    qbias: bool

    def to_json(self) -> dict[str, Any]:
        """The header's JSON object for this layer."""
        return {
            "name": self.name,
            "kind": self.kind,
            "weight_shape": list(self.weight_shape),
            "weight_dtype": self.weight_dtype,
            "weight_spec": self.weight_spec,
            "input": self.input_spec,
            "qbias": self.qbias,
        }

    @property
    def dtype(self) -> str:
        """The weight dtype (``"int4"``, ...) or ``"float"`` for an unquantized weight."""
        return str(self.weight_spec["dtype"]) if self.weight_spec else "float"

    @property
    def bits(self) -> int:
        """Weight bits (32 for a float weight)."""
        return QDtype.parse(self.dtype).bits if self.weight_spec else 32


@dataclass(frozen=True)
class Header:
    """A parsed, checked ``.lowbit`` header."""

    path: Path
    file_size: int
    data_start: int
    tensors: dict[str, TensorEntry]
    format_version: int
    lowbit_version: str
    recipe: dict[str, Any]
    folds: list[tuple[str, str]]
    layers: list[LayerInfo]
    checksum: str


def checksum(items: Iterable[tuple[str, bytes | memoryview]]) -> str:
    """sha256 hex digest of ``(name, raw bytes)`` pairs, hashed in name-sorted order.

    >>> checksum([("b", b"2"), ("a", b"1")]) == checksum([("a", b"1"), ("b", b"2")])
    True
    """
    digest = hashlib.sha256()
    for name, data in sorted(items, key=lambda item: item[0]):
        view = memoryview(data).cast("B")
        digest.update(name.encode("utf-8") + b"\0" + len(view).to_bytes(8, "little"))
        digest.update(view)
    return digest.hexdigest()


def _fail(path: Path, problem: str, fix: str) -> CheckpointError:
    return CheckpointError(f"{str(path)!r}: {problem}; {fix}")


def _foreign_hint(head: bytes) -> str:
    if head.startswith(b"PK"):
        return "it is a zip archive (torch.save writes these; lowbit never unpickles files)"
    if head[:1] == b"\x80":
        return "it is a pickle file (lowbit never unpickles files)"
    return "it does not start with a safetensors header"


def _read_json_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """The raw safetensors JSON header, the data start offset and the file size."""
    if not path.is_file():
        raise _fail(path, "no such file", "check the path (lowbit.save returns it)")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if len(head) < 8:
            raise _fail(
                path,
                f"truncated: the file has {size} byte(s), fewer than the 8-byte "
                "header length a safetensors file starts with",
                _RESAVE,
            )
        if n < 2 or n > _MAX_HEADER_BYTES:
            raise _fail(
                path,
                f"not a lowbit file: {_foreign_hint(head)}",
                "load it with the tool that wrote it, or save the model with lowbit.save",
            )
        raw = f.read(n)
    if len(raw) < n and raw[:1] in (b"", b"{"):
        raise _fail(
            path,
            f"truncated: the header needs {n} bytes but the file has "
            f"{size - 8} after the length field",
            _RESAVE,
        )
    if not raw.startswith(b"{") or len(raw) < n:
        raise _fail(
            path,
            f"not a lowbit file: {_foreign_hint(head)}",
            "load it with the tool that wrote it, or save the model with lowbit.save",
        )
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(
            path,
            f"the safetensors header is not valid JSON ({err}); the file is corrupted",
            _RESAVE,
        ) from None
    if not isinstance(parsed, dict):
        raise _fail(path, "the safetensors header is not a JSON object (corrupted)", _RESAVE)
    return parsed, 8 + n, size


def _tensor_entries(path: Path, raw: dict[str, Any], data_size: int) -> dict[str, TensorEntry]:
    entries: dict[str, TensorEntry] = {}
    for name, info in raw.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            entry = TensorEntry(str(dtype), tuple(int(d) for d in shape), int(begin), int(end))
        except (KeyError, TypeError, ValueError):
            raise _fail(
                path, f"tensor {name!r} has a malformed header entry {info!r} (corrupted)", _RESAVE
            ) from None
        if entry.dtype not in _ITEMSIZE:
            raise _fail(path, f"tensor {name!r} has unknown dtype {entry.dtype!r}", _RESAVE)
        if any(d < 0 for d in entry.shape):
            raise _fail(
                path, f"tensor {name!r} has a negative dimension {list(entry.shape)}", _RESAVE
            )
        if not 0 <= entry.begin <= entry.end:
            raise _fail(
                path, f"tensor {name!r} has bad data offsets [{begin}, {end}] (corrupted)", _RESAVE
            )
        if entry.end > data_size:
            raise _fail(
                path,
                f"truncated: tensor {name!r} needs data bytes up to {entry.end} "
                f"but the file holds only {data_size}",
                _RESAVE,
            )
        if entry.nbytes != math.prod(entry.shape) * _ITEMSIZE[entry.dtype]:
            raise _fail(
                path,
                f"tensor {name!r}: {entry.nbytes} bytes do not fit shape "
                f"{list(entry.shape)} of {entry.dtype} (corrupted)",
                _RESAVE,
            )
        entries[name] = entry
    _check_layout(path, entries, data_size)
    return entries


def _check_layout(path: Path, entries: dict[str, TensorEntry], data_size: int) -> None:
    """The tensors tile the data section exactly, as safetensors requires: no overlap (a file
    of many entries aliasing the same bytes would make a small file allocate without bound),
    no gap."""
    position = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position:
            raise _fail(
                path,
                f"tensor {name!r} starts at data byte {entry.begin} where {position} was "
                "expected (overlapping or missing tensor data: corrupted)",
                _RESAVE,
            )
        position = entry.end
    if position != data_size:
        raise _fail(
            path,
            f"the tensors cover {position} of the {data_size} data bytes (corrupted)",
            _RESAVE,
        )


def _lowbit_json(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    meta = raw.get("__metadata__")
    if not isinstance(meta, dict) or not isinstance(meta.get(FORMAT_NAME), str):
        raise _fail(
            path,
            "not a lowbit file: a safetensors file without lowbit's metadata "
            f"(no __metadata__.{FORMAT_NAME})",
            "load plain safetensors files with "
            "safetensors.torch.load_file, or save the quantized model with lowbit.save",
        )
    try:
        data = json.loads(meta[FORMAT_NAME])
    except json.JSONDecodeError as err:
        raise _fail(path, f"__metadata__.lowbit is not valid JSON ({err})", _RESAVE) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise _fail(path, "__metadata__.lowbit is not a lowbit header object (corrupted)", _RESAVE)
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _fail(
            path,
            f"__metadata__.lowbit.format_version={version!r} is not a positive integer (corrupted)",
            _RESAVE,
        )
    if version not in SUPPORTED_VERSIONS:
        raise _fail(
            path,
            f"unsupported format version {version} (written by lowbit "
            f"{data.get('lowbit_version', '?')}); this lowbit reads version(s) "
            f"{sorted(SUPPORTED_VERSIONS)}",
            "upgrade lowbit to load it"
            if version > max(SUPPORTED_VERSIONS)
            else "quantize the float model again with this lowbit and save it (older files "
            "keep the weights in a layout this version no longer reads)",
        )
    return data


def _field(path: Path, data: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in data:
        raise _fail(path, f"missing key {key!r} in the lowbit header", _RESAVE)
    value = data[key]
    if not isinstance(value, kind):
        raise _fail(
            path, f"header key {key!r} has the wrong type ({type(value).__name__})", _RESAVE
        )
    return value


def _layer(path: Path, item: Any, i: int) -> LayerInfo:
    if not isinstance(item, dict):
        raise _fail(path, f"header layers[{i}] is not an object", _RESAVE)
    where = f"layers[{i}]"
    try:
        for key in ("weight_spec", "input"):
            if item[key] is not None and not isinstance(item[key], dict):
                raise TypeError(f"{key} must be an object or null")
        return LayerInfo(
            name=str(item["name"]),
            kind=str(item["kind"]),
            weight_shape=tuple(int(d) for d in item["weight_shape"]),
            weight_dtype=str(item["weight_dtype"]),
            weight_spec=item["weight_spec"],
            input_spec=item["input"],
            qbias=bool(item["qbias"]),
        )
    except KeyError as err:
        raise _fail(path, f"missing key {err.args[0]!r} in header {where}", _RESAVE) from None
    except (TypeError, ValueError) as err:
        raise _fail(path, f"header {where} is malformed ({err})", _RESAVE) from None


def read_header(path: str | Path) -> Header:
    """Read and check a ``.lowbit`` header without reading any tensor data.

    Checks, in order: the file exists, the 8-byte length is sane, the JSON parses, every
    tensor's bytes lie inside the file, the metadata says ``lowbit`` with a supported version.

    >>> import tempfile, torch
    >>> from lowbit.api import quantize
    >>> from lowbit.export import save
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = save(quantize(torch.nn.Sequential(torch.nn.Linear(8, 4)), "w4a16"), f"{d}/m")
    ...     header = read_header(p)
    >>> [(layer.name, layer.dtype) for layer in header.layers]
    [('0', 'int4')]
    """
    path = Path(path)
    raw, data_start, size = _read_json_header(path)
    tensors = _tensor_entries(path, raw, size - data_start)
    data = _lowbit_json(path, raw)
    folds = _field(path, data, "folds", list)
    if not all(
        isinstance(f, list) and len(f) == 2 and all(isinstance(s, str) for s in f) for f in folds
    ):
        raise _fail(path, "header key 'folds' must be a list of [layer, bn] names", _RESAVE)
    layers = [_layer(path, item, i) for i, item in enumerate(_field(path, data, "layers", list))]
    digest = _field(path, data, "checksum", dict)
    if digest.get("algorithm") != "sha256" or not isinstance(digest.get("value"), str):
        raise _fail(
            path, "header key 'checksum' must be {'algorithm': 'sha256', 'value': hex}", _RESAVE
        )
    return Header(
        path=path,
        file_size=size,
        data_start=data_start,
        tensors=tensors,
        format_version=int(data["format_version"]),
        lowbit_version=str(_field(path, data, "lowbit_version", str)),
        recipe=_field(path, data, "recipe", dict),
        folds=[(a, b) for a, b in folds],
        layers=layers,
        checksum=digest["value"],
    )
