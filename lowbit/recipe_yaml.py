"""Reading a recipe's YAML with its size bounded: ``yaml.safe_load`` that refuses a crafted
document (billion laughs: aliases of aliases; thousands of open brackets; a recursive alias)
before anything is built, and duplicate keys that YAML would otherwise keep the last of."""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["YAMLBoundError", "load_bounded", "YAML_MAX_NODES", "YAML_MAX_DEPTH"]

YAML_MAX_NODES = 100_000  # values in a recipe once aliases are expanded (billion-laughs bound)
YAML_MAX_DEPTH = 32  # nesting levels, aliases followed


class YAMLBoundError(ValueError):
    """A YAML document refused for its shape (too deep, too big once expanded, a key twice)."""


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader, refusing nesting deeper than ``YAML_MAX_DEPTH`` while it composes."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def fetch_flow_collection_start(self, token_class: Any) -> None:
        if self.flow_level >= YAML_MAX_DEPTH:  # in the scanner, before it reads far ahead
            raise YAMLBoundError(f"YAML nested deeper than {YAML_MAX_DEPTH} levels{_PLAIN}")
        super().fetch_flow_collection_start(token_class)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self.depth += 1
        try:
            if self.depth > YAML_MAX_DEPTH:
                raise YAMLBoundError(f"YAML nested deeper than {YAML_MAX_DEPTH} levels{_PLAIN}")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


_PLAIN = (
    " is refused; write the recipe out plainly (a recipe needs no deep nesting or "
    "chains of &anchors and *aliases)"
)


def _check_unique_keys(node: yaml.MappingNode) -> None:
    """A key written twice in one mapping is an error (YAML would keep the last silently)."""
    seen: set[str] = set()
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode) and key.value != "<<":
            if key.value in seen:
                line = key.start_mark.line + 1
                raise YAMLBoundError(
                    f"line {line}: key {key.value!r} appears twice in one mapping; keep one"
                )
            seen.add(key.value)


def _expanded_size(root: yaml.Node) -> int:
    """Values in the document once every alias is expanded, computed on the (small) graph of
    nodes; raises past ``YAML_MAX_NODES`` or ``YAML_MAX_DEPTH`` and on a recursive alias."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def visit(node: yaml.Node, depth: int) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise YAMLBoundError(f"a YAML alias refers to a mapping or list holding it{_PLAIN}")
        if depth > YAML_MAX_DEPTH:
            raise YAMLBoundError(f"YAML nested deeper than {YAML_MAX_DEPTH} levels{_PLAIN}")
        open_nodes.add(id(node))
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
            _check_unique_keys(node)
        total = 1
        for child in children:
            total += visit(child, depth + 1)
            if total > YAML_MAX_NODES:
                raise YAMLBoundError(
                    f"YAML of more than {YAML_MAX_NODES} values once aliases expand{_PLAIN}"
                )
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        return total

    return visit(root, 0)


def load_bounded(text: str) -> Any:
    """``yaml.safe_load(text)`` with the document's size and depth checked on the node graph
    first; raises :class:`YAMLBoundError` (or ``yaml.YAMLError`` for invalid YAML).

    >>> load_bounded("a: [1, 2]")
    {'a': [1, 2]}
    >>> try:
    ...     load_bounded("a: {b: 1, b: 2}")
    ... except YAMLBoundError as err:
    ...     print(err)
    line 1: key 'b' appears twice in one mapping; keep one
    """
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()
