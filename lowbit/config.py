"""Recipes: which layers get which QuantConfig, plus the PTQ algorithm to run; YAML in and out."""

from __future__ import annotations

import fnmatch
import inspect
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lowbit.observers import OBSERVERS, make_observer
from lowbit.recipe_qat import QatConfig
from lowbit.recipe_steps import ALGORITHMS, AlgorithmStep, parse_steps, steps_to_dict
from lowbit.recipe_yaml import YAMLBoundError, load_bounded
from lowbit.spec import PerChannel, PerGroup, PerTensor, QuantSpec, SpecError

__all__ = [
    "QuantConfig",
    "Rule",
    "Recipe",
    "RecipeError",
    "load_recipe",
    "list_recipes",
    "ALGORITHMS",
    "SAME",
]

RECIPE_VERSION = 1
SAME = "default"  # first:/last: not given: the first and last layers follow the other rules
SPEC_KEYS = {"dtype", "bits", "granularity", "symmetric", "dynamic", "observer", "rounding"}


class RecipeError(SpecError):
    """A recipe that cannot be used; the message names the key and the fix."""


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)  # only ever called on values already bounded by the YAML loader
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _only_keys(data: Any, allowed: set[str], where: str, hint: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        raise RecipeError(
            f"{where}: expected a mapping, got {type(data).__name__} {_short(data)}{hint}"
        )
    unknown = sorted(str(key) for key in data if key not in allowed)
    if unknown:
        nested = ""
        if SPEC_KEYS & set(unknown) and "weight" in allowed:
            nested = "; spec fields go one level down, under weight: or input:"
        elif {"weight", "input"} & set(unknown) and "default" in allowed:
            nested = "; weight: and input: go under default: (or a rule's config:)"
        raise RecipeError(
            f"{where}: unknown key(s) {unknown}; allowed keys: {sorted(allowed)}{nested}"
        )
    return data


def _spec_mapping(raw: Any, where: str) -> dict[str, Any]:
    """A weight/input spec as written: a mapping with string keys, checked before parsing."""
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{where}: expected a mapping such as {{dtype: int8, granularity: per_channel}}, "
            f"got {type(raw).__name__} {_short(raw)} (write null to keep it in float)"
        )
    for key in raw:
        if not isinstance(key, str):
            raise RecipeError(f"{where}: key {key!r} is not a field name; write dtype: int8, ...")
    return raw


def _parse_spec(raw: Any, where: str) -> QuantSpec:
    try:
        return QuantSpec.from_dict(_spec_mapping(raw, where), where)
    except RecipeError:
        raise
    except SpecError as err:
        raise RecipeError(str(err)) from None


_ARG_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,)}


def _check_observer_args(spec: QuantSpec, where: str) -> None:
    """Each observer argument has the type its observer declares: ``bins: 2048.0``,
    ``percentile: '99.9'`` or ``refine: yes-as-a-string`` are errors, not surprises later."""
    cls = OBSERVERS.get(spec.observer)
    if cls is None:
        return
    params = inspect.signature(cls.__init__).parameters
    for name, value in spec.observer_args:
        param = params.get(name)
        if param is None:
            continue  # make_observer names unknown arguments
        declared = getattr(param.annotation, "__name__", str(param.annotation))
        allowed = _ARG_TYPES.get(declared)
        if allowed is None:
            continue
        bad_bool = isinstance(value, bool) and bool not in allowed
        if (
            bad_bool
            or not isinstance(value, allowed)
            or (isinstance(value, float) and not math.isfinite(value))
        ):
            example = {"int": "2048", "float": "99.9", "bool": "true"}[declared]
            raise RecipeError(
                f"{where}: observer_args.{name}={value!r} must be a finite {declared} "
                f"(e.g. {name}: {example}, no quotes)"
            )


