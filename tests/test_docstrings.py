"""Docstrings of the public API: a numpy Parameters section that lists exactly the signature's parameters.

ruff's pydocstyle rules (``D``, numpy convention, plus D417) check the layout and that a Parameters
section describes every parameter, but not that the section exists nor that it names no parameter the
signature lacks; this file checks both. Modules that pyproject.toml exempts from ``D`` are skipped
until their docstrings are done.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

import brainsex
from brainsex._docs import DOCS, fill_doc

SRC = Path(brainsex.__file__).parent
ROOT = SRC.parent.parent


def _exempt() -> set[str]:
    """Modules pyproject.toml exempts from ruff's D rules (per-file-ignores)."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ignores = conf["tool"]["ruff"]["lint"].get("per-file-ignores", {})
    return {Path(k).name for k, v in ignores.items() if k.startswith("src/") and "D" in v}


def _section(doc: str, title: str) -> str | None:
    m = re.search(rf"^([ \t]*){title}\n\1-{{{len(title)}}}\n(.*?)(?=^\1\w[\w ]*\n\1---|\Z)", doc, re.M | re.S)
    return m.group(2) if m else None


def documented_names(doc: str) -> list[str] | None:
    """Parameter names of a numpy docstring's Parameters section (None without one)."""
    body = _section(doc, "Parameters")
    if body is None:
        return None
    names = []
    for line in body.splitlines():
        if line.strip() and not line.startswith((" ", "\t")):
            head = line.split(" :", 1)[0]
            names += [n.strip().lstrip("*") for n in head.split(",") if n.strip()]
    return names


def _signature_names(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
    return [n for n in names if n not in ("self", "cls")]


def public_functions() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(``module.py:qualname``, node) of every public function and public class method, exempt modules aside."""
    skip = _exempt()
    out = []
    for path in sorted(SRC.glob("*.py")):
        if path.name in skip or path.name.startswith("__"):
            continue
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not node.name.startswith("_"):
                out.append((f"{path.name}:{node.name}", node))
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and not item.name.startswith("_"):
                        decos = [ast.unparse(d) for d in item.decorator_list]
                        if any(d.endswith(".setter") for d in decos):
                            continue
                        out.append((f"{path.name}:{node.name}.{item.name}", item))
    return out


def test_every_public_function_documents_exactly_its_parameters():
    problems = []
    for where, fn in public_functions():
        params = _signature_names(fn)
        doc = ast.get_docstring(fn) or ""
        names = documented_names(doc)
        if not params:
            continue
        if names is None:
            problems.append(f"{where}: no Parameters section")
        elif sorted(names) != sorted(params):
            problems.append(f"{where}: documents {sorted(names)}, signature has {sorted(params)}")
    assert problems == []


def test_the_check_sees_missing_and_stale_parameters():
    doc = "Do.\n\nParameters\n----------\na, b : int\n    Two.\n**kwargs\n    More.\n\nReturns\n-------\nint\n    One.\n"
    assert documented_names(doc) == ["a", "b", "kwargs"]
    assert documented_names("Do.\n\nReturns\n-------\nint\n") is None


_LEFT_OVER = re.compile(r"^[ \t]*%\(\w+\)s[ \t]*$", re.M)


@pytest.mark.parametrize("name", sorted(p.stem for p in SRC.glob("*.py") if not p.stem.startswith("__")))
def test_shared_docstring_text_is_filled_in(name):
    """A ``%(key)s`` line left in a docstring means a missing ``@fill_doc``."""
    module = importlib.import_module(f"brainsex.{name}")
    objs = []
    for _, obj in inspect.getmembers(module, lambda o: inspect.isfunction(o) or inspect.isclass(o)):
        if getattr(obj, "__module__", None) == module.__name__:
            objs.append(obj)
            if inspect.isclass(obj):
                objs += [getattr(m, "__func__", m) for m in vars(obj).values() if callable(getattr(m, "__func__", m))]
    for obj in objs:
        assert not _LEFT_OVER.search(obj.__doc__ or ""), f"{name}.{obj.__qualname__}: placeholder left (no @fill_doc?)"


def test_fill_doc_indents_shared_text_and_rejects_unknown_keys():
    def f(seed: int = 0) -> None:
        """Do.

        Parameters
        ----------
        seed : int, default=0
            %(reference_source)s
        """

    filled = fill_doc(f).__doc__
    first, second = DOCS["reference_source"].splitlines()[:2]
    assert f"\n            {first}\n            {second}" in filled

    def g() -> None:
        """%(no_such_key)s"""

    with pytest.raises(KeyError, match="no_such_key"):
        fill_doc(g)


def _literal(text: str) -> tuple[bool, object]:
    try:
        return True, ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False, None


def default_mismatches(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """``name : type, default=X`` lines whose literal X differs from the signature's literal default."""
    a = fn.args
    pos = a.posonlyargs + a.args
    defaults = dict(zip([x.arg for x in pos[len(pos) - len(a.defaults):]], a.defaults, strict=True))
    defaults.update({x.arg: d for x, d in zip(a.kwonlyargs, a.kw_defaults, strict=True) if d is not None})
    body = _section(ast.get_docstring(fn) or "", "Parameters") or ""
    found = []
    for line in body.splitlines():
        m = re.match(r"^(\w[\w, ]*) : .*default[= ]\s*(.+)$", line)
        if not m:
            continue
        names = [n.strip() for n in m.group(1).split(",")]
        ok_doc, doc_value = _literal(m.group(2).strip())
        for name in names:
            if name not in defaults or not ok_doc or len(names) > 1:
                continue
            ok_sig, sig_value = _literal(ast.unparse(defaults[name]))
            if ok_sig and sig_value != doc_value:
                found.append(f"{fn.name}: {name} documented default={m.group(2).strip()}, signature "
                             f"{ast.unparse(defaults[name])}")
    return found


def test_documented_defaults_match_the_signature():
    problems = [f"{where}: {p}" for where, fn in public_functions() for p in default_mismatches(fn)]
    assert problems == []


def test_the_default_check_sees_a_stale_default():
    fn = ast.parse('def f(size: int = 192):\n    """Do.\n\n    Parameters\n    ----------\n'
                   '    size : int, default=256\n        Size.\n    """\n').body[0]
    assert default_mismatches(fn) == ["f: size documented default=256, signature 192"]
