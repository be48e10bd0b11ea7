"""Observers: shapes over specs, input checks, and relative claims about their ranges."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.observers import (
    OBSERVERS,
    EntropyObserver,
    MeanStdObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
)
from lowbit.primitives import fake_quantize, minmax, qparam_shape
from lowbit.report.metrics import sqnr_db
from lowbit.spec import OBSERVER_NAMES, PerChannel, QuantSpec, SpecError

# granularity string with a tensor shape it applies to
GRAN_SHAPES = [
    ("per_tensor", (5, 8)),
    ("per_channel:0", (6, 10)),
    ("per_channel:1", (2, 5, 3, 3)),  # activations (N, C, H, W)
    ("per_group:8", (4, 32)),  # divides the row
    ("per_group:8", (4, 30)),  # short last group
]
DTYPES = [
    ("int2", True),
    ("int4", False),
    ("int8", True),
    ("uint4", True),
    ("uint8", False),
    ("int16", False),
]


def applicable(name: str) -> list[tuple[str, tuple[int, ...]]]:
    return GRAN_SHAPES[:1] if name == "entropy" else GRAN_SHAPES


SHAPE_CASES = [
    pytest.param(name, gran, shape, dtype, sym, id=f"{name}-{gran}-{shape}-{dtype}-{sym}")
    for name in OBSERVER_NAMES
    for gran, shape in applicable(name)
    for dtype, sym in DTYPES
]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fq_sqnr(x: torch.Tensor, obs: Observer, on: torch.Tensor | None = None) -> float:
    """SQNR of fake-quantizing ``x`` with the observer's qparams, measured on mask ``on``."""
    scale, zero = obs.qparams()
    y = fake_quantize(x, scale, zero, obs.spec.qdtype, obs.spec.gran)
    return sqnr_db(x, y) if on is None else sqnr_db(x[on], y[on])


# ---------------------------------------------------------------------------- every observer


@pytest.mark.parametrize(("name", "gran", "shape", "dtype", "symmetric"), SHAPE_CASES)
def test_qparams_have_the_granularity_shape_and_lie_on_the_grid(
    name: str, gran: str, shape: tuple[int, ...], dtype: str, symmetric: bool
) -> None:
    spec = QuantSpec(dtype, gran, symmetric=symmetric, observer=name)
    obs = make_observer(spec)
    assert isinstance(obs, OBSERVERS[name])
    for seed in (0, 1):
        x = torch.randn(shape, generator=gen(seed)) * (seed + 1) + 0.3
        assert obs(x) is x
    scale, zero = obs.qparams()
    expected = qparam_shape(shape, spec.gran)
    assert scale.shape == zero.shape == expected
    assert scale.dtype == torch.float32 and zero.dtype == torch.int32
    assert bool((scale > 0).all()) and bool(torch.isfinite(scale).all())
    assert spec.qdtype.qmin <= int(zero.min()) and int(zero.max()) <= spec.qdtype.qmax
    lo, hi = obs.bounds()
    assert lo.shape == hi.shape == expected
    assert bool((lo <= hi).all())
    y = fake_quantize(x, scale, zero, spec.qdtype, spec.gran)
    assert y.shape == x.shape and bool(torch.isfinite(y).all())


