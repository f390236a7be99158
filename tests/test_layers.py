"""The package's layers (DESIGN.md, "Dependency direction"): each subpackage imports only layers
before it, so there is no cycle and no upward arrow. Every import statement counts, including those
inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import deepalign

ROOT = Path(deepalign.__file__).parent
# In order; a package may import the packages of earlier layers only. errors and io are leaves that
# any layer may use; cli (and __main__, which runs it) sits on top, and nothing imports it.
LAYERS = [("errors",), ("io",), ("kernels",), ("models", "data"), ("evaluation",), ("training",), ("attacks",),
          ("analysis",), ("experiments",), ("cli",), ("__main__",)]
LEVEL = {name: index for index, names in enumerate(LAYERS) for name in names}


def _package(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return parts[0] if parts[0] != "__init__" else ""


def imported_packages(path: Path) -> set[str]:
    """The deepalign subpackages a module imports (absolute or relative)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ["deepalign", *parts[:-1]][: len(parts) + 1 - node.level]
                names.append(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        for name in names:
            pieces = name.split(".")
            if pieces[0] == "deepalign" and len(pieces) > 1:
                found.add(pieces[1])
    return found


def test_every_subpackage_is_in_a_layer():
    packages = {_package(p) for p in ROOT.rglob("*.py")} - {""}
    assert packages <= set(LEVEL), f"not in LAYERS: {packages - set(LEVEL)}"


def test_imports_only_point_down():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        source = _package(path)
        if not source:
            continue
        for target in imported_packages(path) - {source}:
            if target not in LEVEL or LEVEL[target] >= LEVEL[source]:
                upward.append(f"{path.relative_to(ROOT.parent)}: {source} imports {target}")
    assert not upward, "\n".join(upward)


def test_the_walker_sees_function_level_and_relative_imports(tmp_path):
    module = ROOT / "training" / "_probe_for_test.py"
    module.write_text("def f():\n    from deepalign.experiments import demo\nfrom ..attacks import rap\n")
    try:
        assert imported_packages(module) == {"experiments", "attacks"}
    finally:
        module.unlink()
