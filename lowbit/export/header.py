"""The ``.lowbit`` file header: a safetensors header whose ``__metadata__`` carries lowbit's JSON.

A ``.lowbit`` file is a plain safetensors file::

    [8 bytes: little-endian u64 N][N bytes: JSON header][tensor data]

The JSON header maps each tensor name to ``{"dtype", "shape", "data_offsets"}`` (offsets relative
to the start of the data) and holds ``"__metadata__"``: ``{"lowbit": JSON}``, one key, because
safetensors writes metadata keys in no fixed order and a file must be the same bytes every time.
Everything here is checked from bytes and JSON only; nothing is unpickled or executed.

The checksum (:mod:`lowbit.export.digest`) is sha256 over lowbit's JSON (canonical form, without
the checksum itself) and every tensor's name, dtype, shape and bytes. Every field is read through
:mod:`lowbit.export.fields`: a wrong type, an out-of-bounds number, a duplicated layer or key, an
unknown layer kind or nesting too deep is a :class:`CheckpointError` naming the file and the field.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from lowbit.export import fields
from lowbit.export.digest import Checksum, checksum
from lowbit.export.fields import FieldError
from lowbit.export.meta import (
    MAX_ITEMS,
    LayerInfo,
    checksum_value,
    fold_pairs,
    layer_infos,
    model_source,
    recipe_shape,
    tie_map,
)

__all__ = [
    "CheckpointError",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LayerInfo",
    "TensorEntry",
    "Header",
    "read_header",
    "Checksum",
    "checksum",
]

FORMAT_NAME = "lowbit"
FORMAT_VERSION = 3  # 3: the checksum covers the header; tied weights stored once ("ties")
SUPPORTED_VERSIONS = frozenset({3})
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_MAX_TENSOR_DIMS = 16
_TOP_KEYS = {"format", "format_version", "lowbit_version", "recipe", "folds", "layers", "checksum"}
_OPTIONAL_KEYS = {"kept_float", "ties", "model"}
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
class Header:
    """A parsed, checked ``.lowbit`` header.

    ``kept_float`` maps each layer the model kept in float to the reason; ``ties`` maps the
    state_dict prefix of a tied weight (``"lm_head.weight"``) to the one stored in the file
    (``"transformer.wte.weight"``): a tied weight is written once and tied again by load.
    ``model`` describes a transformers model (class name and config, see
    :mod:`lowbit.export.hf`) so ``load(path)`` can rebuild it without the user's code.
    """

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
    kept_float: dict[str, str] = field(default_factory=dict)
    ties: dict[str, str] = field(default_factory=dict)
    model: dict[str, Any] | None = None  # how to rebuild the model without the user's code
    meta: dict[str, Any] = field(default_factory=dict, repr=False)  # the raw lowbit JSON


def _fail(path: Path, problem: str, fix: str) -> CheckpointError:
    return CheckpointError(f"{str(path)!r}: {problem}; {fix}")


def _field_fail(path: Path, err: FieldError) -> CheckpointError:
    return _fail(path, f"header field {err} (corrupted or crafted)", _RESAVE)


def _foreign_hint(head: bytes) -> str:
    if head.startswith(b"PK"):
        return "it is a zip archive (torch.save writes these; lowbit never unpickles files)"
    if head[:1] == b"\x80":
        return "it is a pickle file (lowbit never unpickles files)"
    return "it does not start with a safetensors header"


def _not_lowbit(path: Path, head: bytes) -> CheckpointError:
    return _fail(
        path,
        f"not a lowbit file: {_foreign_hint(head)}",
        "load it with the tool that wrote it, or save the model with lowbit.save",
    )


def _read_json_header(path: Path, f: BinaryIO) -> tuple[dict[str, Any], int, int]:
    """The raw safetensors JSON header, the data start offset and the file size, all read
    from the open file ``f``."""
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        raise _fail(
            path,
            f"truncated: the file has {size} byte(s), fewer than the 8-byte "
            "header length a safetensors file starts with",
            _RESAVE,
        )
    n = int.from_bytes(head, "little")
    if n < 2 or n > _MAX_HEADER_BYTES:
        raise _not_lowbit(path, head)
    raw = f.read(min(n, max(size - 8, 0)))
    if len(raw) < n and raw[:1] in (b"", b"{"):
        raise _fail(
            path,
            f"truncated: the header needs {n} bytes but the file has "
            f"{size - 8} after the length field",
            _RESAVE,
        )
    if not raw.startswith(b"{") or len(raw) < n:
        raise _not_lowbit(path, head)
    try:
        parsed = fields.parse_json(raw, "the safetensors header")
    except FieldError as err:
        raise _fail(path, f"{err}; the file is corrupted", _RESAVE) from None
    if not isinstance(parsed, dict):
        raise _fail(path, "the safetensors header is not a JSON object (corrupted)", _RESAVE)
    return parsed, 8 + n, size


def _entry(name: str, info: Any) -> TensorEntry:
    where = f"tensor {fields.short(name)}"
    fields.text(name, f"a tensor name ({fields.short(name)})")
    item = fields.mapping(info, where, {"dtype", "shape", "data_offsets"})
    dtype = fields.text(item["dtype"], f"{where}.dtype", 16)
    if dtype not in _ITEMSIZE:
        raise FieldError(f"{where}.dtype {fields.short(dtype)} is not a safetensors dtype")
    shape = fields.shape(item["shape"], f"{where}.shape", _MAX_TENSOR_DIMS)
    offsets = fields.array(item["data_offsets"], f"{where}.data_offsets", 2)
    if len(offsets) != 2:
        raise FieldError(f"{where}.data_offsets must be [begin, end]")
    begin, end = (fields.integer(o, f"{where}.data_offsets", 0, 1 << 62) for o in offsets)
    return TensorEntry(dtype, shape, begin, end)


def _tensor_entries(path: Path, raw: dict[str, Any], data_size: int) -> dict[str, TensorEntry]:
    entries: dict[str, TensorEntry] = {}
    for name, info in raw.items():
        if name == "__metadata__":
            continue
        try:
            entry = _entry(name, info)
        except FieldError as err:
            raise _field_fail(path, err) from None
        if not entry.begin <= entry.end:
            raise _fail(
                path,
                f"tensor {name!r} has bad data offsets [{entry.begin}, {entry.end}] (corrupted)",
                _RESAVE,
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
        data = fields.parse_json(meta[FORMAT_NAME], "__metadata__.lowbit")
    except FieldError as err:
        raise _fail(path, str(err), _RESAVE) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise _fail(path, "__metadata__.lowbit is not a lowbit header object (corrupted)", _RESAVE)
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _fail(
            path,
            f"__metadata__.lowbit.format_version={fields.short(version)} is not a positive "
            "integer (corrupted)",
            _RESAVE,
        )
    if version not in SUPPORTED_VERSIONS:
        written = data.get("lowbit_version")
        raise _fail(
            path,
            f"unsupported format version {fields.short(version)} (written by lowbit "
            f"{fields.short(written) if isinstance(written, str) else '?'}); this lowbit reads "
            f"version(s) {sorted(SUPPORTED_VERSIONS)}",
            "upgrade lowbit to load it"
            if version > max(SUPPORTED_VERSIONS)
            else "load it with the lowbit that wrote it and save it again with this one, or "
            "quantize the float model again and save it (older files carry a checksum that "
            "does not cover their header)",
        )
    return data


def _header(
    path: Path, data: dict[str, Any], tensors: dict[str, TensorEntry], where: tuple[int, int]
) -> Header:
    missing = sorted(_TOP_KEYS - set(data))
    if missing:
        raise _fail(path, f"missing key {missing[0]!r} in the lowbit header", _RESAVE)
    unknown = sorted(set(data) - _TOP_KEYS - _OPTIONAL_KEYS)
    if unknown:
        raise FieldError(f"{fields.short(unknown[0])} is not a lowbit header key")
    return Header(
        path=path,
        file_size=where[1],
        data_start=where[0],
        tensors=tensors,
        format_version=int(data["format_version"]),
        lowbit_version=fields.text(data["lowbit_version"], "lowbit_version", 64),
        recipe=recipe_shape(data["recipe"]),
        folds=fold_pairs(data["folds"]),
        layers=layer_infos(data),
        checksum=checksum_value(data["checksum"]),
        kept_float=fields.text_map(data.get("kept_float", {}), "kept_float", MAX_ITEMS),
        ties=tie_map(data.get("ties", {}), tensors),
        model=model_source(data.get("model")),
        meta=data,
    )


def read_header(path: str | Path, file: BinaryIO | None = None) -> Header:
    """Read and check a ``.lowbit`` header without reading any tensor data.

    Checks, in order: the file exists, the 8-byte length is sane, the JSON parses, every
    tensor's bytes lie inside the file, the metadata says ``lowbit`` with a supported version,
    then every field's type and bounds. ``file``: read from this open file instead of opening
    ``path`` (load reads header and tensors through one file descriptor, so a file replaced
    meanwhile is never half read).

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
    if file is None:
        if not path.is_file():
            raise _fail(path, "no such file", "check the path (lowbit.save returns it)")
        with path.open("rb") as f:
            return read_header(path, f)
    raw, data_start, size = _read_json_header(path, file)
    tensors = _tensor_entries(path, raw, size - data_start)
    data = _lowbit_json(path, raw)
    try:
        return _header(path, data, tensors, (data_start, size))
    except FieldError as err:
        raise _field_fail(path, err) from None
