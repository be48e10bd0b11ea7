"""`lowbit qat`: an import-path model and data, one and two processes, the best epoch saved."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.cli import main

APP = textwrap.dedent(
    """
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def data():
        from lowbit.data import load_digits
        return load_digits("train"), load_digits("test")

    def bad_data():
        return torch.zeros(3)
    """
)


@pytest.fixture
def app(tmp_path: Path) -> Path:
    (tmp_path / "qat_app.py").write_text(APP)
    return tmp_path


def _run(app: Path, *extra: str) -> int:
    return main(
        [
            "qat",
            "--model",
            "qat_app:model",
            "--data",
            "qat_app:data",
            "--recipe",
            "w8a8-qat",
            "--lr",
            "0.1",
            "--batch-size",
            "32",
            "--calibration",
            "64",
            "--app-dir",
            str(app),
            *extra,
        ]
    )


def test_qat_trains_and_writes_the_best_epoch(app: Path, capsys: pytest.CaptureFixture) -> None:
    out = app / "best.lowbit"
    assert _run(app, "--epochs", "3", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert printed.count("test top-1") == 3 and "best epoch" in printed
    best = float(printed.split("best epoch ")[1].split(": ")[1].split("%")[0])
    assert best > 80.0  # an untrained 64-32-10 MLP learns the digits at int8
    import qat_app  # noqa: F401 - on sys.path through --app-dir

    from lowbit.data import load_digits

    loaded = lowbit.load(out, qat_app.model())
    x, y = load_digits("test")
    with torch.no_grad():
        accuracy = float((loaded(x).argmax(1) == y).float().mean())
    assert abs(100 * accuracy - best) < 2.0  # integer kernels agree with the fake-quantized eval


def test_qat_on_two_processes_with_int8_gradients(app: Path, capsys: pytest.CaptureFixture) -> None:
    out = app / "ddp.lowbit"
    assert _run(app, "--epochs", "2", "--nproc", "2", "--grad-bits", "8", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    ratio = float(printed.split("gradients sent ")[1].split("x")[0])
    assert ratio < 0.3 and out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--epochs", "0"], "--epochs 0"),
        (["--grad-bits", "8"], "give --nproc 2"),
        (["--recipe", "no-such-recipe"], "no-such-recipe"),
    ],
)
def test_qat_usage_errors(
    app: Path, capsys: pytest.CaptureFixture, extra: list[str], message: str
) -> None:
    assert _run(app, "--out", str(app / "x.lowbit"), *extra) == 2
    assert message in capsys.readouterr().err


def test_qat_bad_data(app: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(
        [
            "qat",
            "--model",
            "mlp",
            "--data",
            "qat_app:bad_data",
            "--out",
            str(app / "x.lowbit"),
            "--app-dir",
            str(app),
        ]
    )
    assert code == 2
    assert "((train_x, train_y), (test_x, test_y))" in capsys.readouterr().err
