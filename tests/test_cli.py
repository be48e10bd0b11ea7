"""The `lowbit` command line: quantize, eval, inspect, recipes, and one-line errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lowbit.cli import main

USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def create():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Flatten(), nn.Linear(4 * 8 * 8, 3),
        )

    def calibration():
        g = torch.Generator().manual_seed(1)
        return [torch.randn(8, 1, 8, 8, generator=g) for _ in range(4)]

    def labelled():
        g = torch.Generator().manual_seed(2)
        x = torch.randn(32, 1, 8, 8, generator=g)
        with torch.no_grad():
            y = create().eval()(x).argmax(1)
        return [(x, y)]

    def not_a_model():
        return 42

    def needs_args(width):
        return nn.Linear(width, width)
    """
)


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    name = f"climodels_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / name


def test_quantize_eval_inspect_round_trip(workdir: Path, capsys: pytest.CaptureFixture[str]):
    mod = workdir.name
    out = workdir.parent / "m.lowbit"
    assert (
        main(
            [
                "quantize",
                "--model",
                f"{mod}:create",
                "--data",
                f"{mod}:calibration",
                "--recipe",
                "w8a8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert out.is_file()
    assert (
        main(
            [
                "eval",
                "--model",
                f"{mod}:create",
                "--quantized",
                str(out),
                "--data",
                f"{mod}:labelled",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    accuracy = float(text.split("top-1 accuracy:")[1].split("%")[0])
    assert accuracy >= 80.0  # labels are the float model's own predictions
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "int8" in table and "4" in table


def test_quantize_with_weights_file(workdir: Path, tmp_path: Path):
    mod = workdir.name
    torch.manual_seed(5)
    import importlib

    model = importlib.import_module(mod).create()
    weights = tmp_path / "float.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    torch_file = tmp_path / "float.pt"
    torch.save(model.state_dict(), torch_file)
    for w in (weights, torch_file):
        assert (
            main(
                [
                    "quantize",
                    "--model",
                    f"{mod}:create",
                    "--weights",
                    str(w),
                    "--recipe",
                    "w4a16",
                    "--out",
                    str(tmp_path / "w.lowbit"),
                ]
            )
            == 0
        )


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["quantize", "--model", "nosuchmodule_xyz:create", "--out", "x.lowbit"], "cannot import"),
        (["quantize", "--model", "MOD:missing", "--out", "x.lowbit"], "no attribute"),
        (["quantize", "--model", "MOD:not_a_model", "--out", "x.lowbit"], "not a torch"),
        (["quantize", "--model", "MOD:create", "--recipe", "w9a9", "--out", "x.lowbit"], "w9a9"),
        (
            ["quantize", "--model", "MOD:create", "--recipe", "w8a8", "--out", "x.lowbit"],
            "calibration data",
        ),
        (
            ["quantize", "--model", "MOD:create", "--weights", "nope.pt", "--out", "x.lowbit"],
            "does not exist",
        ),
        (["inspect", "missing.lowbit"], "missing.lowbit"),
        (["quantize", "--model", "nocolon", "--out", "x.lowbit"], "MODULE:NAME"),
        (["quantize", "--model", "MOD:needs_args", "--out", "x.lowbit"], "no arguments"),
        (
            ["quantize", "--model", "MOD:create", "--weights", "small.safetensors", "--out", "x"],
            "size mismatch for 0.weight",
        ),
    ],
)
def test_user_mistakes_print_one_line(
    workdir: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
):
    argv = [a.replace("MOD", workdir.name) for a in argv]
    small = {"0.weight": torch.zeros(2, 1, 3, 3), "0.bias": torch.zeros(2)}  # wrong sizes
    save_file(small, str(workdir.parent / "small.safetensors"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1
    assert needle in err


def test_corrupt_file_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    bad = tmp_path / "bad.lowbit"
    bad.write_bytes(b"\x00" * 5)
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.lowbit" in err and "Traceback" not in err


def test_recipes_lists_every_shipped_recipe(capsys: pytest.CaptureFixture[str]):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    from lowbit.config import list_recipes, load_recipe

    for name in list_recipes():
        assert name in out
        for step, _ in load_recipe(name).steps:  # the algorithms column
            assert step in out


def test_export_and_eval_on_each_backend(workdir: Path, capsys: pytest.CaptureFixture[str]):
    pytest.importorskip("onnxruntime")
    import onnx

    mod = workdir.name
    out = workdir.parent / "m.lowbit"
    assert (
        main(
            [
                "quantize",
                "--model",
                f"{mod}:create",
                "--data",
                f"{mod}:calibration",
                "--recipe",
                "w8a8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    onnx_path = workdir.parent / "m.onnx"
    assert (
        main(
            [
                "export",
                str(out),
                "--model",
                f"{mod}:create",
                "--example",
                "1,1,8,8",
                "--out",
                str(onnx_path),
            ]
        )
        == 0
    )
    onnx.checker.check_model(str(onnx_path))
    ops = {node.op_type for node in onnx.load(str(onnx_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    for backend in ("torch", "onnxruntime", "reference", "auto"):
        capsys.readouterr()
        assert (
            main(
                [
                    "eval",
                    "--model",
                    f"{mod}:create",
                    "--quantized",
                    str(out),
                    "--data",
                    f"{mod}:labelled",
                    "--backend",
                    backend,
                ]
            )
            == 0
        )
        text = capsys.readouterr().out
        assert float(text.split("top-1 accuracy:")[1].split("%")[0]) >= 80.0
    inspected = (capsys.readouterr(), main(["inspect", str(out)]), capsys.readouterr().out)[2]
    assert "kernel" in inspected


def test_export_with_a_bad_example_is_one_line(workdir: Path, capsys: pytest.CaptureFixture[str]):
    mod = workdir.name
    out = workdir.parent / "m.lowbit"
    main(["quantize", "--model", f"{mod}:create", "--recipe", "w8a16", "--out", str(out)])
    capsys.readouterr()
    code = main(
        [
            "export",
            str(out),
            "--model",
            f"{mod}:create",
            "--example",
            "1,x",
            "--out",
            str(workdir.parent / "m.onnx"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "neither a shape" in err and len(err.strip().splitlines()) == 1
