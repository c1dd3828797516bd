"""The build publishes only aggregates of non-shareable cohorts, and the guard checks every published file."""

from __future__ import annotations

import base64
import gzip
import io
import struct
import zipfile
import zlib

import nbformat
import numpy as np
import pandas as pd
import pytest

from brainsex.book import build, results_bundle
from brainsex.cohorts import public_exclusions, table1_public
from brainsex.privacy import (
    LOCAL_ONLY_KEY,
    PrivacyError,
    binned_counts,
    binned_counts_2d,
    check_published,
    group_summary,
    protected_ids,
    protected_names,
    publication_policy,
    qc_aggregate,
    scan_html,
    scan_published,
    scrub_reason,
    strip_local_outputs,
    suppress_small_groups,
    suppress_table,
)
from tests.conftest import write_notebook


def _participants(run_dir, rows):
    (run_dir / "cohort").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(run_dir / "cohort" / "participants.tsv", sep="\t", index=False)


def _restricted_run(run_dir):
    _participants(run_dir, [
        {"participant_id": "S0002", "cohort": "CC-359", "shareable": False, "image": "/data/cc/S0002_T1w.nii.gz",
         "mask": "/data/cc/S0002_mask.nii.gz"},
        {"participant_id": "S0003", "cohort": "CC-359", "shareable": False,
         "image": "/data/cc/visit1/MPRAGE_20110602_Br_0117.nii.gz", "mask": "/data/cc/visit1/brain.nii.gz"},
        {"participant_id": "sub-P001", "cohort": "phantom", "shareable": True, "image": "/x/sub-P001_T1w.nii.gz",
         "mask": ""},
    ])
    return run_dir


def test_protected_ids_only_from_non_shareable(tmp_path):
    _participants(tmp_path, [
        {"participant_id": "sub-ADNI0001", "cohort": "ADNI", "shareable": False},
        {"participant_id": "sub-P001", "cohort": "phantom", "shareable": True},
    ])
    assert protected_ids(tmp_path) == {"sub-ADNI0001"}
    assert protected_ids(tmp_path / "nothing") == set()


def test_protected_names_include_file_names(tmp_path):
    names = protected_names(_restricted_run(tmp_path))
    assert {"S0002", "S0002_T1w.nii.gz", "S0002_mask.nii.gz"} <= names
    assert "MPRAGE_20110602_Br_0117.nii.gz" in names  # a file name without the ID still names the subject
    assert "brain.nii.gz" not in names  # a generic name does not
    assert not any("P001" in n for n in names)


def test_scan_matches_whole_tokens(tmp_path):
    (tmp_path / "a.html").write_text("<td>sub-01</td><td>sub-010</td>")
    (tmp_path / "b.html").write_text("<td>xsub-01x</td>")
    assert scan_html(tmp_path, {"sub-01"}) == {"a.html": ["sub-01"]}
    assert scan_published(tmp_path, {"sub-01"}) == {"a.html": ["sub-01"]}


def test_publication_policy(tmp_path, repo_root):
    manifest = repo_root / "data_manifest.yaml"
    _participants(tmp_path, [{"participant_id": "sub-1", "cohort": "phantom", "shareable": True}])
    assert publication_policy(tmp_path, manifest).shareable
    # before the cohort chapter ran, the profile's cohorts and the manifest decide
    assert not publication_policy(tmp_path / "empty", manifest, cohorts=["CC-359"]).shareable
    _participants(tmp_path, [{"participant_id": "sub-1", "cohort": "phantom", "shareable": False}])
    policy = publication_policy(tmp_path, manifest, min_group_size=7)
    assert not policy.shareable and policy.k == 7 and policy.restricted_cohorts == ("phantom",)
    assert not policy.allows(6) and policy.allows(7)
    with pytest.raises(Exception, match="at least 1"):
        publication_policy(tmp_path, manifest, min_group_size=0)


