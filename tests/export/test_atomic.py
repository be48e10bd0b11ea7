"""Saving loses nothing: leftovers of killed saves cleaned, long names, symlinks, permissions,
and a load never sees half of a file re-saved meanwhile."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from checkpoint_models import fresh_net
from torch import nn

import lowbit.api
import lowbit.export.checkpoint
from lowbit.export import CheckpointError, load, save
from lowbit.export.atomic import atomic_path, temporary_name

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions and symlinks")


def _mlp(seed: int = 0, recipe: str = "w8a16") -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    return lowbit.api.quantize(net, recipe, data=[torch.randn(8, 16)])


def _fresh() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


X = torch.randn(3, 16, generator=torch.Generator().manual_seed(7))


def _killed_save(target: Path) -> int:
    """Fork a process that starts saving ``target`` and dies before its rename; its pid."""
    pid = os.fork()
    if pid == 0:  # the child: no cleanup of any kind runs
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a file")
            os._exit(9)
    os.waitpid(pid, 0)
    return pid


@posix_only
def test_a_killed_save_leaves_a_temporary_file_the_next_save_removes(tmp_path: Path) -> None:
    """A save killed before its rename leaves its temporary file (the process cannot clean
    up); the next save of the same path removes it, and leaves other files alone."""
    target = tmp_path / "m.lowbit"
    dead = _killed_save(target)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".m.lowbit.") and f".{dead}." in left[0]
    other = tmp_path / temporary_name("other.lowbit", pid=dead)
    other.write_bytes(b"another file's leftover")
    live = tmp_path / temporary_name("m.lowbit", pid=os.getppid())  # a save still running
    live.write_bytes(b"in progress")
    save(_mlp(), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.lowbit", other.name, live.name])


@pytest.mark.parametrize("name", ["m" * 248 + ".lowbit", "é" * 121 + ".lowbit"])
def test_temporary_names_fit_the_file_name_limit(name: str, tmp_path: Path) -> None:
    assert len(name.encode()) in (255, 249)
    assert len(temporary_name(name).encode()) <= 255
    q = _mlp()
    path = save(q, tmp_path / name)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert torch.equal(load(path, _fresh())(X), q(X))


@posix_only
def test_saving_through_a_symlink_writes_its_target(tmp_path: Path) -> None:
    real = tmp_path / "store" / "model.lowbit"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / "current.lowbit"
    link.symlink_to(real)
    q = _mlp()
    save(q, link)
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert torch.equal(load(real, _fresh())(X), q(X))
    assert sorted(p.name for p in real.parent.iterdir()) == ["model.lowbit"]


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@posix_only
def test_new_files_get_the_usual_mode_and_resaves_keep_theirs(tmp_path: Path) -> None:
    q = _mlp()
    with _umask(0o022):
        path = save(q, tmp_path / "m.lowbit")
        assert path.stat().st_mode & 0o777 == 0o644
        path.chmod(0o640)
        save(q, path)
        assert path.stat().st_mode & 0o777 == 0o640
    with _umask(0o077):
        with atomic_path(tmp_path / "r.json") as tmp:
            tmp.write_text("{}")
        assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o600


def test_a_resave_between_header_and_tensors_is_never_half_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Header and tensors come from one open file: a re-save landing in between (an atomic
    rename) leaves the reader on the whole old file, never a false 'corrupted'."""
    first, second = _mlp(0, "w8a8"), _mlp(1, "w4a8")
    path = save(first, tmp_path / "m.lowbit")
    original = lowbit.export.checkpoint._read_tensors

    def resave_then_read(header: object, f: object) -> dict[str, torch.Tensor]:
        save(second, path)  # another process re-saves the path meanwhile
        return original(header, f)  # type: ignore[arg-type]

    monkeypatch.setattr(lowbit.export.checkpoint, "_read_tensors", resave_then_read)
    back = load(path, _fresh())
    assert torch.equal(back(X), first(X))


def test_loads_racing_resaves_always_read_a_whole_file(tmp_path: Path) -> None:
    models = [_mlp(0), _mlp(1)]
    want = [m(X) for m in models]
    path = save(models[0], tmp_path / "m.lowbit")
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            save(models[i % 2], path)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(30):
            out = load(path, _fresh())(X)
            assert any(torch.equal(out, w) for w in want)
    except CheckpointError as err:
        pytest.fail(f"a load racing a re-save was refused: {err}")
    finally:
        stop.set()
        thread.join()
    assert [p.name for p in tmp_path.iterdir()] == ["m.lowbit"]


def test_writes_into_a_model_file_in_place_are_caught(
    saved_w8a8: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    """Not lowbit's atomic re-save but a tool writing into the file: the checksum says so."""
    path = tmp_path / "m.lowbit"
    path.write_bytes(saved_w8a8[1].read_bytes())
    with path.open("r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\xff\xff\xff\x7f")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load(path, fresh_net())