@pytest.mark.parametrize("name", OBSERVER_NAMES)
def test_forward_returns_its_input_untouched(name: str) -> None:
    obs = make_observer(QuantSpec("int4", observer=name))
    x = torch.randn(3, 7, generator=gen(), requires_grad=True)
    before = x.detach().clone()
    y = obs(x)
    assert y is x and torch.equal(x.detach(), before)
    y.sum().backward()  # recording statistics did not cut the graph
    assert x.grad is not None and torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("name", OBSERVER_NAMES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_raises_value_error_naming_it(name: str, bad: float) -> None:
    obs = make_observer(QuantSpec("int8", observer=name))
    x = torch.randn(4, 4)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        obs(x)
    with pytest.raises(RuntimeError):
        obs.qparams()  # the bad batch was not recorded


@pytest.mark.parametrize("name", OBSERVER_NAMES)
def test_qparams_before_any_data_raise_runtime_error(name: str) -> None:
    obs = make_observer(QuantSpec("int8", observer=name))
    with pytest.raises(RuntimeError, match="seen no data.*calibrat"):
        obs.qparams()


@pytest.mark.parametrize("name", ["minmax", "moving_average", "percentile", "mse", "meanstd"])
def test_a_changing_channel_count_is_rejected(name: str) -> None:
    obs = make_observer(QuantSpec("int8", "per_channel:1", observer=name))
    obs(torch.randn(2, 4))
    with pytest.raises(ValueError, match="shape changed"):
        obs(torch.randn(2, 5))


@pytest.mark.parametrize("gran", ["per_channel", "per_channel:1", "per_group:16"])
def test_entropy_is_per_tensor_only(gran: str) -> None:
    spec = QuantSpec("int8", gran, observer="entropy")
    with pytest.raises(SpecError, match="per_tensor only"):
        make_observer(spec)
    with pytest.raises(SpecError, match="per_tensor only"):
        EntropyObserver(spec)


# ---------------------------------------------------------------------------- make_observer


@pytest.mark.parametrize(
    ("name", "args", "cls", "attr", "value"),
    [
        ("minmax", {}, MinMaxObserver, "batches", 0),
        ("moving_average", {"averaging_constant": 0.2}, MovingAverageMinMaxObserver, "c", 0.2),
        ("percentile", {"percentile": 99.0}, PercentileObserver, "percentile", 99.0),
        ("mse", {"num_candidates": 5}, MSEObserver, "ratios", None),
        ("entropy", {"bins": 512}, EntropyObserver, "bins", 512),
        ("meanstd", {"k": 2.5}, MeanStdObserver, "k", 2.5),
    ],
)
def test_make_observer_picks_the_class_by_name_and_passes_args(
    name: str, args: dict[str, object], cls: type, attr: str, value: object
) -> None:
    assert set(OBSERVERS) == set(OBSERVER_NAMES)
    obs = make_observer(QuantSpec("int8", observer=name, observer_args=args))
    assert type(obs) is cls and OBSERVERS[name] is cls
    if value is not None:
        assert getattr(obs, attr) == value
    else:
        assert len(obs.ratios) == 5  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", OBSERVER_NAMES)
def test_unknown_observer_args_raise_spec_error(name: str) -> None:
    spec = QuantSpec("int8", observer=name, observer_args={"no_such_arg": 1})
    with pytest.raises(SpecError, match="no_such_arg"):
        make_observer(spec)


@pytest.mark.parametrize(
    ("name", "args", "pattern"),
    [
        ("moving_average", {"averaging_constant": 0.0}, "averaging_constant"),
        ("moving_average", {"averaging_constant": 1.5}, "averaging_constant"),
        ("percentile", {"percentile": 0.0}, "percentile"),
        ("percentile", {"percentile": 101.0}, "percentile"),
        ("percentile", {"percentile": 10.0}, "percentile"),  # below 50 inverts the range
        ("mse", {"num_candidates": 0}, "num_candidates"),
        ("mse", {"min_ratio": 0.0}, "min_ratio"),
        ("meanstd", {"k": 0.0}, "k=0"),
        ("meanstd", {"k": -1.0}, "k=-1"),
    ],
)
def test_bad_observer_arg_values_raise_spec_error(
    name: str, args: dict[str, object], pattern: str
) -> None:
    with pytest.raises(SpecError, match=pattern):
        make_observer(QuantSpec("int8", observer=name, observer_args=args))


def test_minmax_observer_direct_unknown_kwarg_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="unknown observer_args"):
        MinMaxObserver(QuantSpec(), percentile=3)


# ---------------------------------------------------------------------------- min-max and EMA


def test_minmax_tracks_the_running_extremes_per_channel() -> None:
    spec = QuantSpec("int8", "per_channel:1")
    obs = MinMaxObserver(spec)
    batches = [torch.randn(n, 3, 4, generator=gen(n)) * n for n in (1, 5, 2)]
    for b in batches:
        obs(b)
    lo, hi = minmax(torch.cat(batches), PerChannel(1))
    assert torch.equal(obs.bounds()[0], lo) and torch.equal(obs.bounds()[1], hi)


@pytest.mark.parametrize(("gran", "shape"), [("per_tensor", (8,)), ("per_channel:0", (3, 8))])
def test_moving_average_follows_the_ema_formula(gran: str, shape: tuple[int, ...]) -> None:
    c = 0.3
    obs = MovingAverageMinMaxObserver(QuantSpec("int8", gran), averaging_constant=c)
    granularity = QuantSpec(granularity=gran).gran
    exp_lo = exp_hi = None
    for i in range(6):
        x = torch.randn(shape, generator=gen(i)) * (i + 1)
        obs(x)
        lo, hi = minmax(x, granularity)
        if exp_lo is None or exp_hi is None:
            exp_lo, exp_hi = lo, hi  # the first batch sets the range
        else:
            exp_lo = (1 - c) * exp_lo + c * lo
            exp_hi = (1 - c) * exp_hi + c * hi
    got_lo, got_hi = obs.bounds()
    assert exp_lo is not None and exp_hi is not None
    torch.testing.assert_close(got_lo, exp_lo, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_hi, exp_hi, rtol=1e-6, atol=1e-6)


