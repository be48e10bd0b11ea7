"""Save a converted model as one packed ``.lowbit`` file (safetensors + JSON header), load it back.

Integer weights are stored packed at their real width (two int4 or four int2 per byte) as flat
``uint8`` tensors under ``<layer>.qweight``; every other ``state_dict`` entry (scales, zero
points, int32 biases, float leftovers) is stored as it is. No pickle is written or read, and the
header is checked before any tensor byte is touched (see :mod:`lowbit.export.header`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch as st
import torch
from torch import nn

import lowbit
from lowbit.api import prepared_info, quantized_layers
from lowbit.export.atomic import atomic_path
from lowbit.export.header import (
    FORMAT_NAME,
    FORMAT_VERSION,
    CheckpointError,
    Header,
    LayerInfo,
    checksum,
    read_header,
)
from lowbit.export.rebuild import rebuild
from lowbit.nn import QModule
from lowbit.primitives import pack_bits

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
    weight = layer.qweight if layer.frozen else layer.weight
    return LayerInfo(
        name=name,
        layer_class=type(layer).__name__,
        weight_shape=tuple(weight.shape),
        weight_spec=wq.spec.to_dict() if wq is not None else None,
        input_spec=iq.spec.to_dict() if iq is not None else None,
        qbias=getattr(layer, "qbias", None) is not None,
    )


def _storable(state: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no memory (safetensors refuses shared storage)."""
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
            t = t.clone()  # tied or sliced tensors: store a copy of their own
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU contiguous tensor, as safetensors writes them (little endian)."""
    return t.reshape(-1).view(torch.uint8).numpy().data  # (nbytes,)


def _compact_zero_point(zero: torch.Tensor, layer: QModule) -> torch.Tensor | None:
    """A weight zero point as stored: None (symmetric, all zeros: not stored), packed at the
    weight's width (uint8), or int32 as it is when it does not fit that width."""
    wq = layer.weight_quantizer
    assert wq is not None
    if wq.spec.symmetric and not bool(zero.any()):
        return None
    try:
        return pack_bits(zero, wq.spec.qdtype)  # (ceil(groups*w/8),) uint8
    except ValueError:
        return zero


def _collect(model: nn.Module, layers: dict[str, QModule], where: str) -> dict[str, torch.Tensor]:
    """The tensors to write: the state_dict with each integer weight and weight zero point
    packed at its real width; symmetric (all-zero) weight zero points are left out."""
    state: dict[str, Any] = dict(model.state_dict())
    for name, layer in layers.items():
        wq = layer.weight_quantizer
        if layer.frozen and wq is not None:
            key = _prefix(name) + "qweight"
            state[key] = pack_bits(state[key], wq.spec.qdtype)  # (ceil(numel*w/8),) uint8
            zkey = _prefix(name) + "weight_quantizer.zero_point"
            zero = _compact_zero_point(state[zkey], layer)
            if zero is None:
                del state[zkey]
            else:
                state[zkey] = zero
    return _storable(state, where)


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
    tensors = _collect(model, layers, where)
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "lowbit_version": lowbit.__version__,
        "recipe": info.recipe.to_dict(),
        "folds": [[pair.layer, pair.bn] for pair in info.folds],
        "layers": [_layer_info(name, layer).to_json() for name, layer in layers.items()],
        "checksum": {
            "algorithm": "sha256",
            "value": checksum((key, _raw(t)) for key, t in tensors.items()),
        },
    }
    try:
        text = json.dumps(header, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{where}: the recipe cannot be written as JSON ({err}); keep recipe args to "
            "numbers, strings, lists and dicts"
        ) from None
    with atomic_path(path) as tmp:  # one metadata key: byte-identical files
        st.save_file(tensors, tmp, metadata={FORMAT_NAME: text})
    return path


def _read_tensors(header: Header) -> dict[str, torch.Tensor]:
    """Verify the checksum over the raw bytes, then deserialize (safetensors, no pickle)."""
    path = header.path
    data = path.read_bytes()
    if len(data) != header.file_size:
        raise CheckpointError(f"{str(path)!r}: the file changed while it was read; load it again")
    view = memoryview(data)
    start = header.data_start
    found = checksum(
        (name, view[start + e.begin : start + e.end]) for name, e in header.tensors.items()
    )
    if found != header.checksum:
        raise CheckpointError(
            f"{str(path)!r}: checksum mismatch (sha256 of the tensor data is {found[:12]}..., "
            f"the header says {header.checksum[:12]}...): the file is corrupted; re-save it "
            "with lowbit.save(model, path) or restore it from a good copy"
        )
    try:
        return st.load(data)
    except safetensors.SafetensorError as err:
        raise CheckpointError(
            f"{str(path)!r}: safetensors could not read the tensors ({err}); the file is "
            "corrupted; re-save it with lowbit.save(model, path)"
        ) from None


def load(path: str | Path, model: nn.Module) -> nn.Module:
    """Rebuild the quantized model saved in ``path`` on a copy of the float ``model``.

    ``model`` is a float model of the same architecture (untrained weights are fine); it is
    not modified. The file is checked (header, bounds, format version, sha256) before use.
    The model comes back in eval mode, ready for inference (dropout off, batch norms frozen).

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
    header = read_header(path)
    tensors = _read_tensors(header)
    return rebuild(header, tensors, model).eval()


def theoretical_size(model: nn.Module) -> int:
    """Bytes a converted model needs at its exact bit widths: ``numel * bits / 8`` per integer
    weight and asymmetric weight zero point (rounded up per tensor; symmetric zero points are
    all zero and cost nothing), plus scales, activation qparams, biases and float leftovers.

    >>> from lowbit.api import quantize
    >>> q = quantize(torch.nn.Sequential(torch.nn.Linear(64, 8, bias=False)), "w8a16")
    >>> theoretical_size(q)  # 512 int8 weights + 8 fp32 scales (symmetric: no zero points)
    544
    """
    layers = _check_converted(model, "theoretical_size")
    exact_bits: dict[str, int] = {}
    for name, layer in layers.items():
        wq = layer.weight_quantizer
        if layer.frozen and wq is not None:
            bits = wq.spec.qdtype.bits
            exact_bits[_prefix(name) + "qweight"] = bits
            exact_bits[_prefix(name) + "weight_quantizer.zero_point"] = (
                0 if wq.spec.symmetric else bits
            )
    total = 0
    for key, t in model.state_dict().items():
        width = exact_bits.get(key)
        total += t.numel() * t.element_size() if width is None else math.ceil(t.numel() * width / 8)
    return total
