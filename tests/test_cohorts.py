"""Cohort adapters on small fake trees (IXI, BIDS, table), the phantom adapter, Table 1."""

import gzip
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainsex import BrainsexError, cohorts, synthetic
from brainsex.manifest import CohortEntry, load_manifest

REPO = Path(__file__).resolve().parents[1]


def nii(path: Path, shape=(8, 9, 7)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(0).integers(0, 500, size=shape).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


def corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image" * 10)
    return path


def truncated(path: Path) -> Path:
    nii(path, shape=(20, 20, 20))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def reasons(excl: pd.DataFrame) -> dict[str, str]:
    return dict(zip(excl["participant_id"], excl["reason"], strict=True))


# ---------------------------------------------------------------------------------------- checks
def test_check_image(tmp_path):
    assert cohorts.check_image(nii(tmp_path / "ok.nii.gz")) is None
    assert cohorts.check_image(nii(tmp_path / "squeezable.nii.gz", shape=(8, 8, 8, 1))) is None
    assert "not found" in cohorts.check_image(tmp_path / "missing.nii.gz")
    assert "not 3-D" in cohorts.check_image(nii(tmp_path / "four_d.nii.gz", shape=(8, 8, 8, 3)))
    assert "cannot be read" in cohorts.check_image(corrupt(tmp_path / "bad.nii.gz"))
    assert "truncated" in cohorts.check_image(truncated(tmp_path / "cut.nii.gz"))
    raw = nii(tmp_path / "plain.nii", shape=(20, 20, 20))
    raw.write_bytes(raw.read_bytes()[:-100])
    assert "truncated" in cohorts.check_image(raw)
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    assert "empty" in cohorts.check_image(tmp_path / "empty.nii.gz")
    # a valid gzip stream holding too little data is caught by the gzip length field
    good = nii(tmp_path / "short.nii.gz", shape=(20, 20, 20))
    with gzip.open(good) as fh:
        payload = fh.read()
    with gzip.open(good, "wb") as fh:
        fh.write(payload[:1000])
    assert "truncated" in cohorts.check_image(good)


@pytest.mark.parametrize(
    ("value", "vendor"),
    [("GE MEDICAL SYSTEMS", "GE"), ("ge", "GE"), ("Philips Healthcare", "Philips"), ("SIEMENS", "Siemens"),
     ("Toshiba", "Toshiba"), ("CANON MEDICAL SYSTEMS", "Canon"), ("Hitachi Medical Corporation", "Hitachi"),
     ("", None), (float("nan"), None), ("Generic  scanner", "Generic scanner")],
)
def test_normalise_vendor(value, vendor):
    assert cohorts.normalise_vendor(value) == vendor


@pytest.mark.parametrize(
    ("value", "field"),
    [("3T", 3.0), (3, 3.0), ("1.5", 1.5), (1.494, 1.5), ("2.89", 3.0), (15000, 1.5), ("15", 1.5), ("7T", 7.0), (0.55, 0.55), ("", None),
     ("n/a", None), ("strong", None)],
)
def test_normalise_field(value, field):
    assert cohorts.normalise_field(value) == field


# ------------------------------------------------------------------------------------------- IXI
@pytest.fixture
def ixi_tree(tmp_path):
    root = tmp_path / "IXI"
    rows = [
        (2, 2, 35.8), (12, 1, 38.78), (13, 1, 46.7), (14, 0, 34.0), (15, 1, 52.0), (15, 1, 52.0),
        (16, 1, 40.0), (16, 2, 40.0), (17, 2, np.nan), (18, 2, 50.0), (19, 1, 60.0), (20, 2, 41.0),
        (21, 1, 30.0), (22, 1, 30.0),
    ]
    df = pd.DataFrame(rows, columns=["IXI_ID", "SEX_ID (1=m, 2=f)", "AGE"])
    df["HEIGHT"] = 0  # IXI uses 0 for missing in several columns
    root.mkdir()
    df.to_excel(root / "IXI.xlsx", index=False)
    img = root / "IXI-T1"
    for name in ["IXI002-Guys-0828", "IXI012-HH-1211", "IXI013-IOP-0862", "IXI014-HH-1212", "IXI015-HH-1258",
                 "IXI016-Guys-0697", "IXI017-Guys-0698", "IXI022-XYZ-0001", "IXI099-Guys-0999"]:
        nii(img / f"{name}-T1.nii.gz")
    corrupt(img / "IXI018-Guys-0001-T1.nii.gz")
    nii(img / "IXI019-Guys-0002-T1.nii.gz", shape=(8, 8, 8, 2))
    truncated(img / "IXI020-HH-0003-T1.nii.gz")
    manifest = load_manifest(REPO / "data_manifest.yaml")
    entry = manifest.cohort("IXI").model_copy(update={"root": str(root), "participants": "IXI.xlsx", "enabled": True,
                                                      "download": False})
    return root, entry


def test_ixi_adapter(ixi_tree):
    root, entry = ixi_tree
    table, excl = cohorts.load_cohort(entry)
    assert list(table.columns) == cohorts.COLUMNS
    t = table.set_index("participant_id")
    assert sorted(t.index) == ["IXI002", "IXI012", "IXI013", "IXI015", "IXI022"]
    # an unknown site is data (vendor and field unknown), never a reason to exclude
    assert t.loc["IXI022", "vendor"] == "unknown" and np.isnan(t.loc["IXI022", "field"])
    assert t.loc["IXI002", ["sex", "vendor", "field"]].tolist() == ["F", "Philips", 1.5]
    assert t.loc["IXI012", ["sex", "vendor", "field"]].tolist() == ["M", "Philips", 3.0]
    assert t.loc["IXI013", ["vendor", "field"]].tolist() == ["GE", 1.5]
    assert t.loc["IXI002", "age"] == pytest.approx(35.8)
    assert (t["dataset"] == "IXI").all() and t["shareable"].all() and t["tiv_ml"].isna().all()
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in t["image"])
    r = reasons(excl)
    assert "missing sex" in r["IXI014"]
    assert "duplicate" in r["IXI016"]
    assert "missing age" in r["IXI017"]
    assert "cannot be read" in r["IXI018"]
    assert "not 3-D" in r["IXI019"]
    assert "truncated" in r["IXI020"]
    assert "no T1 image" in r["IXI021"]
    assert "IXI022" not in r
    assert "without demographics" in r["IXI099"]
    assert set(excl["cohort"]) == {"IXI"}
    assert len(excl) == 8


