"""IDX parsing: round trips, and damaged files that must fail with a clear message."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from lowbit.data import IDXFormatError, parse_idx, read_idx, write_idx


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_round_trip(tmp_path: Path, dtype: str, name: str) -> None:
    arr = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)  # (N, H, W)
    write_idx(tmp_path / name, arr)
    out = read_idx(tmp_path / name)
    assert out.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(out, arr)


def test_header_is_big_endian_like_the_original_files(tmp_path: Path) -> None:
    write_idx(tmp_path / "x", np.zeros((3, 28, 28), np.uint8))
    head = (tmp_path / "x").read_bytes()[:16]
    assert head.hex() == "00000803" + "00000003" + "0000001c" + "0000001c"


def _written(tmp_path: Path, arr: np.ndarray) -> bytes:
    write_idx(tmp_path / "x", arr)
    return (tmp_path / "x").read_bytes()


def test_truncated_body_names_the_problem(tmp_path: Path) -> None:
    data = _written(tmp_path, np.zeros((10, 28, 28), np.uint8))
    bad = tmp_path / "cut-idx3-ubyte"
    bad.write_bytes(data[:-100])
    with pytest.raises(IDXFormatError, match=r"truncated.*\(10, 28, 28\).*download it again"):
        read_idx(bad)


def test_truncated_gzip_stream(tmp_path: Path) -> None:
    data = gzip.compress(_written(tmp_path, np.arange(5000, dtype=np.uint8).reshape(5, 1000)))
    bad = tmp_path / "cut-idx2-ubyte.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(IDXFormatError, match="gzip stream is damaged or truncated"):
        read_idx(bad)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "bad magic"),
        (b"\x01\x02\x08\x01\x00\x00\x00\x01\x05", "bad magic"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "unknown IDX type code 0x07"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x01", "header is truncated"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x01\x05\x06", "longer than its header says"),
    ],
)
def test_corrupt_bytes(data: bytes, message: str) -> None:
    with pytest.raises(IDXFormatError, match=message):
        parse_idx(data)


def test_idx_error_is_a_value_error() -> None:
    assert issubclass(IDXFormatError, ValueError)


def test_write_rejects_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot store dtype"):
        write_idx(tmp_path / "x", np.zeros(3, np.uint64))
