"""The architecture as a specification: each package imports only from the floors below it (and
itself), so data flows one way and no layer needs a later one to be imported."""

from __future__ import annotations

import ast
from pathlib import Path

import cxrfusion

PACKAGE = Path(cxrfusion.__file__).parent
# Floors, lowest first. Modules of one floor may not import each other's packages either.
FLOORS = [
    {"labels", "errors", "atomic"},
    {"checks", "tables", "plotting"},
    {"data", "stats"},
    {"models", "explain"},
    {"training"},
    {"inference"},
    {"evaluation", "dicom"},
    {"serving", "reproduce"},
    {"cli"},
]
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names}


def _part(module: str) -> str | None:
    """The top-level part of a cxrfusion module name (`cxrfusion.stats.metrics` -> `stats`)."""
    names = module.split(".")
    return names[1] if names[0] == "cxrfusion" and len(names) > 1 else None


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "cxrfusion":
                found |= {f"cxrfusion.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {part for module in found if (part := _part(module))}


def test_every_part_of_the_package_has_a_floor() -> None:
    parts = {p.stem for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert parts - {"__init__"} == set(FLOOR)


def test_no_module_imports_from_its_own_floor_or_above() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _part(".".join(("cxrfusion", *path.relative_to(PACKAGE).with_suffix("").parts)))
        if own is None or own == "__init__":
            continue
        for part in _imports(path) - {own}:
            if FLOOR[part] >= FLOOR[own]:
                upward.append(f"{path.relative_to(PACKAGE)} imports cxrfusion.{part}")
    assert not upward, "\n".join(upward)