def test_ixi_without_demographics_file_is_a_clear_error(ixi_tree):
    root, entry = ixi_tree
    (root / "IXI.xlsx").unlink()
    with pytest.raises(BrainsexError, match="fetch_ixi"):
        cohorts.load_cohort(entry)


def test_wrong_column_mapping_names_file_and_key(ixi_tree):
    root, entry = ixi_tree
    bad = entry.model_copy(update={"columns": entry.columns.model_copy(update={"sex": "GENDER"})})
    with pytest.raises(BrainsexError, match=r"IXI\.xlsx.*columns\.sex: 'GENDER'"):
        cohorts.load_cohort(bad)


def test_fetch_ixi_uses_pooch_with_hashes(tmp_path, monkeypatch):
    import pooch

    calls = []
    monkeypatch.setattr(pooch, "retrieve", lambda url, **kw: calls.append((url, kw)) or str(tmp_path / kw["fname"]))
    assert cohorts.fetch_ixi(tmp_path, progressbar=False) == tmp_path
    got = {kw["fname"]: (url, kw["known_hash"], kw["processor"]) for url, kw in calls}
    assert got["IXI.xls"][1] == "md5:066002afe250e4375d132266fcfceac5"
    assert got["IXI-T1.tar"][1] == "md5:34901a0593b41dd19c1a1f746eac2d58"
    assert got["IXI-T1.tar"][0].endswith("/IXI-T1.tar") and isinstance(got["IXI-T1.tar"][2], pooch.Untar)
    assert got["IXI.xls"][2] is None


# ------------------------------------------------------------------------------------------ BIDS
def bids_entry(root: Path, **kw) -> CohortEntry:
    base = {"name": "fakebids", "kind": "bids", "root": str(root), "shareable": False,
            "columns": {"id": "participant_id", "sex": "sex", "age": "age", "vendor": "scanner",
                        "field": "field_strength"},
            "sex_coding": {"female": ["F"], "male": ["M"]},
            "image_pattern": "sub-{id}/ses-*/anat/sub-{id}_ses-*_T1w.nii.gz", "dataset": "FakeBIDS"}
    base.update(kw)
    return CohortEntry.model_validate(base)


