"""Crafted files: bounded work at load, validated qparams, a checksum over the header, every
malformed field a CheckpointError naming file and field, plain text in ``lowbit inspect``."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoint_models import batch, fresh_net, quantized_net
from crafting import craft, split, write_raw
from rich.console import Console
from torch import nn

import lowbit.observers
from lowbit.api import prepared_info, quantized_layers
from lowbit.config import QuantConfig, Recipe, Rule
from lowbit.export import CheckpointError, format_inspect, load, print_inspect, read_header, save
from lowbit.spec import QuantSpec

Edit = Callable[[dict[str, Any]], None]


def _error(path: Path, model: nn.Module | None = None) -> str:
    with pytest.raises(CheckpointError) as info:
        load(path, model if model is not None else fresh_net())
    message = str(info.value)
    assert repr(str(path)) in message, message
    return message


def _all_inputs(args: dict[str, Any], observer: str) -> Edit:
    """Give the recipe's default input spec and every layer's input spec these observer args."""

    def edit(meta: dict[str, Any]) -> None:
        for spec in [meta["recipe"]["default"]["input"], *(x["input"] for x in meta["layers"])]:
            spec["observer"], spec["observer_args"] = observer, dict(args)

    return edit


# --- a. bounded memory and time ---------------------------------------------------------


@pytest.mark.parametrize(
    ("observer", "args", "needle"),
    [
        ("entropy", {"bins": 600_000_000}, "bins=600000000"),  # 4.8 GB of histogram
        ("mse", {"num_candidates": 1_000_000_000}, "num_candidates=1000000000"),
        ("percentile", {"max_samples": 10**15}, "max_samples="),
    ],
)
def test_huge_observer_args_in_the_recipe_are_refused_at_once(
    observer: str,
    args: dict[str, Any],
    needle: str,
    saved_w8a8: tuple[nn.Module, Path],
    tmp_path: Path,
) -> None:
    path = craft(saved_w8a8[1], tmp_path / "big.lowbit", _all_inputs(args, observer))
    assert path.stat().st_size < 20_000
    start = time.perf_counter()
    message = _error(path)
    assert time.perf_counter() - start < 2.0
    assert needle in message and "recipe" in message


def test_load_allocates_no_observer(
    saved_w8a8: tuple[nn.Module, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loaded model never observes: whatever observers the recipe names are built on the
    meta device while it is parsed and prepared, and none is left on the loaded layers."""
    built: list[torch.device] = []
    original = lowbit.observers.EntropyObserver.__init__

    def spy(self: lowbit.observers.EntropyObserver, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        built.append(self.hist.device)

    monkeypatch.setattr(lowbit.observers.EntropyObserver, "__init__", spy)
    q, src = saved_w8a8
    path = craft(src, tmp_path / "entropy.lowbit", _all_inputs({"bins": 65536}, "entropy"))
    back = load(path, fresh_net())
    assert built and all(device.type == "meta" for device in built), built
    for layer in quantized_layers(back).values():
        for quantizer in (layer.input_quantizer, layer.weight_quantizer):
            assert quantizer is None or quantizer.observer is None
    assert torch.equal(back(batch(5)), q(batch(5)))


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda raw: raw["offset"].update(shape=[1] * 17), "shape has 17 items"),
        (lambda raw: raw["offset"].update(shape=[2**60, 0]), "is out of range"),
        (lambda raw: raw["offset"].update(data_offsets=[0, 2**70]), "is out of range"),
    ],
    ids=["dims", "dim-size", "offset"],
)
def test_tensor_entries_are_bounded(
    edit: Edit, needle: str, saved_w8a8: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    raw, _, body = split(saved_w8a8[1])
    edit(raw)
    message = _error(write_raw(tmp_path / "t.lowbit", raw, body))
    assert "'offset'" in message and needle in message


# --- b. quantization parameters validated -----------------------------------------------


def _set(key: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = value(tensors[key])

    return edit


def _first(v: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def put(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[0] = v
        return t

    return put


@pytest.mark.parametrize(
    ("key", "change", "needle"),
    [
        ("fc1.weight.scale", _first(float("nan")), "not a finite positive"),
        ("fc1.weight.scale", _first(-0.5), "not a finite positive"),
        ("fc1.weight.scale", _first(0.0), "not a finite positive"),
        ("fc1.weight.scale", lambda t: t[:7].clone(), "expected float32 [32]"),
        ("fc1.input_quantizer.scale", _first(float("nan")), "not a finite positive"),
        ("fc1.input_quantizer.scale", _first(-1.0), "not a finite positive"),
        ("fc1.input_quantizer.scale", lambda t: t.expand(3).clone(), "shape [3]"),
        ("fc1.input_quantizer.zero_point", _first(300), "outside the int8 range"),
        ("fc1.input_quantizer.zero_point", lambda t: t.float(), "expected int32"),
        ("fc1.bias.scale", _first(float("inf")), "not a finite positive"),
    ],
    ids=[
        "nan-scale",
        "negative-scale",
        "zero-scale",
        "scale-shape",
        "nan-input-scale",
        "negative-input-scale",
        "input-scale-shape",
        "input-zero-range",
        "input-zero-dtype",
        "inf-bias-scale",
    ],
)
def test_bad_qparams_name_the_file_and_the_tensor(
    key: str,
    change: Callable[[torch.Tensor], torch.Tensor],
    needle: str,
    saved_w8a8: tuple[nn.Module, Path],
    tmp_path: Path,
) -> None:
    path = craft(saved_w8a8[1], tmp_path / "q.lowbit", tensors=_set(key, change))
    message = _error(path)
    assert key.rpartition(".")[0] in message and needle in message, message


def test_an_int32_weight_zero_point_off_the_grid_is_refused(tmp_path: Path) -> None:
    src = save(quantized_net("w4a16"), tmp_path / "w4.lowbit")
    groups = read_header(src).tensors["fc1.weight.scale"].shape

    def wide(tensors: dict[str, torch.Tensor]) -> None:
        tensors["fc1.weight.zero_point"] = torch.full(groups, 99, dtype=torch.int32)

    message = _error(craft(src, tmp_path / "zp.lowbit", tensors=wide))
    assert "'fc1.weight.zero_point' holds values outside the int4 range" in message


# --- c. the checksum covers the header ---------------------------------------------------


@pytest.mark.parametrize(
    "edit",
    [
        lambda meta: meta["recipe"].update(name="renamed"),
        lambda meta: meta["layers"][0].update(qbias=False),
        lambda meta: meta.update(kept_float={"x": "edited"}),
    ],
    ids=["recipe", "layer", "kept-float"],
)
def test_an_edited_header_fails_the_checksum(
    edit: Edit, saved_w8a8: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    message = _error(craft(saved_w8a8[1], tmp_path / "h.lowbit", header=edit, sign=False))
    assert "checksum mismatch" in message and "header" in message


def test_a_changed_tensor_dtype_or_shape_fails_the_checksum(
    saved_w8a8: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    raw, _, body = split(saved_w8a8[1])
    raw["offset"]["dtype"] = "I32"  # same bytes, read as integers
    assert "checksum mismatch" in _error(write_raw(tmp_path / "d.lowbit", raw, body))
    raw, _, body = split(saved_w8a8[1])
    raw["fc1.weight.scale"]["shape"] = [2, 16]
    assert "checksum mismatch" in _error(write_raw(tmp_path / "s.lowbit", raw, body))


def test_an_older_format_is_refused_with_how_to_resave(
    saved_w8a8: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    path = craft(saved_w8a8[1], tmp_path / "v2.lowbit", lambda m: m.update(format_version=2))
    message = _error(path)
    assert "unsupported format version 2" in message and "save it again" in message


# --- d. malformed headers: always a CheckpointError naming the field ----------------------


def _layer0(**values: Any) -> Edit:
    return lambda meta: meta["layers"][0].update(values)


MALFORMED: list[tuple[str, Edit, str]] = [
    ("shape-string", _layer0(weight_shape=["8", 3, 3, 3]), "layers[0].weight_shape[0]"),
    ("shape-float", _layer0(weight_shape=[8.0, 3, 3, 3]), "layers[0].weight_shape[0]"),
    ("shape-huge", _layer0(weight_shape=[2**80, 3, 3, 3]), "out of range"),
    ("qbias-int", _layer0(qbias=1), "layers[0].qbias must be true or false"),
    ("name-number", _layer0(name=7), "layers[0].name must be a string"),
    ("kind-unknown", _layer0(kind="quantum"), "'quantum' is not a layer kind"),
    ("weight-dtype", _layer0(weight_dtype="int5"), "layers[0].weight_dtype"),
    ("spec-list", _layer0(weight_spec=[1, 2]), "layers[0].weight_spec must be a JSON object"),
    ("spec-bits", _layer0(weight_spec={"dtype": "int99"}), "layers[0].weight_spec"),
    ("spec-group", _layer0(weight_spec={"granularity": "per_group:-4"}), "group_size"),
    ("layer-key", _layer0(extra=1), "layers[0] has unknown key 'extra'"),
    ("layer-missing", lambda m: m["layers"][0].pop("kind"), "missing key 'kind' in layers[0]"),
    ("layer-dup", lambda m: m["layers"].append(dict(m["layers"][0])), "appears twice"),
    ("layers-dict", lambda m: m.update(layers={"a": 1}), "layers must be a list"),
    ("version-string", lambda m: m.update(format_version="3"), "format_version='3'"),
    ("version-bool", lambda m: m.update(format_version=True), "format_version=True"),
    ("folds-ints", lambda m: m.update(folds=[[1, 2]]), "folds[0][0] must be a string"),
    ("folds-dup", lambda m: m.update(folds=m["folds"] + m["folds"][:1]), "batch norm twice"),
    ("folds-short", lambda m: m.update(folds=[["a"]]), "folds[0] must be [layer, batch norm]"),
    ("checksum-int", lambda m: m["checksum"].update(value=123), "checksum.value"),
    ("checksum-algo", lambda m: m["checksum"].update(algorithm="md5"), "checksum.algorithm"),
    ("top-key", lambda m: m.update(evil=1), "'evil' is not a lowbit header key"),
    ("recipe-list", lambda m: m.update(recipe=[1]), "recipe must be a JSON object"),
    ("rules-many", lambda m: m["recipe"].update(rules=[{}] * 20000), "recipe.rules has 20000"),
    ("recipe-bits", lambda m: m["recipe"]["default"]["weight"].update(dtype="int77"), "recipe"),
    ("recipe-junk", lambda m: m["recipe"].update(default="x"), "its recipe is invalid"),
    ("kept-int", lambda m: m.update(kept_float={"a": 1}), "kept_float['a'] must be a string"),
    ("ties-missing", lambda m: m.update(ties={"x.weight": "nowhere"}), "holds no tensor"),
    ("ties-self", lambda m: m.update(ties={"fc1.weight": "fc1.weight"}), "lies inside"),
    ("ties-existing", lambda m: m.update(ties={"fc1.weight": "head.weight"}), "also holds"),
    ("ties-chain", lambda m: m.update(ties={"a": "b", "b": "fc1.weight"}), "another tie"),
    ("version-text", lambda m: m.update(lowbit_version="x" * 100), "lowbit_version is 100"),
]


@pytest.mark.parametrize(
    ("edit", "needle"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_header_fields(
    edit: Edit, needle: str, saved_w8a8: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    sign = "checksum" not in needle  # else signing would overwrite the edited checksum
    message = _error(craft(saved_w8a8[1], tmp_path / "m.lowbit", header=edit, sign=sign))
    assert needle in message, message


RAW_TEXT: list[tuple[str, Callable[[str], str], str]] = [
    ("nan", lambda t: t.replace('"qbias": true', '"qbias": NaN', 1), "NaN"),
    ("infinity", lambda t: t.replace('"qbias": true', '"qbias": -Infinity', 1), "-Infinity"),
    ("overflow", lambda t: t.replace('"qbias": true', '"qbias": 1e999', 1), "overflows a float"),
    ("digits", lambda t: t.replace('"qbias": true', '"qbias": ' + "9" * 5000, 1), "not valid"),
    ("deep", lambda t: t.replace('"args": {}', '"args": ' + "[" * 50000 + "]" * 50000), "deep"),
    ("deep-33", lambda t: t.replace('"args": {}', '"args": ' + "[" * 40 + "]" * 40), "deep"),
    ("dup-key", lambda t: t.replace('"qbias": true', '"qbias": true, "qbias": false', 1), "twice"),
    ("not-json", lambda t: t[:-5], "not valid JSON"),
]


@pytest.mark.parametrize(
    ("edit", "needle"), [r[1:] for r in RAW_TEXT], ids=[r[0] for r in RAW_TEXT]
)
def test_malformed_header_json(
    edit: Callable[[str], str], needle: str, saved_w8a8: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    raw, meta, body = split(saved_w8a8[1])
    text = edit(json.dumps(meta))
    message = _error(write_raw(tmp_path / "j.lowbit", raw, body, meta_text=text))
    assert needle in message and "__metadata__.lowbit" in message, message


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda raw: raw["offset"].update(dtype="F33"), "not a safetensors dtype"),
        (lambda raw: raw["offset"].update(dtype=5), "dtype must be a string"),
        (lambda raw: raw["offset"].update(shape="10"), "shape must be a list"),
        (lambda raw: raw["offset"].update(data_offsets=[0]), "must be [begin, end]"),
        (lambda raw: raw["offset"].pop("dtype"), "missing key 'dtype'"),
        (lambda raw: raw.update(__metadata__={"lowbit": 5}), "not a lowbit file"),
        (lambda raw: raw.update(__metadata__=[1]), "not a lowbit file"),
    ],
)
def test_malformed_tensor_entries(
    edit: Edit, needle: str, saved_w8a8: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    raw, _, body = split(saved_w8a8[1])
    edit(raw)
    assert needle in _error(write_raw(tmp_path / "e.lowbit", raw, body))


def test_deep_outer_json_is_a_checkpoint_error(tmp_path: Path) -> None:
    text = b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    path = tmp_path / "deep.lowbit"
    path.write_bytes(len(text).to_bytes(8, "little") + text)
    assert "nested too deeply" in _error(path)


# --- e. inspect prints names as plain text ----------------------------------------------

EVIL = "fc1\x1b]0;owned\x07\x1b[2J[bold red]X[/]\u202e"


def test_inspect_prints_names_as_plain_text(
    saved_w8a8: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    path = craft(saved_w8a8[1], tmp_path / "evil.lowbit", _layer0(name=EVIL))
    text = format_inspect(path, width=300)
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert r"fc1\x1b]0;owned\x07\x1b[2J[bold red]X[/]\u202e" in text
    console = Console(file=io.StringIO(), force_terminal=True, width=300)
    print_inspect(path, console)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "\x1b]0;" not in out and "\x07" not in out and "\x1b[2J" not in out
    assert "[bold red]X[/]" in out  # shown as written, not applied


# --- i. the layers kept in float, with their reasons -------------------------------------


def test_kept_float_is_in_the_header(tmp_path: Path) -> None:
    spec = QuantConfig(weight=QuantSpec("int8", "per_channel"))
    q = quantized_net(Recipe(spec, rules=(Rule("head", None),), name="mixed"))
    header = read_header(save(q, tmp_path / "k.lowbit"))
    assert header.kept_float == prepared_info(q).kept_float
    assert header.kept_float["head"] == "a recipe rule keeps it in float (config: null)"
