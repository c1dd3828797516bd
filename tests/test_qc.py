"""Cohort-relative QC: robust z flags, clearly wrong registrations, TIV sanity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from brainsex import BrainsexError, qc
from brainsex.io import read_table, write_table

IXI = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "IXI-HH-2mm"  # ../shared beside the checkout


def cohort(n: int = 30, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    mask = rng.normal(1450, 110, n)
    return pd.DataFrame({"participant_id": [f"S{i:02d}" for i in range(n)], "status": "ok", "reason": "",
                         "similarity": rng.uniform(0.39, 0.61, n), "mask_ml": mask,
                         "etiv_ml": mask * rng.normal(1.0, 0.02, n), "sex": ["F", "M"] * (n // 2)})


def test_robust_z_ignores_outliers_and_nan():
    z = qc.robust_z([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 10.0, np.nan])
    assert z[6] > 20 and np.isnan(z[7]) and np.all(np.abs(z[:6]) < 1.5)
    assert np.all(qc.robust_z([2.0, 2.0, 2.0]) == 0)


def test_qc_flags_flag_volume_outliers_only():
    t = cohort()
    t.loc[3, "etiv_ml"] = 2600.0  # eTIV far from the mask volume and from the cohort
    flags = qc.qc_flags(t).set_index("participant_id")
    assert flags.loc["S03", "flagged"] and "eTIV high" in flags.loc["S03", "flag_reason"]
    assert "eTIV / mask volume" in flags.loc["S03", "flag_reason"]
    assert flags["flagged"].sum() == 1
    small = qc.qc_flags(t.head(3))
    assert not small["flagged"].any() and "too few" in small.attrs["note"]
    with pytest.raises(BrainsexError, match="etiv_ml"):
        qc.qc_flags(t.drop(columns="etiv_ml"))


def test_review_fails_only_clearly_wrong_registrations(tmp_path):
    t = cohort()
    t.loc[0, "similarity"] = 0.385  # an ordinary real head the old phantom cutoff (0.4) rejected
    t.loc[1, "similarity"] = 0.20   # a head registered sideways
    write_table(t, tmp_path / "preprocessed.tsv")
    table, flags = qc.review_registrations(tmp_path)
    status = table.set_index("participant_id")["status"]
    assert status["S00"] == "ok" and status["S01"] == "failed"
    assert (status == "failed").sum() == 1
    reason = table.set_index("participant_id").loc["S01", "reason"]
    assert "registration clearly wrong" in reason and "S01" not in reason  # reasons carry no ID (issue 15)
    assert flags.set_index("participant_id").loc["S01", "failed"]
    on_disk = read_table(tmp_path / "preprocessed.tsv")
    assert (on_disk["status"] == "failed").sum() == 1 and (tmp_path / "qc_flags.tsv").is_file()
    again, _ = qc.review_registrations(tmp_path)  # idempotent
    assert again["status"].tolist() == table["status"].tolist()


def test_tiv_sanity_reports_ratio_next_to_published_range():
    t = pd.DataFrame({"sex": ["F"] * 3 + ["M"] * 3, "etiv_ml": [1300, 1280, 1320, 1480, 1500, 1460],
                      "mask_ml": [1290, 1270, 1330, 1470, 1510, 1450]})
    s = qc.tiv_sanity(t)
    assert s["ratio"] == pytest.approx(1300 / 1480)
    assert s["within"] == (s["published_low"] <= s["ratio"] <= s["published_high"])
    assert s["r_mask"] > 0.95 and s["n_f"] == 3


@pytest.mark.slow
@pytest.mark.skipif(not IXI.is_dir(), reason=f"real IXI sample not found at {IXI} (see shared/realdata/README.md)")
def test_a_deliberately_misregistered_real_scan_fails_and_real_heads_pass(tmp_path):
    """Five real heads and one turned 90 degrees (beyond what rigid registration recovers)."""
    import nibabel as nib

    from brainsex.preprocess import load_t1, preprocess_cohort

    images = sorted(IXI.glob("IXI*-T1.nii.gz"))[:5]
    img = load_t1(images[0])
    bad = tmp_path / "IXI999-HH-0000-T1.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(np.rot90(np.asarray(img.dataobj), 1, axes=(1, 2))), img.affine),
             bad)
    rows = [{"participant_id": p.name[:6], "image": str(p), "mask": ""} for p in [*images, bad]]
    preprocess_cohort(pd.DataFrame(rows), tmp_path / "pre", voxel_size=4.0, n_workers=1, progress=False)
    table, flags = qc.review_registrations(tmp_path / "pre")
    status = table.set_index("participant_id")["status"]
    assert status["IXI999"] == "failed", table[["participant_id", "similarity", "reason"]]
    assert (status.drop("IXI999") == "ok").all(), table[["participant_id", "similarity", "reason"]]


def test_has_truth_only_for_the_runs_own_phantom(tmp_path):
    from brainsex.validity import has_truth

    run = tmp_path / "run"
    gt = run / "cohort" / "phantom" / "ground_truth"
    gt.mkdir(parents=True)
    assert not has_truth(run)  # no regions table
    (gt / "regions.tsv").write_text("label\tsign\n1\t1\n")
    phantom_img = run / "cohort" / "phantom" / "sub-1" / "anat" / "sub-1_T1w.nii.gz"
    write_table(pd.DataFrame({"participant_id": ["sub-1"], "image": [str(phantom_img)]}),
                run / "cohort" / "participants.tsv")
    assert has_truth(run)
    # the same run directory reused for real scans keeps the old truth on disk: it is not this run's
    write_table(pd.DataFrame({"participant_id": ["IXI012"], "image": [str(tmp_path / "IXI012-HH-1211-T1.nii.gz")]}),
                run / "cohort" / "participants.tsv")
    assert not has_truth(run)