# --------------------------------------------------------------------------------------- the guard
def _png(text_chunks: list[tuple[bytes, bytes]]) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    body = b"".join(chunk(k, v) for k, v in text_chunks)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + body + chunk(b"IDAT", zlib.compress(b"\x00\x00"))
            + chunk(b"IEND", b""))


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _nifti_gz(descrip: str) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    img.header["descrip"] = descrip.encode()
    return gzip.compress(img.to_bytes())


PLANTS = {
    # published file -> bytes with a protected ID or file name planted (mixed case on purpose)
    "notebooks/01_preprocessing.html": b"<html><td>s0002</td></html>",
    "alt.html": b'<div class="brainsex-plotly" role="img" aria-label="mosaic of S0002"></div>',
    "highlighted.html": b'<span class="n">S</span><span class="mi">0002</span><span class="o">_</span>',
    "entities.html": b"<td>&#83;0002</td>",
    "hover.html": b'<script>Plotly.newPlot("x", [{"text": ["S0002"]}])</script>',
    "_sources/notebooks/01_preprocessing.ipynb": b'{"cells": [{"outputs": [{"text": "S0002_T1w.nii.gz"}]}]}',
    "_sources/book/intro.md": b"see S0002_T1W.NII.GZ",
    "_downloads/listing.txt": b"mprage_20110602_br_0117.nii.gz\n",
    "searchindex.js": b'Search.setIndex({"terms": {"s0002": [3]}})',
    "_static/custom.js": b'const who = "S0002";',
    "_images/tEXt.png": _png([(b"tEXt", b"Title\x00QC of S0002")]),
    "_images/zTXt.png": _png([(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"from S0002_mask.nii.gz"))]),
    "_images/iTXt.png": _png([(b"iTXt", b"Description\x00\x01\x00en\x00\x00" + zlib.compress(b"subject s0002"))]),
    "embedded.html": b'<img src="data:image/png;base64,'
                     + base64.b64encode(_png([(b"tEXt", b"Title\x00S0002")])) + b'">',
    "_sources/notebooks/embedded.ipynb": b'{"outputs": [{"data": {"image/png": "'
                                         + base64.b64encode(_png([(b"tEXt", b"Title\x00S0002")])) + b'"}}]}',
    "results.zip": _zip({"saliency/mean_all.nii.gz": b"x", "cohort/S0002_T1w.nii.gz": b"x"}),
    "results_content.zip": _zip({"tiv/tertiles.tsv": b"tertile\tparticipant_id\nlow\tS0002\n"}),
    "nested.zip": _zip({"inner.zip": _zip({"table.tsv": b"S0002\t1\n"})}),
    "map.nii.gz": _nifti_gz("S0002"),
    "_images/S0002_slice.png": _png([]),
}


@pytest.mark.parametrize("path", sorted(PLANTS))
def test_guard_refuses_a_planted_id_naming_the_file(tmp_path, path):
    run = _restricted_run(tmp_path / "run")
    site = tmp_path / "site"
    (site / "_static").mkdir(parents=True)
    (site / "index.html").write_text("<html>aggregates only: 48 subjects, sub-P001 is shareable</html>")
    assert check_published(run, site) >= 0  # clean site passes (a shareable subject may be named)
    target = site / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(PLANTS[path])
    with pytest.raises(PrivacyError, match="refusing to publish") as err:
        check_published(run, site)
    assert path in str(err.value)
    assert "s0002" in str(err.value).lower() or "mprage_20110602_br_0117" in str(err.value).lower()


def test_guard_reports_the_archive_member(tmp_path):
    run = _restricted_run(tmp_path / "run")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "results.zip").write_bytes(PLANTS["results_content.zip"])
    found = scan_published(tmp_path / "site", protected_names(run))
    assert found["results.zip!tiv/tertiles.tsv"] == ["s0002"]


# --------------------------------------------------------------------------------------- reasons
def test_scrub_reason_removes_ids_and_file_names():
    assert scrub_reason("image file is empty: S0002_T1w.nii.gz") == "image file is empty: <file>"
    assert scrub_reason("no image matches 'img/S0009_T1w.nii.gz' under /data/cc") == \
        "no image matches <value> under <file>"
    assert scrub_reason("sub-0002: RuntimeError: failed for SUB-0002", ["sub-0002"]) == \
        "<id>: RuntimeError: failed for <id>"
    assert scrub_reason("missing sex") == "missing sex"


