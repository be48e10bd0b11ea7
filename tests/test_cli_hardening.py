"""The command line never prints a traceback for bad files, unwritable or full outputs, and
never lets a file in the working folder shadow an installed package."""

from __future__ import annotations

import errno
import os
import pathlib
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import lowbit.export.checkpoint
from lowbit.cli import main

USER_MODULE = textwrap.dedent(
    """
    from pathlib import Path

    import torch
    from torch import nn

    def create():
        Path("built.marker").write_text("the model was built")
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

    def broken():
        raise KeyError("a bug in the user's factory")
    """
)


@pytest.fixture()
def user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A user's module in a fresh working folder (not put on sys.path by the test)."""
    name = f"hardmodels_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI's additions undone afterwards
    yield name
    sys.modules.pop(name, None)


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _quantize(user: str, out: str, *extra: str) -> list[str]:
    return ["quantize", "--model", f"{user}:create", "--recipe", "w8a16", "--out", out, *extra]


# ---------------------------------------------------------------------------- bad input files


def test_truncated_lowbit_file_is_one_line(user: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_quantize(user, "good.lowbit")) == 0
    data = Path("good.lowbit").read_bytes()
    Path("cut.lowbit").write_bytes(data[: len(data) // 2])
    for argv in (
        ["inspect", "cut.lowbit"],
        ["eval", "--model", f"{user}:create", "--quantized", "cut.lowbit", "--data", "x:y"],
    ):
        assert "cut.lowbit" in _one_line_error(capsys, argv)


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("w.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{'a':", "truncated, corrupt"),
        ("w.pt", b"PK\x03\x04 not really a zip", "cannot read weights"),
        ("w.pt", b"", "cannot read weights"),
    ],
    ids=["garbage-safetensors", "garbage-pt", "empty-pt"],
)
def test_corrupt_weights_are_one_line(
    user: str, capsys: pytest.CaptureFixture[str], name: str, content: bytes, needle: str
) -> None:
    Path(name).write_bytes(content)
    err = _one_line_error(capsys, _quantize(user, "m.lowbit", "--weights", name))
    assert needle in err and name in err


def test_weights_folder_and_unreadable_weights(
    user: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    Path("folder.pt").mkdir()
    err = _one_line_error(capsys, _quantize(user, "m.lowbit", "--weights", "folder.pt"))
    assert "is a folder" in err
    torch.save({"0.weight": torch.zeros(8, 8)}, "locked.pt")
    real_open = pathlib.Path.open

    def deny(self: Path, *args: object, **kwargs: object) -> object:
        if self.name == "locked.pt":  # what chmod 000 does for a non-root user
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pathlib.Path, "open", deny)
    err = _one_line_error(capsys, _quantize(user, "m.lowbit", "--weights", "locked.pt"))
    assert "'locked.pt': permission denied" in err and "permissions" in err


def test_unreadable_recipe_is_one_line(user: str, capsys: pytest.CaptureFixture[str]) -> None:
    Path("r.yaml").write_bytes(b"\xff\xfe binary")
    err = _one_line_error(capsys, _quantize(user, "m.lowbit", "--recipe", "r.yaml"))
    assert "r.yaml" in err and "UTF-8" in err


# ---------------------------------------------------------------------------- unwritable --out


@pytest.mark.parametrize(
    ("out", "needle"),
    [
        ("missing/dir/m.lowbit", "the folder 'missing/dir' does not exist; create it first"),
        ("/etc/passwd/m.lowbit", "'/etc/passwd' is a file, not a folder"),
        ("/etc/passwd/deeper/m.lowbit", "'/etc/passwd' is a file, not a folder"),
        (".", "is a folder; give a file name"),
    ],
)
def test_unwritable_out_fails_before_any_work(
    user: str, capsys: pytest.CaptureFixture[str], out: str, needle: str
) -> None:
    err = _one_line_error(capsys, _quantize(user, out))
    assert needle in err and "--out" in err
    assert not Path("built.marker").exists()  # refused before the model was even built