def _check_role(spec: QuantSpec, role: str, where: str) -> None:
    """Reject specs that parse but cannot work for this tensor (``role``: weight, input or
    gradient)."""
    if role == "gradient":
        if not isinstance(spec.gran, (PerTensor, PerChannel)):
            raise RecipeError(
                f"{where}: gradients are quantized per_tensor or per_channel, not {spec.gran.kind}"
            )
        return  # a gradient's range is its own, every step: no observer
    if role == "weight" and spec.dynamic:
        raise RecipeError(
            f"{where}: weights cannot be dynamic (they are known ahead of time); "
            "set dynamic: false for the weight"
        )
    if role == "input" and isinstance(spec.gran, PerGroup):
        raise RecipeError(
            f"{where}: per_group granularity is for weights only; use per_tensor "
            "(or per_channel) for the input"
        )
    if not spec.dynamic:
        _check_observer_args(spec, where)
        try:
            make_observer(spec)  # unknown observer_args, entropy off per_tensor, ...
        except SpecError as err:
            raise RecipeError(f"{where}: {err}") from None


@dataclass(frozen=True)
class QuantConfig:
    """Specs for one layer's weight and input activation; ``None`` leaves that tensor float.
    ``gradient`` quantizes the gradients the layer passes back in training (to its input and
    to its weight; ``rounding: stochastic`` keeps them unbiased).

    >>> QuantConfig(weight=QuantSpec("int4", "per_group:32")).input is None
    True
    """

    weight: QuantSpec | None = None
    input: QuantSpec | None = None
    gradient: QuantSpec | None = None

    def __post_init__(self) -> None:
        for key in ("weight", "input", "gradient"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, QuantSpec):
                raise RecipeError(f"QuantConfig.{key} must be a QuantSpec or None, got {value!r}")
            if value is not None:
                _check_role(value, key, f"QuantConfig.{key}")
        if self.input is None and self.weight is None:
            raise RecipeError(
                "QuantConfig with neither weight nor input quantizes nothing: use config=None "
                "in a Rule to keep a layer in float"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, as written in YAML (``gradient`` only when set)."""
        out = {
            "weight": self.weight.to_dict() if self.weight else None,
            "input": self.input.to_dict() if self.input else None,
        }
        if self.gradient is not None:
            out["gradient"] = self.gradient.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "config") -> QuantConfig:
        """Read ``{"weight": {...}, "input": {...}, "gradient": {...}}`` strictly."""
        hint = " (write {weight: {dtype: int8, ...}, input: ..., gradient: ...}, or null for float)"
        data = _only_keys(data, {"weight", "input", "gradient"}, where, hint)
        specs: dict[str, QuantSpec | None] = {}
        for role in ("weight", "input", "gradient"):
            raw = data.get(role)
            spec = _parse_spec(raw, f"{where}.{role}") if raw is not None else None
            if spec is not None:
                _check_role(spec, role, f"{where}.{role}")
            specs[role] = spec
        if specs["weight"] is None and specs["input"] is None:
            raise RecipeError(
                f"{where}: a config with neither weight nor input quantizes nothing; write "
                "null instead of the mapping to keep the layer(s) in float"
            )
        return cls(weight=specs["weight"], input=specs["input"], gradient=specs["gradient"])


@dataclass(frozen=True)
class Rule:
    """Layers whose qualified name matches the glob ``match`` get ``config`` (None: float).

    >>> Rule("features.*", None).matches("features.0")
    True
    """

    match: str
    config: QuantConfig | None

    def matches(self, name: str) -> bool:
        """Whether the module name matches this rule's glob."""
        return fnmatch.fnmatchcase(name, self.match)


@dataclass(frozen=True)
class Recipe:
    """A default config, ordered rules (first match wins), optional PTQ algorithms.

    ``algorithm`` is None, a name or a sequence of names run in order (see
    :mod:`lowbit.recipe_steps`); ``first`` and ``last`` give the first and last quantizable
    layers (module order, embeddings aside) a config of their own without naming them (None
    keeps them float; ``"default"`` treats them like the others). A rule naming a layer wins.

    >>> r = Recipe(QuantConfig(weight=QuantSpec("int8")), rules=(Rule("head", None),))
    >>> r.config_for("head") is None, r.config_for("body.0").weight.dtype.bits
    (True, 8)
    """

    default: QuantConfig | None
    rules: tuple[Rule, ...] = ()
    algorithm: str | tuple[str, ...] | None = None
    args: tuple[tuple[str, Any], ...] = ()
    name: str = "custom"
    description: str = ""
    fold_batchnorm: bool = True
    version: int = RECIPE_VERSION
    embedding: QuantConfig | None = None  # weight-only config of embeddings no rule matches
    first: QuantConfig | str | None = SAME
    last: QuantConfig | str | None = SAME
    qat: QatConfig | None = None  # ranges and batch norms in quantization-aware training

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))
        if isinstance(self.algorithm, list):
            object.__setattr__(self, "algorithm", tuple(self.algorithm))
        if self.version != RECIPE_VERSION:
            raise RecipeError(
                f"recipe version {self.version} is not supported by this lowbit "
                f"(it reads version {RECIPE_VERSION}); upgrade lowbit or rewrite the recipe"
            )
        _check_embedding(self.embedding, "recipe.embedding")
        for key in ("first", "last"):
            value = getattr(self, key)
            if value != SAME and value is not None and not isinstance(value, QuantConfig):
                raise RecipeError(
                    f"recipe.{key} must be a QuantConfig, None (float) or {SAME!r}, got "
                    f"{_short(value)}"
                )
        try:
            steps = parse_steps(self.algorithm, self.args)
        except SpecError as err:
            raise RecipeError(str(err)) from None
        object.__setattr__(self, "args", _flat_args(steps))

    @property
    def steps(self) -> tuple[AlgorithmStep, ...]:
        """The algorithms to run, in order, each with its arguments.

        >>> load_recipe("w8a8").steps
        ()
        """
        return parse_steps(self.algorithm, self.args)

    def with_args(self, **overrides: Mapping[str, Any]) -> Recipe:
        """This recipe with some algorithms' arguments replaced (the others kept), checked
        like a recipe file's ``args:``; naming an algorithm the recipe does not run is an
        error.

        >>> r = load_recipe("w4a8-adaround").with_args(adaround={"iters": 200})
        >>> dict(r.steps[0][1])["iters"], load_recipe("w4a8-adaround").steps[0][1] != r.steps[0][1]
        (200, True)
        """
        steps = self.steps
        names = [name for name, _ in steps]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise RecipeError(
                f"recipe {self.name!r} runs {names or 'no algorithm'}, not {unknown}; "
                "give arguments only to the algorithms it runs"
            )
        args = {
            name: {**steps_to_dict(((name, a),))[1], **overrides.get(name, {})} for name, a in steps
        }
        data = self.to_dict()
        data["args"] = args[names[0]] if len(names) == 1 else args
        return Recipe.from_dict(data, where=f"recipe {self.name!r} with_args")

    def config_for(self, name: str, kind: str = "", position: str = "") -> QuantConfig | None:
        """The config of the first rule matching ``name``, else the default; a layer of
        ``kind`` ``"embedding"`` that no rule matches gets ``embedding`` instead, and the
        layer at ``position`` ``"first"`` or ``"last"`` gets that section when the recipe has
        one. An embedding's input is indices: a config with an input spec for one is an error.

        >>> r = load_recipe("w4a16")
        >>> r.config_for("wte", "embedding").weight.gran, r.config_for("fc").input is None
        (PerGroup(group_size=32, kind='per_group'), True)
        """
        found = next((rule for rule in self.rules if rule.matches(name)), None)
        if found is None:
            if kind == "embedding":
                return self.embedding
            edge = getattr(self, position, SAME) if position in ("first", "last") else SAME
            return self.default if edge == SAME else edge  # type: ignore[return-value]
        if kind == "embedding" and found.config is not None and found.config.input is not None:
            raise RecipeError(
                f"rule match={found.match!r} gives the embedding {name!r} an input spec, but "
                "an embedding's input is token indices; put a rule for it before that one "
                f"with a weight-only config ({{match: {name!r}, config: {{weight: ...}}}}) "
                "or config: null to keep it in float"
            )
        return found.config

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form; :meth:`from_dict` reads it back."""
        return {
            "name": self.name,
            "description": self.description,
            "version": self.version,
            "default": self.default.to_dict() if self.default else None,
            "rules": [
                {"match": r.match, "config": r.config.to_dict() if r.config else None}
                for r in self.rules
            ],
            **dict(zip(("algorithm", "args"), steps_to_dict(self.steps), strict=True)),
            "fold_batchnorm": self.fold_batchnorm,
            "embedding": self.embedding.to_dict() if self.embedding else None,
            **{
                key: _edge_dict(getattr(self, key))
                for key in ("first", "last")
                if getattr(self, key) != SAME
            },
            **({"qat": self.qat.to_dict()} if self.qat is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> Recipe:
        """Read a recipe mapping strictly: an unknown key is an error naming it."""
        allowed = {
            "name",
            "description",
            "version",
            "default",
            "rules",
            "algorithm",
            "args",
            "fold_batchnorm",
            "embedding",
            "first",
            "last",
            "qat",
        }
        data = _only_keys(data, allowed, where)
        if "default" not in data:
            raise RecipeError(f"{where}: missing key 'default' (a config, or null for float)")
        _check_scalars(data, where)
        raw_rules = data.get("rules")
        if raw_rules is None:
            raw_rules = []
        if not isinstance(raw_rules, list):
            raise RecipeError(
                f"{where}.rules: expected a list of {{match: GLOB, config: ...}} mappings, "
                f"got {type(raw_rules).__name__} {raw_rules!r}"
            )
        rules = []
        for i, item in enumerate(raw_rules):
            item = _only_keys(item, {"match", "config"}, f"{where}.rules[{i}]")
            if "match" not in item or not isinstance(item["match"], str):
                raise RecipeError(f"{where}.rules[{i}]: needs 'match', a glob over module names")
            cfg = item.get("config")
            rules.append(
                Rule(
                    item["match"],
                    QuantConfig.from_dict(cfg, f"{where}.rules[{i}].config")
                    if cfg is not None
                    else None,
                )
            )
        default = data["default"]
        args = data.get("args")
        if args is None:
            args = {}
        if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
            raise RecipeError(
                f"{where}.args: expected a mapping of algorithm argument names to values "
                f"(e.g. args: {{damp: 0.01}}), got {_short(args)}"
            )
        try:
            parse_steps(data.get("algorithm"), args, where)
        except SpecError as err:
            raise RecipeError(str(err)) from None
        version = data.get("version", RECIPE_VERSION)
        if not isinstance(version, int) or isinstance(version, bool):
            raise RecipeError(
                f"{where}.version: expected an integer (this lowbit reads version "
                f"{RECIPE_VERSION}), got {version!r}"
            )
        fold = data.get("fold_batchnorm", True)
        if not isinstance(fold, bool):
            raise RecipeError(
                f"{where}.fold_batchnorm: expected true or false (no quotes), got {fold!r}"
            )
        return cls(
            default=(
                QuantConfig.from_dict(default, f"{where}.default") if default is not None else None
            ),
            rules=tuple(rules),
            algorithm=_algorithm_names(data.get("algorithm")),
            args=tuple(sorted(args.items())),
            name=data.get("name", "custom"),
            description=data.get("description", ""),
            fold_batchnorm=fold,
            version=version,
            embedding=_read_embedding(data.get("embedding"), f"{where}.embedding"),
            first=_read_edge(data, "first", where),
            last=_read_edge(data, "last", where),
            qat=_read_qat(data.get("qat"), f"{where}.qat"),
        )

    def to_yaml(self) -> str:
        """YAML text of this recipe.

        >>> Recipe.from_yaml(load_recipe("w8a8").to_yaml()) == load_recipe("w8a8")
        True
        """
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        """Compact JSON of this recipe (stored in saved file headers)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_yaml(cls, text: str, where: str = "recipe") -> Recipe:
        """Parse YAML text (safe loader only)."""
        return cls.from_dict(_load_yaml(text, where), where)