def test_public_exclusions_carry_no_ids_or_file_names(repo_root):
    excl = pd.DataFrame([
        {"participant_id": "S0002", "cohort": "CC-359", "reason": "image file is empty: S0002_T1w.nii.gz"},
        {"participant_id": "S0003", "cohort": "CC-359", "reason": "image file is empty: S0003_T1w.nii.gz"},
        {"participant_id": "S0009", "cohort": "CC-359", "reason": "no image matches 'img/S0009_T1w.nii.gz' under /d"},
        {"participant_id": "sub-P1", "cohort": "phantom", "reason": "image file is empty: sub-P1_T1w.nii.gz"},
    ])
    pub = public_exclusions(excl, repo_root / "data_manifest.yaml")
    text = pub.to_csv()
    assert "S000" not in text and "nii.gz" not in pub[pub["cohort"] == "CC-359"].to_csv()
    assert pub.loc[pub["reason"] == "image file is empty: <file>", "n"].tolist() == [2]
    assert "sub-P1" in text  # the shareable cohort keeps its detail


# --------------------------------------------------------------------------------------- group size
def test_suppression_on_a_crafted_table():
    t = pd.DataFrame({"dataset": ["A", "B", "C"], "n": [12, 4, 5], "accuracy": [0.9, 1.0, 0.8]})
    out = suppress_small_groups(t, 5)
    assert out.loc[1, "n"] == "<5" and pd.isna(out.loc[1, "accuracy"]) and out.loc[1, "dataset"] == "B"
    assert "fewer than 5" in out.loc[1, "note"]
    assert out.loc[0, "accuracy"] == 0.9 and out.loc[2, "accuracy"] == 0.8 and out.loc[2, "note"] == ""
    # any group-size column counts: accuracy of 2 females is about 2 people
    m = pd.DataFrame({"group": ["x"], "n": [20], "n_female": [2], "n_male": [18], "tiv_low": [1200.0],
                      "value": [0.7]})
    s = suppress_table(m, 5)
    assert pd.isna(s.loc[0, "value"]) and "tiv_low" not in s.columns


def test_group_summary_has_no_single_subject_value():
    t = pd.DataFrame({"site": ["a"] * 6 + ["b"], "dice": np.linspace(0.8, 0.95, 7)})
    out = group_summary(t, ["dice"], by=["site"], k=5)
    assert set(out["statistic"]) == {"mean", "sd", "median"}
    assert out[out["site"] == "b"]["dice"].isna().all()  # the site of one subject is suppressed
    assert out[out["site"] == "a"]["dice"].notna().all()


def test_histogram_bin_of_one_is_suppressed():
    values = [1.0, 1.1, 1.2, 1.3, 1.4, 1.45, 9.9]  # 9.9 alone in its bin
    b = binned_counts(values, bins=[0, 2, 5, 10], k=5)
    assert b["n"].tolist()[0] == 6 and b["n"].tolist()[1] == 0
    assert bool(b["suppressed"].iloc[2]) and np.isnan(b["n"].iloc[2])
    assert binned_counts(values, bins=[0, 2, 5, 10], k=1)["n"].iloc[2] == 1
    grid = binned_counts_2d([1, 1, 1, 1, 1, 9], [1, 1, 1, 1, 1, 9], bins=2, k=5)
    assert grid["n_suppressed"] == 1 and np.nansum(grid["counts"]) == 5


