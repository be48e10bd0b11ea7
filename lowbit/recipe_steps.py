"""A recipe's PTQ algorithms: the registry they are looked up in, and the steps a recipe names.

A recipe writes ``algorithm: gptq`` with ``args: {damp: 0.01}``, or a list run in order,
``algorithm: [cle, bias_correction, adaround]`` with ``args`` keyed by algorithm name
(``args: {adaround: {iters: 500}}``). Each step is checked against the algorithm's config
dataclass (an unknown argument names the ones that exist), and the order against the
algorithms' stages: algorithms that reshape the float weights (``stage = "float"``: CLE,
SmoothQuant, AWQ) run before calibration, those that choose roundings (``"quantized"``:
AdaRound, GPTQ, bias correction) after it, so a float-stage step cannot follow a quantized one.

The registry is filled by ``lowbit.algorithms`` (imported by the package ``lowbit`` itself, so
every recipe sees every algorithm whatever the caller imported).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lowbit.spec import SpecError

__all__ = ["ALGORITHMS", "STAGES", "AlgorithmStep", "parse_steps", "steps_to_dict", "build"]

ALGORITHMS: dict[str, Any] = {}
"""Algorithm name -> class (``config_class``, ``stage``); filled by ``lowbit.algorithms``."""
STAGES = ("float", "quantized")
AlgorithmStep = tuple[str, tuple[tuple[str, Any], ...]]


class _StepError(SpecError):
    """Raised as the caller's RecipeError (config.py converts it)."""


def _freeze(value: Any) -> Any:
    """Mappings and lists as sorted tuples, so a recipe stays hashable."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _known(where: str, name: Any) -> Any:
    if not isinstance(name, str):
        raise _StepError(f"{where}: expected an algorithm name, got {name!r}")
    cls = ALGORITHMS.get(name)
    if cls is None:
        known = ", ".join(sorted(ALGORITHMS)) or "none yet"
        raise _StepError(
            f"{where}: algorithm {name!r} is unknown; available: {known} "
            "(or algorithm: null for plain calibration)"
        )
    return cls


def config_of(name: str, args: dict[str, Any], where: str) -> Any:
    """The config dataclass of algorithm ``name`` built from ``args``; errors name the fix.

    >>> import lowbit
    >>> config_of("gptq", {"damp": 0.02}, "recipe").damp
    0.02
    """
    cls = _known(where, name)
    config_cls = cls.config_class
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(args) - fields)
    if unknown:
        raise _StepError(
            f"{where}: {name} has no argument(s) {unknown}; its arguments are {sorted(fields)}"
        )
    try:
        return config_cls(**args)
    except (TypeError, ValueError) as err:
        raise _StepError(f"{where}: {name}: {err}") from None


def parse_steps(algorithm: Any, args: Any, where: str = "recipe") -> tuple[AlgorithmStep, ...]:
    """The (name, args) steps of ``algorithm`` (None, a name or a list of names) and ``args``
    (flat for one name, keyed by name for a list), each checked against its config.

    >>> import lowbit
    >>> parse_steps(["cle", "adaround"], {"adaround": {"iters": 10}})
    (('cle', ()), ('adaround', (('iters', 10),)))
    """
    args = {} if args is None else args
    if isinstance(args, tuple):
        args = _thaw(args)
    if not isinstance(args, dict):
        raise _StepError(f"{where}.args: expected a mapping, got {args!r}")
    if algorithm is None:
        if args:
            raise _StepError(f"{where}.args: arguments given but no algorithm; add algorithm: NAME")
        return ()
    if isinstance(algorithm, str):
        steps = [(algorithm, args)]
    elif isinstance(algorithm, (list, tuple)) and algorithm:
        names = list(algorithm)
        extra = sorted(str(k) for k in args if k not in names)
        if extra:
            raise _StepError(
                f"{where}.args: with a list of algorithms, args are keyed by algorithm name "
                f"(args: {{{names[0]}: {{...}}}}); {extra} is not in the list {names}"
            )
        if len(set(map(str, names))) != len(names):
            raise _StepError(f"{where}.algorithm: {names} names an algorithm twice")
        steps = []
        for name in names:
            own = args.get(name, {})
            if not isinstance(own, dict):
                raise _StepError(f"{where}.args.{name}: expected a mapping, got {own!r}")
            steps.append((name, own))
    else:
        raise _StepError(
            f"{where}.algorithm: expected a name, a non-empty list of names or null, "
            f"got {algorithm!r}"
        )
    _check_order([name for name, _ in steps], where)
    for name, own in steps:
        config_of(name, own, f"{where}.algorithm")
    return tuple((name, _freeze(own)) for name, own in steps)


def _check_order(names: list[Any], where: str) -> None:
    seen_quantized = ""
    for name in names:
        stage = getattr(_known(f"{where}.algorithm", name), "stage", "quantized")
        if stage == "quantized":
            seen_quantized = seen_quantized or name
        elif seen_quantized:
            raise _StepError(
                f"{where}.algorithm: {name} changes the float weights before calibration, so it "
                f"must come before {seen_quantized} (which rounds the calibrated weights); "
                "reorder the list"
            )


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple) and all(
        isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) for item in value
    ):
        return {k: _thaw(v) for k, v in value}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def steps_to_dict(steps: tuple[AlgorithmStep, ...]) -> tuple[Any, dict[str, Any]]:
    """``(algorithm, args)`` as a recipe writes them (the inverse of :func:`parse_steps`).

    >>> steps_to_dict((("gptq", (("damp", 0.02),)),))
    ('gptq', {'damp': 0.02})
    """
    if not steps:
        return None, {}
    if len(steps) == 1:
        name, args = steps[0]
        return name, _thaw(args) if args else {}
    return [name for name, _ in steps], {name: _thaw(a) for name, a in steps if a}


def build(steps: tuple[AlgorithmStep, ...]) -> list[Any]:
    """Instances of the steps' algorithms, resolved from the registry now.

    >>> import lowbit
    >>> [type(a).__name__ for a in build((("cle", ()),))]
    ['CrossLayerEqualization']
    """
    built = []
    for name, args in steps:
        config = config_of(name, _thaw(args) if args else {}, "recipe.algorithm")
        built.append(ALGORITHMS[name](config))
    return built
