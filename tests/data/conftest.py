"""Shared fixtures for the data tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lowbit.data import text


@pytest.fixture
def small_text(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A two-play corpus (a few hundred characters) instead of the 5 MB one."""
    plays = (
        ("comedy", "To be, or not to be.\n" * 20),
        (text.HELD_OUT_PLAY, "O brave new world!\n" * 10),
    )
    monkeypatch.setattr(text, "_texts", lambda: plays)
    text.vocabulary.cache_clear()
    yield
    text.vocabulary.cache_clear()