def test_bids_adapter_earliest_session_and_bad_rows(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    (root / "participants.tsv").write_text(textwrap.dedent("""\
        participant_id\tsex\tage\tscanner\tfield_strength
        sub-01\tF\t60\tSIEMENS\t3
        sub-02\tM\t70\tToshiba\t1.5
        sub-03\t\t65\tSiemens\t3
        sub-04\tM\t66\tSiemens\t3
        sub-05\tX\t50\tSiemens\t3
        sub-07\tF\t50\tSiemens\t3
        sub-07\tF\t52\tSiemens\t3
        sub-09\tM\t44\tPhilips\t7
        """))
    early = nii(root / "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz")
    nii(root / "sub-01/ses-10/anat/sub-01_ses-10_T1w.nii.gz")  # later session (a plain sort would pick it)
    for sid in ("02", "03", "05", "07", "08", "09"):
        nii(root / f"sub-{sid}/ses-1/anat/sub-{sid}_ses-1_T1w.nii.gz")
    table, excl = cohorts.load_cohort(bids_entry(root))
    assert table["participant_id"].tolist() == ["sub-01", "sub-02", "sub-09"]
    row = table.iloc[0]
    assert row["image"] == str(early.resolve())
    assert (row["sex"], row["vendor"], row["field"], row["dataset"], row["shareable"]) == (
        "F", "Siemens", 3.0, "FakeBIDS", False)
    r = reasons(excl)
    t = table.set_index("participant_id")
    assert t.loc["sub-02", ["vendor", "field"]].tolist() == ["Toshiba", 1.5]  # open categories
    assert t.loc["sub-09", "field"] == 7.0
    assert "missing sex" in r["sub-03"]
    assert "no image matches" in r["sub-04"]
    assert "unknown sex code 'X'" in r["sub-05"]
    assert "duplicate" in r["sub-07"]
    assert "without demographics" in r["sub-08"]
    assert "sub-02" not in r and "sub-09" not in r


def test_bids_without_vendor_columns_reads_sidecars_or_records_unknown(tmp_path):
    import json

    root = tmp_path / "bids"
    root.mkdir()
    (root / "participants.tsv").write_text("participant_id\tsex\tage\nsub-01\tF\t30\nsub-02\tM\t31\n"
                                           "sub-03\tM\t32\n")
    for sid in ("01", "02", "03"):
        nii(root / f"sub-{sid}/anat/sub-{sid}_T1w.nii.gz")
    (root / "sub-01/anat/sub-01_T1w.json").write_text(json.dumps({"Manufacturer": "Canon Medical Systems",
                                                                  "MagneticFieldStrength": 3}))
    (root / "sub-02/anat/sub-02_T1w.json").write_text(json.dumps({"Manufacturer": "Hitachi"}))
    entry = bids_entry(root, columns={"id": "participant_id", "sex": "sex", "age": "age"},
                       image_pattern="sub-{id}/anat/sub-{id}_T1w.nii.gz")
    table, excl = cohorts.load_cohort(entry)
    assert excl.empty and len(table) == 3
    t = table.set_index("participant_id")
    assert t.loc["sub-01", ["vendor", "field"]].tolist() == ["Canon", 3.0]
    assert t.loc["sub-02", "vendor"] == "Hitachi" and np.isnan(t.loc["sub-02", "field"])
    assert t.loc["sub-03", "vendor"] == "unknown"
    # a dataset-level sidecar (BIDS inheritance) fills what the subject's own lacks
    (root / "T1w.json").write_text(json.dumps({"Manufacturer": "Siemens", "MagneticFieldStrength": 1.5}))
    t = cohorts.load_cohort(entry)[0].set_index("participant_id")
    assert t.loc["sub-03", ["vendor", "field"]].tolist() == ["Siemens", 1.5]
    assert t.loc["sub-02", ["vendor", "field"]].tolist() == ["Hitachi", 1.5]
    t1 = cohorts.table1(table)
    assert {"Canon", "Hitachi", "vendor unknown", "field unknown"} <= set(t1.columns)


def test_cohort_with_no_usable_subject_names_the_leading_reasons(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    (root / "participants.tsv").write_text("participant_id\tsex\tage\nsub-01\tX\t30\nsub-02\tX\t31\n"
                                           "sub-03\tF\t\n")
    for sid in ("01", "02", "03"):
        nii(root / f"sub-{sid}/anat/sub-{sid}_T1w.nii.gz")
    manifest_path = tmp_path / "manifest.yaml"
    manifest_path.write_text(textwrap.dedent(f"""\
        version: 1
        cohorts:
          - name: empty
            kind: bids
            root: {root}
            shareable: true
            image_pattern: "sub-{{id}}/anat/sub-{{id}}_T1w.nii.gz"
        """))
    with pytest.raises(BrainsexError, match=r"empty: no usable subject \(3 excluded\).*unknown sex code \(2\)"
                                            r".*missing age"):
        cohorts.load_cohorts(manifest_path, ["empty"], run_dir=tmp_path / "run")
    assert len(pd.read_csv(tmp_path / "run" / "cohort" / "exclusions.tsv", sep="\t")) == 3


def test_bids_session_column_keeps_the_earliest_row(tmp_path):
    root = tmp_path / "oasis"
    root.mkdir()
    (root / "participants.tsv").write_text(textwrap.dedent("""\
        participant_id\tsession\tsex\tage\tfield_strength
        sub-A\td0100\tF\t61.5\t3
        sub-A\td0020\tF\t60.1\t3
        sub-B\td0003\tM\t70.0\t1.5
        """))
    for sid, ses in (("A", "d0100"), ("A", "d0020"), ("B", "d0003")):
        nii(root / f"sub-{sid}/ses-{ses}/anat/sub-{sid}_ses-{ses}_T1w.nii.gz")
    entry = bids_entry(root, columns={"id": "participant_id", "sex": "sex", "age": "age", "field": "field_strength",
                                      "session": "session"},
                       image_pattern="sub-{id}/ses-{session}/anat/sub-{id}_ses-{session}_T1w.nii.gz",
                       vendor="Siemens")
    table, excl = cohorts.load_cohort(entry)
    t = table.set_index("participant_id")
    assert t.loc["sub-A", "age"] == pytest.approx(60.1)
    assert "ses-d0020" in t.loc["sub-A", "image"]
    assert t.loc["sub-B", "field"] == 1.5 and (t["vendor"] == "Siemens").all()
    assert excl.empty


# ----------------------------------------------------------------------------------------- table
def test_table_adapter_with_masks_and_subsampling(tmp_path):
    root = tmp_path / "cc359"
    ids = [f"CC{i:04d}_{v}_{f}" for i, (v, f) in enumerate([("philips", 15), ("ge", 3), ("siemens", 3)] * 4)]
    df = pd.DataFrame({"subject": ids, "gender": ["F", "M"] * 6, "age": np.linspace(40, 60, 12),
                       "vendor": [i.split("_")[1] for i in ids], "field_strength": [i.split("_")[2] for i in ids]})
    root.mkdir()
    df.to_csv(root / "participants.csv", index=False)
    for i in ids:
        nii(root / "Original" / f"{i}.nii.gz")
    nii(root / "Skull-stripping-masks" / f"{ids[0]}_staple.nii.gz")
    manifest = load_manifest(REPO / "data_manifest.yaml")
    entry = manifest.cohort("CC-359").model_copy(update={"root": str(root), "enabled": True})
    table, excl = cohorts.load_cohort(entry)
    assert len(table) == 12 and excl.empty
    t = table.set_index("participant_id")
    assert t.loc[ids[0], "mask"].endswith(f"{ids[0]}_staple.nii.gz") and t.loc[ids[1], "mask"] == ""
    assert t.loc[ids[0], ["vendor", "field"]].tolist() == ["Philips", 1.5]
    assert not t["shareable"].any()
    small, _ = cohorts.load_cohort(entry, n=6, seed=1)
    assert len(small) == 6
    assert small.groupby(["vendor", "field"]).size().tolist() == [2, 2, 2]
    again, _ = cohorts.load_cohort(entry, n=6, seed=1)
    assert again["participant_id"].tolist() == small["participant_id"].tolist()


# ------------------------------------------------------------------------------- phantom, many
def test_synthetic_adapter_and_load_cohorts(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    (root / "participants.tsv").write_text("participant_id\tsex\tage\tscanner\tfield_strength\n"
                                           "sub-01\tF\t60\tGE\t1.5\nsub-02\tM\t61\tGE\t3\n")
    for sid in ("01", "02"):
        nii(root / f"sub-{sid}/ses-1/anat/sub-{sid}_ses-1_T1w.nii.gz")
    manifest_path = tmp_path / "manifest.yaml"
    manifest_path.write_text(textwrap.dedent(f"""\
        version: 1
        cohorts:
          - name: phantom
            kind: synthetic
            root: cohort/phantom
            shareable: true
            synthetic: {{spec: paper, region_effect: 0.1}}
          - name: one
            kind: bids
            root: {root}
            shareable: false
            columns: {{id: participant_id, sex: sex, age: age, vendor: scanner, field: field_strength}}
            image_pattern: "sub-{{id}}/ses-*/anat/sub-{{id}}_ses-*_T1w.nii.gz"
          - name: two
            kind: bids
            root: {root}
            shareable: false
            columns: {{id: participant_id, sex: sex, age: age, vendor: scanner, field: field_strength}}
            image_pattern: "sub-{{id}}/ses-*/anat/sub-{{id}}_ses-*_T1w.nii.gz"
          - name: unused
            kind: bids
            root: {root}
            shareable: false
            enabled: false
            image_pattern: "x"
        """))
    run = tmp_path / "run"
    parts, excl = cohorts.load_cohorts(manifest_path, ["phantom", "one", "two"], run_dir=run, n=10, voxel_size=8.0,
                                       progress=False)
    assert list(parts.columns) == cohorts.COLUMNS
    assert parts["participant_id"].is_unique
    assert (parts["cohort"] == "phantom").sum() == 10
    assert {"one-sub-01", "two-sub-02"} <= set(parts["participant_id"])
    assert (run / "cohort" / "phantom" / "participants.tsv").is_file()
    on_disk = pd.read_csv(run / "cohort" / "participants.tsv", sep="\t")
    assert len(on_disk) == 14 and list(on_disk.columns) == cohorts.COLUMNS
    assert list(pd.read_csv(run / "cohort" / "exclusions.tsv", sep="\t").columns) == cohorts.EXCLUSION_COLUMNS
    ph = parts[parts["cohort"] == "phantom"]
    assert ph["shareable"].all() and ph["tiv_ml"].notna().all() and (ph["mask"] == "").all()
    assert set(ph["dataset"]) <= {"ADNI", "CC-359", "Cam-CAN", "OASIS-3"}
    with pytest.raises(BrainsexError, match="disabled"):
        cohorts.load_cohorts(manifest_path, ["unused"], run_dir=run)
    with pytest.raises(BrainsexError, match="no cohort named 'nope'"):
        cohorts.load_cohorts(manifest_path, ["nope"], run_dir=run)


def test_unknown_synthetic_option_is_rejected(tmp_path):
    entry = CohortEntry.model_validate({"name": "p", "kind": "synthetic", "root": "ph", "shareable": True,
                                        "synthetic": {"region_effekt": 0.2}})
    with pytest.raises(BrainsexError, match="region_effekt"):
        cohorts.load_cohort(entry, run_dir=tmp_path, n=2, voxel_size=8.0, progress=False)


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(BrainsexError, match="does not exist"):
        cohorts.load_cohort(bids_entry(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------------------ Table 1
def test_table1_reproduces_the_paper_counts():
    df = synthetic.paper_demographics(seed=0)
    t1 = cohorts.table1(df)
    assert list(t1.index) == ["ADNI", "CC-359", "Cam-CAN", "OASIS-3", "All"]
    strata = synthetic.PAPER_STRATA
    for ds in ["ADNI", "CC-359", "Cam-CAN", "OASIS-3"]:
        s = strata[strata["dataset"] == ds]
        assert t1.loc[ds, "Female"] == s.loc[s["sex"] == "F", "count"].sum()
        assert t1.loc[ds, "Male"] == s.loc[s["sex"] == "M", "count"].sum()
        for v in ("GE", "Philips", "Siemens"):
            assert t1.loc[ds, v] == s.loc[s["vendor"] == v, "count"].sum()
        assert t1.loc[ds, "3 T"] == s.loc[s["field"] == 3.0, "count"].sum()
    assert t1.loc["All", "N"] == 2110
    assert t1.loc["ADNI", "Age (F)"].startswith("74.7 ± 5.7 (")
    assert t1.loc["Cam-CAN", "Age (M)"].startswith("54.8 ± 18.4 (")
    with pytest.raises(BrainsexError, match="vendor"):
        cohorts.table1(df.drop(columns="vendor"))


def test_public_exclusions_hide_ids_of_non_shareable_cohorts(tmp_path):
    manifest = load_manifest(REPO / "data_manifest.yaml")
    excl = pd.DataFrame({"participant_id": ["IXI014", "IXI017", "002_S_0001", "002_S_0002", "x1"],
                         "cohort": ["IXI", "IXI", "ADNI", "ADNI", "unknown-cohort"],
                         "reason": ["missing sex", "missing age", "missing sex", "missing sex", "missing age"]})
    pub = cohorts.public_exclusions(excl, manifest)
    assert list(pub.columns) == ["cohort", "participant_id", "reason", "n"]
    assert {"IXI014", "IXI017"} <= set(pub["participant_id"])
    assert not {"002_S_0001", "002_S_0002", "x1"} & set(pub["participant_id"])
    adni = pub[pub["cohort"] == "ADNI"]
    assert adni["n"].tolist() == [2] and adni["participant_id"].tolist() == [""]
    assert cohorts.public_exclusions(excl.iloc[:0], manifest).empty


# ------------------------------------------------------------------------- IXI download, offline
def fake_ixi_release(tmp_path: Path) -> tuple[Path, Path]:
    """A small IXI-T1.tar (flat NIfTI files, as the real one) and demographics, with one quirk each."""
    import tarfile

    src = tmp_path / "release"
    names = ["IXI002-Guys-0828", "IXI012-HH-1211", "IXI013-IOP-0862", "IXI637-HH-2720"]  # IXI637: no row
    for name in names:
        nii(src / "t1" / f"{name}-T1.nii.gz")
    tar = src / "IXI-T1.tar"
    with tarfile.open(tar, "w") as tf:
        for name in names:
            tf.add(src / "t1" / f"{name}-T1.nii.gz", arcname=f"{name}-T1.nii.gz")
    df = pd.DataFrame([(2, 2, 35.8), (12, 1, 38.8), (13, 1, 46.7), (13, 2, 46.7)],  # IXI013: conflicting rows
                      columns=["IXI_ID", "SEX_ID (1=m, 2=f)", "AGE"])
    xls = src / "IXI.xlsx"
    df.to_excel(xls, index=False)
    return tar, xls


def test_ixi_download_extract_and_reuse_offline(tmp_path):
    import pooch

    tar, xls = fake_ixi_release(tmp_path)
    root = tmp_path / "data" / "IXI"
    manifest = load_manifest(REPO / "data_manifest.yaml")
    entry = manifest.cohort("IXI").model_copy(update={
        "root": str(root), "participants": "IXI.xlsx", "download": True,
        "downloads": {"images": {"url": tar.as_uri(), "known_hash": f"md5:{pooch.file_hash(str(tar), 'md5')}",
                                 "fname": "IXI-T1.tar"},
                      "demographics": {"url": str(xls), "known_hash": f"md5:{pooch.file_hash(str(xls), 'md5')}",
                                       "fname": "IXI.xlsx"}}})
    entry = type(entry).model_validate(entry.model_dump())
    table, excl = cohorts.load_cohort(entry, progress=False)
    assert (root / "IXI-T1.tar").is_file() and (root / "IXI-T1" / "IXI012-HH-1211-T1.nii.gz").is_file()
    assert sorted(table["participant_id"]) == ["IXI002", "IXI012"]
    r = reasons(excl)
    assert "duplicate" in r["IXI013"] and "without demographics" in r["IXI637"]
    # a second load reads the folder as it is: no download, even when a hash no longer matches
    stamp = (root / "IXI-T1.tar").stat().st_mtime_ns
    (root / "IXI.xlsx").write_bytes((root / "IXI.xlsx").read_bytes())  # same content, new file
    bad_hash = entry.model_copy(update={"downloads": {k: v.model_copy(update={"known_hash": "md5:" + "0" * 32})
                                                      for k, v in entry.downloads.items()}})
    again, _ = cohorts.load_cohort(bad_hash, progress=False)
    assert len(again) == 2 and (root / "IXI-T1.tar").stat().st_mtime_ns == stamp
    # a corrupted download is refused by its hash
    other = tmp_path / "other" / "IXI"
    with pytest.raises(BrainsexError, match="(?i)downloading IXI.*hash"):
        cohorts.load_cohort(bad_hash.model_copy(update={"root": str(other)}), progress=False)


def test_ixi_root_from_brainsex_data_symlink(tmp_path, monkeypatch, ixi_tree):
    """BRAINSEX_DATA pointing at a folder holding IXI/ (here a symlink) is read without downloading."""
    root, entry = ixi_tree
    data = tmp_path / "data"
    data.mkdir()
    (data / "IXI").symlink_to(root)
    monkeypatch.setenv("BRAINSEX_DATA", str(data))
    manifest = load_manifest(REPO / "data_manifest.yaml")
    ixi = manifest.cohort("IXI").model_copy(update={"participants": "IXI.xlsx"})
    assert ixi.enabled and ixi.download
    assert manifest.resolve_root(ixi) == data / "IXI"
    table, _ = cohorts.load_cohort(ixi, manifest=manifest, progress=False)
    assert "IXI012" in set(table["participant_id"])
