"""The allow-listed unpickler reads numpy data and refuses anything that could run code."""

from __future__ import annotations

import gzip
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lowbit.data import RestrictedUnpickler, UnsafePickleError, safe_load, safe_loads


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_numpy_data_round_trips(protocol: int) -> None:
    payload = {
        b"data": np.arange(12, dtype=np.uint8).reshape(3, 4),  # (N, features)
        "floats": np.linspace(0, 1, 5, dtype=np.float32),
        "labels": [1, 2, 3],
        "scalar": np.float32(1.5),
        "nested": ({"a": (1, 2.5, None, True)}, "text"),
    }
    out = safe_loads(pickle.dumps(payload, protocol=protocol))
    np.testing.assert_array_equal(out[b"data"], payload[b"data"])
    np.testing.assert_array_equal(out["floats"], payload["floats"])
    assert out["labels"] == [1, 2, 3]
    assert out["scalar"] == np.float32(1.5)
    assert out["nested"] == payload["nested"]


def test_safe_load_reads_plain_and_gzip_files(tmp_path: Path) -> None:
    data = pickle.dumps({"x": np.ones(3)}, protocol=2)
    (tmp_path / "a.pkl").write_bytes(data)
    (tmp_path / "a.pkl.gz").write_bytes(gzip.compress(data))
    for name in ("a.pkl", "a.pkl.gz"):
        np.testing.assert_array_equal(safe_load(tmp_path / name)["x"], np.ones(3))
    with open(tmp_path / "a.pkl.gz", "rb") as f:
        np.testing.assert_array_equal(safe_load(f)["x"], np.ones(3))


class _Shell:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


class _Popen:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[list[str]]]:
        return (subprocess.Popen, (["touch", str(self.marker)],))


class _Eval:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (eval, ("__import__('os').system('true')",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    payloads = [
        _Shell(f"touch {marker}"),
        _Popen(marker),
        _Eval(),
        {"data": np.zeros(2), "evil": _Shell(f"touch {marker}")},  # hidden next to real data
    ]
    for payload in payloads:
        data = pickle.dumps(payload, protocol=protocol)
        with pytest.raises(UnsafePickleError, match="not on the allow-list"):
            safe_loads(data)
        path = tmp_path / "evil.pkl.gz"
        path.write_bytes(gzip.compress(data))
        with pytest.raises(ValueError, match="refusing to load pickle"):
            safe_load(path)
    assert not marker.exists()


def test_refusal_names_the_global() -> None:
    with pytest.raises(UnsafePickleError, match=r"posix\.system|os\.system|nt\.system"):
        safe_loads(pickle.dumps(_Shell("true"), protocol=2))


def test_object_arrays_are_refused() -> None:
    data = pickle.dumps(np.array([1, "a"], dtype=object), protocol=2)
    with pytest.raises(UnsafePickleError, match="Python objects"):
        safe_loads(data)


def test_codecs_encode_only_for_latin1() -> None:
    # _codecs.encode('abc', 'rot13'): allowed global name, disallowed use.
    data = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    with pytest.raises(UnsafePickleError, match="latin1"):
        safe_loads(data)


def test_unpickler_is_a_pickle_unpickler_and_error_a_value_error() -> None:
    assert issubclass(RestrictedUnpickler, pickle.Unpickler)
    assert issubclass(UnsafePickleError, ValueError)
