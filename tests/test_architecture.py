"""Module boundaries: the dependency order of the package docstring, and no cross-module private import."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import brainsex

SRC = Path(brainsex.__file__).parent


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), filename=str(p)) for p in sorted(SRC.glob("*.py"))
            if p.stem not in ("__init__", "__main__")}


def _stated_order() -> list[str]:
    doc = brainsex.__doc__ or ""
    block = doc.split("(``tests/test_architecture.py``", 1)[-1]
    return re.findall(r"``(\w+)``", block)


def _imports(tree: ast.Module) -> list[tuple[str, str | None, int]]:
    """(brainsex module, imported name or None, line) for every import of the package, at any depth."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "brainsex":
            parts = node.module.split(".")
            for a in node.names:
                if len(parts) == 1:  # from brainsex import X: a submodule or a package-level name
                    if (SRC / f"{a.name}.py").is_file():
                        out.append((a.name, None, node.lineno))
                    else:
                        out.append(("brainsex", a.name, node.lineno))
                else:
                    out.append((parts[1], a.name, node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("brainsex."):
                    out.append((a.name.split(".")[1], None, node.lineno))
    return out


def _module_aliases(tree: ast.Module) -> dict[str, str]:
    """Local names bound to brainsex submodules (``from brainsex import synthetic as syn``)."""
    alias = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "brainsex":
            for a in node.names:
                if (SRC / f"{a.name}.py").is_file():
                    alias[a.asname or a.name] = a.name
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("brainsex.") and a.asname:
                    alias[a.asname] = a.name.split(".")[1]
    return alias


def private_imports(trees: dict[str, ast.Module]) -> list[str]:
    """Every use of another module's private name: ``from brainsex.x import _y`` or ``x_alias._y``."""
    found = []
    for mod, tree in trees.items():
        for src, name, line in _imports(tree):
            if name and name.startswith("_") and not name.startswith("__") and src != mod:
                found.append(f"{mod}.py:{line}: imports {src}.{name}")
        alias = _module_aliases(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in alias
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and alias[node.value.id] != mod):
                found.append(f"{mod}.py:{node.lineno}: uses {alias[node.value.id]}.{node.attr}")
    return found


def order_violations(trees: dict[str, ast.Module], order: list[str]) -> list[str]:
    """Imports of a module listed later than (or not at all in) the stated order."""
    rank = {m: i for i, m in enumerate(order)}
    found = []
    for mod, tree in trees.items():
        for src, _, line in _imports(tree):
            if src in ("brainsex", mod):
                continue
            if src not in rank or mod not in rank or rank[src] > rank[mod]:
                found.append(f"{mod}.py:{line}: imports {src}, which the package docstring lists after it")
    return found


def test_no_module_imports_another_modules_private_names():
    assert private_imports(_modules()) == []


def test_every_module_is_in_the_stated_order_and_imports_only_earlier_ones():
    trees, order = _modules(), _stated_order()
    assert len(order) == len(set(order)), f"the docstring lists a module twice: {order}"
    assert sorted(set(trees) - set(order)) == [], "modules missing from the package docstring's order"
    assert sorted(set(order) - set(trees)) == [], "the package docstring names modules that do not exist"
    assert order_violations(trees, order) == []


def test_the_checks_catch_violations():
    """The scanners flag a private import, a private attribute through a module alias and a reversed edge."""
    trees = {
        "atlas": ast.parse("from brainsex.saliency import _as_array\n"),
        "validity": ast.parse("def f():\n    from brainsex import synthetic as syn\n    return syn._context\n"),
        "io": ast.parse("from brainsex.book import build\n"),
    }
    found = private_imports(trees)
    assert any("saliency._as_array" in f for f in found) and any("synthetic._context" in f for f in found)
    assert order_violations(trees, ["io", "saliency", "synthetic", "atlas", "validity", "book"]) == [
        "io.py:1: imports book, which the package docstring lists after it"]
    # a module's own private names are its business
    assert private_imports({"preprocess": ast.parse("class R:\n    pass\nR._build\n")}) == []
