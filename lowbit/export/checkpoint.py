"""Save a converted model as one packed ``.lowbit`` file (safetensors + JSON header), load it back.

The tensors are the converted model's ``state_dict``, in which each quantized layer writes its
own packed form (:mod:`lowbit.nn.state`: sub-byte weights two int4 or four int2 per byte,
scales, packed zero points, int32 biases); float leftovers are stored as they are. No pickle is
written or read, the header is checked before any tensor byte is touched (see
:mod:`lowbit.export.header`), and tensors are read one at a time, a chunk at a time, straight
into their own memory while the checksum is computed, so a large file is never held twice.
Header and tensors are read through one open file, so a file re-saved meanwhile (an atomic
rename) is read whole, old or new, never half of each. Tied weights are stored once
(:mod:`lowbit.export.ties`).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import safetensors.torch as st
import torch
from torch import nn

import lowbit
from lowbit.api import prepared_info, quantized_layers
from lowbit.export.atomic import atomic_path
from lowbit.export.digest import Checksum
from lowbit.export.header import (
    FORMAT_NAME,
    FORMAT_VERSION,
    CheckpointError,
    Header,
    LayerInfo,
    read_header,
)
from lowbit.export.hf import HFError, build_from_source, model_source
from lowbit.export.rebuild import rebuild
from lowbit.export.ties import drop_aliases, find_ties
from lowbit.nn import QModule, QTensor
from lowbit.runtime.ops import release_free_memory

__all__ = ["save", "load", "theoretical_size", "SUFFIX"]

SUFFIX = ".lowbit"


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _check_converted(model: nn.Module, where: str) -> dict[str, QModule]:
    """The quantized layers of a converted model; a clear error for anything else."""
    try:
        prepared_info(model)
    except ValueError:
        raise CheckpointError(
            f"{where}: {type(model).__name__} is not a lowbit model; quantize it first with "
            "lowbit.quantize(model, recipe, data=...) (or prepare, calibrate and convert)"
        ) from None
    layers = quantized_layers(model)
    for name, layer in layers.items():
        iq = layer.input_quantizer
        if (layer.weight_quantizer is not None and not layer.frozen) or (
            iq is not None and iq.observing
        ):
            raise CheckpointError(
                f"{where}: layer {name!r} is not converted (its weight is still float and "
                "fake-quantized); call lowbit.convert(model) after calibration first"
            )
    return layers


def _layer_info(name: str, layer: QModule) -> LayerInfo:
    wq, iq = layer.weight_quantizer, layer.input_quantizer
    return LayerInfo(
        name=name,
        kind=layer.kind,
        weight_shape=tuple(layer.weight.shape),
        weight_dtype=str(layer.weight.dtype).removeprefix("torch."),
        weight_spec=wq.spec.to_dict() if wq is not None else None,
        input_spec=iq.spec.to_dict() if iq is not None else None,
        qbias=isinstance(layer.bias, QTensor),
    )


def _storable(state: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no memory (safetensors refuses shared storage; tied
    tensors are left out by the caller, what still overlaps, a slice of another, is copied)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{where}: state_dict entry {key!r} is a {type(value).__name__}, not a tensor; "
                ".lowbit files hold tensors only, so keep extra state out of the model"
            )
        t = value.detach().cpu().contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view of another tensor: store a copy of its own
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def file_checksum(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """The sha256 a file holding ``tensors`` under the lowbit JSON ``meta`` carries
    (:mod:`lowbit.export.digest`); tools that rewrite a file use it to sign it again.

    >>> a = file_checksum({"format": "lowbit"}, {"w": torch.zeros(2)})
    >>> a == file_checksum({"format": "lowbit"}, {"w": torch.zeros(2, 1)})  # shape counts
    False
    """
    digest = Checksum(meta)
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.add(key, _SAFETENSORS_DTYPES[t.dtype], tuple(t.shape), _raw(t))
    return digest.hexdigest()


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU contiguous tensor, as safetensors writes them (little endian)."""
    return t.reshape(-1).view(torch.uint8).numpy().data  # (nbytes,)


