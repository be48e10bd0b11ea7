"""lowbit's JSON in a ``.lowbit`` header, field by field: each value checked for type and bounds.

Every function here raises :class:`~lowbit.export.fields.FieldError` naming the field; the
header module (:mod:`lowbit.export.header`) turns it into a CheckpointError naming the file.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lowbit.export import fields
from lowbit.export.fields import FieldError
from lowbit.export.ties import prefixes
from lowbit.nn import QMODULE_KINDS
from lowbit.spec import QDtype, QuantSpec, SpecError

__all__ = [
    "LayerInfo",
    "MAX_ITEMS",
    "spec_dict",
    "layer_info",
    "layer_infos",
    "fold_pairs",
    "recipe_shape",
    "tie_map",
    "model_source",
    "checksum_value",
]

_MAX_WEIGHT_DIMS = 8
MAX_ITEMS = 1 << 20  # layers, folds, ties, float layers: far above any real model
_MAX_RULES = 1 << 14  # recipe rules: each is matched against every layer name
_WEIGHT_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64"})
_LAYER_KEYS = {"name", "kind", "weight_shape", "weight_dtype", "weight_spec", "input", "qbias"}


@dataclass(frozen=True)
class LayerInfo:
    """What the header says about one quantized layer (``weight_spec`` None: float weight).

    ``kind`` is the quantized layer's registered kind (``"linear"``, ``"conv2d"``, ...) and
    ``weight_dtype`` the float dtype the weight reads as (``"float32"``, ``"bfloat16"``, ...).
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    weight_dtype: str
    weight_spec: dict[str, Any] | None
    input_spec: dict[str, Any] | None
    qbias: bool

    def to_json(self) -> dict[str, Any]:
        """The header's JSON object for this layer."""
        return {
            "name": self.name,
            "kind": self.kind,
            "weight_shape": list(self.weight_shape),
            "weight_dtype": self.weight_dtype,
            "weight_spec": self.weight_spec,
            "input": self.input_spec,
            "qbias": self.qbias,
        }

    @property
    def dtype(self) -> str:
        """The weight dtype (``"int4"``, ...) or ``"float"`` for an unquantized weight."""
        return str(self.weight_spec["dtype"]) if self.weight_spec else "float"

    @property
    def bits(self) -> int:
        """Weight bits (32 for a float weight)."""
        return QDtype.parse(self.dtype).bits if self.weight_spec else 32


def spec_dict(value: Any, where: str) -> dict[str, Any] | None:
    """A spec object validated by :class:`QuantSpec` and written back in canonical form.

    >>> spec_dict({"dtype": "int4", "granularity": "per_group:32"}, "w")["granularity"]
    'per_group:32'
    """
    if value is None:
        return None
    fields.mapping(value, where)
    try:
        return QuantSpec.from_dict(value, where).to_dict()
    except (SpecError, TypeError, ValueError, OverflowError) as err:
        raise FieldError(str(err)[:300]) from None


def layer_info(item: Any, i: int) -> LayerInfo:
    """``layers[i]``: every key present, of its type, a known kind and a valid spec.

    >>> layer_info({"name": "fc", "kind": "linear", "weight_shape": [4, 8],
    ...             "weight_dtype": "float32", "weight_spec": {"dtype": "int4"},
    ...             "input": None, "qbias": False}, 0).bits
    4
    """
    where = f"layers[{i}]"
    item = fields.mapping(item, where, _LAYER_KEYS)
    kind = fields.text(item["kind"], f"{where}.kind", 64)
    if kind not in QMODULE_KINDS:
        raise FieldError(
            f"{where}.kind {fields.short(kind)} is not a layer kind this lowbit knows "
            f"({', '.join(sorted(QMODULE_KINDS))}); a newer lowbit may read it"
        )
    dtype = fields.text(item["weight_dtype"], f"{where}.weight_dtype", 16)
    if dtype not in _WEIGHT_DTYPES:
        raise FieldError(
            f"{where}.weight_dtype {fields.short(dtype)} is not one of {sorted(_WEIGHT_DTYPES)}"
        )
    return LayerInfo(
        name=fields.text(item["name"], f"{where}.name"),
        kind=kind,
        weight_shape=fields.shape(item["weight_shape"], f"{where}.weight_shape", _MAX_WEIGHT_DIMS),
        weight_dtype=dtype,
        weight_spec=spec_dict(item["weight_spec"], f"{where}.weight_spec"),
        input_spec=spec_dict(item["input"], f"{where}.input"),
        qbias=fields.boolean(item["qbias"], f"{where}.qbias"),
    )