def _load_yaml(text: str, where: str) -> Any:
    """The recipe's YAML, read with its size bounded (:mod:`lowbit.recipe_yaml`)."""
    try:
        return load_bounded(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"{where}: not valid YAML ({err})") from None
    except YAMLBoundError as err:
        raise RecipeError(f"{where}: {err}") from None


def _check_scalars(data: dict[str, Any], where: str) -> None:
    """name and description are text, algorithm is a name or null."""
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            raise RecipeError(
                f"{where}.{key}: expected text, got {type(data[key]).__name__} "
                f"{_short(data[key])}; quote it if YAML reads it as something else"
            )
    algorithm = data.get("algorithm")
    names_ok = isinstance(algorithm, list) and all(isinstance(a, str) for a in algorithm)
    if algorithm is not None and not isinstance(algorithm, str) and not names_ok:
        raise RecipeError(
            f"{where}.algorithm: expected an algorithm name, a list of names or null, got "
            f"{type(algorithm).__name__} {_short(algorithm)}"
        )


def _algorithm_names(algorithm: Any) -> str | tuple[str, ...] | None:
    return tuple(algorithm) if isinstance(algorithm, list) else algorithm


def _flat_args(steps: tuple[AlgorithmStep, ...]) -> tuple[tuple[str, Any], ...]:
    """``args`` stored as a sorted, hashable tuple (keyed by name for several steps)."""
    if len(steps) == 1:
        return steps[0][1]
    return tuple(sorted((name, args) for name, args in steps if args))


