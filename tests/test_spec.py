"""QDtype, granularities and QuantSpec: parsing, validation messages, dict round trips."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.spec import (
    OBSERVER_NAMES,
    ROUNDING_MODES,
    PerChannel,
    PerGroup,
    PerTensor,
    QDtype,
    QuantSpec,
    SpecError,
    parse_granularity,
)

FAST = settings(max_examples=60, deadline=None)

# (name, bits, signed, qmin, qmax, storage_bits)
DTYPES = [
    ("int2", 2, True, -2, 1, 2),
    ("int3", 3, True, -4, 3, 4),
    ("int4", 4, True, -8, 7, 4),
    ("int5", 5, True, -16, 15, 8),
    ("int6", 6, True, -32, 31, 8),
    ("int7", 7, True, -64, 63, 8),
    ("int8", 8, True, -128, 127, 8),
    ("int16", 16, True, -32768, 32767, 16),
    ("uint1", 1, False, 0, 1, 1),
    ("uint2", 2, False, 0, 3, 2),
    ("uint3", 3, False, 0, 7, 4),
    ("uint4", 4, False, 0, 15, 4),
    ("uint5", 5, False, 0, 31, 8),
    ("uint8", 8, False, 0, 255, 8),
    ("uint16", 16, False, 0, 65535, 16),
]


# ---------------------------------------------------------------------------- QDtype


@pytest.mark.parametrize(("name", "bits", "signed", "qmin", "qmax", "storage"), DTYPES)
def test_qdtype_parse_and_properties(
    name: str, bits: int, signed: bool, qmin: int, qmax: int, storage: int
) -> None:
    dtype = QDtype.parse(name)
    assert dtype == QDtype(bits, signed)
    assert (dtype.qmin, dtype.qmax, dtype.storage_bits) == (qmin, qmax, storage)
    assert dtype.qmax - dtype.qmin + 1 == 2**bits
    assert str(dtype) == name
    assert QDtype.parse(str(dtype)) == dtype


def test_qdtype_parse_is_lenient_on_case_and_space_and_passes_qdtype_through() -> None:
    assert QDtype.parse(" INT4 ") == QDtype(4)
    dtype = QDtype(3, signed=False)
    assert QDtype.parse(dtype) is dtype


@pytest.mark.parametrize("bits", [0, 17, -1, 32])
def test_qdtype_bad_bits_name_the_field_and_the_range(bits: int) -> None:
    with pytest.raises(SpecError, match=rf"bits={bits}.*1 to 16"):
        QDtype(bits)


def test_binary_is_the_signed_one_bit_grid() -> None:
    binary = QDtype.parse("binary")
    assert binary == QDtype(1, signed=True) == QDtype.parse("int1")
    assert (binary.qmin, binary.qmax, binary.storage_bits, str(binary)) == (-1, 1, 1, "binary")
    assert QDtype.parse(str(binary)) == binary
    with pytest.raises(SpecError, match="binary.*symmetric: true"):
        QuantSpec("binary", symmetric=False)
    with pytest.raises(SpecError, match="narrow"):
        QDtype(1, signed=True, narrow=True)


@pytest.mark.parametrize("name", ["float8", "int", "i8", "int4x", "qint8", "", "int 8", "8"])
def test_unknown_dtype_strings_are_rejected_with_the_choices(name: str) -> None:
    with pytest.raises(SpecError, match="unknown dtype.*int2..int8"):
        QDtype.parse(name)


@pytest.mark.parametrize("name", ["int0", "int17", "uint0", "uint32"])
def test_dtype_strings_with_bad_bits_are_rejected(name: str) -> None:
    with pytest.raises(SpecError, match="bits="):
        QDtype.parse(name)


# ---------------------------------------------------------------------------- granularity


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("per_tensor", PerTensor()),
        ("per_channel", PerChannel(0)),
        ("per_channel:1", PerChannel(1)),
        ("per_channel:-1", PerChannel(-1)),
        ("per_group:32", PerGroup(32)),
        ("per_group", PerGroup(128)),
        ({"kind": "per_group", "group_size": 7}, PerGroup(7)),
        ({"kind": "per_channel", "axis": 1}, PerChannel(1)),
        (PerGroup(5), PerGroup(5)),
    ],
)
def test_parse_granularity(text: object, expected: object) -> None:
    assert parse_granularity(text) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        ("per_block", "kind 'per_block' is unknown.*per_tensor"),
        ({"axis": 1}, "kind None is unknown"),
        ({"kind": "per_tensor", "axis": 0}, r"unknown key\(s\) \['axis'\]"),
        ({"kind": "per_channel", "group_size": 8}, r"unknown key\(s\) \['group_size'\]"),
        ("per_tensor:3", r"unknown key\(s\) \['axis'\]"),
        ("per_group:abc", "per_group"),
        ("per_channel:x", "per_channel"),
        (3, "write per_tensor, per_channel, per_group:SIZE or per_token"),
    ],
)
def test_parse_granularity_errors_are_spec_errors_naming_the_problem(
    value: object, pattern: str
) -> None:
    with pytest.raises(SpecError, match=pattern):
        parse_granularity(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("group_size", [0, -4, 2.5, "32"])
def test_bad_group_size_names_the_field_and_typical_values(group_size: object) -> None:
    with pytest.raises(SpecError, match="group_size=.*positive integer.*32, 64, 128"):
        PerGroup(group_size)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="group_size"):
        QuantSpec(granularity={"kind": "per_group", "group_size": group_size})


@pytest.mark.parametrize("axis", [1.5, "1", None])
def test_per_channel_axis_must_be_an_integer(axis: object) -> None:
    with pytest.raises(SpecError, match="axis"):
        PerChannel(axis)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- QuantSpec


def test_quantspec_defaults_and_normalisation() -> None:
    spec = QuantSpec()
    assert spec.qdtype == QDtype(8) and spec.gran == PerTensor()
    assert spec.symmetric and not spec.dynamic
    assert spec.observer == "minmax" and spec.rounding == "nearest"
    spec = QuantSpec("uint4", "per_group:16", observer_args={"b": 1, "a": 2})
    assert spec.dtype == QDtype(4, signed=False) and spec.granularity == PerGroup(16)
    assert spec.observer_args == (("a", 2), ("b", 1))
    hash(spec)  # frozen and hashable even with observer_args given as a dict


def test_observer_args_order_does_not_matter() -> None:
    a = QuantSpec(observer="percentile", observer_args=(("percentile", 99.0), ("max_samples", 8)))
    b = QuantSpec(observer="percentile", observer_args={"max_samples": 8, "percentile": 99.0})
    assert a == b and hash(a) == hash(b)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"dtype": "float16"}, "unknown dtype 'float16'.*int2..int8"),
        ({"dtype": "binary", "rounding": "stochastic"}, "binary.*rounding: nearest"),
        ({"dtype": QDtype(8), "granularity": "per_row"}, "granularity kind 'per_row'.*per_tensor"),
        ({"observer": "kl"}, "observer='kl' is unknown.*minmax.*entropy"),
        ({"rounding": "floor"}, "rounding='floor' is unknown.*nearest.*stochastic"),
        ({"dynamic": True, "granularity": "per_group:32"}, "dynamic.*per_group.*per_channel"),
        ({"symmetric": "no"}, "symmetric='no'.*True or False"),
        ({"dynamic": 1}, "dynamic=1.*True or False"),
        ({"observer_args": 5}, "observer_args=5.*mapping"),
    ],
)
def test_quantspec_validation_errors_name_the_field_and_the_fix(
    kwargs: dict[str, object], pattern: str
) -> None:
    with pytest.raises(SpecError, match=pattern):
        QuantSpec(**kwargs)  # type: ignore[arg-type]


def test_quantspec_is_frozen() -> None:
    spec = QuantSpec("int4")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.symmetric = False  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.dtype = QDtype(8)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.qdtype.bits = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        PerGroup(32).group_size = 64  # type: ignore[misc]
    assert spec == QuantSpec("int4")
    assert dataclasses.replace(spec, symmetric=False).symmetric is False


# ---------------------------------------------------------------------------- dict round trip

_dtypes = st.sampled_from([d[0] for d in DTYPES])
_grans = st.one_of(
    st.just("per_tensor"),
    st.builds(PerChannel, st.integers(-4, 3)),
    st.builds(PerGroup, st.integers(1, 512)),
)
_args = st.dictionaries(
    st.sampled_from(["percentile", "k", "bins", "num_candidates", "averaging_constant"]),
    st.one_of(st.integers(1, 4096), st.floats(0.01, 100.0, allow_nan=False)),
    max_size=3,
)


@st.composite
def specs(draw: st.DrawFn) -> QuantSpec:
    gran = draw(_grans)
    dynamic = draw(st.booleans()) and not isinstance(gran, PerGroup)
    return QuantSpec(
        dtype=draw(_dtypes),
        granularity=gran,
        symmetric=draw(st.booleans()),
        dynamic=dynamic,
        observer=draw(st.sampled_from(OBSERVER_NAMES)),
        observer_args=draw(_args),
        rounding=draw(st.sampled_from(ROUNDING_MODES)),
    )


@FAST
@given(specs())
def test_to_dict_from_dict_round_trip(spec: QuantSpec) -> None:
    data = spec.to_dict()
    assert all(isinstance(k, str) for k in data)
    assert isinstance(data["dtype"], str) and isinstance(data["granularity"], str)
    back = QuantSpec.from_dict(data)
    assert back == spec
    assert back.to_dict() == data


@FAST
@given(specs())
def test_from_dict_of_to_dict_survives_a_yaml_like_copy(spec: QuantSpec) -> None:
    # values a YAML loader gives back: plain str / bool / int / float / dict
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in spec.to_dict().items()}
    assert QuantSpec.from_dict(data) == spec


def test_from_dict_rejects_unknown_keys_naming_them_and_where() -> None:
    with pytest.raises(SpecError, match=r"layers\.0: unknown key\(s\) \['bitz', 'sym'\]"):
        QuantSpec.from_dict({"dtype": "int8", "sym": True, "bitz": 4}, where="layers.0")
    with pytest.raises(SpecError, match="allowed keys:.*granularity"):
        QuantSpec.from_dict({"gran": "per_tensor"})


def test_from_dict_rejects_non_mappings() -> None:
    with pytest.raises(SpecError, match="w: expected a mapping"):
        QuantSpec.from_dict(["int8"], where="w")  # type: ignore[arg-type]


def test_from_dict_bits_alias_keeps_the_signedness() -> None:
    assert QuantSpec.from_dict({"bits": 4}).qdtype == QDtype(4)
    assert QuantSpec.from_dict({"bits": 3, "dtype": "uint8"}).qdtype == QDtype(3, signed=False)


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"bits": 0}, "bits=0"),
        ({"bits": 17}, "bits=17"),
        ({"bits": 4, "dtype": "float8"}, "unknown dtype"),
        ({"dtype": "int9x"}, "unknown dtype"),
        ({"granularity": "per_group:0"}, "group_size=0"),
        ({"observer": "kl"}, "observer='kl'"),
    ],
)
def test_from_dict_errors_are_prefixed_with_where(data: dict[str, object], pattern: str) -> None:
    with pytest.raises(SpecError, match=rf"^fc1\.weight: .*{pattern}"):
        QuantSpec.from_dict(data, where="fc1.weight")


def test_spec_error_is_a_value_error() -> None:
    assert issubclass(SpecError, ValueError)
