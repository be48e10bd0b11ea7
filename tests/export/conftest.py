"""Fixtures shared by the checkpoint tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from checkpoint_models import quantized_net
from torch import nn


@pytest.fixture(scope="session")
def saved_w8a8(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """A w8a8 Net and its file (read-only for tests: copy before corrupting)."""
    from lowbit.export import save

    q = quantized_net("w8a8")
    return q, save(q, tmp_path_factory.mktemp("saved") / "net.lowbit")


@pytest.fixture()
def copy_file(tmp_path: Path) -> Callable[[Path], Path]:
    def copy(src: Path) -> Path:
        dst = tmp_path / src.name
        dst.write_bytes(src.read_bytes())
        return dst

    return copy