def test_table1_public_drops_ranges_and_small_datasets():
    rng = np.random.default_rng(0)
    p = pd.DataFrame({"dataset": ["A"] * 10 + ["B"] * 2, "sex": ["F", "M"] * 6, "age": rng.uniform(20, 80, 12),
                      "vendor": "GE", "field": 3.0})
    t = table1_public(p, 5).set_index("dataset")
    assert "(" not in str(t.loc["All", "Age (F)"]) and "±" in str(t.loc["All", "Age (F)"])  # no min–max
    # B (2 subjects) alone would be All - A: it is pooled, with A as the next smallest
    assert list(t.index) == ["other datasets (pooled: 2)", "All"] and t.loc["All", "N"] == 12
    tiny = table1_public(p.iloc[10:], 5).set_index("dataset")  # fewer than k subjects in all
    assert tiny.loc["All", "N"] == "<5" and pd.isna(tiny.loc["All", "Age (F)"])
    # complementary suppression: a small dataset is pooled with the next smallest until the pool reaches k
    p3 = pd.concat([p, p.iloc[:6].assign(dataset="C")], ignore_index=True)
    t3 = table1_public(p3, 5).set_index("dataset")
    assert list(t3.index) == ["A", "other datasets (pooled: 2)", "All"]
    assert t3.loc["other datasets (pooled: 2)", "N"] == 8 and t3.loc["All", "N"] == 18


def test_qc_aggregate_mean_sd_and_counts():
    slices = [np.full((4, 4), v, np.float32) for v in (1.0, 2.0, 3.0, 4.0, 5.0)]
    agg = qc_aggregate(slices, [True, False, False, False, False], ["sub-9: registration failed"],
                       ids=["sub-9"], k=5)
    assert np.allclose(agg.mean, 3.0) and np.allclose(agg.sd, np.std([1, 2, 3, 4, 5], ddof=1))
    assert agg.counts["n"].tolist() == [1, 1] and "sub-9" not in agg.counts.to_csv()
    assert qc_aggregate(slices[:4], [False] * 4, k=5).mean is None


def test_results_bundle_withholds_small_maps_and_rows(tmp_path):
    from brainsex.privacy import Policy

    run = tmp_path / "run"
    (run / "saliency").mkdir(parents=True)
    (run / "tiv").mkdir()
    (run / "atlas").mkdir()
    pd.DataFrame({"label": [1], "weighted_score": [0.5]}).to_csv(run / "atlas" / "region_scores.tsv", sep="\t")
    for name in ("mean_correct_all.nii.gz", "mean_low_F.nii.gz", "mean_high_M.nii.gz"):
        (run / "saliency" / name).write_bytes(b"map")
    pd.DataFrame({"file": ["mean_correct_all.nii.gz", "mean_low_F.nii.gz"], "n": [30, 1]}).to_csv(
        run / "saliency" / "maps.tsv", sep="\t", index=False)  # mean_high_M: size unknown
    pd.DataFrame({"tertile": ["low", "low"], "sex": ["F", "M"], "n": [1, 9], "accuracy": [1.0, 0.8],
                  "tiv_low": [1100.0, 1100.0]}).to_csv(run / "tiv" / "tertiles.tsv", sep="\t", index=False)
    open_zip = results_bundle(run, tmp_path / "open.zip")
    assert {"saliency/mean_low_F.nii.gz", "atlas/region_scores.tsv"} <= set(zipfile.ZipFile(open_zip).namelist())
    zf = zipfile.ZipFile(results_bundle(run, tmp_path / "r.zip", policy=Policy(shareable=False, k=5)))
    names = zf.namelist()
    assert "saliency/mean_correct_all.nii.gz" in names
    assert "saliency/mean_low_F.nii.gz" not in names and "saliency/mean_high_M.nii.gz" not in names
    note = zf.read("SUPPRESSED.txt").decode()
    assert "mean_low_F" in note and "mean_high_M" in note
    assert "region_scores" not in " ".join(names)  # read off a map that is not published
    tert = pd.read_csv(io.BytesIO(zf.read("tiv/tertiles.tsv")), sep="\t")
    assert pd.isna(tert.loc[0, "accuracy"]) and tert.loc[1, "accuracy"] == 0.8 and "tiv_low" not in tert.columns


