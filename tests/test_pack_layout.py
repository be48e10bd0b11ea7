"""The packed layout of sub-byte integers, byte for byte: files depend on it never changing.

Values are offset by ``-qmin`` (so they are non-negative), then packed lowest bits first: the
first value of each pair of int4 values is the LOW nibble of its byte.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.primitives import pack_bits, unpack_bits
from lowbit.spec import QDtype

# (dtype, values, exact bytes)
LAYOUT = [
    (QDtype(4), [-8, 7, 0, 1], [0xF0, 0x98]),  # offsets 0,15 | 8,9: first value low nibble
    (QDtype(4), [3, -1, 5], [0x7B, 0x0D]),  # odd count: the last high nibble is padding 0
    (QDtype(4, signed=False), [1, 2, 3], [0x21, 0x03]),
    (QDtype(4, narrow=True), [-7, 7], [0xE0]),  # narrow int4: offset by 7, not 8
    (QDtype(2), [-2, -1, 0, 1], [0b11_10_01_00]),  # four values, lowest bits first
    (QDtype(2, signed=False), [3, 0, 0, 0, 1], [0x03, 0x01]),
    (QDtype(1, signed=False), [1, 0, 1, 1, 0, 0, 0, 1, 1], [0b1000_1101, 0x01]),
    (QDtype(3), [-4, 3], [0x70]),  # 3-bit values take a 4-bit slot
    (QDtype(8), [-128, 127, 0], [0x00, 0xFF, 0x80]),
    (QDtype(8, signed=False), [0, 200], [0x00, 200]),
    (QDtype(16), [-32768, 1], [0x00, 0x00, 0x01, 0x80]),  # little endian, offset 32768
]


@pytest.mark.parametrize(("dtype", "values", "expected"), LAYOUT, ids=lambda v: str(v))
def test_pack_bits_exact_bytes(dtype: QDtype, values: list[int], expected: list[int]) -> None:
    q = torch.tensor(values, dtype=torch.int32)
    packed = pack_bits(q, dtype)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == expected
    assert unpack_bits(packed, dtype, len(values)).tolist() == values


def test_pack_bits_flattens_in_row_major_order() -> None:
    q = torch.tensor([[-8, 7], [0, 1]], dtype=torch.int8)  # (2, 2): rows one after the other
    assert pack_bits(q, QDtype(4)).tolist() == [0xF0, 0x98]
    assert pack_bits(q.t(), QDtype(4)).tolist() == [0x80, 0x9F]  # the transpose's own order


def test_pack_bits_refuses_values_off_the_grid() -> None:
    with pytest.raises(ValueError, match="outside the int4 range"):
        pack_bits(torch.tensor([8]), QDtype(4))