def test_moving_average_with_constant_one_is_the_last_batch() -> None:
    obs = MovingAverageMinMaxObserver(QuantSpec("int8"), averaging_constant=1.0)
    obs(torch.tensor([-9.0, 9.0]))
    obs(torch.tensor([-1.0, 2.0]))
    assert [t.item() for t in obs.bounds()] == [-1.0, 2.0]


# ---------------------------------------------------------------------------- clipping observers


def gaussian_with_outliers(n: int = 5_000, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, generator=gen(seed))
    x[:5] = torch.tensor([25.0, -30.0, 22.0, 28.0, -26.0])
    return x


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_beats_minmax_at_4_bits_with_outliers(symmetric: bool) -> None:
    x = gaussian_with_outliers()
    spec = QuantSpec("int4", symmetric=symmetric)
    mse, mm = MSEObserver(spec), MinMaxObserver(spec)
    mse(x)
    mm(x)
    assert fq_sqnr(x, mse) > fq_sqnr(x, mm) + 1.0
    assert mse.bounds()[1] < mm.bounds()[1]


def test_mse_per_channel_is_never_worse_than_minmax_on_any_channel() -> None:
    w = torch.randn(8, 200, generator=gen(4)) * torch.logspace(-2, 1, 8).view(8, 1)
    w[::3, 0] *= 20  # outliers in some channels only
    spec = QuantSpec("int4", "per_channel")
    mse, mm = MSEObserver(spec), MinMaxObserver(spec)
    mse(w)
    mm(w)
    for c in range(8):
        err_mse = (fake_quantize(w, *mse.qparams(), spec.qdtype, spec.gran) - w)[c].pow(2).sum()
        err_mm = (fake_quantize(w, *mm.qparams(), spec.qdtype, spec.gran) - w)[c].pow(2).sum()
        assert err_mse <= err_mm * (1 + 1e-6)


def test_mse_per_group_with_a_short_last_group() -> None:
    w = torch.randn(4, 70, generator=gen(6))
    spec = QuantSpec("int3", "per_group:32")
    mse, mm = MSEObserver(spec), MinMaxObserver(spec)
    mse(w)
    mm(w)
    assert mse.qparams()[0].shape == (4, 3)
    assert fq_sqnr(w, mse) >= fq_sqnr(w, mm)


@pytest.mark.parametrize("gran", ["per_tensor", "per_channel"])
def test_percentile_clips_outliers(gran: str) -> None:
    x = torch.stack([gaussian_with_outliers(seed=s) for s in range(3)])  # (3, n)
    obs = PercentileObserver(QuantSpec("int8", gran), percentile=99.9)
    obs(x)
    lo, hi = obs.bounds()
    seen_lo, seen_hi = minmax(x, QuantSpec(granularity=gran).gran)
    assert bool((hi < seen_hi / 5).all()) and bool((lo > seen_lo / 5).all())
    assert bool((hi > 2.0).all()) and bool((lo < -2.0).all())  # still covers the bulk


def test_percentile_100_is_the_observed_range() -> None:
    x = gaussian_with_outliers()
    obs = PercentileObserver(QuantSpec("int8"), percentile=100.0)
    obs(x)
    assert [t.item() for t in obs.bounds()] == [x.min().item(), x.max().item()]


def test_percentile_per_group_ignores_the_padding_of_a_short_last_group() -> None:
    x = torch.arange(1.0, 21.0).reshape(2, 10)  # all positive; last group holds 2 values
    obs = PercentileObserver(QuantSpec("uint8", "per_group:4", symmetric=False), percentile=100.0)
    obs(x)
    lo, hi = obs.bounds()
    assert lo.tolist() == [[1.0, 5.0, 9.0], [11.0, 15.0, 19.0]]
    assert hi.tolist() == [[4.0, 8.0, 10.0], [14.0, 18.0, 20.0]]


def heavy_tailed(n: int = 20_000, seed: int = 0) -> torch.Tensor:
    """Student-t with 2 degrees of freedom: a Gaussian bulk with far outliers."""
    g = gen(seed)
    z = torch.randn(n, generator=g)
    chi2 = torch.randn(n, 2, generator=g).pow(2).sum(dim=1)
    return z / (chi2 / 2).sqrt()


