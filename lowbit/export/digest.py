"""The sha256 a ``.lowbit`` file carries: over its header and every tensor's name, dtype, shape
and bytes, so no byte that changes what load builds can change unnoticed.

It hashes, in order:

1. ``b"lowbit-header\\0"``, the byte count of the canonical header as a little-endian u64, then
   the canonical header: lowbit's JSON without its ``checksum`` field, written with sorted keys,
   no spaces and ASCII only (:func:`canonical`);
2. for each tensor in name order: the UTF-8 name, NUL, the safetensors dtype, NUL, the shape as
   JSON, NUL, the byte count as a little-endian u64, then the raw bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["Checksum", "canonical", "checksum"]

TensorItem = tuple[str, str, Sequence[int], bytes | memoryview]


def canonical(meta: dict[str, Any]) -> bytes:
    """The bytes of ``meta`` the checksum covers: sorted keys, no spaces, no ``checksum`` key.

    >>> canonical({"b": 1, "a": [1.5, "x"], "checksum": {"value": "..."}})
    b'{"a":[1.5,"x"],"b":1}'
    """
    body = {key: value for key, value in meta.items() if key != "checksum"}
    return json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


class Checksum:
    """sha256 of a header and its tensors, fed one tensor at a time in name order.

    >>> digest = Checksum({"format": "lowbit"})
    >>> digest.add("w", "U8", [2], b"ab")
    >>> digest.hexdigest() == checksum({"format": "lowbit"}, [("w", "U8", [2], b"ab")])
    True
    """

    def __init__(self, meta: dict[str, Any]) -> None:
        self._sha = hashlib.sha256()
        body = canonical(meta)
        self._sha.update(b"lowbit-header\0" + len(body).to_bytes(8, "little") + body)
        self._last: str | None = None

    def add(self, name: str, dtype: str, shape: Sequence[int], data: bytes | memoryview) -> None:
        """Hash one whole tensor; names must come in sorted order."""
        view = memoryview(data).cast("B")
        self.begin(name, dtype, shape, len(view))
        self._sha.update(view)

    def update(self, data: bytes | memoryview) -> None:
        """Hash more bytes of the tensor :meth:`begin` started (for reading in chunks)."""
        self._sha.update(data)

    def begin(self, name: str, dtype: str, shape: Sequence[int], nbytes: int) -> None:
        """Start a tensor of ``nbytes`` whose bytes follow through :meth:`update`."""
        if self._last is not None and name <= self._last:
            raise ValueError(f"tensor {name!r} hashed after {self._last!r}: feed names in order")
        self._last = name
        dims = json.dumps([int(d) for d in shape], separators=(",", ":"))
        self._sha.update(f"{name}\0{dtype}\0{dims}\0".encode() + nbytes.to_bytes(8, "little"))

    def hexdigest(self) -> str:
        """The hex digest of everything hashed so far."""
        return self._sha.hexdigest()


def checksum(meta: dict[str, Any], tensors: Iterable[TensorItem]) -> str:
    """sha256 hex digest of ``meta`` and ``(name, dtype, shape, bytes)`` tensors, in name order.

    >>> a = checksum({}, [("b", "U8", [1], b"2"), ("a", "U8", [1], b"1")])
    >>> a == checksum({}, [("a", "U8", [1], b"1"), ("b", "U8", [1], b"2")])
    True
    >>> a == checksum({"recipe": "other"}, [("a", "U8", [1], b"1"), ("b", "U8", [1], b"2")])
    False
    """
    digest = Checksum(meta)
    for name, dtype, shape, data in sorted(tensors, key=lambda item: item[0]):
        digest.add(name, dtype, shape, data)
    return digest.hexdigest()
