"""An allow-listed unpickler: the only way lowbit reads pickle-format datasets.

Plain ``pickle.load`` runs whatever code a file names. :class:`RestrictedUnpickler` resolves a
global only if it is on a short allow-list of what numpy needs to rebuild arrays (``_reconstruct``,
``ndarray``, ``dtype``, ``scalar``, ``_frombuffer``), plus a latin-1-only stand-in for
``_codecs.encode`` (how protocol-2 pickles written by Python 3 store ``bytes``). Everything else
(``os.system``, ``builtins.eval``, ``subprocess.Popen``, ...) is refused with
:class:`UnsafePickleError` before anything is called. Dtypes holding Python objects are refused too,
so an array cannot smuggle arbitrary objects in.
"""

from __future__ import annotations

import gzip
import importlib
import io
import pickle
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["RestrictedUnpickler", "UnsafePickleError", "safe_load", "safe_loads"]

_GZIP_MAGIC = b"\x1f\x8b"

# (module, name) as written in the pickle -> (numpy 2 location, numpy 1 location) of the object.
_NUMPY_ALLOWED: dict[tuple[str, str], tuple[str, str]] = {
    (mod, name): (f"numpy._core.{sub}", f"numpy.core.{sub}")
    for sub, name in (
        ("multiarray", "_reconstruct"),
        ("multiarray", "scalar"),
        ("numeric", "_frombuffer"),
    )
    for mod in (f"numpy.core.{sub}", f"numpy._core.{sub}")
}


class UnsafePickleError(ValueError):
    """A pickle names a global that is not on the allow-list; nothing in it was executed."""


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode``: protocol <= 2 pickles store bytes as latin-1 text."""
    if not isinstance(text, str) or encoding.lower().replace("-", "") != "latin1":
        raise UnsafePickleError(
            f"pickle calls _codecs.encode with encoding {encoding!r}; only the 'latin1' form that "
            "pickle itself writes for bytes is allowed"
        )
    return text.encode("latin-1")


def _checked_dtype(*args: Any) -> np.dtype:
    """Stand-in for ``numpy.dtype`` that refuses object dtypes."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise UnsafePickleError(
            f"pickle holds a numpy array of dtype {dtype} (Python objects); only plain numeric "
            "arrays are allowed. Re-save the data with numeric dtypes (e.g. np.savez)"
        )
    return dtype


def _resolve_numpy(candidates: tuple[str, str], name: str) -> Any:
    for module in candidates:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise UnsafePickleError(f"numpy on this machine has no {name} in {candidates}")


def _starts_with_gzip_magic(file: IO[bytes]) -> bool:
    if isinstance(file, io.BufferedReader):
        return file.peek(2)[:2] == _GZIP_MAGIC
    if file.seekable():
        start = file.tell()
        head = file.read(2)
        file.seek(start)
        return head == _GZIP_MAGIC
    return False


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only numpy's array-rebuilding globals.

    >>> import io, pickle, numpy as np
    >>> data = pickle.dumps({"x": np.arange(3)}, protocol=2)
    >>> RestrictedUnpickler(io.BytesIO(data)).load()["x"].tolist()
    [0, 1, 2]
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return _checked_dtype
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in _NUMPY_ALLOWED:
            return _resolve_numpy(_NUMPY_ALLOWED[(module, name)], name)
        raise UnsafePickleError(
            f"refusing to load pickle: it names the global {module}.{name}, which is not on the "
            "allow-list of numpy array types, so it could run code. Only pickles of dicts, lists, "
            "numbers, strings and numpy arrays can be read; re-save other data as "
            ".npz or .safetensors"
        )


def safe_loads(data: bytes, encoding: str = "latin1") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`.

    ``encoding="latin1"`` reads Python 2 pickles (MNIST, CIFAR-10) without corrupting array bytes.

    >>> import pickle
    >>> safe_loads(pickle.dumps([1, "a", b"b"], protocol=2))
    [1, 'a', b'b']
    """
    return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()


def safe_load(file: str | Path | IO[bytes], encoding: str = "latin1") -> Any:
    """Unpickle a file (path or binary stream; gzip-compressed is detected) with the allow-list.

    >>> import pickle, tempfile
    >>> p = Path(tempfile.mkdtemp()) / "d.pkl"
    >>> _ = p.write_bytes(pickle.dumps({"labels": [1, 2]}, protocol=2))
    >>> safe_load(p)
    {'labels': [1, 2]}
    """
    if isinstance(file, (str, Path)):
        with open(file, "rb") as f:
            return safe_load(f, encoding=encoding)
    if _starts_with_gzip_magic(file):
        with gzip.GzipFile(fileobj=file) as gz:
            return RestrictedUnpickler(gz, encoding=encoding).load()
    return RestrictedUnpickler(file, encoding=encoding).load()
