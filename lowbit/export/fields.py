"""Strict reading of the JSON inside a ``.lowbit`` file: each value checked for type and bounds.

A header comes from a file that may have been damaged or crafted, so nothing in it is trusted:
JSON with ``NaN``/``Infinity``, numbers that overflow a float, duplicated keys or nesting deeper
than :data:`MAX_DEPTH` is refused, and each field is read through one of the checks below, which
raise :class:`FieldError` naming the field. The header module turns that into a
:class:`~lowbit.export.header.CheckpointError` naming the file too.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = [
    "FieldError",
    "MAX_DEPTH",
    "MAX_TEXT",
    "parse_json",
    "short",
    "integer",
    "text",
    "boolean",
    "mapping",
    "array",
    "shape",
    "text_map",
]

MAX_DEPTH = 32  # a recipe is 6 levels deep; nothing legitimate comes close
MAX_TEXT = 4096  # layer and tensor names, versions, reasons
MAX_DIM = 1 << 48  # one dimension of a tensor (256 Ti elements)


class FieldError(ValueError):
    """A header value of the wrong type or out of bounds; the message names the field."""


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (crafted values can be megabytes long).

    >>> short("x" * 100, 10)
    "'xxxxxx..."
    """
    if isinstance(value, (dict, list)):
        return f"a {'JSON object' if isinstance(value, dict) else 'list'} of {len(value)}"
    if isinstance(value, str) and len(value) > limit:
        value = value[:limit]
    text_ = repr(value)
    return text_ if len(text_) <= limit else text_[: limit - 3] + "..."


def _no_constant(name: str) -> Any:
    raise FieldError(f"the JSON holds {name}, which lowbit never writes")


def _finite(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise FieldError(f"the JSON number {short(literal)} overflows a float")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise FieldError(f"the JSON object has the key {short(key)} twice")
        out[key] = value
    return out


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def parse_json(raw: bytes | str, what: str) -> Any:
    """Parse JSON the way a header must be: finite numbers, unique keys, bounded nesting.

    >>> parse_json('{"a": [1, 2.5]}', "x")
    {'a': [1, 2.5]}
    >>> parse_json('{"a": NaN}', "x")
    Traceback (most recent call last):
    lowbit.export.fields.FieldError: x is not valid: the JSON holds NaN, which lowbit never writes
    """
    try:
        parsed = json.loads(
            raw,
            parse_constant=_no_constant,
            parse_float=_finite,
            object_pairs_hook=_unique_keys,
        )
    except FieldError as err:
        raise FieldError(f"{what} is not valid: {err}") from None
    except RecursionError:
        raise FieldError(f"{what} is nested too deeply (more than {MAX_DEPTH} levels)") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError, too many int digits
        raise FieldError(f"{what} is not valid JSON ({str(err)[:200]})") from None
    if _depth(parsed) > MAX_DEPTH:
        raise FieldError(f"{what} is nested too deeply (more than {MAX_DEPTH} levels)")
    return parsed


def integer(value: Any, where: str, lo: int, hi: int) -> int:
    """An int (never a bool, float or string) in ``[lo, hi]``.

    >>> integer(3, "n", 0, 10)
    3
    >>> integer("3", "n", 0, 10)
    Traceback (most recent call last):
    lowbit.export.fields.FieldError: n must be an integer, got '3'
    """
    if not isinstance(value, int) or isinstance(value, bool):
        raise FieldError(f"{where} must be an integer, got {short(value)}")
    if not lo <= value <= hi:
        raise FieldError(f"{where}={short(value)} is out of range [{lo}, {hi}]")
    return value


def text(value: Any, where: str, limit: int = MAX_TEXT) -> str:
    """A string of at most ``limit`` characters.

    >>> text("fc1", "name")
    'fc1'
    """
    if not isinstance(value, str):
        raise FieldError(f"{where} must be a string, got {short(value)}")
    if len(value) > limit:
        raise FieldError(f"{where} is {len(value)} characters long (at most {limit})")
    return value


def boolean(value: Any, where: str) -> bool:
    """``true`` or ``false`` (never 0, 1 or a string).

    >>> boolean(False, "qbias")
    False
    """
    if not isinstance(value, bool):
        raise FieldError(f"{where} must be true or false, got {short(value)}")
    return value


def mapping(value: Any, where: str, keys: set[str] | None = None) -> dict[str, Any]:
    """A JSON object; with ``keys``, exactly those keys.

    >>> mapping({"a": 1}, "m", {"a"})
    {'a': 1}
    """
    if not isinstance(value, dict):
        raise FieldError(f"{where} must be a JSON object, got {short(value)}")
    if keys is not None:
        missing, unknown = sorted(keys - set(value)), sorted(set(value) - keys)
        if missing:
            raise FieldError(f"missing key {missing[0]!r} in {where}")
        if unknown:
            raise FieldError(f"{where} has unknown key {short(unknown[0])}")
    return value


def array(value: Any, where: str, limit: int) -> list[Any]:
    """A JSON list of at most ``limit`` items.

    >>> array([1, 2], "l", 4)
    [1, 2]
    """
    if not isinstance(value, list):
        raise FieldError(f"{where} must be a list, got {short(value)}")
    if len(value) > limit:
        raise FieldError(f"{where} has {len(value)} items (at most {limit})")
    return value


def shape(value: Any, where: str, max_dims: int) -> tuple[int, ...]:
    """A tensor shape: at most ``max_dims`` non-negative integer dimensions.

    >>> shape([4, 8], "weight_shape", 8)
    (4, 8)
    """
    dims = array(value, where, max_dims)
    return tuple(integer(d, f"{where}[{i}]", 0, MAX_DIM) for i, d in enumerate(dims))


def text_map(value: Any, where: str, limit: int) -> dict[str, str]:
    """A JSON object of at most ``limit`` string -> string entries.

    >>> text_map({"head": "a rule keeps it in float"}, "kept_float", 10)
    {'head': 'a rule keeps it in float'}
    """
    items = mapping(value, where)
    if len(items) > limit:
        raise FieldError(f"{where} has {len(items)} entries (at most {limit})")
    for key, item in items.items():
        text(key, f"a key of {where}")
        text(item, f"{where}[{short(key)}]")
    return items
