"""Range estimators: they watch tensors and turn what they saw into a scale and zero point.

``Observer.forward(x)`` records statistics and returns ``x`` unchanged;
``Observer.qparams()`` gives ``(scale, zero_point)`` shaped by the spec's granularity.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lowbit.primitives import _sign, blocks, choose_qparams, minmax, qparam_shape
from lowbit.spec import PerTensor, QuantSpec, SpecError

__all__ = [
    "Observer",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "PercentileObserver",
    "MSEObserver",
    "EntropyObserver",
    "MeanStdObserver",
    "OBSERVERS",
    "make_observer",
]


_MAX_SAMPLES = 1 << 24  # values kept per block by the sampling observers
_MAX_CANDIDATES = 1024  # clipping ratios the MSE observer tries
_MAX_BINS = 1 << 16  # histogram bins of the entropy observer (TensorRT uses 2048)


def _check_bound(name: str, value: Any, lo: int, hi: int) -> None:
    """An integer observer argument within ``[lo, hi]``: a recipe (or a file's) asking for
    a billion bins or candidates would allocate gigabytes or run for hours."""
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise SpecError(f"{name}={value!r} must be an integer in [{lo}, {hi}]")


class Observer(nn.Module):
    """Base class: subclasses implement :meth:`observe` and :meth:`bounds`."""

    def __init__(self, spec: QuantSpec, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            raise SpecError(
                f"{type(self).__name__}: unknown observer_args {sorted(kwargs)}; see its docstring"
            )
        self.spec = spec
        self.shape: tuple[int, ...] | None = None
        self.batches = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Record statistics of ``x`` and return it unchanged."""
        if not torch.isfinite(x.detach().sum(dtype=torch.float32)):  # NaN/Inf: one cheap pass
            raise ValueError(
                f"{type(self).__name__}: the observed tensor of shape {tuple(x.shape)} holds NaN "
                "or Inf; check the model's weights and the calibration data"
            )
        shape = qparam_shape(x.shape, self.spec.gran)
        if self.shape is not None and shape != self.shape:
            raise ValueError(
                f"{type(self).__name__}: qparams shape changed from {self.shape} to {shape}; "
                "per_channel activations need the same channel count in every batch"
            )
        self.shape = shape
        with torch.no_grad():
            self.observe(x.detach().float())
        self.batches += 1
        return x

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (min, max) range to cover, shaped like the qparams."""
        raise NotImplementedError

    # --- state: every statistic is a buffer; batches and shape ride along ---------------------
    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "batches"] = torch.tensor(self.batches, dtype=torch.int64)
        if self.shape is not None:
            destination[prefix + "shape"] = torch.tensor(self.shape, dtype=torch.int64)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        if not any(key.startswith(prefix) for key in state_dict):
            return  # no statistics given (a float model's state_dict): keep what it has
        own = {prefix + "batches", prefix + "shape"}
        batches, shape = state_dict.get(prefix + "batches"), state_dict.get(prefix + "shape")
        for key, value in ((prefix + "batches", batches), (prefix + "shape", shape)):
            if value is not None and (
                not isinstance(value, torch.Tensor) or value.is_floating_point()
            ):
                error_msgs.append(f"{key} must be an integer tensor")
                return
        if isinstance(batches, torch.Tensor):
            self.batches = int(batches)
        if isinstance(shape, torch.Tensor):
            self.shape = tuple(int(v) for v in shape.reshape(-1))
        for name in list(self._buffers):  # statistics take the saved shape (lazily shaped)
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor) and name not in self._non_persistent_buffers_set:
                mine = self._buffers[name]
                device = mine.device if mine is not None else value.device
                self._buffers[name] = torch.empty_like(value, device=device)
        super()._load_from_state_dict(
            {k: v for k, v in state_dict.items() if k not in own},
            prefix,
            local_metadata,
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,
        )

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point for what was observed.

        >>> obs = MinMaxObserver(QuantSpec("int8"))
        >>> _ = obs(torch.tensor([-1.0, 2.0]))
        >>> round(obs.qparams()[0].item() * 127, 4)
        2.0
        """
        if self.batches == 0:
            raise RuntimeError(
                f"{type(self).__name__} has seen no data: run calibration batches through the "
                "prepared model first (lowbit.calibrate(model, data))"
            )
        lo, hi = self.bounds()
        return choose_qparams(lo, hi, self.spec.qdtype, self.spec.symmetric)


class MinMaxObserver(Observer):
    """Running minimum and maximum over everything seen.

    >>> obs = MinMaxObserver(QuantSpec("uint8", symmetric=False))
    >>> _ = obs(torch.tensor([0.0, 1.0])); _ = obs(torch.tensor([3.0]))
    >>> [t.item() for t in obs.bounds()]
    [0.0, 3.0]
    """

    min_val: torch.Tensor
    max_val: torch.Tensor

    def __init__(self, spec: QuantSpec, **kwargs: Any) -> None:
        super().__init__(spec, **kwargs)
        self.register_buffer("min_val", torch.tensor(math.inf))
        self.register_buffer("max_val", torch.tensor(-math.inf))

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = minmax(x, self.spec.gran)
        self.min_val = torch.minimum(self.min_val, lo)
        self.max_val = torch.maximum(self.max_val, hi)

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of per-batch min and max (``averaging_constant``, 0.01).

    >>> obs = MovingAverageMinMaxObserver(QuantSpec("int8"), averaging_constant=0.5)
    >>> _ = obs(torch.tensor([-1.0, 1.0])); _ = obs(torch.tensor([-3.0, 3.0]))
    >>> [t.item() for t in obs.bounds()]
    [-2.0, 2.0]
    """

    def __init__(self, spec: QuantSpec, averaging_constant: float = 0.01) -> None:
        super().__init__(spec)
        if not 0.0 < averaging_constant <= 1.0:
            raise SpecError(f"averaging_constant={averaging_constant} must be in (0, 1]")
        self.c = averaging_constant

    def seed(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Start the average from a known range (a calibrated one), as one batch seen.

        >>> obs = MovingAverageMinMaxObserver(QuantSpec("int8"), averaging_constant=0.5)
        >>> obs.seed(torch.tensor(-1.0), torch.tensor(1.0)); _ = obs(torch.tensor([-3.0, 3.0]))
        >>> [t.item() for t in obs.bounds()]
        [-2.0, 2.0]
        """
        self.min_val, self.max_val = lo.detach().float().clone(), hi.detach().float().clone()
        self.shape = tuple(lo.shape)
        self.batches = max(self.batches, 1)

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = minmax(x, self.spec.gran)
        if self.batches == 0:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = self.min_val + self.c * (lo - self.min_val)
            self.max_val = self.max_val + self.c * (hi - self.max_val)


def _subsample(rows: torch.Tensor, limit: int, generator: torch.Generator) -> torch.Tensor:
    """Keep at most ``limit`` random columns of a (blocks, n) matrix."""
    if rows.shape[1] <= limit:
        return rows
    idx = torch.randperm(rows.shape[1], generator=generator)[:limit]
    return rows[:, idx]


class _SampleObserver(Observer):
    """Keeps a bounded random sample of each block's values (``max_samples`` per block)."""

    samples: torch.Tensor | None
    lo: torch.Tensor
    hi: torch.Tensor

    def __init__(self, spec: QuantSpec, max_samples: int = 1 << 16) -> None:
        super().__init__(spec)
        _check_bound("max_samples", max_samples, 1, _MAX_SAMPLES)
        self.max_samples = max_samples
        self.generator = torch.Generator().manual_seed(0)
        self.register_buffer("samples", None)
        self.register_buffer("lo", torch.tensor(math.inf))
        self.register_buffer("hi", torch.tensor(-math.inf))

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = minmax(x, self.spec.gran)
        self.lo = torch.minimum(self.lo, lo.reshape(-1))  # (blocks,)
        self.hi = torch.maximum(self.hi, hi.reshape(-1))
        rows = blocks(x, self.spec.gran, pad=math.nan)  # (blocks, n); nan marks padding
        rows = _subsample(rows, self.max_samples, self.generator)
        merged = rows if self.samples is None else torch.cat([self.samples, rows], dim=1)
        self.samples = _subsample(merged, self.max_samples, self.generator)

    def _shaped(self, t: torch.Tensor) -> torch.Tensor:
        assert self.shape is not None
        return t.reshape(self.shape)


class PercentileObserver(_SampleObserver):
    """Clips to the ``percentile`` (99.99 by default) and its mirror (0.01) of values, per block.

    >>> obs = PercentileObserver(QuantSpec("int8"), percentile=75.0)
    >>> _ = obs(torch.arange(-100.0, 101.0))
    >>> [t.item() for t in obs.bounds()]
    [-50.0, 50.0]
    """

    def __init__(self, spec: QuantSpec, percentile: float = 99.99, max_samples: int = 1 << 16):
        super().__init__(spec, max_samples)
        if not 50.0 < percentile <= 100.0:
            raise SpecError(
                f"percentile={percentile} must be in (50, 100]: it is the upper clip point, "
                "the lower one mirrors it (e.g. 99.99 clips below 0.01)"
            )
        self.percentile = percentile

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.samples is not None
        q = self.percentile / 100.0
        hi = torch.nanquantile(self.samples, q, dim=1)  # nan: padding of a short group
        lo = torch.nanquantile(self.samples, 1.0 - q, dim=1)
        # a block whose sample kept only padding falls back to its observed range
        hi, lo = torch.where(hi.isnan(), self.hi, hi), torch.where(lo.isnan(), self.lo, lo)
        return self._shaped(lo), self._shaped(hi)


class MSEObserver(_SampleObserver):
    """Searches clipping ratios of the min-max range for the least squared error, per block.

    ``num_candidates`` ratios evenly spaced in [``min_ratio``, 1], then as many again in the
    interval around each block's best (``refine``): finer than one grid of twice the size at
    half its cost, which is what made int4 per-group weights of large layers slow to observe.

    >>> x = torch.cat([torch.randn(10000), torch.tensor([40.0])])
    >>> obs = MSEObserver(QuantSpec("int4"))
    >>> _ = obs(x)
    >>> obs.bounds()[1].item() < 40.0
    True
    """

    def __init__(
        self,
        spec: QuantSpec,
        num_candidates: int = 24,
        min_ratio: float = 0.2,
        max_samples: int = 1 << 14,
        refine: bool = True,
    ) -> None:
        super().__init__(spec, max_samples)
        if num_candidates < 1 or not 0.0 < min_ratio <= 1.0:
            raise SpecError("MSEObserver: num_candidates >= 1 and min_ratio in (0, 1] required")
        _check_bound("num_candidates", num_candidates, 1, _MAX_CANDIDATES)
        self.ratios = torch.linspace(min_ratio, 1.0, num_candidates)
        self.refine = refine

    def _error(
        self, rows: torch.Tensor, ratio: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
    ) -> torch.Tensor:
        """Squared error per block of fake-quantizing ``rows`` to ``[lo, hi] * ratio``."""
        dtype = self.spec.qdtype
        scale, zero = choose_qparams(lo * ratio, hi * ratio, dtype, self.spec.symmetric)
        s, z = scale.unsqueeze(1), zero.unsqueeze(1).float()  # (blocks, 1)
        q = torch.div(rows, s)
        q = (_sign(q) if dtype.binary else q.round_()).add_(z).clamp_(dtype.qmin, dtype.qmax)
        q.sub_(z).mul_(s).sub_(rows)  # (blocks, n): the error
        return q.square_().nansum(dim=1)  # nan: padding of a short group

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.samples is not None
        rows = self.samples  # (blocks, n)
        lo, hi = self.lo.clamp(max=0.0), self.hi.clamp(min=0.0)
        best_err = torch.full_like(lo, math.inf)
        best_ratio = torch.ones_like(lo)
        grids = [self.ratios.tolist()]
        for stage in range(2 if self.refine and len(self.ratios) > 1 else 1):
            if stage == 1:  # around each block's best, one coarse step either side
                step = float(self.ratios[1] - self.ratios[0])
                offsets = torch.linspace(-step, step, len(self.ratios) + 2)[1:-1]
                grids = [list(offsets.tolist())]
                centre = best_ratio.clone()
            for value in grids[0]:
                if stage == 0:
                    ratio = torch.full_like(lo, value)
                else:
                    ratio = (centre + value).clamp(float(self.ratios[0]), 1.0)
                err = self._error(rows, ratio, lo, hi)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_ratio = torch.where(better, ratio, best_ratio)
        best_lo, best_hi = lo * best_ratio, hi * best_ratio
        empty = rows.isnan().all(dim=1)  # a block whose sample kept only padding: no clipping
        best_lo, best_hi = torch.where(empty, lo, best_lo), torch.where(empty, hi, best_hi)
        return self._shaped(best_lo), self._shaped(best_hi)


class EntropyObserver(Observer):
    """KL-divergence calibration (TensorRT style) on a histogram of |x|; per-tensor only.

    >>> obs = EntropyObserver(QuantSpec("int8"))
    >>> _ = obs(torch.cat([torch.randn(100000), torch.tensor([60.0])]))
    >>> obs.bounds()[1].item() < 60.0
    True
    """

    hist: torch.Tensor
    amax_seen: torch.Tensor
    has_negative: torch.Tensor

    def __init__(self, spec: QuantSpec, bins: int = 2048) -> None:
        super().__init__(spec)
        if not isinstance(spec.gran, PerTensor):
            raise SpecError("the entropy observer is per_tensor only: use minmax or mse instead")
        _check_bound("bins", bins, 2, _MAX_BINS)
        self.bins = bins
        self.register_buffer("hist", torch.zeros(bins, dtype=torch.float64))
        self.register_buffer("amax_seen", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("has_negative", torch.tensor(False))

    def observe(self, x: torch.Tensor) -> None:
        mag = x.abs().flatten()
        self.has_negative = self.has_negative | (x < 0).any()
        old = self.amax
        amax = max(float(mag.max()), old, 1e-12)
        if amax > old and self.hist.sum() > 0:
            # re-bin the old histogram: move each old bin's count to the new bin of its centre
            centres = (torch.arange(self.bins, dtype=torch.float64) + 0.5) * old / self.bins
            idx = torch.clamp((centres / amax * self.bins).long(), max=self.bins - 1)
            self.hist = torch.zeros_like(self.hist).index_add_(0, idx, self.hist)
        self.amax_seen = torch.tensor(amax, dtype=torch.float64)
        self.hist += torch.histc(mag.double(), bins=self.bins, min=0.0, max=amax)

    @property
    def amax(self) -> float:
        """The largest magnitude seen so far (the histogram's upper edge)."""
        return float(self.amax_seen)

    def _kl(self, i: int, levels: int) -> float:
        ref = self.hist[:i].clone()
        ref[-1] += self.hist[i:].sum()
        chunks = torch.tensor_split(self.hist[:i], levels)
        expanded = []
        for chunk in chunks:
            nonzero = (chunk > 0).double()
            count = nonzero.sum()
            fill = chunk.sum() / count if count > 0 else 0.0
            expanded.append(nonzero * fill)
        q = torch.cat(expanded)
        p = ref / ref.sum()
        q = q / q.sum().clamp(min=1e-12)
        mask = p > 0
        q = torch.where(mask & (q == 0), torch.full_like(q, 1e-12), q)
        return float((p[mask] * torch.log(p[mask] / q[mask])).sum())

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.spec.qdtype
        negative = bool(self.has_negative)
        levels = 1 << (dtype.bits - 1) if negative else 1 << dtype.bits
        if levels >= self.bins:
            best = self.bins  # the grid is finer than the histogram: nothing to gain by clipping
        else:
            step = max(1, (self.bins - levels) // 128)
            candidates = range(levels, self.bins + 1, step)
            best = min(candidates, key=lambda i: self._kl(i, levels))
        threshold = torch.tensor(best * self.amax / self.bins, dtype=torch.float32)
        lo = -threshold if negative else torch.tensor(0.0)
        return lo, threshold


class MeanStdObserver(Observer):
    """Range ``mean ± k·std`` per block (``k`` = 3), never wider than what was seen.

    >>> obs = MeanStdObserver(QuantSpec("int8"), k=1.0)
    >>> _ = obs(torch.tensor([-1.0, 1.0, -1.0, 1.0]))
    >>> [round(t.item(), 3) for t in obs.bounds()]
    [-1.0, 1.0]
    """

    sum: torch.Tensor
    sumsq: torch.Tensor
    count: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor

    def __init__(self, spec: QuantSpec, k: float = 3.0) -> None:
        super().__init__(spec)
        if not 0 < k < math.inf:
            raise SpecError(f"k={k} must be a positive finite number (typical: 3)")
        self.k = k
        for name in ("sum", "sumsq", "count"):
            self.register_buffer(name, torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("lo", torch.tensor(math.inf))
        self.register_buffer("hi", torch.tensor(-math.inf))

    def observe(self, x: torch.Tensor) -> None:
        rows = blocks(x, self.spec.gran, pad=math.nan).double()  # (blocks, n); nan: padding
        self.sum = self.sum + rows.nansum(dim=1)
        self.sumsq = self.sumsq + rows.pow(2).nansum(dim=1)
        self.count = self.count + (~rows.isnan()).sum(dim=1)
        lo, hi = minmax(x, self.spec.gran)
        self.lo = torch.minimum(self.lo, lo.reshape(-1))  # (blocks,)
        self.hi = torch.maximum(self.hi, hi.reshape(-1))

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.shape is not None
        mean = self.sum / self.count
        std = (self.sumsq / self.count - mean.pow(2)).clamp(min=0.0).sqrt()
        lo = torch.maximum((mean - self.k * std).float(), self.lo)
        hi = torch.minimum((mean + self.k * std).float(), self.hi)
        return lo.reshape(self.shape), hi.reshape(self.shape)


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
    "meanstd": MeanStdObserver,
}


def make_observer(spec: QuantSpec) -> Observer:
    """The observer that ``spec.observer`` names, built with ``spec.observer_args``.

    >>> type(make_observer(QuantSpec("int8", observer="mse"))).__name__
    'MSEObserver'
    """
    try:
        cls = OBSERVERS[spec.observer]
    except KeyError:
        raise SpecError(
            f"observer {spec.observer!r} is unknown: use one of {list(OBSERVERS)}"
        ) from None
    try:
        return cls(spec, **dict(spec.observer_args))
    except TypeError as err:
        raise SpecError(f"observer {spec.observer!r}: bad observer_args ({err})") from None
