"""Bad files, wrong models and failed writes: clear CheckpointErrors, nothing half done."""

from __future__ import annotations

import json
import pickle
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from checkpoint_models import Net, NetWithoutFc1, batch, fresh_net, warm
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lowbit.export.checkpoint
from lowbit.api import calibrate, prepare
from lowbit.export import CheckpointError, load, read_header, save

CopyFile = Callable[[Path], Path]


def _rewrite_header(src: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    """Re-save ``src``'s tensors with an edited lowbit header (the errors tested come before
    the checksum, which no longer matches, is checked)."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    header = json.loads(meta["lowbit"])
    edit(header)
    meta["lowbit"] = json.dumps(header)
    save_file(load_file(src), str(dst), metadata=meta)
    return dst


def _load_error(path: Path, model: nn.Module | None = None) -> str:
    with pytest.raises(CheckpointError) as info:
        load(path, model if model is not None else fresh_net())
    message = str(info.value)
    assert repr(str(path)) in message
    return message.replace(repr(str(path)), "PATH")


# --- damaged and foreign files ------------------------------------------------------------


def test_truncated_file_at_several_points(saved_w8a8: tuple[nn.Module, Path], tmp_path: Path):
    _, path = saved_w8a8
    data = path.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    for cut in (0, 3, 8, 20, start - 1, start, start + 7, (start + len(data)) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.lowbit"
        bad.write_bytes(data[:cut])
        message = _load_error(bad)
        assert "truncated" in message, (cut, message)
        assert "re-save" in message
        with pytest.raises(CheckpointError, match=": truncated"):
            read_header(bad)


def test_flipped_data_byte_fails_the_checksum(
    saved_w8a8: tuple[nn.Module, Path], copy_file: CopyFile
):
    _, src = saved_w8a8
    header = read_header(src)
    for name in ("stem.weight.qdata", "head.weight.scale", "offset"):
        path = copy_file(src)
        data = bytearray(path.read_bytes())
        entry = header.tensors[name]
        data[header.data_start + (entry.begin + entry.end) // 2] ^= 0x10
        path.write_bytes(bytes(data))
        message = _load_error(path)
        assert "checksum" in message and "corrupted" in message


def test_foreign_safetensors_file(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.randn(4, 4)}, str(plain))
    assert "not a lowbit file" in _load_error(plain)
    tagged = tmp_path / "tagged.safetensors"
    save_file({"w": torch.randn(4, 4)}, str(tagged), metadata={"format": "pt"})
    assert "not a lowbit file" in _load_error(tagged)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes(seed: int, tmp_path: Path) -> None:
    path = tmp_path / f"random{seed}.lowbit"
    path.write_bytes(random.Random(seed).randbytes(4096))
    _load_error(path)


def test_torch_save_and_pickle_files_are_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    zipped = tmp_path / "model.pt"
    torch.save(Net().state_dict(), zipped)
    pickled = tmp_path / "model.pkl"
    pickled.write_bytes(pickle.dumps({"a": 1}))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a foreign file was unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert "zip" in _load_error(zipped)
    assert "pickle" in _load_error(pickled)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    assert "no such file" in _load_error(tmp_path / "nothing.lowbit")
    empty = tmp_path / "empty.lowbit"
    empty.write_bytes(b"")
    assert "truncated" in _load_error(empty)


def test_unsupported_format_version(saved_w8a8: tuple[nn.Module, Path], tmp_path: Path):
    def bump(header: dict) -> None:
        header["format_version"] = 99

    message = _load_error(_rewrite_header(saved_w8a8[1], tmp_path / "v99.lowbit", bump))
    assert "unsupported format version 99" in message and "upgrade lowbit" in message


@pytest.mark.parametrize("key", ["layers", "folds", "recipe", "checksum", "lowbit_version"])
def test_missing_header_key(key: str, saved_w8a8: tuple[nn.Module, Path], tmp_path: Path):
    def drop(header: dict) -> None:
        del header[key]

    message = _load_error(_rewrite_header(saved_w8a8[1], tmp_path / "m.lowbit", drop))
    assert f"missing key {key!r}" in message


def test_missing_tensor_key(saved_w8a8: tuple[nn.Module, Path], tmp_path: Path) -> None:
    src = saved_w8a8[1]
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(src)
    del tensors["fc1.weight.scale"]
    header = json.loads(meta["lowbit"])
    header["checksum"]["value"] = lowbit.export.checkpoint.file_checksum(header, tensors)
    meta["lowbit"] = json.dumps(header)
    path = tmp_path / "m.lowbit"
    save_file(tensors, str(path), metadata=meta)
    assert "missing key 'fc1.weight.scale'" in _load_error(path)


# --- a model that does not match ------------------------------------------------------------


def _snapshot(model: nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    return repr(model), {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: fresh_net(width=16), "'stem' has weight shape [16, 3, 3, 3]"),
        (lambda: fresh_net(hidden=64), "'fc1' has weight shape [64, 8]"),
        (NetWithoutFc1, "quantized layer 'fc1'"),
    ],
    ids=["width", "hidden", "missing-layer"],
)
def test_architecture_mismatch_names_the_layer(
    make: Callable[[], nn.Module], needle: str, saved_w8a8: tuple[nn.Module, Path]
) -> None:
    model = make()
    text, state = _snapshot(model)
    message = _load_error(saved_w8a8[1], model)
    assert needle in message and "same architecture" in message
    assert repr(model) == text
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(state[k], after[k]) for k in state)


def test_extra_layer_is_named(saved_w8a8: tuple[nn.Module, Path]) -> None:
    model = fresh_net()
    model.extra = nn.Linear(4, 4)
    assert "'extra' would be quantized" in _load_error(saved_w8a8[1], model)


def test_float_leftover_mismatch_is_named(saved_w8a8: tuple[nn.Module, Path]) -> None:
    model = fresh_net()
    model.register_buffer("offset", torch.zeros(11))
    assert "'offset' has shape [11]" in _load_error(saved_w8a8[1], model)
    model = fresh_net()
    model.extra_buffer = nn.Parameter(torch.zeros(2))
    assert "missing key 'extra_buffer'" in _load_error(saved_w8a8[1], model)


def test_quantized_model_is_refused_as_load_target(saved_w8a8: tuple[nn.Module, Path]) -> None:
    q, path = saved_w8a8
    assert "fresh float model" in _load_error(path, q)


# --- saving ------------------------------------------------------------------------------


def test_save_unconverted_model_says_convert(tmp_path: Path) -> None:
    prepared = calibrate(prepare(warm(Net()), "w8a8"), [batch(0)])
    with pytest.raises(CheckpointError, match=r"lowbit\.convert"):
        save(prepared, tmp_path / "m.lowbit")
    with pytest.raises(CheckpointError, match=r"lowbit\.quantize"):
        save(Net(), tmp_path / "m.lowbit")
    assert list(tmp_path.iterdir()) == []


def test_save_into_missing_folder(saved_w8a8: tuple[nn.Module, Path], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        save(saved_w8a8[0], tmp_path / "no" / "m.lowbit")


@pytest.mark.parametrize("partial", [False, True], ids=["raise-at-once", "raise-midway"])
def test_failed_save_leaves_no_file(
    partial: bool,
    saved_w8a8: tuple[nn.Module, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(tensors: dict, filename: Path, metadata: dict | None = None) -> None:
        if partial:
            Path(filename).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save(saved_w8a8[0], tmp_path / "m.lowbit")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_old_file(
    saved_w8a8: tuple[nn.Module, Path], copy_file: CopyFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    q, src = saved_w8a8
    old = copy_file(src)
    before = old.read_bytes()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("interrupted")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(RuntimeError):
        save(q, old)
    assert old.read_bytes() == before
    assert [p.name for p in old.parent.iterdir()] == [old.name]


# --- crafted layouts and values (found in review) ------------------------------------------


def _write_raw(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


def test_tensors_aliasing_the_same_bytes_are_refused(
    saved_w8a8: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    """Many entries pointing at the same bytes would make a small file allocate N times its
    size before any model check: the tensors must tile the data section exactly."""
    src = saved_w8a8[1]
    data = src.read_bytes()
    n = int.from_bytes(data[:8], "little")
    raw = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    raw.update(
        {
            f"junk{i}": {"dtype": "U8", "shape": [len(body)], "data_offsets": [0, len(body)]}
            for i in range(50)
        }
    )
    message = _load_error(_write_raw(tmp_path / "alias.lowbit", raw, body))
    assert "overlapping or missing tensor data" in message


def test_a_negative_dimension_is_refused(saved_w8a8: tuple[nn.Module, Path], tmp_path: Path):
    src = saved_w8a8[1]
    data = src.read_bytes()
    n = int.from_bytes(data[:8], "little")
    raw = json.loads(data[8 : 8 + n])
    name = next(k for k, v in raw.items() if k != "__metadata__" and len(v["shape"]) == 2)
    rows, cols = raw[name]["shape"]
    raw[name]["shape"] = [-rows, -cols]
    message = _load_error(_write_raw(tmp_path / "neg.lowbit", raw, data[8 + n :]))
    assert f"{name!r}.shape[0]=-{rows} is out of range" in message


def _resave(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """Re-save ``src`` with edited tensors and a checksum made valid again."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(src)
    edit(tensors)
    header = json.loads(meta["lowbit"])
    header["checksum"]["value"] = lowbit.export.checkpoint.file_checksum(header, tensors)
    meta["lowbit"] = json.dumps(header)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_a_zero_point_on_a_symmetric_grid_is_refused(
    saved_w8a8: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    """oneDNN ignores weight zero points: a symmetric weight with one would run wrong."""

    def add_zero(tensors: dict[str, torch.Tensor]) -> None:
        scale = tensors["fc1.weight.scale"]
        tensors["fc1.weight.zero_point"] = torch.full(scale.shape, 5, dtype=torch.int32)

    message = _load_error(_resave(saved_w8a8[1], tmp_path / "zp.lowbit", add_zero))
    assert "nonzero zero points for a symmetric signed grid" in message


def test_a_static_input_without_its_scale_is_refused(
    saved_w8a8: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    def drop(tensors: dict[str, torch.Tensor]) -> None:
        del tensors["fc1.input_quantizer.scale"], tensors["fc1.input_quantizer.zero_point"]

    message = _load_error(_resave(saved_w8a8[1], tmp_path / "noscale.lowbit", drop))
    assert "static input but the file holds no input scale" in message