def layer_infos(data: dict[str, Any]) -> list[LayerInfo]:
    """``data["layers"]``: each one checked, no name twice.

    >>> layer_infos({"layers": []})
    []
    """
    layers = [
        layer_info(item, i)
        for i, item in enumerate(fields.array(data["layers"], "layers", MAX_ITEMS))
    ]
    seen: set[str] = set()
    for i, layer in enumerate(layers):
        if layer.name in seen:
            raise FieldError(f"layers[{i}].name {fields.short(layer.name)} appears twice")
        seen.add(layer.name)
    return layers


def fold_pairs(value: Any) -> list[tuple[str, str]]:
    """``folds``: [layer, batch norm] name pairs, no batch norm twice.

    >>> fold_pairs([["conv", "bn"]])
    [('conv', 'bn')]
    """
    out: list[tuple[str, str]] = []
    for i, pair in enumerate(fields.array(value, "folds", MAX_ITEMS)):
        items = fields.array(pair, f"folds[{i}]", 2)
        if len(items) != 2:
            raise FieldError(f"folds[{i}] must be [layer, batch norm]")
        out.append(
            (fields.text(items[0], f"folds[{i}][0]"), fields.text(items[1], f"folds[{i}][1]"))
        )
    if len(set(out)) != len(out) or len({bn for _, bn in out}) != len(out):
        raise FieldError("folds lists one batch norm twice")
    return out


def recipe_shape(value: Any) -> dict[str, Any]:
    """``recipe``: its shape only, the recipe itself is validated when a model is rebuilt
    from it (on the meta device).

    >>> recipe_shape({"rules": []})
    {'rules': []}
    """
    recipe = fields.mapping(value, "recipe")
    if isinstance(recipe.get("rules"), list):
        fields.array(recipe["rules"], "recipe.rules", _MAX_RULES)
    return recipe


def tie_map(value: Any, tensors: Iterable[str]) -> dict[str, str]:
    """``ties``: alias prefix -> stored prefix; the stored one holds tensors (``tensors``:
    the file's tensor names), the alias none, and no tie lies inside another.

    >>> tie_map({"lm_head.weight": "wte.weight"}, ["wte.weight"])
    {'lm_head.weight': 'wte.weight'}
    """
    ties = fields.text_map(value, "ties", MAX_ITEMS)
    held = {p for key in tensors for p in prefixes(key)} if ties else set()
    for alias, source in ties.items():
        where = f"ties[{fields.short(alias)}]"
        if any(p in ties for p in [*prefixes(source), *prefixes(alias)[:-1]]):
            raise FieldError(f"{where} points at or lies inside another tie")
        if source not in held:
            raise FieldError(f"{where}: the file holds no tensor under {fields.short(source)}")
        if alias in held:
            raise FieldError(f"{where}: the file also holds {fields.short(alias)} itself")
    return ties


def model_source(value: Any) -> dict[str, Any] | None:
    """``model`` (optional): the library, architecture, version and config a file saved
    from a transformers model records.

    >>> model_source(None) is None
    True
    """
    if value is None:
        return None
    source = fields.mapping(value, "model", {"library", "architecture", "version", "config"})
    fields.text(source["library"], "model.library", 64)
    fields.text(source["architecture"], "model.architecture", 200)
    fields.text(source["version"], "model.version", 64)
    fields.mapping(source["config"], "model.config")
    return source


def checksum_value(value: Any) -> str:
    """``checksum``: ``{"algorithm": "sha256", "value": 64 hex digits}``; the digest.

    >>> checksum_value({"algorithm": "sha256", "value": "0" * 64}) == "0" * 64
    True
    """
    digest = fields.mapping(value, "checksum", {"algorithm", "value"})
    if digest["algorithm"] != "sha256":
        raise FieldError(f"checksum.algorithm {fields.short(digest['algorithm'])} is not sha256")
    hexdigest = fields.text(digest["value"], "checksum.value", 64)
    if len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
        raise FieldError("checksum.value must be 64 lowercase hex digits")
    return hexdigest
