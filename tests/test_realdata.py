"""Real scans end to end: the smoke book on real IXI heads, and a BIDS cohort as most BIDS datasets come."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainsex import cohorts

ROOT = Path(__file__).resolve().parents[1]
IXI = ROOT.parent / "shared" / "realdata" / "IXI-HH-2mm"  # ../shared beside the checkout, as CI lays it

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not IXI.is_dir(), reason=f"real IXI sample not found at {IXI} (see shared/realdata/README.md); "
                                              "the book on real scans is checked where the sample exists")
def test_smoke_book_on_20_real_ixi_heads(tmp_path, monkeypatch):
    """Every chapter on a small real cohort without truth: notes instead of failures, no planted truth read.

    20 heads (10 women, 10 men by the subsample's strata) are the fewest that still give every chapter a
    sex-stratified split with both sexes in the test set (80/10/10: strata of at least 10). Chapter 07 runs
    its checks on the phantom matched to this run (48 subjects, built here: the only test of that path);
    what follows is the smoke book's own chapter 07 on a phantom of the same size, grid and settings, so
    two of its costs are cut here and covered there: the size experiments are off (run on the smoke
    phantom by the ``smoke_book`` fixture, tests/test_book_e2e.py, and by
    tests/test_validity.py::test_size_experiments_on_a_tiny_run), which also checks the chapter's
    "skipped" branch, and the registered-warp sample of the positive control is 8 subjects (16 in the
    smoke book).
    """
    from brainsex.book import build

    data = tmp_path / "data"
    data.mkdir()
    (data / "IXI").symlink_to(IXI)  # BRAINSEX_DATA holding IXI/, as the manifest expects
    monkeypatch.setenv("BRAINSEX_DATA", str(data))
    run_dir = tmp_path / "run"
    html = build(ROOT, "smoke", overrides={"cohorts": ["IXI"], "n_subjects": 20, "size_experiments": False,
                                           "tbm_subjects": 8}, run_dir=run_dir, out=tmp_path / "out", force=True)
    assert (html / "notebooks" / "07_validity.html").is_file()
    parts = pd.read_csv(run_dir / "cohort" / "participants.tsv", sep="\t")
    assert len(parts) == 20 and (parts["vendor"] == "Philips").all() and (parts["field"] == 3.0).all()
    excl = pd.read_csv(run_dir / "cohort" / "exclusions.tsv", sep="\t")
    reasons = dict(zip(excl["participant_id"], excl["reason"], strict=True))
    assert "duplicate" in reasons["IXI328"] and "without demographics" in reasons["IXI637"]
    pre = pd.read_csv(run_dir / "preprocess" / "preprocessed.tsv", sep="\t")
    assert (pre["status"] == "ok").all(), pre.loc[pre["status"] != "ok", ["participant_id", "reason"]]
    assert (run_dir / "preprocess" / "qc_flags.tsv").is_file()
    regions = (html / "notebooks" / "06_regions.html").read_text()
    assert "real scans" in regions
    validity = (html / "notebooks" / "07_validity.html").read_text()
    assert "phantom matched to this run" in validity
    assert "This build skipped the experiment" in validity
    assert not list((run_dir / "validity").glob("size_experiments*"))
    split = pd.read_csv(run_dir / "train" / "split.tsv", sep="\t").merge(parts[["participant_id", "sex"]])
    assert len(split) == 20
    assert set(split.loc[split["split"] == "test", "sex"]) == {"F", "M"}
    assert (run_dir / "validity" / "matched_phantom" / "cohort" / "phantom" / "ground_truth" / "regions.tsv").is_file()
    assert not (run_dir / "cohort" / "phantom").exists()


def test_bids_cohort_skull_stripped_without_vendor_columns(tmp_path):
    """Skull-stripped images, sex and age only in participants.tsv: every subject loads and preprocesses."""
    from brainsex.preprocess import preprocess_cohort
    from brainsex.qc import review_registrations
    from brainsex.synthetic import make_cohort

    phantom = tmp_path / "phantom"
    made = make_cohort(phantom, n=6, voxel_size=8.0, seed=3, progress=False)  # >= qc.MIN_SUBJECTS: flags computed
    root = tmp_path / "bids"
    rows = []
    for r in made.itertuples(index=False):
        pid = r.participant_id.removeprefix("sub-")
        head = nib.load(phantom / r.participant_id / "anat" / f"{r.participant_id}_T1w.nii.gz")
        mask = nib.load(phantom / "ground_truth" / "masks" / f"{r.participant_id}_desc-brain_mask.nii.gz")
        brain = np.asarray(head.dataobj, dtype=np.float32) * (np.asarray(mask.dataobj) > 0)
        out = root / f"sub-{pid}" / "anat" / f"sub-{pid}_T1w.nii.gz"
        out.parent.mkdir(parents=True)
        nib.save(nib.Nifti1Image(brain, head.affine), out)
        rows.append({"participant_id": f"sub-{pid}", "sex": r.sex, "age": r.age})
    pd.DataFrame(rows).to_csv(root / "participants.tsv", sep="\t", index=False)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "stripped", "BIDSVersion": "1.8.0"}))
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(textwrap.dedent(f"""\
        version: 1
        cohorts:
          - name: stripped
            kind: bids
            root: {root}
            shareable: true
            columns: {{id: participant_id, sex: sex, age: age}}
            image_pattern: "sub-{{id}}/anat/sub-{{id}}_T1w.nii.gz"
        """))
    run = tmp_path / "run"
    parts, excl = cohorts.load_cohorts(manifest, ["stripped"], run_dir=run)
    assert excl.empty and len(parts) == 6
    assert (parts["vendor"] == "unknown").all() and parts["field"].isna().all()
    assert "vendor unknown" in cohorts.table1(parts).columns
    preprocess_cohort(parts, run / "preprocess", voxel_size=8.0, n_workers=1, progress=False)
    table, flags = review_registrations(run / "preprocess")
    assert (table["status"] == "ok").all(), table.loc[table["status"] != "ok", ["participant_id", "reason"]]
    assert len(flags) == 6 and "note" not in flags.attrs
