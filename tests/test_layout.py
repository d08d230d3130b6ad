"""The package's layout (docs/design.md): subpackages in layers, each importing only from layers below it, and no
module over 500 lines.

    errors < metrics < data < nn < training, inference < evaluation < commands

training and inference sit side by side and never import each other. Every import counts, also those inside
functions (most heavy imports are lazy). ``idgbr/__init__.py`` (the public names), ``idgbr/__main__.py`` and the
``idgbr/io.py`` re-export stand above the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "idgbr"
MAX_LINES = 500
LAYERS = {"errors": 0, "metrics": 1, "data": 2, "nn": 3, "training": 4, "inference": 4, "evaluation": 5, "commands": 6}
ABOVE = {"__init__", "__main__", "io"}  # the public face: may import anything, imported by nothing inside


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _dotted(path: Path) -> list[str]:
    parts = ["idgbr", *path.relative_to(PACKAGE).with_suffix("").parts]
    return parts[:-1] if parts[-1] == "__init__" else parts


def _unit(dotted: list[str]) -> str:
    """The layer unit of a module: its subpackage, or the top-level module's own name."""
    return dotted[1] if len(dotted) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, list[str]]]:
    """(line, absolute dotted target) of every idgbr import in ``path``, at any depth."""
    package = _dotted(path) if path.name == "__init__.py" else _dotted(path)[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")) for alias in node.names if alias.name.split(".")[0] == "idgbr"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "idgbr":
                base = node.module.split(".")
            else:
                continue
            if len(base) == 1:  # from idgbr import x / from . import x: x is the unit
                found += [(node.lineno, ["idgbr", alias.name]) for alias in node.names]
            else:
                found.append((node.lineno, base))
    return found


def layer_violations() -> list[str]:
    bad = []
    for path in _modules():
        source = _unit(_dotted(path))
        if source in ABOVE:
            continue
        assert source in LAYERS, f"{path.relative_to(PACKAGE)}: not in a layer; add its subpackage to LAYERS"
        for line, target in _imports(path):
            unit = _unit(target)
            where = f"{path.relative_to(PACKAGE)}:{line} imports {'.'.join(target)}"
            if unit in ABOVE:
                bad.append(f"{where} (the public face; import the module itself)")
            elif unit not in LAYERS:
                bad.append(f"{where} (not in a layer)")
            elif unit != source and LAYERS[unit] >= LAYERS[source]:
                bad.append(f"{where} ({unit} is {'beside' if LAYERS[unit] == LAYERS[source] else 'above'} {source})")
    return bad


def test_imports_go_down_the_layers() -> None:
    assert layer_violations() == []


def test_no_module_over_500_lines() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


@pytest.mark.parametrize("unit", sorted(set(LAYERS) - {"errors", "metrics"}))
def test_every_layer_is_a_package(unit: str) -> None:
    assert (PACKAGE / unit / "__init__.py").is_file()
