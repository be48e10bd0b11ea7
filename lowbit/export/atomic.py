"""Atomic file writes: every file lowbit writes goes through :func:`atomic_path`.

The data goes to a temporary file next to the destination, which is fsynced and renamed over
it: a reader sees the old file or the new one, never half of each, and a failed write leaves
the old file as it was. Through a symlink, the link's target is replaced (the link stays a
link). A new file gets the usual permissions (``0o666`` less the umask), a replaced one keeps
its mode. Temporary names fit the 255-byte file-name limit whatever the destination's name,
and carry the writer's process id: the next save of the same path removes those a killed
process left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "write_json", "temporary_name"]

_NAME_MAX = 255  # bytes in one file name on every common file system
_TMP = re.compile(r"\.(?P<stem>.*)\.(?P<key>[0-9a-f]{8})\.(?P<pid>\d+)\.[0-9a-f]{12}\.tmp")


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable; not every platform can open a folder, so failures are ignored."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _key(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _stem(name: str) -> str:
    """The destination's name cut (on a character boundary) so the temporary name fits."""
    room = _NAME_MAX - len(".") - len(".12345678.4294967296.") - 12 - len(".tmp")
    data = name.encode("utf-8", "surrogateescape")[:room]
    return data.decode("utf-8", "ignore")


def temporary_name(name: str, pid: int | None = None) -> str:
    """The temporary file name a write of ``name`` uses: at most 255 bytes.

    >>> tmp = temporary_name("model.lowbit", pid=42)
    >>> tmp.startswith(".model.lowbit.") and tmp.endswith(".tmp") and ".42." in tmp
    True
    >>> len(temporary_name("é" * 127).encode()) <= 255
    True
    """
    pid = os.getpid() if pid is None else pid
    return f".{_stem(name)}.{_key(name)}.{pid}.{secrets.token_hex(6)}.tmp"


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":  # Windows' os.kill would end the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process, or not a pid we can ask about: leave it
    return True


def _remove_leftovers(path: Path) -> None:
    """Delete temporary files of earlier writes of ``path`` whose process is gone."""
    stem, key = _stem(path.name), _key(path.name)
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        match = _TMP.fullmatch(name)
        if match is None or match["stem"] != stem or match["key"] != key:
            continue
        if not _alive(int(match["pid"])):
            with suppress(OSError):
                (path.parent / name).unlink()


def _create(tmp: Path) -> int:
    """Create ``tmp`` empty with mode ``0o666`` less the umask, and return that mode (writers
    such as safetensors create their files 0o600; the umask cannot be read without setting
    it, which would race with other threads)."""
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return os.fstat(fd).st_mode & 0o7777
    finally:
        os.close(fd)


def _mode(path: Path, usual: int) -> int:
    """The mode the new file gets: the replaced file's, else ``usual``."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return usual


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path``: write it inside the block; on success it is fsynced
    and renamed over ``path``, on any error it is removed and ``path`` is left as it was.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "a.txt"
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text("done")
    >>> target.read_text()
    'done'
    """
    path = Path(os.path.realpath(path))  # through symlinks: replace the target, keep the link
    _remove_leftovers(path)
    tmp = path.with_name(temporary_name(path.name))
    usual = _create(tmp)
    try:
        yield tmp
        os.chmod(tmp, _mode(path, usual))
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def write_json(path: str | Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "r.json"
    >>> write_json(target, {"a": 1})
    >>> json.loads(target.read_text())
    {'a': 1}
    """
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))