def test_out_folder_without_write_permission(
    user: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    Path("ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p).name == "ro" else real_access(p, mode)
    )
    err = _one_line_error(capsys, _quantize(user, "ro/m.lowbit"))
    assert "no permission to write in 'ro'" in err


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
def test_full_disk_is_one_line_and_leaves_nothing(
    user: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        if kind == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
            'space left on device" })'
        )

    monkeypatch.setattr(lowbit.export.checkpoint.st, "save_file", full)
    Path("out").mkdir()
    err = _one_line_error(capsys, _quantize(user, "out/m.lowbit"))
    assert "--out 'out/m.lowbit': no space left on the disk; free some space" in err
    assert list(Path("out").iterdir()) == []  # no half-written file, no temporary left


def test_unexpected_errors_are_one_line_and_debug_shows_them(
    user: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["quantize", "--model", f"{user}:broken", "--out", "m.lowbit"]
    err = _one_line_error(capsys, argv)
    assert "KeyError" in err and "a bug in the user's factory" in err and "--debug" in err
    with pytest.raises(KeyError):
        main(["--debug", *argv])


# ---------------------------------------------------------------------------- --app-dir


def test_a_file_in_the_working_folder_does_not_shadow_an_installed_package(
    user: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = f"shadowed_{tmp_path.name.replace('-', '_')}"
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / f"{pkg}.py").write_text("ORIGIN = 'installed'\n")
    monkeypatch.syspath_prepend(str(site))  # "installed": on sys.path before the CLI runs
    (tmp_path / f"{pkg}.py").write_text(
        "from pathlib import Path\nPath('shadow.marker').write_text('ran')\nORIGIN = 'cwd'\n"
    )
    (tmp_path / "usermodel.py").write_text(
        f"import {pkg}\nfrom torch import nn\n"
        f"ORIGIN = {pkg}.ORIGIN\n"
        "def create():\n    return nn.Sequential(nn.Linear(4, 4))\n"
    )
    try:
        argv = ["quantize", "--model", "usermodel:create", "--recipe", "w8a16", "--out", "u"]
        assert main(argv) == 0
        assert not Path("shadow.marker").exists()
        assert sys.modules["usermodel"].ORIGIN == "installed"
        assert Path("u.lowbit").is_file()  # the user's own module in that folder imported
    finally:
        sys.modules.pop(pkg, None)
        sys.modules.pop("usermodel", None)


def test_app_dir_points_at_another_folder(
    user: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    elsewhere = tmp_path / "project"
    elsewhere.mkdir()
    (elsewhere / "projmodel_h4.py").write_text(
        "from torch import nn\ndef create():\n    return nn.Sequential(nn.Linear(4, 4))\n"
    )
    try:
        argv = ["quantize", "--model", "projmodel_h4:create", "--recipe", "w8a16", "--out", "p"]
        assert main([*argv, "--app-dir", str(elsewhere)]) == 0
        err = _one_line_error(capsys, [*argv, "--app-dir", "nowhere"])
        assert "--app-dir 'nowhere' is not a folder" in err
    finally:
        sys.modules.pop("projmodel_h4", None)


@pytest.mark.slow  # a fresh interpreter importing torch: seconds; the test above is in-process
def test_sympy_in_the_working_folder_is_not_run(tmp_path: Path) -> None:
    """The real case, in a fresh interpreter: torch imports sympy while quantizing."""
    (tmp_path / "sympy.py").write_text(
        "from pathlib import Path\nPath('sympy.marker').write_text('shadowed')\n"
    )
    (tmp_path / "mynet.py").write_text(
        "from torch import nn\ndef create():\n    return nn.Sequential(nn.Linear(4, 4))\n"
    )
    argv = ["--model", "mynet:create", "--recipe", "w8a16", "--out", "net.lowbit"]
    run = subprocess.run(
        [sys.executable, "-P", "-m", "lowbit.cli", "quantize", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert not (tmp_path / "sympy.marker").exists()
    assert (tmp_path / "net.lowbit").is_file()
