"""Atomic file writes: every file lowbit writes goes through :func:`atomic_path`."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "write_json"]


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
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        yield tmp
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
