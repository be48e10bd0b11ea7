"""What to quantize to: integer dtypes, granularities and the QuantSpec that joins them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "QDtype",
    "PerTensor",
    "PerChannel",
    "PerGroup",
    "PerToken",
    "Granularity",
    "QuantSpec",
    "SpecError",
    "parse_granularity",
    "OBSERVER_NAMES",
    "ROUNDING_MODES",
]

OBSERVER_NAMES = ("minmax", "moving_average", "percentile", "mse", "entropy", "meanstd")
ROUNDING_MODES = ("nearest", "stochastic")
_MIN_BITS, _MAX_BITS = 1, 16


class SpecError(ValueError):
    """A quantization spec or recipe that cannot work; the message says which field and the fix."""


@dataclass(frozen=True)
class QDtype:
    """An integer grid: ``bits`` wide, signed (two's complement range) or unsigned.

    ``narrow=True`` drops the lowest value so the grid is symmetric around its centre
    (int8 in [-127, 127], uint8 in [1, 255] around 128), as several runtimes expect of weights.

    >>> QDtype.parse("int4").qmin, QDtype.parse("int4").qmax
    (-8, 7)
    >>> QDtype(8, narrow=True).qmin
    -127
    >>> str(QDtype(8, signed=False))
    'uint8'
    """

    bits: int
    signed: bool = True
    narrow: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise SpecError(
                f"bits={self.bits!r} must be a whole number of bits such as 4 or 8 "
                "(in YAML write bits: 4, without quotes; true/false and 4.0 are not bit counts)"
            )
        if not _MIN_BITS <= self.bits <= _MAX_BITS:
            raise SpecError(
                f"bits={self.bits!r} is out of range: lowbit supports {_MIN_BITS} to {_MAX_BITS} "
                "bits (2..8 for weights and activations, 16 for high-precision layers)"
            )
        if self.narrow and self.bits < 2:
            raise SpecError("a narrow range needs at least 2 bits: use narrow_range: false")

    @property
    def binary(self) -> bool:
        """The 1-bit signed grid ``{-1, +1}`` (``"binary"``: sign times a scale, as in
        BinaryConnect / XNOR-Net); it has no zero, so it is symmetric only.

        >>> QDtype.parse("binary").binary, QDtype.parse("binary").qmin, QDtype.parse("binary").qmax
        (True, -1, 1)
        """
        return self.signed and self.bits == 1

    @property
    def qmin(self) -> int:
        """Smallest integer on the grid."""
        lowest = -(1 << (self.bits - 1)) if self.signed else 0
        return lowest + 1 if self.narrow else lowest

    @property
    def qmax(self) -> int:
        """Largest integer on the grid."""
        if self.binary:
            return 1
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def storage_bits(self) -> int:
        """Bits one value takes when packed on disk (1, 2, 4, 8 or 16)."""
        for width in (1, 2, 4, 8, 16):
            if self.bits <= width:
                return width
        raise AssertionError("unreachable: bits validated in __post_init__")

    def __str__(self) -> str:
        if self.binary:
            return "binary"
        return f"{'int' if self.signed else 'uint'}{self.bits}"

    @classmethod
    def parse(cls, name: str | QDtype) -> QDtype:
        """Parse ``"int4"``, ``"uint8"``, ... into a QDtype.

        >>> QDtype.parse("uint2")
        QDtype(bits=2, signed=False, narrow=False)
        """
        if isinstance(name, QDtype):
            return name
        if str(name).strip().lower() in ("binary", "int1"):
            return cls(1, signed=True)
        match = re.fullmatch(r"(u?)int(\d+)", str(name).strip().lower())
        if match is None:
            raise SpecError(
                f"unknown dtype {name!r}: write binary, int2..int8, int16 or uint1..uint8, uint16"
            )
        return cls(int(match.group(2)), signed=match.group(1) == "")


@dataclass(frozen=True)
class PerTensor:
    """One scale and zero point for the whole tensor."""

    kind: Literal["per_tensor"] = field(default="per_tensor", init=False)


@dataclass(frozen=True)
class PerChannel:
    """One scale and zero point per index along ``axis`` (0: output channels of a weight)."""

    axis: int = 0
    kind: Literal["per_channel"] = field(default="per_channel", init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.axis, int) or isinstance(self.axis, bool):
            raise SpecError(
                f"per_channel axis={self.axis!r} must be an integer "
                "(0 = output channels of a weight, 1 = channels of an activation)"
            )


@dataclass(frozen=True)
class PerGroup:
    """One scale per ``group_size`` consecutive inputs of each output row (weights only).

    A weight is viewed as (out, in*kh*kw); a row that is not a multiple of ``group_size``
    gets a shorter last group.
    """

    group_size: int = 128
    kind: Literal["per_group"] = field(default="per_group", init=False)

    def __post_init__(self) -> None:
        if (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int)
            or self.group_size < 1
        ):
            raise SpecError(
                f"group_size={self.group_size!r} must be a positive integer (typical: 32, 64, 128)"
            )


@dataclass(frozen=True)
class PerToken:
    """One scale and zero point per row of an activation: every index of all dimensions but
    the last (a token of a (batch, seq, hidden) input). Dynamic activations only.
    """

    kind: Literal["per_token"] = field(default="per_token", init=False)


Granularity = PerTensor | PerChannel | PerGroup | PerToken
_GRANULARITIES = (PerTensor, PerChannel, PerGroup, PerToken)


def parse_granularity(value: str | dict[str, Any] | Granularity) -> Granularity:
    """Build a granularity from ``"per_tensor"``, ``"per_channel"``, ``"per_group:64"``,
    ``"per_token"`` or a dict.

    >>> parse_granularity("per_group:64")
    PerGroup(group_size=64, kind='per_group')
    >>> parse_granularity({"kind": "per_channel", "axis": 1})
    PerChannel(axis=1, kind='per_channel')
    """
    if isinstance(value, _GRANULARITIES):
        return value
    if isinstance(value, str):
        kind, _, arg = value.partition(":")
        args: dict[str, Any] = {}
        if arg:
            key = "group_size" if kind == "per_group" else "axis"
            try:
                args = {key: int(arg)}
            except ValueError:
                raise SpecError(
                    f"granularity {value!r}: {key} {arg!r} is not an integer; "
                    "write per_channel:AXIS or per_group:SIZE, e.g. per_group:64"
                ) from None
        value = {"kind": kind, **args}
    if not isinstance(value, dict):
        raise SpecError(
            f"granularity {value!r}: write per_tensor, per_channel, per_group:SIZE or per_token"
        )
    args = dict(value)
    kind = args.pop("kind", None)
    classes: dict[str, type] = {
        "per_tensor": PerTensor,
        "per_channel": PerChannel,
        "per_group": PerGroup,
        "per_token": PerToken,
    }
    if kind not in classes:
        raise SpecError(f"granularity kind {kind!r} is unknown: use one of {', '.join(classes)}")
    allowed = {
        "per_tensor": set(),
        "per_channel": {"axis"},
        "per_group": {"group_size"},
        "per_token": set(),
    }[kind]
    unknown = set(args) - allowed
    if unknown:
        raise SpecError(
            f"granularity {kind}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}"
        )
    result: Granularity = classes[kind](**args)
    return result


def _normalise_args(args: Any) -> tuple[tuple[str, Any], ...]:
    """Observer arguments as a sorted tuple of (name, value) pairs, whatever order they came in."""
    try:
        pairs = dict(args)
    except (TypeError, ValueError):
        raise SpecError(
            f"observer_args={args!r} must be a mapping of argument names to values, "
            "e.g. {'percentile': 99.9}"
        ) from None
    if not all(isinstance(name, str) for name in pairs):
        raise SpecError(f"observer_args={args!r}: argument names must be strings")
    return tuple(sorted(pairs.items()))


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    ``dynamic=True`` computes the range from each batch at run time (activations only);
    ``observer`` names the range estimator used during calibration; ``narrow_range=True``
    keeps a symmetric grid off its lowest value (int8 in [-127, 127]).

    >>> spec = QuantSpec(dtype="int4", granularity="per_group:32")
    >>> spec.dtype.bits, spec.granularity.group_size
    (4, 32)
    """

    dtype: QDtype | str = "int8"
    granularity: Granularity | str = "per_tensor"
    symmetric: bool = True
    dynamic: bool = False
    observer: str = "minmax"
    observer_args: tuple[tuple[str, Any], ...] = ()
    rounding: str = "nearest"
    narrow_range: bool = False

    def __post_init__(self) -> None:
        dtype = QDtype.parse(self.dtype)
        if not isinstance(self.narrow_range, bool):
            raise SpecError(
                f"narrow_range={self.narrow_range!r} must be True or False "
                "(in YAML write true / false without quotes)"
            )
        narrow = self.narrow_range or dtype.narrow
        object.__setattr__(self, "narrow_range", narrow)
        object.__setattr__(self, "dtype", QDtype(dtype.bits, dtype.signed, narrow))
        object.__setattr__(self, "granularity", parse_granularity(self.granularity))
        object.__setattr__(self, "observer_args", _normalise_args(self.observer_args))
        for name in ("symmetric", "dynamic"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(
                    f"{name}={getattr(self, name)!r} must be True or False "
                    "(in YAML write true / false without quotes)"
                )
        if self.observer not in OBSERVER_NAMES:
            raise SpecError(
                f"observer={self.observer!r} is unknown: use one of {', '.join(OBSERVER_NAMES)}"
            )
        if self.rounding not in ROUNDING_MODES:
            raise SpecError(
                f"rounding={self.rounding!r} is unknown: use one of {', '.join(ROUNDING_MODES)}"
            )
        if self.dynamic and isinstance(self.granularity, PerGroup):
            raise SpecError(
                "dynamic quantization with per_group granularity is not supported: use "
                "per_tensor, per_token or per_channel for dynamic activations"
            )
        if isinstance(self.granularity, PerToken) and not self.dynamic:
            raise SpecError(
                "per_token scales follow each input row, so they are computed at run time: "
                "set dynamic: true (or use per_tensor for a calibrated static input)"
            )
        if dtype.binary and (not self.symmetric or self.rounding != "nearest"):
            raise SpecError(
                "binary ({-1, +1} times a scale) has no zero to offset and rounds by sign: "
                "set symmetric: true and rounding: nearest"
            )
        if self.narrow_range and not self.symmetric:
            raise SpecError(
                "narrow_range is for symmetric grids: set symmetric: true or narrow_range: false"
            )

    @property
    def qdtype(self) -> QDtype:
        """The dtype, typed (``dtype`` is always a QDtype after construction)."""
        assert isinstance(self.dtype, QDtype)
        return self.dtype

    @property
    def gran(self) -> Granularity:
        """The granularity, typed (always a Granularity object after construction)."""
        assert isinstance(self.granularity, _GRANULARITIES)
        return self.granularity

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that :meth:`from_dict` reads back (used by YAML recipes and file headers).

        >>> QuantSpec.from_dict(QuantSpec("uint8", symmetric=False).to_dict()).dtype
        QDtype(bits=8, signed=False, narrow=False)
        """
        gran = self.gran
        if isinstance(gran, PerChannel):
            gran_str = f"per_channel:{gran.axis}"
        elif isinstance(gran, PerGroup):
            gran_str = f"per_group:{gran.group_size}"
        else:
            gran_str = gran.kind
        out: dict[str, Any] = {
            "dtype": str(self.qdtype),
            "granularity": gran_str,
            "symmetric": self.symmetric,
            "dynamic": self.dynamic,
            "observer": self.observer,
            "rounding": self.rounding,
        }
        if self.observer_args:
            out["observer_args"] = dict(self.observer_args)
        if self.narrow_range:
            out["narrow_range"] = True
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "spec") -> QuantSpec:
        """Build a spec from a dict, rejecting unknown keys with a message naming ``where``.

        >>> QuantSpec.from_dict({"dtype": "int8", "granularity": "per_channel"}).granularity
        PerChannel(axis=0, kind='per_channel')
        """
        if not isinstance(data, dict):
            raise SpecError(f"{where}: expected a mapping of spec fields, got {data!r}")
        known = {
            "dtype",
            "granularity",
            "symmetric",
            "dynamic",
            "observer",
            "observer_args",
            "rounding",
            "narrow_range",
            "bits",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(
                f"{where}: unknown key(s) {unknown}; allowed keys: {sorted(known - {'bits'})}"
            )
        args = dict(data)
        try:
            if "bits" in args:
                bits = args.pop("bits")
                signed = QDtype.parse(args.get("dtype", "int8")).signed
                args["dtype"] = QDtype(bits, signed)
            return cls(**args)
        except SpecError as err:
            raise SpecError(f"{where}: {err}") from None
        except TypeError as err:
            raise SpecError(f"{where}: {err}") from None
