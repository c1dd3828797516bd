"""End to end: the smoke book on a phantom marked ``shareable: false`` is published with aggregates only."""

from __future__ import annotations

import time
import zipfile

import nbformat
import pandas as pd
import pytest

from brainsex.book import toc_notebooks
from brainsex.privacy import LOCAL_ONLY_KEY, protected_ids, protected_names, scan_published

pytestmark = pytest.mark.slow


def test_restricted_book_builds_and_every_chapter_is_published(restricted_smoke_book, repo_root):
    html = restricted_smoke_book["html"]
    for nb in toc_notebooks(repo_root):
        assert (html / "notebooks" / f"{nb.stem}.html").is_file(), nb.stem
    assert "privacy check: no protected subject ID" in restricted_smoke_book["stdout"]


def test_whole_published_tree_names_no_subject(restricted_smoke_book):
    run_dir, manifest, html = (restricted_smoke_book[k] for k in ("run_dir", "manifest", "html"))
    ids = protected_ids(run_dir, manifest)
    needles = protected_names(run_dir, manifest)
    assert len(ids) >= 40 and any(n.endswith(".nii.gz") for n in needles)  # the check is not vacuous
    # the researcher's local copy keeps the detail the site leaves out
    local = (run_dir / "notebooks" / "01_preprocessing.ipynb").read_text()
    assert any(i in local for i in ids) and LOCAL_ONLY_KEY in local
    t0 = time.perf_counter()
    found = scan_published(html, needles)
    seconds = time.perf_counter() - t0
    assert found == {}, found
    print(f"scan of {sum(1 for p in html.rglob('*') if p.is_file())} files: {seconds:.2f} s")


def test_no_single_subject_image_or_row_is_published(restricted_smoke_book):
    run_dir, html = restricted_smoke_book["run_dir"], restricted_smoke_book["html"]
    pre = (html / "notebooks" / "01_preprocessing.html").read_text()
    assert "mean and standard deviation" in pre and "flagged: low similarity" in pre
    assert "red titles: flagged" not in pre  # the per-subject mosaic is not published
    published = nbformat.read(html / "_sources" / "notebooks" / "01_preprocessing.ipynb", as_version=4)
    assert not any((o.get("metadata") or {}).get(LOCAL_ONLY_KEY) for c in published.cells
                   for o in c.get("outputs", []))
    # every published average map covers at least k subjects
    sizes = pd.read_csv(run_dir / "saliency" / "maps.tsv", sep="\t").set_index("file")["n"]
    with zipfile.ZipFile(html / "results.zip") as zf:
        maps = [n for n in zf.namelist() if n.endswith(".nii.gz")]
        withheld = zf.read("SUPPRESSED.txt").decode() if "SUPPRESSED.txt" in zf.namelist() else ""
    assert all(sizes[n.split("/")[-1]] >= 5 for n in maps)
    assert all(n.split("/")[-1] in withheld for n in sizes[sizes < 5].index)
    # tables with group sizes show no group under k
    tiv = (html / "notebooks" / "04_tiv.html").read_text()
    assert "<th>tiv_low</th>" not in tiv and "<th>tertile</th>" in tiv  # the smallest TIV of a bin is one person's
    saliency = (html / "notebooks" / "05_saliency.html").read_text()
    assert "suppressed: fewer than 5 subjects" in saliency  # the smoke model's bins hold one or two scans
    if sizes.get("mean_rtiv_subset.nii.gz", 0) < 5:  # nor is a map of fewer than k read off in the regions chapter
        regions = (html / "notebooks" / "06_regions.html").read_text()
        assert "Withheld: the average map covers fewer than 5" in regions and "plotly-graph-div" not in regions
