"""The private torch ops behind lowbit.runtime.ops: one self-test each, so a torch upgrade that
changes one breaks here, loudly, and the kernel that uses it falls back instead of lying."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.primitives import choose_qparams
from lowbit.runtime import ops, opscheck
from lowbit.runtime.activation import scalar_qparams
from lowbit.spec import QDtype


@pytest.mark.parametrize("op", sorted(opscheck.SELF_TESTS))
def test_private_op_matches_its_float_reference(op: str) -> None:
    if op != "onednn_qlinear" and opscheck.available("onednn_qlinear") is not None:
        pytest.skip(f"no oneDNN int8 on this machine: {opscheck.available('onednn_qlinear')}")
    if op in ("weight_int8_mm", "int4_mm") and not ops.bf16_fast():
        pytest.skip("no native bfloat16 on this CPU: the weight-only kernels are not used")
    assert opscheck.available(op) is None, opscheck.available(op)


def test_unknown_problem_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> str | None:
        raise RuntimeError("this op changed its schema")

    monkeypatch.setitem(opscheck.SELF_TESTS, "broken", broken)
    assert "changed its schema" in str(opscheck.available("broken"))
    opscheck.available.cache_clear()


@pytest.mark.parametrize("rows", [64, 128, 192])
def test_int4_packing_round_trips(rows: int) -> None:
    if ops.int4_block_n() is None:
        pytest.skip("the CPU int4 packing of this torch build is not understood")
    gen = torch.Generator().manual_seed(rows)
    q = torch.randint(0, 16, (rows, 96), dtype=torch.int32, generator=gen)
    assert torch.equal(ops.int4_unpack(ops.int4_pack(q), rows, 96).to(torch.int32), q)


_ranges = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(
    lo=_ranges,
    hi=_ranges,
    bits=st.sampled_from([8, 4]),
    signed=st.booleans(),
    symmetric=st.booleans(),
)
def test_scalar_qparams_equal_choose_qparams(
    lo: float, hi: float, bits: int, signed: bool, symmetric: bool
) -> None:
    """Dynamic activations are quantized with float32 scalar math that must give exactly the
    simulation's scale and zero point."""
    lo, hi = min(lo, hi), max(lo, hi)
    dtype = QDtype(bits, signed)
    scale, zero = choose_qparams(torch.tensor(lo), torch.tensor(hi), dtype, symmetric)
    assert scalar_qparams(lo, hi, dtype, symmetric) == (scale.item(), zero.item())