def _edge_dict(value: QuantConfig | str | None) -> dict[str, Any] | None:
    return value.to_dict() if isinstance(value, QuantConfig) else None


def _read_edge(data: dict[str, Any], key: str, where: str) -> QuantConfig | str | None:
    """``first:``/``last:``: absent or ``default`` (like the others), null (float) or a config."""
    if key not in data or data[key] == SAME:
        return SAME
    if data[key] is None:
        return None
    return QuantConfig.from_dict(data[key], f"{where}.{key}")


def _read_qat(raw: Any, where: str) -> QatConfig | None:
    if raw is None:
        return None
    try:
        return QatConfig.from_dict(raw, where)
    except SpecError as err:
        raise RecipeError(str(err)) from None


def _weight_only(where: str) -> RecipeError:
    return RecipeError(
        f"{where}: embeddings are quantized weight-only (their input is token indices); give "
        "a weight spec and input: null, e.g. embedding: {weight: {dtype: int8, granularity: "
        "per_channel}}, or embedding: null to keep them in float"
    )


def _check_embedding(config: Any, where: str) -> None:
    if config is None:
        return
    if not isinstance(config, QuantConfig):
        raise RecipeError(f"{where} must be a QuantConfig or None, got {_short(config)}")
    if config.input is not None or config.weight is None:
        raise _weight_only(where)