def _target(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix == "":
        path = path.with_suffix(SUFFIX)
    if not path.parent.is_dir():
        raise CheckpointError(
            f"{str(path)!r}: the folder {str(path.parent)!r} does not exist; create it first"
        )
    if path.is_dir():
        raise CheckpointError(f"{str(path)!r} is a folder; give a file name such as model.lowbit")
    return path


def save(model: nn.Module, path: str | Path) -> Path:
    """Write a converted model to one packed ``.lowbit`` file, atomically; returns its path.

    ``.lowbit`` is appended when ``path`` has no suffix. The model must come out of
    :func:`lowbit.convert` (or :func:`lowbit.quantize`).

    >>> import tempfile, torch
    >>> from lowbit.api import quantize
    >>> q = quantize(torch.nn.Sequential(torch.nn.Linear(1024, 64)), "w4a16")
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = save(q, f"{d}/net")
    ...     p.name, p.stat().st_size < 1024 * 64 * 4 / 5  # fp32 bytes / 5
    ('net.lowbit', True)
    """
    path = _target(path)
    where = f"cannot save to {str(path)!r}"
    layers = _check_converted(model, where)
    info = prepared_info(model)
    state = model.state_dict(keep_vars=True)  # each layer writes its packed form
    ties = find_ties(model, state)
    tensors = _storable(drop_aliases(state, ties), where)
    header: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "lowbit_version": lowbit.__version__,
        "recipe": info.recipe.to_dict(),
        "folds": [[pair.layer, pair.bn] for pair in info.folds],
        "layers": [_layer_info(name, layer).to_json() for name, layer in layers.items()],
        "kept_float": dict(info.kept_float),
        "ties": ties,
    }
    source = model_source(model)  # a transformers model: load(path) rebuilds it alone
    if source is not None:
        header["model"] = source
    try:
        header["checksum"] = {"algorithm": "sha256", "value": file_checksum(header, tensors)}
        text = json.dumps(header, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{where}: the recipe cannot be written as JSON ({err}); keep recipe args to "
            "finite numbers, strings, lists and dicts"
        ) from None
    with atomic_path(path) as tmp:  # one metadata key: byte-identical files
        st.save_file(tensors, tmp, metadata={FORMAT_NAME: text})
    return path


_CHUNK = 1 << 20
_TORCH_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
}


_SAFETENSORS_DTYPES = {dtype: name for name, dtype in _TORCH_DTYPES.items()}


def _read_tensors(header: Header, f: io.BufferedReader) -> dict[str, torch.Tensor]:
    """Every tensor read once from the open file ``f``, a chunk at a time, straight into memory
    of its own, hashing the bytes on the way; the sha256 is compared before any tensor is used.

    Not memory-mapped: a mapping's pages stay resident while any tensor of the file is alive,
    so a model that re-packs a weight (the int4 kernel does) would hold the file's bytes and
    its own (the loaded w4a16 benchmark MLP grew to 0.35x FP32 instead of 0.22x); copied out of
    a mapping, every tensor is briefly held twice. Read like this it is held once, and the
    loaded model never depends on the file staying as it is.
    """
    path = header.path
    digest = Checksum(header.meta)
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in sorted(header.tensors.items()):
        buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
        view = buffer.numpy().data  # (nbytes,) memoryview
        f.seek(header.data_start + entry.begin)
        done = 0
        while done < entry.nbytes:
            got = f.readinto(view[done : min(done + _CHUNK, entry.nbytes)])
            if not got:
                raise CheckpointError(
                    f"{str(path)!r}: the file ended early (truncated, or cut while it was "
                    f"read); {_RESAVE_HINT}"
                )
            done += got
        digest.add(name, entry.dtype, entry.shape, view)
        tensors[name] = buffer.view(_TORCH_DTYPES[entry.dtype]).reshape(entry.shape)
    found = digest.hexdigest()
    if found != header.checksum:
        raise CheckpointError(
            f"{str(path)!r}: checksum mismatch (sha256 of the header and tensor data is "
            f"{found[:12]}..., the header says {header.checksum[:12]}...): the file is "
            "corrupted or was edited; re-save it with lowbit.save(model, path) or restore it "
            "from a good copy"
        )
    return tensors