def test_entropy_clips_heavy_tails_and_resolves_the_bulk_better_than_minmax() -> None:
    x = heavy_tailed()
    spec = QuantSpec("int8")
    ent, mm = EntropyObserver(spec), MinMaxObserver(spec)
    for part in x.chunk(4):  # several batches exercise the histogram re-binning
        ent(part)
        mm(part)
    amax = x.abs().max().item()
    lo, hi = (t.item() for t in ent.bounds())
    assert hi < amax / 2 and lo == -hi
    bulk = x.abs() <= torch.quantile(x.abs(), 0.99)
    assert fq_sqnr(x, ent, on=bulk) > fq_sqnr(x, mm, on=bulk) + 6.0


def test_entropy_on_non_negative_data_keeps_zero_as_the_lower_bound() -> None:
    x = heavy_tailed().abs()
    obs = EntropyObserver(QuantSpec("uint8", symmetric=False), bins=512)
    obs(x)
    lo, hi = obs.bounds()
    assert lo.item() == 0.0 and 0.0 < hi.item() < x.max().item()


@pytest.mark.parametrize("dtype", ["int2", "int4", "int12", "int16", "uint12"])
def test_entropy_gives_a_range_for_any_bit_width(dtype: str) -> None:
    obs = EntropyObserver(QuantSpec(dtype, symmetric=False))
    x = heavy_tailed(5_000)
    obs(x)
    lo, hi = obs.bounds()
    assert 0.0 < hi.item() <= x.abs().max().item() * (1 + 1e-6)
    assert obs.qparams()[0].item() > 0


# ---------------------------------------------------------------------------- mean ± k·std


def reference_meanstd(data: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """mean ± k·std (population) of each row of ``data``, clipped to the row's range."""
    mean, std = data.double().mean(dim=1), data.double().std(dim=1, correction=0)
    lo = torch.maximum((mean - k * std).float(), data.min(dim=1).values)
    hi = torch.minimum((mean + k * std).float(), data.max(dim=1).values)
    return lo, hi


@pytest.mark.parametrize("k", [0.5, 1.0, 3.0])
def test_meanstd_is_mean_plus_minus_k_std_clipped_to_the_observed_range(k: float) -> None:
    batches = [torch.randn(4, 50, generator=gen(i)) * torch.tensor([[0.1], [1], [3], [9]])
               + torch.tensor([[0.0], [2.0], [-1.0], [5.0]]) for i in range(3)]  # fmt: skip
    obs = MeanStdObserver(QuantSpec("int8", "per_channel"), k=k)
    for b in batches:
        obs(b)
    lo, hi = obs.bounds()
    exp_lo, exp_hi = reference_meanstd(torch.cat(batches, dim=1), k)  # (4, 150) rows
    torch.testing.assert_close(lo, exp_lo, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hi, exp_hi, rtol=1e-5, atol=1e-5)


def test_meanstd_with_a_large_k_is_the_observed_range() -> None:
    x = torch.randn(1000, generator=gen(2))
    obs = MeanStdObserver(QuantSpec("int8"), k=100.0)
    obs(x)
    assert [t.item() for t in obs.bounds()] == [x.min().item(), x.max().item()]


def test_meanstd_per_group_counts_only_real_values_of_a_short_last_group() -> None:
    x = torch.randn(3, 21, generator=gen(8)) + 4.0  # groups of 8, 8, 5; far from zero
    obs = MeanStdObserver(QuantSpec("int8", "per_group:8"), k=1.0)
    obs(x)
    lo, hi = obs.bounds()
    for g, cols in enumerate([slice(0, 8), slice(8, 16), slice(16, 21)]):
        exp_lo, exp_hi = reference_meanstd(x[:, cols], 1.0)
        torch.testing.assert_close(lo[:, g], exp_lo, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hi[:, g], exp_hi, rtol=1e-5, atol=1e-5)


def test_observers_built_from_one_spec_share_no_state() -> None:
    # the same spec object builds independent observers: no state is shared between them
    spec = QuantSpec("int8", observer="minmax")
    a, b = make_observer(spec), make_observer(spec)
    a(torch.tensor([-1.0, 1.0]))
    b(torch.tensor([-5.0, 5.0]))
    assert a.bounds()[1].item() == 1.0 and b.bounds()[1].item() == 5.0
