"""Shared fixtures. The smoke book is built once per session and shared by the end-to-end tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def smoke_book(tmp_path_factory) -> dict:
    """Build the whole book on the ``smoke`` profile into a temporary folder (once per session)."""
    from brainsex.book import build

    base = tmp_path_factory.mktemp("smoke_book")
    run_dir, out = base / "run", base / "out"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        html = build(ROOT, "smoke", run_dir=run_dir, out=out, force=True)
    return {"html": html, "run_dir": run_dir, "log": (run_dir / "build.log").read_text(), "stdout": buf.getvalue()}


def write_notebook(path: Path, body: str, params: str = 'profile = "x"\nrun_dir = "."\n') -> Path:
    """Write a small Jupytext percent notebook with a parameters cell."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (
        "# ---\n# jupyter:\n#   kernelspec:\n#     display_name: Python 3\n#     language: python\n"
        "#     name: python3\n# ---\n\n"
        "# %% [markdown]\n# # A chapter\n\n"
        f'# %% tags=["parameters"]\n{params}\n'
        f"# %%\n{body}\n"
    )
    path.write_text(text)
    return path


@pytest.fixture
def mini_book(tmp_path) -> Path:
    """A tiny book root: the real config and manifest, two trivial chapters."""
    for name in ("_config.yml", "references.bib", "data_manifest.yaml"):
        shutil.copy2(ROOT / name, tmp_path / name)
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "intro.md").write_text("# Intro\n\nHello.\n\n```{tableofcontents}\n```\n")
    (tmp_path / "_toc.yml").write_text(
        "format: jb-book\nroot: book/intro\nchapters:\n  - file: notebooks/a\n  - file: notebooks/b\n"
    )
    write_notebook(tmp_path / "notebooks" / "a.py",
                   "from pathlib import Path\nPath(run_dir, 'a.txt').write_text(str(epochs))",
                   params='profile = "x"\nrun_dir = "."\nepochs = 1\n')
    write_notebook(tmp_path / "notebooks" / "b.py", "print('b', seed)", params='run_dir = "."\nseed = 0\n')
    return tmp_path


@pytest.fixture(scope="session")
def restricted_smoke_book(tmp_path_factory, smoke_book) -> dict:
    """The smoke book with the phantom marked ``shareable: false`` (a manifest copy passed to the build).

    It starts from a copy of the shareable smoke book's run directory, so the phantom, the preprocessing
    and the checkpoint are resumed rather than recomputed; every chapter still runs again (``force``).
    """
    import contextlib
    import io

    import yaml

    from brainsex.book import build

    base = tmp_path_factory.mktemp("restricted_smoke_book")
    manifest = yaml.safe_load((ROOT / "data_manifest.yaml").read_text())
    for cohort in manifest["cohorts"]:
        if cohort["name"] == "phantom":
            cohort["shareable"] = False
    (base / "data_manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    run_dir, out = base / "run", base / "out"
    shutil.copytree(smoke_book["run_dir"], run_dir, ignore=shutil.ignore_patterns("build.log", "_book*", "_html*"))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        html = build(ROOT, "smoke", run_dir=run_dir, out=out, force=True, manifest=base / "data_manifest.yaml")
    return {"html": html, "run_dir": run_dir, "manifest": base / "data_manifest.yaml", "stdout": buf.getvalue()}



#: Test modules that build whole books; each group runs on one xdist worker (see pytest_xdist_make_scheduler).
BOOK_GROUPS = {
    "smoke_books": ("test_book_e2e.py", "test_privacy_e2e.py", "test_browser.py"),  # smoke_book, restricted_smoke_book
    "real_books": ("test_realdata.py",),  # the smoke book on real IXI heads
}
BOOK_FIXTURES = {"smoke_book", "restricted_smoke_book"}


def _book_group(nodeid: str) -> str | None:
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return next((group for group, modules in BOOK_GROUPS.items() if module in modules), None)


def pytest_collection_modifyitems(config, items):
    """Every test that reads the session-scoped smoke books must live in a module of the ``smoke_books`` group."""
    stray = [item.nodeid for item in items
             if BOOK_FIXTURES & set(getattr(item, "fixturenames", ())) and _book_group(item.nodeid) != "smoke_books"]
    if stray:
        raise pytest.UsageError(f"tests using the smoke books outside BOOK_GROUPS['smoke_books'] (each worker would "
                                f"build the books again): {', '.join(stray)}")


@pytest.hookimpl(optionalhook=True)  # a plain `pytest -p no:xdist` must still run
def pytest_xdist_make_scheduler(config, log):
    """``-n 2 --dist loadgroup`` (the Makefile's): each book-building group on one worker, every other test alone.

    The books are session fixtures, so a worker builds them when its first test asks: a group keeps them to
    one worker, and the largest groups start first (xdist orders scopes by size), one per worker. This
    replaces the ``xdist_group`` mark, which pytest-xdist's loadgroup stopped honouring with pytest 9.2
    (structured node IDs, pytest-dev/pytest-xdist#1386): both workers then built every book.
    """
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class BookGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _book_group(nodeid) or nodeid

    return BookGroupScheduling(config, log)
