"""End to end: the whole book on the smoke profile, then checks on the HTML it produced."""

from __future__ import annotations

import re

import nbformat
import pytest

from brainsex.book import toc_notebooks

pytestmark = pytest.mark.slow


def test_every_chapter_page_exists(smoke_book, repo_root):
    html = smoke_book["html"]
    assert (html / "index.html").is_file()
    for nb in toc_notebooks(repo_root):
        assert (html / "notebooks" / f"{nb.stem}.html").is_file(), nb.stem
    for page in ("how_to_run", "methods", "reproducibility", "references"):
        assert (html / "book" / f"{page}.html").is_file(), page


def test_plotly_figures_present_and_served_locally(smoke_book, repo_root):
    html, run_dir = smoke_book["html"], smoke_book["run_dir"]
    assert (html / "_static" / "plotly.min.js").stat().st_size > 1_000_000
    total = 0
    for nb in toc_notebooks(repo_root):
        executed = nbformat.read(run_dir / "notebooks" / f"{nb.stem}.ipynb", as_version=4)
        n_figs = sum(
            "plotly-graph-div" in "".join(out.get("data", {}).get("text/html", ""))
            for cell in executed.cells for out in cell.get("outputs", [])
        )
        page = (html / "notebooks" / f"{nb.stem}.html").read_text()
        assert len(re.findall(r'class="plotly-graph-div"', page)) == n_figs, nb.stem
        if n_figs:
            assert re.search(r'<script src="(\.\./)*_static/plotly\.min\.js', page), nb.stem
        total += n_figs
    assert total >= 1
    for page in html.rglob("*.html"):
        text = page.read_text()
        assert "cdn.plot.ly" not in text and "require.min.js" not in text, page.name


def test_no_unknown_mime_type_warnings(smoke_book):
    assert "unknown_mime_type" not in smoke_book["log"]
    assert "skipping unknown output mime type" not in smoke_book["log"]


def test_every_glue_reference_in_the_prose_resolves(smoke_book, repo_root):
    """A missing glue key renders as nothing (the sentence loses its number) and logs a warning."""
    from brainsex.book import glue_references, unresolved_glue
    from brainsex.run import RunDir

    run = RunDir(smoke_book["run_dir"])
    n_refs = 0
    for nb in toc_notebooks(repo_root):
        executed = nbformat.read(run.executed(nb.stem), as_version=4)
        n_refs += len(glue_references(executed))
        assert unresolved_glue(executed) == set(), nb.stem
    assert n_refs > 50  # the chapters' numbers do come from glue
    assert "No key" not in smoke_book["log"] and "[mystnb.glue]" not in smoke_book["log"]
    page = (smoke_book["html"] / "notebooks" / "00_overview.html").read_text()
    assert re.search(r"<span class=\"pasted-text\">smoke</span>", page)  # the profile name, glued


def test_no_script_from_the_network(smoke_book):
    """Offline book: every script (plotly.js, MathJax) is served from the book itself."""
    for page in smoke_book["html"].rglob("*.html"):
        srcs = re.findall(r'<script[^>]*\ssrc="([^"]+)"', page.read_text())
        remote = [s for s in srcs if s.startswith(("http:", "https:", "//"))]
        assert not remote, (page.name, remote)
    assert (smoke_book["html"] / "_mathjax" / "tex-chtml.js").is_file()


def test_results_bundle_is_published_without_subject_rows(smoke_book):
    import zipfile

    bundle = smoke_book["html"] / "results.zip"
    assert bundle.is_file()
    names = zipfile.ZipFile(bundle).namelist()
    assert "train/history.tsv" in names and "evaluate/subgroup_metrics.tsv" in names
    assert not any(n.startswith(("cohort/", "preprocess/")) or "predictions" in n for n in names)
