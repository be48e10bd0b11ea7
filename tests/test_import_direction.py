"""Imports flow one way (DESIGN.md): a lowbit module imports only from modules of its rank or lower.

    spec -> primitives -> observers -> nn -> config, fuse -> api -> algorithms, qat,
    mixed_precision -> distributed, export, runtime -> report, data -> cli, demo -> __init__

``lowbit.report.metrics`` is pure (torch and math only) and ranks with primitives, so anything
above primitives may use it. Every import counts, including ones inside functions and under
``TYPE_CHECKING``: a lazy import that goes the wrong way is still a cycle in the design. Reading
package metadata (``lowbit.__version__``) through the root is allowed anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lowbit

PACKAGE = Path(lowbit.__file__).parent
RANKS = {
    "spec": 0,
    "primitives": 1,
    "observers": 2,
    "nn": 3,
    "config": 4,
    "recipe_yaml": 4,
    "recipe_steps": 4,
    "recipe_qat": 4,
    "fuse": 4,
    "api": 5,
    "algorithms": 6,
    "qat": 6,
    "mixed_precision": 6,
    "distributed": 7,
    "export": 7,
    "runtime": 7,
    "report": 8,
    "data": 8,
    "cli": 9,
    "demo": 9,
    "__init__": 10,
}
SPECIAL = {"lowbit.report.metrics": 1}  # pure metrics: usable by anything right of primitives
METADATA = {"__version__"}  # package metadata read through the root, not code: any rank may


def module_name(path: Path) -> str:
    """``lowbit/nn/layers.py`` -> ``lowbit.nn.layers``; a package's ``__init__`` -> the package."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def rank(module: str) -> int:
    """Rank of a ``lowbit...`` module; KeyError for a top-level name the design does not list."""
    for prefix, value in SPECIAL.items():
        if module == prefix or module.startswith(prefix + "."):
            return value
    parts = module.split(".")
    return RANKS["__init__"] if len(parts) == 1 else RANKS[parts[1]]


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module) for every lowbit import in ``source``, relative ones resolved.

    ``from lowbit import api`` counts as importing ``lowbit.api``; ``from lowbit import X``
    for a non-module ``X`` counts as importing ``lowbit`` (the package root). A bare
    ``import lowbit`` counts by what the file reads through it: ``lowbit.api.f`` is
    ``lowbit.api``, package metadata (``lowbit.__version__``) is free, anything else is the root.
    """
    package = module if is_package else module.rpartition(".")[0]
    tree = ast.parse(source)
    found: list[tuple[int, str]] = []
    roots: dict[str, int] = {}  # names bound to the bare package -> line of the import
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "lowbit":
                    roots[alias.asname or "lowbit"] = node.lineno
                else:
                    found.append((node.lineno, alias.name))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                if base == "lowbit" and alias.name in METADATA:
                    continue
                full = f"{base}.{alias.name}"
                found.append((node.lineno, full if _is_module(full) else base))
    used = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in roots
        ):
            used.add(node.value.id)
            if node.attr not in METADATA:
                full = f"lowbit.{node.attr}"
                found.append((node.lineno, full if _is_module(full) else "lowbit"))
    found += [(line, "lowbit") for name, line in roots.items() if name not in used]
    return sorted(name for name in found if name[1].split(".")[0] == "lowbit")


def violations(path: Path) -> list[str]:
    """Human-readable wrong-way imports of one file."""
    module = module_name(path)
    own = rank(module)
    problems = []
    for line, target in imported_modules(path.read_text(), module, path.name == "__init__.py"):
        try:
            target_rank = rank(target)
        except KeyError:
            problems.append(
                f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}, "
                "which has no rank in the design"
            )
            continue
        if target_rank > own:
            problems.append(
                f"{path.relative_to(PACKAGE.parent)}:{line} ({module}, rank {own}) imports "
                f"{target} (rank {target_rank}), which is to its right"
            )
    return problems


FILES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_rank() -> None:
    assert len(FILES) >= 10
    unranked = []
    for path in FILES:
        try:
            rank(module_name(path))
        except KeyError:
            unranked.append(module_name(path))
    assert not unranked, f"modules the design does not place; add them to RANKS: {unranked}"


def test_imports_flow_one_way() -> None:
    problems = [problem for path in FILES for problem in violations(path)]
    assert not problems, "imports against the design's direction:\n" + "\n".join(problems)


def test_metrics_module_is_pure() -> None:
    path = PACKAGE / "report" / "metrics.py"
    assert rank(module_name(path)) == 1
    assert violations(path) == []


# ---------------------------------------------------------------------------- the checker itself


@pytest.mark.parametrize(
    ("module", "is_package", "source", "expected"),
    [
        ("lowbit.spec", False, "import torch\nfrom lowbit import api\n", [(2, "lowbit.api")]),
        ("lowbit.nn.layers", False, "from .module import QModule\n", [(1, "lowbit.nn.module")]),
        ("lowbit.nn", True, "from . import layers\n", [(1, "lowbit.nn.layers")]),
        ("lowbit.nn.module", False, "from ..config import Recipe\n", [(1, "lowbit.config")]),
        ("lowbit.cli", False, "def f():\n    import lowbit.api as a\n", [(2, "lowbit.api")]),
        ("lowbit.cli", False, "from lowbit import __version__\n", []),
        ("lowbit.export.x", False, "import lowbit\nv = lowbit.__version__\n", []),
        ("lowbit.spec", False, "import lowbit as lb\nlb.api.prepare\n", [(2, "lowbit.api")]),
        ("lowbit.spec", False, "import lowbit\nlowbit.prepare\n", [(2, "lowbit")]),
        ("lowbit.spec", False, "import lowbit\nf(lowbit)\n", [(1, "lowbit")]),
        ("lowbit.spec", False, "from lowbit import prepare\n", [(1, "lowbit")]),
        (
            "lowbit.api",
            False,
            "from lowbit.report.metrics import sqnr_db\n",
            [(1, "lowbit.report.metrics")],
        ),
    ],
)
def test_imported_modules_resolves_names(
    module: str, is_package: bool, source: str, expected: list[tuple[int, str]]
) -> None:
    assert imported_modules(source, module, is_package) == expected


def test_checker_catches_a_wrong_way_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "lowbit"
    (fake / "nn").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "api.py").write_text("")
    (fake / "nn" / "__init__.py").write_text("")
    bad = fake / "nn" / "layers.py"
    bad.write_text("import torch\n\ndef late():\n    from lowbit.api import prepare\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    [problem] = violations(bad)
    assert "lowbit/nn/layers.py:4" in problem and "lowbit.api (rank 5)" in problem
    assert rank("lowbit.report.metrics") < rank("lowbit.api") < rank("lowbit.report")
