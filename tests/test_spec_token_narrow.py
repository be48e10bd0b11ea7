"""Per-token dynamic activation scales and the narrow-range option of a spec."""

from __future__ import annotations

import pytest
import torch

from lowbit.primitives import (
    blocks,
    choose_qparams,
    fake_quantize,
    minmax,
    pack_bits,
    qparam_shape,
    quantize,
    unpack_bits,
)
from lowbit.spec import PerToken, QDtype, QuantSpec, SpecError, parse_granularity


def test_per_token_parses_and_round_trips() -> None:
    spec = QuantSpec("int8", "per_token", symmetric=False, dynamic=True)
    assert spec.gran == PerToken()
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert parse_granularity({"kind": "per_token"}) == PerToken()


def test_per_token_must_be_dynamic() -> None:
    with pytest.raises(SpecError, match="per_token.*dynamic: true"):
        QuantSpec("int8", "per_token")


@pytest.mark.parametrize("shape", [(5, 16), (2, 3, 16), (16,)])
def test_per_token_gives_each_row_its_own_range(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape) * torch.arange(1, shape[0] + 1).reshape(-1, *[1] * (len(shape) - 1))
    lo, hi = minmax(x, PerToken())
    assert lo.shape == qparam_shape(x.shape, PerToken()) == tuple(shape[:-1])
    rows = blocks(x, PerToken())
    torch.testing.assert_close(hi.reshape(-1), rows.amax(dim=1))
    scale, zero = choose_qparams(lo, hi, QDtype(8), symmetric=False)
    q = quantize(x, scale, zero, QDtype(8), PerToken())
    # every row reaches both ends of the grid: its own min maps to -128, its max to 127
    assert (q.reshape(-1, shape[-1]).amin(dim=1) == -128).all()
    assert (q.reshape(-1, shape[-1]).amax(dim=1) == 127).all()
    err = (fake_quantize(x, scale, zero, QDtype(8), PerToken()) - x).abs()
    assert (err <= scale.unsqueeze(-1) / 2 + 1e-6).all()


def test_narrow_range_drops_the_lowest_value() -> None:
    spec = QuantSpec("int8", "per_channel", narrow_range=True)
    assert (spec.qdtype.qmin, spec.qdtype.qmax) == (-127, 127)
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert "narrow_range" not in QuantSpec("int8").to_dict()  # default stays out of files
    x = torch.tensor([-10.0, -1.0, 0.0, 1.0])
    scale, zero = choose_qparams(x.min(), x.max(), spec.qdtype, True)
    q = quantize(x * 2, scale, zero, spec.qdtype)
    assert int(q.min()) == -127
    packed = pack_bits(q, spec.qdtype)
    assert torch.equal(unpack_bits(packed, spec.qdtype, q.numel()), q)


def test_narrow_range_for_every_width_and_unsigned() -> None:
    for bits in range(2, 9):
        dtype = QDtype(bits, narrow=True)
        assert dtype.qmin == -dtype.qmax
    assert (QDtype(8, signed=False, narrow=True).qmin, QDtype(8, False, True).qmax) == (1, 255)


def test_narrow_range_needs_a_symmetric_grid() -> None:
    with pytest.raises(SpecError, match="narrow_range is for symmetric"):
        QuantSpec("int8", symmetric=False, narrow_range=True)
    with pytest.raises(SpecError, match="narrow_range=.*True or False"):
        QuantSpec("int8", narrow_range="yes")  # type: ignore[arg-type]
