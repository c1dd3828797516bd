"""data_manifest.yaml schema: the shipped file loads; every malformed one gives one clear message."""

import textwrap
from pathlib import Path

import pytest

from brainsex import BrainsexError
from brainsex.manifest import ManifestError, expand_env, load_manifest, manifest_table

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "manifest.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert isinstance(info.value, BrainsexError)
    msg = str(info.value)
    assert str(path) in msg  # every message names the file
    return msg


GOOD_COHORT = """\
    - name: mine
      kind: bids
      root: /data/mine
      shareable: false
      image_pattern: "sub-{id}/anat/sub-{id}_T1w.nii.gz"
"""


def test_shipped_manifest_loads():
    m = load_manifest(REPO / "data_manifest.yaml")
    names = [c.name for c in m.cohorts]
    assert names[0] == "phantom" and {"IXI", "CC-359", "OASIS-3", "ADNI", "Cam-CAN"} <= set(names)
    assert m.cohort("phantom").kind == "synthetic" and m.cohort("phantom").enabled
    assert all(not m.cohort(n).shareable for n in ("CC-359", "OASIS-3", "ADNI", "Cam-CAN"))
    assert m.cohort("IXI").shareable and m.cohort("IXI").enabled and m.cohort("IXI").download  # the ixi profile
    assert m.cohort("IXI").columns.sex == "SEX_ID (1=m, 2=f)"
    assert set(m.references) == {"template", "brain_mask", "atlas"}
    table = manifest_table(m)
    assert len(table) == len(names) and set(table["kind"]) == {"synthetic", "ixi", "bids", "table"}


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, """\
        version: 1
        cohorts:
          - name: mine
            root: /data: oops
        """)
    msg = error_of(path)
    assert "not valid YAML" in msg and "line 4" in msg and "mapping values are not allowed" in msg


def test_unknown_kind_names_the_key(tmp_path):
    path = write(tmp_path, GOOD_COHORT.replace("kind: bids", "kind: dicom").join(["cohorts:\n", ""]))
    msg = error_of(path)
    assert "cohorts[0] ('mine').kind" in msg and "dicom" in msg and "'bids'" in msg


def test_missing_key_names_the_key(tmp_path):
    path = write(tmp_path, "cohorts:\n" + GOOD_COHORT.replace("      shareable: false\n", ""))
    msg = error_of(path)
    assert "cohorts[0] ('mine').shareable" in msg and "required" in msg.lower()


def test_misspelt_key_names_the_key(tmp_path):
    path = write(tmp_path, "cohorts:\n" + GOOD_COHORT.replace("image_pattern", "imge_pattern"))
    msg = error_of(path)
    assert "imge_pattern" in msg and "cohorts[0] ('mine')" in msg


def test_kind_that_needs_a_pattern_names_the_key(tmp_path):
    path = write(tmp_path, "cohorts:\n" + GOOD_COHORT.replace('      image_pattern: "sub-{id}/anat/sub-{id}_T1w.nii.gz"\n', ""))
    msg = error_of(path)
    assert "cohorts[0] ('mine')" in msg and "image_pattern" in msg


def test_wrong_type_names_the_key_and_value(tmp_path):
    path = write(tmp_path, "cohorts:\n" + GOOD_COHORT.replace("shareable: false", "shareable: maybe"))
    msg = error_of(path)
    assert "cohorts[0] ('mine').shareable" in msg and "maybe" in msg


def test_duplicate_names_are_named(tmp_path):
    path = write(tmp_path, "cohorts:\n" + GOOD_COHORT + GOOD_COHORT)
    msg = error_of(path)
    assert "cohort names must be unique" in msg and "'mine'" in msg


def test_sex_coded_both_ways_names_the_key(tmp_path):
    path = write(tmp_path, "cohorts:\n" + GOOD_COHORT + "      sex_coding: {female: [F, 1], male: [M, 1]}\n")
    msg = error_of(path)
    assert "cohorts[0] ('mine').sex_coding" in msg and "'1'" in msg


def test_top_level_and_missing_file(tmp_path):
    msg = error_of(write(tmp_path, "- just\n- a list\n"))
    assert "'cohorts'" in msg
    msg = error_of(tmp_path / "absent.yaml")
    assert "not found" in msg
    msg = error_of(write(tmp_path, "version: 1\n", name="empty.yaml"))
    assert "cohorts" in msg


def test_unknown_cohort_lists_the_known_ones(tmp_path):
    m = load_manifest(write(tmp_path, "cohorts:\n" + GOOD_COHORT))
    with pytest.raises(ManifestError, match=r"manifest\.yaml: no cohort named 'nope'; known cohorts: \['mine'\]"):
        m.cohort("nope")


def test_env_expansion_in_root(tmp_path, monkeypatch):
    path = write(tmp_path, """\
        cohorts:
          - name: env
            kind: table
            root: ${BRAINSEX_TEST_DATA}/cc359
            shareable: false
            image_pattern: "{id}.nii.gz"
          - name: fallback
            kind: table
            root: ${BRAINSEX_TEST_UNSET:-/opt/default}/adni
            shareable: false
            image_pattern: "{id}.nii.gz"
          - name: relative
            kind: table
            root: data/here
            shareable: false
            image_pattern: "{id}.nii.gz"
        """)
    monkeypatch.setenv("BRAINSEX_TEST_DATA", "/mnt/data")
    monkeypatch.delenv("BRAINSEX_TEST_UNSET", raising=False)
    m = load_manifest(path)
    assert m.resolve_root("env") == Path("/mnt/data/cc359")
    assert m.resolve_root("fallback") == Path("/opt/default/adni")
    assert m.resolve_root("relative") == tmp_path.resolve() / "data/here"
    assert m.resolve_root("relative", base="/runs/demo") == Path("/runs/demo/data/here")
    monkeypatch.delenv("BRAINSEX_TEST_DATA")
    with pytest.raises(ManifestError) as info:
        m.resolve_root("env")
    msg = str(info.value)
    assert str(path.resolve()) in msg and "cohorts[env].root" in msg and "BRAINSEX_TEST_DATA" in msg


def test_expand_env_unset_without_default():
    assert expand_env("${HOME_IS_SET:-x}/y") == "x/y"
    with pytest.raises(ManifestError, match=r"m\.yaml: cohorts\[a\]\.root uses \$\{NOPE_NOT_SET\}"):
        expand_env("${NOPE_NOT_SET}/z", key="cohorts[a].root", source="m.yaml")