def _read_embedding(raw: Any, where: str) -> QuantConfig | None:
    """The recipe's ``embedding:`` section: a weight-only config, or null (float embeddings)."""
    if raw is None:
        return None
    if isinstance(raw, dict) and raw.get("input") is not None:
        raise _weight_only(where)
    config = QuantConfig.from_dict(raw, where)
    _check_embedding(config, where)
    return config


def _shipped() -> dict[str, Path]:
    folder = resources.files("lowbit") / "recipes"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def list_recipes() -> dict[str, str]:
    """Shipped recipe names with their one-line descriptions.

    >>> "w8a8" in list_recipes()
    True
    """
    return {name: load_recipe(name).description for name in sorted(_shipped())}


def load_recipe(recipe: str | Path | Recipe) -> Recipe:
    """A shipped recipe by name, a YAML file by path, or a Recipe as it is.

    >>> load_recipe("w4a16").default.weight.dtype.bits
    4
    """
    if isinstance(recipe, Recipe):
        return recipe
    shipped = _shipped()
    if isinstance(recipe, str) and recipe in shipped:
        return Recipe.from_yaml(shipped[recipe].read_text(), where=f"recipe {recipe!r}")
    path = Path(recipe)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise RecipeError(
                f"cannot read recipe file {str(path)!r} ({err.strerror or err}); check its "
                "permissions or copy it somewhere readable"
            ) from None
        except UnicodeDecodeError:
            raise RecipeError(
                f"recipe file {str(path)!r} is not UTF-8 text; give a YAML recipe file"
            ) from None
        return Recipe.from_yaml(text, where=str(path))
    raise RecipeError(
        f"recipe {str(recipe)!r} is neither a shipped recipe ({', '.join(sorted(shipped))}) "
        "nor a YAML file; run `lowbit recipes` to list them"
    )
