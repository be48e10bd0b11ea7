"""Reading and writing IDX files, the raw format of MNIST and Fashion-MNIST, with plain numpy.

An IDX file is a 4-byte magic number ``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` big-endian
uint32 sizes, then the data in row-major order (big-endian for multi-byte types). Files ending in
``.gz`` are decompressed on the fly; nothing but numpy parsing ever touches the bytes.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

__all__ = ["IDXFormatError", "parse_idx", "read_idx", "write_idx"]

# IDX type code -> numpy dtype (big-endian where it matters).
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


class IDXFormatError(ValueError):
    """An IDX file is corrupt, truncated or not an IDX file at all."""


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as exc:  # gzip raises both for damaged or cut-short streams
        raise IDXFormatError(
            f"{path}: the gzip stream is damaged or truncated ({exc}); "
            "download or reinstall the file (e.g. `apt-get install --reinstall ...`)"
        ) from exc


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an (uncompressed) IDX file into a numpy array in native byte order.

    >>> parse_idx(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9])).tolist()
    [7, 8, 9]
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IDXFormatError(
            f"{name}: not an IDX file (bad magic number {data[:4].hex() or 'empty'}); "
            "expected 0x0000 followed by a type code and the number of dimensions"
        )
    code, ndim = data[2], data[3]
    if code not in _DTYPES:
        raise IDXFormatError(
            f"{name}: unknown IDX type code 0x{code:02x}; "
            f"known codes are {sorted(hex(c) for c in _DTYPES)}"
        )
    header_len = 4 + 4 * ndim
    if ndim == 0 or len(data) < header_len:
        raise IDXFormatError(
            f"{name}: IDX header is truncated or has 0 dimensions "
            f"({len(data)} bytes, {ndim} dims); the file is damaged, download it again"
        )
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _DTYPES[code]
    expected = header_len + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise IDXFormatError(
            f"{name}: IDX file is {what}: header says shape {dims} of {dtype} "
            f"({expected} bytes in all) but the file holds {len(data)} bytes; "
            "the file is damaged, download it again"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)  # (d0, d1, ...)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain or ``.gz``) into a numpy array; magic, dims and size are checked.

    >>> import tempfile, numpy as np
    >>> p = Path(tempfile.mkdtemp()) / "x-idx1-ubyte"
    >>> write_idx(p, np.arange(5, dtype=np.uint8))
    >>> read_idx(p).tolist()
    [0, 1, 2, 3, 4]
    """
    path = Path(path)
    return parse_idx(_read_bytes(path), name=str(path))


def write_idx(path: str | Path, array: np.ndarray, compress: bool | None = None) -> None:
    """Write ``array`` as an IDX file; gzip-compressed when ``compress`` or the name ends in .gz.

    >>> import tempfile, numpy as np
    >>> p = Path(tempfile.mkdtemp()) / "y-idx1-ubyte.gz"
    >>> write_idx(p, np.array([3, 1], dtype=np.uint8))
    >>> read_idx(p).tolist()
    [3, 1]
    """
    path = Path(path)
    codes = {dt.str.lstrip("<>|="): c for c, dt in _DTYPES.items()}
    key = np.dtype(array.dtype).str.lstrip("<>|=")
    if key not in codes or array.ndim == 0:
        raise ValueError(
            f"write_idx: cannot store dtype {array.dtype} with {array.ndim} dims in IDX; "
            f"convert to one of {sorted(codes)} with at least 1 dimension"
        )
    code = codes[key]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    body = np.ascontiguousarray(array, dtype=_DTYPES[code]).tobytes()
    data = header + body
    if compress if compress is not None else path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
