"""Tests of brainsex.split: stratified 80/10/10 split, small-stratum merging, composition, leakage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from brainsex import BrainsexError
from brainsex.split import (
    check_no_leakage,
    earliest_scan,
    split_composition,
    stratified_split,
    stratum_keys,
)

# The paper's cohort structure (dataset, vendor, field, n female, n male); 2,110 subjects.
PAPER_COUNTS = [
    ("ADNI", "GE", 1.5, 51, 53), ("ADNI", "GE", 3.0, 1, 1), ("ADNI", "Philips", 1.5, 6, 11),
    ("ADNI", "Philips", 3.0, 25, 20), ("ADNI", "Siemens", 1.5, 48, 41), ("ADNI", "Siemens", 3.0, 55, 55),
    ("CC-359", "GE", 1.5, 30, 30), ("CC-359", "GE", 3.0, 30, 30), ("CC-359", "Siemens", 1.5, 30, 30),
    ("CC-359", "Siemens", 3.0, 30, 30), ("CC-359", "Philips", 1.5, 33, 26), ("CC-359", "Philips", 3.0, 30, 30),
    ("Cam-CAN", "Siemens", 3.0, 330, 323), ("OASIS-3", "Siemens", 1.5, 33, 19),
    ("OASIS-3", "Siemens", 3.0, 383, 296),
]


def paper_table() -> pd.DataFrame:
    rows = []
    for dataset, vendor, field, n_f, n_m in PAPER_COUNTS:
        for sex, n in (("F", n_f), ("M", n_m)):
            for _ in range(n):
                rows.append({"participant_id": f"sub-{len(rows):04d}", "sex": sex, "dataset": dataset,
                             "vendor": vendor, "field": field, "age": 50.0})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def paper_split() -> pd.DataFrame:
    return stratified_split(paper_table(), seed=0)


def test_sizes_match_paper(paper_split):
    counts = paper_split["split"].value_counts()
    # Paper section 2.5: 1,688 / 211 / 211.
    assert (counts["train"], counts["val"], counts["test"]) == (1688, 211, 211)
    assert paper_split["participant_id"].is_unique


def test_strata_proportions_within_two_points(paper_split):
    comp = split_composition(paper_split).set_index("split")
    whole = comp.loc["all"]
    pct_cols = [c for c in comp.columns if c.startswith("pct_")]
    assert {"pct_F", "pct_M", "pct_GE", "pct_Philips", "pct_Siemens", "pct_1.5T", "pct_3T"} <= set(pct_cols)
    for split in ("train", "val", "test"):
        diff = (comp.loc[split, pct_cols] - whole[pct_cols]).abs()
        assert diff.max() <= 2.0, (split, diff.to_dict())
    # The paper's reported composition: 53 % F, 11 % GE, 8 % Philips, 81 % Siemens, 79 % 3 T.
    assert round(whole["pct_F"]) == 53 and round(whole["pct_GE"]) == 11 and round(whole["pct_3T"]) == 79
    assert comp.loc[["train", "val", "test"], "n"].sum() == comp.loc["all", "n"] == 2110
    assert comp.loc["all", "n_Cam-CAN"] == 653


def test_no_leakage_and_deterministic(paper_split):
    check_no_leakage(paper_split)
    again = stratified_split(paper_table(), seed=0)
    assert again["split"].tolist() == paper_split["split"].tolist()
    other = stratified_split(paper_table(), seed=1)
    assert other["split"].tolist() != paper_split["split"].tolist()


def test_check_no_leakage_raises():
    t = pd.DataFrame({"participant_id": ["a", "a", "b"], "split": ["train", "test", "val"]})
    with pytest.raises(BrainsexError, match="more than one split.*a"):
        check_no_leakage(t)
    with pytest.raises(BrainsexError, match="unknown split"):
        check_no_leakage(pd.DataFrame({"participant_id": ["a"], "split": ["training"]}))


def test_small_strata_are_merged_not_crashing():
    t = paper_table().sample(48, random_state=3)
    s = stratified_split(t, seed=0)
    assert s["split"].value_counts().to_dict() == {"train": 38, "val": 5, "test": 5}
    # no more strata than rows in the smallest subset; merged keys are coarser ('*') or 'other'
    assert s["stratum"].nunique() <= 5
    assert s["stratum"].value_counts().min() >= 2
    check_no_leakage(s)


def test_stratum_keys_merge_hierarchy():
    t = pd.DataFrame({
        "sex": ["F"] * 12 + ["F"] * 3 + ["F"] * 3 + ["M"] * 12 + ["M"] * 1,
        "vendor": ["Siemens"] * 12 + ["GE"] * 3 + ["Philips"] * 3 + ["Siemens"] * 12 + ["GE"],
        "field": [3.0] * 12 + [1.5] * 3 + [3.0] * 3 + [3.0] * 12 + [1.5],
    })
    key = stratum_keys(t, min_stratum_size=5)
    assert key.iloc[0] == "F|Siemens|3"           # big strata keep their full key
    assert set(key.iloc[12:18]) == {"F|*|*"}      # two small F strata merged over vendor and field
    # the lone GE man: "M|GE|*", then "M|*|*" (still 1) -> "other" (1 < 5) -> joins the smallest stratum
    assert key.iloc[-1] != "M|GE|1.5" and key.nunique() == 3


def test_earliest_scan_kept():
    t = pd.DataFrame({"participant_id": ["a", "a", "b", "c", "c"], "age": [70.0, 68.0, 50.0, 61.0, 62.0],
                      "sex": ["F", "F", "M", "M", "M"]})
    kept = earliest_scan(t)
    assert kept["participant_id"].tolist() == ["a", "b", "c"]
    assert kept["age"].tolist() == [68.0, 50.0, 61.0]
    with pytest.raises(BrainsexError, match="no session or age column"):
        earliest_scan(t.drop(columns="age"))
    big = pd.concat([paper_table(), paper_table().head(30).assign(age=99.0)])
    s = stratified_split(big)
    assert len(s) == 2110 and s.loc[s["participant_id"] == "sub-0000", "age"].item() == 50.0


@pytest.mark.parametrize(
    ("table", "kwargs", "match"),
    [
        (pd.DataFrame(columns=["participant_id", "sex", "vendor", "field"]), {}, "empty"),
        (paper_table().head(5), {}, "too few"),
        (paper_table().head(50), {"fractions": (0.8, 0.1)}, "three positive"),
        (paper_table().head(50), {"fractions": (0.8, 0.3, 0.1)}, "sum"),
        (paper_table().head(50), {"by": ("sex", "scanner")}, "scanner"),
        (paper_table().head(50).drop(columns="participant_id"), {}, "participant_id"),
    ],
)
def test_bad_input(table, kwargs, match):
    with pytest.raises(BrainsexError, match=match):
        stratified_split(table, **kwargs)


def test_tiny_table_still_splits():
    t = paper_table().sample(10, random_state=0)
    s = stratified_split(t)
    assert s["split"].value_counts().to_dict() == {"train": 8, "val": 1, "test": 1}
    assert (s["stratum"] == s["stratum"].iloc[0]).all()
    assert np.isfinite(split_composition(s)["pct_F"]).all()
