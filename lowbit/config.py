"""Recipes: which layers get which QuantConfig, plus the PTQ algorithm to run; YAML in and out."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lowbit.observers import make_observer
from lowbit.spec import PerGroup, QuantSpec, SpecError

__all__ = [
    "QuantConfig",
    "Rule",
    "Recipe",
    "RecipeError",
    "load_recipe",
    "list_recipes",
    "ALGORITHMS",
]

RECIPE_VERSION = 1
ALGORITHMS: dict[str, Any] = {}
"""Algorithm name -> class; filled by ``lowbit.algorithms`` as each algorithm is defined."""


class RecipeError(SpecError):
    """A recipe that cannot be used; the message names the key and the fix."""


def _only_keys(data: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; allowed keys: {sorted(allowed)}")
    return data


def _check_role(spec: QuantSpec, role: str, where: str) -> None:
    """Reject specs that parse but cannot work for this tensor (``role``: weight or input)."""
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
        try:
            make_observer(spec)  # unknown observer_args, entropy off per_tensor, ...
        except SpecError as err:
            raise RecipeError(f"{where}: {err}") from None


@dataclass(frozen=True)
class QuantConfig:
    """Specs for one layer's weight and input activation; ``None`` leaves that tensor float.

    >>> QuantConfig(weight=QuantSpec("int4", "per_group:32")).input is None
    True
    """

    weight: QuantSpec | None = None
    input: QuantSpec | None = None

    def __post_init__(self) -> None:
        for key in ("weight", "input"):
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
        """Plain-dict form, as written in YAML."""
        return {
            "weight": self.weight.to_dict() if self.weight else None,
            "input": self.input.to_dict() if self.input else None,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "config") -> QuantConfig:
        """Read ``{"weight": {...}, "input": {...}}`` strictly."""
        data = _only_keys(data, {"weight", "input"}, where)
        specs: dict[str, QuantSpec | None] = {}
        for role in ("weight", "input"):
            raw = data.get(role)
            spec = QuantSpec.from_dict(raw, f"{where}.{role}") if raw is not None else None
            if spec is not None:
                _check_role(spec, role, f"{where}.{role}")
            specs[role] = spec
        if specs["weight"] is None and specs["input"] is None:
            raise RecipeError(
                f"{where}: a config with neither weight nor input quantizes nothing; write "
                "null instead of the mapping to keep the layer(s) in float"
            )
        return cls(weight=specs["weight"], input=specs["input"])


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
    """A default config, ordered rules (first match wins), an optional algorithm.

    >>> r = Recipe(QuantConfig(weight=QuantSpec("int8")), rules=(Rule("head", None),))
    >>> r.config_for("head") is None, r.config_for("body.0").weight.dtype.bits
    (True, 8)
    """

    default: QuantConfig | None
    rules: tuple[Rule, ...] = ()
    algorithm: str | None = None
    args: tuple[tuple[str, Any], ...] = ()
    name: str = "custom"
    description: str = ""
    fold_batchnorm: bool = True
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))
        if isinstance(self.args, dict):
            object.__setattr__(self, "args", tuple(sorted(self.args.items())))
        if self.version != RECIPE_VERSION:
            raise RecipeError(
                f"recipe version {self.version} is not supported by this lowbit "
                f"(it reads version {RECIPE_VERSION}); upgrade lowbit or rewrite the recipe"
            )
        if self.algorithm is not None and self.algorithm not in ALGORITHMS:
            known = ", ".join(sorted(ALGORITHMS)) or "none yet"
            raise RecipeError(
                f"algorithm {self.algorithm!r} is unknown; available: {known} "
                "(or algorithm: null for plain calibration)"
            )

    def config_for(self, name: str) -> QuantConfig | None:
        """The config of the first rule matching ``name``, else the default."""
        for rule in self.rules:
            if rule.matches(name):
                return rule.config
        return self.default

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
            "algorithm": self.algorithm,
            "args": dict(self.args),
            "fold_batchnorm": self.fold_batchnorm,
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
        }
        data = _only_keys(data, allowed, where)
        if "default" not in data:
            raise RecipeError(f"{where}: missing key 'default' (a config, or null for float)")
        raw_rules = data.get("rules") or []
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
        args = data.get("args") or {}
        if not isinstance(args, dict):
            raise RecipeError(f"{where}.args: expected a mapping of algorithm arguments")
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
            algorithm=data.get("algorithm"),
            args=tuple(sorted(args.items())),
            name=str(data.get("name", "custom")),
            description=str(data.get("description", "")),
            fold_batchnorm=fold,
            version=version,
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
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise RecipeError(f"{where}: not valid YAML ({err})") from None
        return cls.from_dict(data, where)


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
        return Recipe.from_yaml(path.read_text(), where=str(path))
    raise RecipeError(
        f"recipe {str(recipe)!r} is neither a shipped recipe ({', '.join(sorted(shipped))}) "
        "nor a YAML file; run `lowbit recipes` to list them"
    )