def test_local_only_outputs_are_stripped():
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("show(...)")
    cell.outputs = [nbformat.v4.new_output("display_data", {"text/html": "<p>mean map</p>"}),
                    nbformat.v4.new_output("display_data", {"text/html": "<p>S0002</p>"},
                                           metadata={LOCAL_ONLY_KEY: True})]
    nb.cells.append(cell)
    assert strip_local_outputs(nb) == 1
    assert [o["data"]["text/html"] for o in nb.cells[0].outputs] == ["<p>mean map</p>"]


# --------------------------------------------------------------------------------------- builds
@pytest.mark.slow
def test_build_over_non_shareable_cohort_is_refused(mini_book, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    _participants(run_dir, [{"participant_id": f"sub-CC{i:04d}", "cohort": "CC-359", "shareable": False}
                            for i in range(5)])
    # a chapter that (wrongly) prints a per-subject table of the non-shareable cohort
    write_notebook(mini_book / "notebooks" / "b.py",
                   "import pandas as pd\n"
                   "pd.read_csv(run_dir + '/cohort/participants.tsv', sep='\\t')",
                   params='run_dir = "."\nseed = 0\n')
    with pytest.raises(PrivacyError, match=r"refusing to publish.*sub-cc000"):
        build(mini_book, "smoke", run_dir=run_dir, out=out)
    assert not (out / "html").exists()  # nothing was published

    # aggregate-only output is fine; a local-only output stays in the run directory
    write_notebook(mini_book / "notebooks" / "b.py",
                   "import pandas as pd\n"
                   "from brainsex.figures import show_table\n"
                   "t = pd.read_csv(run_dir + '/cohort/participants.tsv', sep='\\t')\n"
                   "show_table(t, caption='local', local_only=True)\n"
                   "t.groupby('cohort').size()",
                   params='run_dir = "."\nseed = 0\n')
    html = build(mini_book, "smoke", run_dir=run_dir, out=out)
    assert (html / "notebooks" / "b.html").is_file()
    assert not scan_published(html, protected_names(run_dir))
    assert "sub-CC0001" in (run_dir / "notebooks" / "b.ipynb").read_text()

    # a later build that would leak is refused and the previous good site stays in place
    before = (html / "notebooks" / "b.html").read_text()
    (mini_book / "book" / "intro.md").write_text("# Intro\n\nsub-CC0003 was excluded.\n\n```{tableofcontents}\n```\n")
    with pytest.raises(PrivacyError, match=r"book/intro"):
        build(mini_book, "smoke", run_dir=run_dir, out=out)
    assert (out / "html" / "notebooks" / "b.html").read_text() == before
    assert "sub-CC0003" not in (out / "html" / "book" / "intro.html").read_text()


def test_exclusions_of_non_shareable_cohorts_are_protected(tmp_path, repo_root):
    (tmp_path / "cohort").mkdir()
    pd.DataFrame([{"participant_id": "sub-X9", "cohort": "ADNI", "reason": "missing sex"},
                  {"participant_id": "sub-P9", "cohort": "phantom", "reason": "corrupt image"}]).to_csv(
        tmp_path / "cohort" / "exclusions.tsv", sep="\t", index=False)
    assert protected_ids(tmp_path, repo_root / "data_manifest.yaml") == {"sub-X9"}


def test_a_manifest_copy_reaches_the_chapters(mini_book, tmp_path):
    from brainsex.book import plan_build, run_notebooks

    copy = tmp_path / "elsewhere" / "restricted.yaml"
    copy.parent.mkdir()
    copy.write_text((mini_book / "data_manifest.yaml").read_text().replace("shareable: true", "shareable: false"))
    write_notebook(mini_book / "notebooks" / "b.py", "print('manifest:', manifest)",
                   params='run_dir = "."\nmanifest = "data_manifest.yaml"\n')
    plan = plan_build(mini_book, "smoke", manifest=copy, run_dir=tmp_path / "run")
    assert plan.manifest_path == copy.resolve()
    run_notebooks(plan)
    executed = (tmp_path / "run" / "notebooks" / "b.ipynb").read_text()
    assert "manifest: elsewhere/restricted.yaml" in executed
    assert plan_build(mini_book, "smoke").manifest_path == (mini_book / "data_manifest.yaml").resolve()