_RESAVE_HINT = "re-save it with lowbit.save(model, path)"


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the quantized model saved in ``path`` on a copy of the float ``model``.

    ``model`` is a float model of the same architecture (untrained weights are fine); it is
    not modified. A file saved from a transformers model needs none: it stores the model's
    class and config, and transformers builds the architecture (no remote code, parameters
    on the meta device until the file fills them). The file is checked (header, bounds,
    format version, sha256) before use, read through one open file (a concurrent re-save is
    never half read), and weights stored once for several layers come back tied. The model
    comes back in eval mode, ready for inference (dropout off, batch norms frozen).

    >>> import tempfile, torch
    >>> from lowbit.api import quantize
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> q = quantize(net, "w8a8", data=[torch.randn(16, 8)])
    >>> fresh = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     back = load(save(q, f"{d}/net.lowbit"), fresh)
    >>> x = torch.randn(4, 8)
    >>> torch.equal(back(x), q(x))
    True
    """
    path = Path(path)
    if not path.is_file():
        read_header(path)  # the error naming what is wrong with the path
    try:
        f = path.open("rb")
    except OSError as err:
        raise CheckpointError(
            f"{str(path)!r}: cannot be opened ({err.strerror}); check the path and permissions"
        ) from None
    with f:
        header = read_header(path, f)
        tensors = _read_tensors(header, f)  # checksum verified before anything is built
    if model is None:
        model = _model_from_header(header)
    loaded = rebuild(header, tensors, model).eval()
    del tensors
    release_free_memory()  # the read buffers, not kept by the heap
    return loaded


def _model_from_header(header: Header) -> nn.Module:
    if header.model is None:
        raise CheckpointError(
            f"{str(header.path)!r} does not say how to build its model (only transformers "
            "models do); pass the float model: lowbit.load(path, MyModel())"
        )
    try:
        elements = sum(math.prod(entry.shape) for entry in header.tensors.values())
        budget = (elements, len(header.tensors))
        return build_from_source(header.model, where=repr(str(header.path)), budget=budget)
    except HFError as err:
        raise CheckpointError(str(err)) from None


def theoretical_size(model: nn.Module) -> int:
    """Bytes a converted model needs at its exact bit widths: ``numel * bits / 8`` per integer
    weight and asymmetric weight zero point (rounded up per tensor; symmetric zero points are
    all zero and cost nothing), plus scales, activation qparams, biases and float leftovers.
    A tensor the model holds at several places (tied weights) counts once.

    >>> from lowbit.api import quantize
    >>> q = quantize(torch.nn.Sequential(torch.nn.Linear(64, 8, bias=False)), "w8a16")
    >>> theoretical_size(q)  # 512 int8 weights + 8 fp32 scales (symmetric: no zero points)
    544
    """
    layers = _check_converted(model, "theoretical_size")
    exact: dict[str, int] = {}  # state_dict key -> exact bytes
    for name, layer in layers.items():
        weight = layer.weight
        if isinstance(weight, QTensor) and weight.qdtype is not None:
            bits = weight.qdtype.bits
            exact[_prefix(name) + "weight.qdata"] = math.ceil(weight.numel() * bits / 8)
            exact[_prefix(name) + "weight.zero_point"] = math.ceil(weight.scale.numel() * bits / 8)
    state = model.state_dict(keep_vars=True)
    stored = drop_aliases(state, find_ties(model, state))
    return sum(exact.get(key, t.numel() * t.element_size()) for key, t in stored.items())
