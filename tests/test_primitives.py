"""Pure quantization math: properties over specs, bit packing, STE, rounding, SQNR claims."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.primitives import (
    blocks,
    choose_qparams,
    dequantize,
    fake_quantize,
    minmax,
    pack_bits,
    qparam_shape,
    quantize,
    storage_dtype,
    unpack_bits,
)
from lowbit.report.metrics import sqnr_db
from lowbit.spec import Granularity, PerChannel, PerGroup, PerTensor, QDtype, SpecError

FAST = settings(max_examples=30, deadline=None)

QUANT_DTYPES = [QDtype(b) for b in range(2, 9)] + [QDtype(b, False) for b in range(2, 9)]
QUANT_DTYPES.append(QDtype(16))
PACK_DTYPES = [
    QDtype(1, False), QDtype(2), QDtype(2, False), QDtype(3), QDtype(3, False), QDtype(4),
    QDtype(4, False), QDtype(5), QDtype(5, False), QDtype(6), QDtype(7), QDtype(8),
    QDtype(8, False), QDtype(12), QDtype(16), QDtype(16, False),
]  # fmt: skip

# granularity with a tensor shape it applies to
GRAN_SHAPES: list[tuple[Granularity, tuple[int, ...]]] = [
    (PerTensor(), (7,)),
    (PerTensor(), (3, 5)),
    (PerTensor(), (2, 3, 2, 2)),
    (PerChannel(0), (6, 10)),
    (PerChannel(1), (6, 10)),
    (PerChannel(-1), (4, 6)),
    (PerChannel(0), (4, 3, 3, 3)),
    (PerChannel(1), (2, 5, 3, 3)),
    (PerGroup(8), (4, 32)),  # divides the row
    (PerGroup(8), (4, 30)),  # short last group of 6
    (PerGroup(5), (3, 2, 3, 3)),  # row of 18: groups 5, 5, 5, 3
    (PerGroup(64), (2, 10)),  # one group, shorter than group_size
]
GRAN_IDS = [f"{type(g).__name__}{getattr(g, 'axis', getattr(g, 'group_size', ''))}-{s}"
            for g, s in GRAN_SHAPES]  # fmt: skip


def full(param: torch.Tensor, shape: tuple[int, ...], gran: Granularity) -> torch.Tensor:
    """Expand a scale / zero point to one value per element of a tensor of ``shape``."""
    if isinstance(gran, PerTensor):
        return param.reshape(()).expand(shape)
    if isinstance(gran, PerChannel):
        view = [1] * len(shape)
        view[gran.axis] = -1
        return param.reshape(view).expand(shape)  # (…, C, …)
    width = math.prod(shape[1:])
    cols = param.repeat_interleave(gran.group_size, dim=1)[:, :width]  # (out, in)
    return cols.reshape(shape)


@st.composite
def cases(draw: st.DrawFn) -> tuple[torch.Tensor, QDtype, bool, Granularity]:
    """A random tensor, dtype, symmetry and granularity (with a shape it applies to)."""
    dtype = draw(st.sampled_from(QUANT_DTYPES))
    symmetric = draw(st.booleans())
    gran, shape = draw(st.sampled_from(GRAN_SHAPES))
    seed = draw(st.integers(0, 2**31 - 1))
    magnitude = draw(st.sampled_from([1e-3, 0.1, 1.0, 30.0, 1e4]))
    offset = draw(st.sampled_from([0.0, 0.5, -2.0, 5.0]))
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) + offset) * magnitude
    if draw(st.booleans()):
        # a few exact zeros: they must survive quantization exactly
        x = x * (torch.rand(shape, generator=gen) > 0.2)
    return x, dtype, symmetric, gran


def qparams_for(
    x: torch.Tensor, dtype: QDtype, symmetric: bool, gran: Granularity
) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = minmax(x, gran)
    return choose_qparams(lo, hi, dtype, symmetric)


# ---------------------------------------------------------------------------- properties


@FAST
@given(cases(), st.floats(1.0, 50.0))
def test_quantized_values_are_in_range_with_the_storage_dtype(case, stretch: float) -> None:
    x, dtype, symmetric, gran = case
    scale, zero = qparams_for(x, dtype, symmetric, gran)
    q = quantize(x * stretch, scale, zero, dtype, gran)  # stretched values must be clipped
    assert q.dtype == storage_dtype(dtype) and q.shape == x.shape
    assert int(q.min()) >= dtype.qmin and int(q.max()) <= dtype.qmax


@FAST
@given(cases())
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(case) -> None:
    x, dtype, symmetric, gran = case
    scale, zero = qparams_for(x, dtype, symmetric, gran)
    q = quantize(x, scale, zero, dtype, gran)
    err = (dequantize(q, scale, zero, gran) - x).abs()
    s, z = full(scale, x.shape, gran), full(zero, x.shape, gran).float()
    # float32 arithmetic on x / s and (q - z) * s costs a few ulps of |x| and |z * s|
    bound = s / 2 * (1 + 1e-5) + 1e-6 * (x.abs() + z.abs() * s)
    assert bool((err <= bound).all()), float((err - bound).max())


@FAST
@given(cases())
def test_quantizing_twice_changes_nothing(case) -> None:
    x, dtype, symmetric, gran = case
    scale, zero = qparams_for(x, dtype, symmetric, gran)
    q = quantize(x, scale, zero, dtype, gran)
    again = quantize(dequantize(q, scale, zero, gran), scale, zero, dtype, gran)
    assert torch.equal(again, q)


@FAST
@given(cases())
def test_zero_maps_to_the_zero_point_and_back_to_exactly_zero(case) -> None:
    x, dtype, symmetric, gran = case
    scale, zero = qparams_for(x, dtype, symmetric, gran)
    q0 = quantize(torch.zeros_like(x), scale, zero, dtype, gran)
    assert torch.equal(q0.to(torch.int32), full(zero, x.shape, gran).to(torch.int32))
    assert bool((dequantize(q0, scale, zero, gran) == 0).all())
    at_zero = x == 0
    dq = dequantize(quantize(x, scale, zero, dtype, gran), scale, zero, gran)
    assert bool((dq[at_zero] == 0).all())


@FAST
@given(cases())
def test_choose_qparams_zero_point_is_an_integer_on_the_grid(case) -> None:
    x, dtype, symmetric, gran = case
    lo, hi = minmax(x, gran)
    scale, zero = choose_qparams(lo, hi, dtype, symmetric)
    assert scale.dtype == torch.float32 and zero.dtype == torch.int32
    assert scale.shape == zero.shape == qparam_shape(x.shape, gran)
    assert bool((scale > 0).all())
    assert int(zero.min()) >= dtype.qmin and int(zero.max()) <= dtype.qmax
    if symmetric:
        expected = 0 if dtype.signed else (dtype.qmax + 1) // 2
        assert bool((zero == expected).all())
    # the grid covers [min, max] up to half a step at either end
    grid_lo = (dtype.qmin - zero).float() * scale
    grid_hi = (dtype.qmax - zero).float() * scale
    tol = scale * 0.5001 + 1e-6 * torch.maximum(lo.abs(), hi.abs())
    assert bool((grid_lo <= torch.clamp(lo, max=0) + tol).all())
    assert bool((grid_hi >= torch.clamp(hi, min=0) - tol).all())


@FAST
@given(cases(), st.sampled_from(["nearest", "stochastic"]), st.integers(0, 1000))
def test_fake_quantize_equals_dequantize_of_quantize(case, rounding: str, seed: int) -> None:
    x, dtype, symmetric, gran = case
    scale, zero = qparams_for(x, dtype, symmetric, gran)
    q = quantize(x * 1.3, scale, zero, dtype, gran, rounding, torch.Generator().manual_seed(seed))
    expected = dequantize(q, scale, zero, gran)
    fq = fake_quantize(
        x * 1.3, scale, zero, dtype, gran, rounding, torch.Generator().manual_seed(seed)
    )
    assert fq.dtype == x.dtype and torch.equal(fq, expected)


@FAST
@given(cases(), st.sampled_from(["nearest", "stochastic"]), st.integers(0, 1000))
def test_inference_path_matches_the_autograd_path_bit_for_bit(
    case, rounding: str, seed: int
) -> None:
    """Without a gradient, fake_quantize takes an in-place path; its numbers are the same."""
    x, dtype, symmetric, gran = case
    scale, zero = qparams_for(x, dtype, symmetric, gran)
    leaf = (x * 1.3).requires_grad_(True)
    with_grad = fake_quantize(
        leaf, scale, zero, dtype, gran, rounding, torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        without = fake_quantize(
            leaf, scale, zero, dtype, gran, rounding, torch.Generator().manual_seed(seed)
        )
    assert with_grad.requires_grad and not without.requires_grad
    assert torch.equal(with_grad.detach(), without)
    assert torch.equal(leaf.detach(), x * 1.3)  # the input is never modified in place


def test_asymmetric_non_negative_data_uses_the_whole_grid() -> None:
    x = torch.linspace(0.0, 3.0, 16)
    scale, zero = qparams_for(x, QDtype(4, False), False, PerTensor())
    assert int(zero) == 0 and scale.item() == pytest.approx(0.2)
    assert quantize(x, scale, zero, QDtype(4, False)).tolist() == list(range(16))


def test_all_zero_tensor_gets_a_positive_scale_and_stays_zero() -> None:
    x = torch.zeros(3, 4)
    for dtype in (QDtype(8), QDtype(4, False)):
        for symmetric in (True, False):
            scale, zero = qparams_for(x, dtype, symmetric, PerChannel(0))
            assert bool((scale > 0).all())
            dq = dequantize(quantize(x, scale, zero, dtype, PerChannel(0)), scale, zero,
                            PerChannel(0))  # fmt: skip
            assert bool((dq == 0).all())


# ---------------------------------------------------------------------------- bit packing


@pytest.mark.parametrize("dtype", PACK_DTYPES, ids=str)
@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 67), seed=st.integers(0, 2**31 - 1))
def test_pack_then_unpack_is_the_identity(dtype: QDtype, n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(dtype.qmin, dtype.qmax + 1, (n,), generator=gen).to(storage_dtype(dtype))
    if n >= 2:
        q[0], q[-1] = dtype.qmin, dtype.qmax  # both ends of the grid
    packed = pack_bits(q, dtype)
    assert packed.dtype == torch.uint8 and packed.ndim == 1
    assert packed.numel() == math.ceil(n * dtype.storage_bits / 8)
    back = unpack_bits(packed, dtype, n)
    assert back.dtype == storage_dtype(dtype) and torch.equal(back, q)


@pytest.mark.parametrize("dtype", PACK_DTYPES, ids=str)
def test_pack_accepts_any_shape_and_unpack_gives_it_back_flat(dtype: QDtype) -> None:
    q = torch.randint(dtype.qmin, dtype.qmax + 1, (3, 5, 7)).to(storage_dtype(dtype))
    back = unpack_bits(pack_bits(q, dtype), dtype, q.numel())
    assert torch.equal(back.reshape(q.shape), q)


@pytest.mark.parametrize("dtype", PACK_DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 33])
def test_unpack_of_a_wrong_byte_count_raises(dtype: QDtype, n: int) -> None:
    packed = pack_bits(torch.zeros(n, dtype=storage_dtype(dtype)) + dtype.qmin, dtype)
    for wrong in (packed[:-1], torch.cat([packed, packed[:1]])):
        with pytest.raises(ValueError, match="truncated|header"):
            unpack_bits(wrong, dtype, n)


@pytest.mark.parametrize("dtype", [QDtype(2), QDtype(4, False), QDtype(8), QDtype(16)], ids=str)
def test_pack_rejects_values_off_the_grid(dtype: QDtype) -> None:
    for bad in (dtype.qmin - 1, dtype.qmax + 1):
        with pytest.raises(ValueError, match="quantize them first"):
            pack_bits(torch.tensor([0, bad], dtype=torch.int32), dtype)


def test_pack_layout_is_lowest_bits_first_and_little_endian() -> None:
    assert pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]), QDtype(1, False)).tolist() == [
        0b1101,
        1,
    ]
    assert pack_bits(torch.tensor([3, 0, 1]), QDtype(2, False)).tolist() == [0b010011]
    assert pack_bits(torch.tensor([-32768, 32767]), QDtype(16)).tolist() == [0, 0, 255, 255]


# ---------------------------------------------------------------------------- STE


STE_CASES = [
    (PerTensor(), (50,)),
    (PerChannel(0), (4, 40)),
    (PerChannel(1), (3, 4, 5, 2)),
    (PerGroup(16), (3, 40)),  # short last group
]


@pytest.mark.parametrize("dtype", [QDtype(2), QDtype(4), QDtype(8), QDtype(4, False)], ids=str)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("gran", "shape"), STE_CASES, ids=lambda v: str(v))
def test_ste_gradient_is_one_inside_and_zero_outside_the_range(
    dtype: QDtype, symmetric: bool, gran: Granularity, shape: tuple[int, ...]
) -> None:
    gen = torch.Generator().manual_seed(1)
    qshape = qparam_shape(shape, gran)
    scale = torch.rand(qshape, generator=gen) + 0.1
    if symmetric:
        zero = torch.full(qshape, 0 if dtype.signed else (dtype.qmax + 1) // 2, dtype=torch.int32)
    else:
        zero = torch.randint(dtype.qmin, dtype.qmax + 1, qshape, generator=gen, dtype=torch.int32)
    # positions on the integer grid, from well below qmin to well above qmax
    pos = torch.rand(shape, generator=gen) * (dtype.qmax - dtype.qmin + 8) + dtype.qmin - 4
    # keep away from the clipping edges qmin - 0.5 and qmax + 0.5
    edge = torch.minimum((pos - dtype.qmin + 0.5).abs(), (pos - dtype.qmax - 0.5).abs())
    pos = torch.where(edge < 0.05, torch.full_like(pos, float(dtype.qmin)), pos)
    s, z = full(scale, shape, gran), full(zero, shape, gran)
    x = ((pos - z) * s).requires_grad_(True)
    upstream = torch.randn(shape, generator=gen)
    fake_quantize(x, scale, zero, dtype, gran).backward(upstream)
    inside = (pos > dtype.qmin - 0.5) & (pos < dtype.qmax + 0.5)
    assert bool(inside.any()) and bool((~inside).any())
    assert x.grad is not None
    assert torch.equal(x.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))


def test_ste_gives_no_gradient_to_scale_or_zero_point() -> None:
    x = torch.randn(10, requires_grad=True)
    scale = torch.tensor(0.1, requires_grad=True)
    fake_quantize(x, scale, torch.tensor(0), QDtype(4)).sum().backward()
    assert scale.grad is None
    assert x.grad is not None


# ---------------------------------------------------------------------------- rounding


def test_round_to_nearest_even_on_ties() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 0.49, 0.51])
    one, zero, dtype = torch.tensor(1.0), torch.tensor(0), QDtype(8)
    expected = [0, 2, 2, 4, 0, -2, -2, 0, 1]
    assert quantize(x, one, zero, dtype).tolist() == expected
    assert fake_quantize(x, one, zero, dtype).tolist() == [float(v) for v in expected]
    # the same with a non-unit scale that keeps x / scale exact
    assert quantize(x * 0.25, torch.tensor(0.25), zero, dtype).tolist() == expected


STOCHASTIC_N = 10_000
# the mean of N Bernoulli steps has standard deviation <= 0.5 / sqrt(N) = 0.005 steps;
# 0.03 steps is 6 standard deviations
STOCHASTIC_TOL = 0.03


@pytest.mark.parametrize("frac", [0.1, 0.5, 0.73])
@pytest.mark.parametrize("dtype", [QDtype(4), QDtype(8, False)], ids=str)
def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour(
    frac: float, dtype: QDtype
) -> None:
    scale, zero = torch.tensor(0.5), torch.tensor(2 if dtype.signed else 8)
    value = (3 + frac) * 0.5 - (0 if dtype.signed else 4.0)  # 3 + frac steps above zero point
    x = torch.full((STOCHASTIC_N,), value)
    gen = torch.Generator().manual_seed(0)
    q = quantize(x, scale, zero, dtype, rounding="stochastic", generator=gen)
    below = math.floor(value / 0.5) + int(zero)
    assert int(q.min()) >= below and int(q.max()) <= below + 1
    mean = dequantize(q, scale, zero).double().mean().item()
    assert abs(mean - value) <= STOCHASTIC_TOL * 0.5


def test_stochastic_rounding_per_channel_and_exact_values_never_move() -> None:
    gen = torch.Generator().manual_seed(3)
    scale = torch.tensor([0.1, 1.0, 7.0])
    target = torch.tensor([0.137, -2.4, 30.0])  # 1.37, -2.4, 4.2857 steps
    x = target.view(3, 1).expand(3, STOCHASTIC_N).contiguous()
    zero = torch.zeros(3, dtype=torch.int32)
    q = quantize(x, scale, zero, QDtype(8), PerChannel(0), "stochastic", gen)
    below = torch.floor(target / scale).view(3, 1)
    assert bool(((q == below) | (q == below + 1)).all())
    mean = dequantize(q, scale, zero, PerChannel(0)).double().mean(dim=1)
    tol = STOCHASTIC_TOL * scale
    assert bool(((mean.float() - target).abs() <= tol).all())
    exact = torch.tensor([-3.0, 0.0, 2.0, 5.0])
    q = quantize(exact, torch.tensor(1.0), torch.tensor(0), QDtype(4), None, "stochastic", gen)
    assert q.tolist() == [-3, 0, 2, 5]


def test_stochastic_rounding_is_reproducible_with_a_generator() -> None:
    x = torch.randn(100)
    a = quantize(x, torch.tensor(0.1), torch.tensor(0), QDtype(8), None, "stochastic",
                 torch.Generator().manual_seed(5))  # fmt: skip
    b = quantize(x, torch.tensor(0.1), torch.tensor(0), QDtype(8), None, "stochastic",
                 torch.Generator().manual_seed(5))  # fmt: skip
    assert torch.equal(a, b)


def test_unknown_rounding_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="rounding='up'.*nearest"):
        quantize(torch.ones(2), torch.tensor(1.0), torch.tensor(0), QDtype(8), rounding="up")


# ---------------------------------------------------------------------------- granularity


@pytest.mark.parametrize(
    ("shape", "gran", "expected"),
    [
        ((64, 100), PerGroup(32), (64, 4)),
        ((64, 96), PerGroup(32), (64, 3)),
        ((8, 3, 3, 3), PerGroup(4), (8, 7)),
        ((5, 10), PerGroup(100), (5, 1)),
        ((5, 10), PerChannel(1), (10,)),
        ((2, 3, 4, 5), PerChannel(-1), (5,)),
        ((5, 10), PerTensor(), ()),
    ],
)
def test_qparam_shape(shape: tuple[int, ...], gran: Granularity, expected: tuple[int, ...]) -> None:
    assert qparam_shape(shape, gran) == expected
    assert minmax(torch.randn(shape), gran)[0].shape == expected


def test_per_group_with_a_short_last_group_uses_its_own_scale() -> None:
    x = torch.randn(4, 70, generator=torch.Generator().manual_seed(2))
    gran = PerGroup(32)
    scale = torch.tensor([1e-3, 1e-3, 100.0]).repeat(4, 1)  # (4, 3): last group of 6 coarse
    q = quantize(x, scale, torch.zeros(4, 3), QDtype(8), gran)
    assert q[:, 64:].abs().max() == 0  # |x| << 100 / 2: all zero in the short group
    fine = torch.clamp(torch.round(x[:, :64] / 1e-3), -128, 127)  # the 1e-3 groups
    assert torch.equal(q[:, :64].float(), fine)
    assert blocks(x, gran).shape == (12, 32)
    assert torch.equal(blocks(x, gran)[2::3, :6], x[:, 64:])


def test_minmax_per_group_ignores_the_padding_of_a_short_last_group() -> None:
    x = torch.arange(1.0, 21.0).reshape(2, 10)  # all positive; last group of 2
    lo, hi = minmax(x, PerGroup(4))
    assert lo.tolist() == [[1.0, 5.0, 9.0], [11.0, 15.0, 19.0]]
    assert hi.tolist() == [[4.0, 8.0, 10.0], [14.0, 18.0, 20.0]]
    lo, hi = minmax(-x, PerGroup(4))
    assert hi.tolist() == [[-1.0, -5.0, -9.0], [-11.0, -15.0, -19.0]]


def test_minmax_per_channel_on_activations_axis_1() -> None:
    x = torch.randn(2, 3, 4, 4)
    lo, hi = minmax(x, PerChannel(1))
    assert torch.equal(lo, x.amin(dim=(0, 2, 3))) and torch.equal(hi, x.amax(dim=(0, 2, 3)))


@pytest.mark.parametrize("axis", [2, -3, 5])
def test_bad_per_channel_axis_is_a_spec_error(axis: int) -> None:
    x, gran = torch.randn(4, 6), PerChannel(axis)
    with pytest.raises(SpecError, match=f"axis={axis}.*2-d"):
        qparam_shape(x.shape, gran)
    with pytest.raises(SpecError, match=f"axis={axis}"):
        minmax(x, gran)
    with pytest.raises(SpecError, match=f"axis={axis}"):
        quantize(x, torch.ones(4), torch.zeros(4), QDtype(8), gran)
    with pytest.raises(SpecError, match=f"axis={axis}"):
        fake_quantize(x, torch.ones(4), torch.zeros(4), QDtype(8), gran)


def test_per_group_on_a_vector_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="per_group needs a weight with at least 2 dims"):
        minmax(torch.randn(10), PerGroup(4))
    with pytest.raises(SpecError, match="per_group"):
        quantize(torch.randn(10), torch.ones(3), torch.zeros(3), QDtype(8), PerGroup(4))


# ---------------------------------------------------------------------------- SQNR claims


def _sqnr(w: torch.Tensor, dtype: QDtype, gran: Granularity, symmetric: bool = True) -> float:
    scale, zero = qparams_for(w, dtype, symmetric, gran)
    return sqnr_db(w, fake_quantize(w, scale, zero, dtype, gran))


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    return torch.randn(64, 256, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_per_channel_on_gaussian_weights_beats_35_db(
    weight: torch.Tensor, symmetric: bool
) -> None:
    assert _sqnr(weight, QDtype(8), PerChannel(0), symmetric) > 35.0
    assert _sqnr(weight, QDtype(8, False), PerChannel(0), symmetric) > 35.0


@pytest.mark.parametrize("gran", [PerTensor(), PerChannel(0), PerChannel(1), PerGroup(32)], ids=str)
@pytest.mark.parametrize("signed", [True, False])
def test_more_bits_give_strictly_higher_sqnr(
    weight: torch.Tensor, gran: Granularity, signed: bool
) -> None:
    db = [_sqnr(weight, QDtype(bits, signed), gran, symmetric=False) for bits in range(2, 9)]
    db.append(_sqnr(weight, QDtype(16, signed), gran, symmetric=False))
    assert all(a < b for a, b in zip(db, db[1:], strict=False)), db
    # about 6 dB per bit between 4 and 8 bits
    assert 4 * 5.0 < db[6] - db[2] < 4 * 7.0, db


@pytest.mark.parametrize("bits", [4, 8])
def test_per_channel_beats_per_tensor_when_channel_scales_differ(
    weight: torch.Tensor, bits: int
) -> None:
    w = weight * torch.logspace(-3, 1, 64).view(64, 1)  # (out, in): channel scales 1e-3 .. 10
    per_tensor = _sqnr(w, QDtype(bits), PerTensor())
    per_channel = _sqnr(w, QDtype(bits), PerChannel(0))
    assert per_channel >= per_tensor + 3.0


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_group_32_beats_per_channel_at_4_bits(weight: torch.Tensor, symmetric: bool) -> None:
    per_channel = _sqnr(weight, QDtype(4), PerChannel(0), symmetric)
    per_group = _sqnr(weight, QDtype(4), PerGroup(32), symmetric)
    assert per_group >= per_channel
