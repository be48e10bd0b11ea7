"""Export converted models: packed ``.lowbit`` checkpoints (safetensors + JSON header) and
ONNX QDQ models (:mod:`lowbit.export.onnx`, imported on use: it needs the ``onnx`` extra)."""

from lowbit.export.atomic import atomic_path, write_json
from lowbit.export.checkpoint import SUFFIX, load, save, theoretical_size
from lowbit.export.header import (
    FORMAT_NAME,
    FORMAT_VERSION,
    CheckpointError,
    Header,
    LayerInfo,
    read_header,
)
from lowbit.export.summary import (
    FileSummary,
    LayerRow,
    format_inspect,
    inspect,
    inspect_table,
    print_inspect,
    summarize,
)

__all__ = [
    "atomic_path",
    "CheckpointError",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FileSummary",
    "Header",
    "LayerInfo",
    "LayerRow",
    "SUFFIX",
    "format_inspect",
    "inspect",
    "inspect_table",
    "load",
    "print_inspect",
    "read_header",
    "save",
    "summarize",
    "theoretical_size",
    "write_json",
]
