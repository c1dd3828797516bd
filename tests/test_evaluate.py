"""Tests of brainsex.evaluate: metrics with bootstrap CIs, Table 2 subgroups, predictions table, TIV baseline."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from brainsex import BrainsexError
from brainsex.evaluate import (
    AGE_GROUP_LABELS,
    METRICS,
    PREDICTION_COLUMNS,
    _bootstrap_values,
    age_group,
    confusion,
    exclude_missing_tiv,
    format_metrics_table,
    make_predictions_table,
    metrics,
    roc_curve_table,
    subgroup_metrics,
    tiv_baseline,
)


def _synthetic(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.5 + (y - 0.5) * 0.4 + rng.normal(0, 0.25, n), 0, 1).round(2)  # ties on purpose
    return y, p


def _predictions(n: int = 120, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    sex = np.where(rng.random(n) < 0.5, "F", "M")
    y = (sex == "M").astype(int)
    tiv = np.where(y == 1, rng.normal(1600, 110, n), rng.normal(1400, 110, n))
    prob = 1 / (1 + np.exp(-((tiv - 1500) / 80 + rng.normal(0, 1.0, n))))
    return pd.DataFrame({
        "participant_id": [f"sub-{i:03d}" for i in range(n)], "sex": sex, "y_true": y, "prob_male": prob,
        "y_pred": (prob >= 0.5).astype(int), "tiv_ml": tiv, "etiv_ml": tiv + rng.normal(0, 20, n),
        "age": rng.uniform(20, 90, n).round(), "dataset": rng.choice(["CC-359", "OASIS-3", "Cam-CAN"], n),
        "vendor": rng.choice(["GE", "Philips", "Siemens"], n), "field": rng.choice([1.5, 3.0], n), "split": "test",
    })


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------
def test_metrics_match_sklearn_and_have_cis():
    y, p = _synthetic()
    m = metrics(y, p, n_bootstrap=300, seed=1).set_index("metric")
    assert list(m.index) == list(METRICS)
    yhat = (p >= 0.5).astype(int)
    assert m.loc["accuracy", "value"] == pytest.approx(skm.accuracy_score(y, yhat))
    assert m.loc["balanced_accuracy", "value"] == pytest.approx(skm.balanced_accuracy_score(y, yhat))
    assert m.loc["precision", "value"] == pytest.approx(skm.precision_score(y, yhat))
    assert m.loc["f1", "value"] == pytest.approx(skm.f1_score(y, yhat))
    assert m.loc["auc_roc", "value"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m.loc["accuracy_female", "value"] == pytest.approx((yhat[y == 0] == 0).mean())
    assert m.loc["accuracy_male", "value"] == pytest.approx((yhat[y == 1] == 1).mean())
    assert (m["ci_low"] <= m["value"]).all() and (m["value"] <= m["ci_high"]).all()
    assert (m["ci_low"] < m["ci_high"]).all()
    assert (m["n"] == len(y)).all() and (m["n_boot"] == 300).all() and (m["reason"] == "").all()
    assert str(m["value"].dtype) == "Float64"


def test_vectorised_bootstrap_equals_sklearn_on_resamples():
    y, p = _synthetic(60, seed=3)
    yb, yhat = y.astype(bool), p >= 0.5
    idx = np.random.default_rng(0).integers(0, 60, size=(8, 60))
    boot = _bootstrap_values(yb, p, yhat, idx, METRICS)
    for k in range(8):
        yy, pp, hh = y[idx[k]], p[idx[k]], yhat[idx[k]].astype(int)
        expected = [skm.accuracy_score(yy, hh), skm.balanced_accuracy_score(yy, hh), skm.recall_score(yy, hh),
                    skm.precision_score(yy, hh), skm.f1_score(yy, hh), skm.roc_auc_score(yy, pp),
                    skm.recall_score(yy, hh, pos_label=0), skm.recall_score(yy, hh, pos_label=1)]
        np.testing.assert_allclose(boot[k], expected, rtol=1e-12)


def test_single_class_gives_explicit_na_without_warnings():
    y = np.zeros(20, dtype=int)
    p = np.linspace(0.05, 0.7, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = metrics(y, p, n_bootstrap=50).set_index("metric")
    for name in ("balanced_accuracy", "auc_roc", "recall", "accuracy_male"):
        assert pd.isna(m.loc[name, "value"]) and m.loc[name, "reason"], name
        assert m.loc[name, "n_boot"] == 0
    assert "only F" in m.loc["auc_roc", "reason"]
    assert m.loc["accuracy", "value"] == pytest.approx((p < 0.5).mean())
    assert m.loc["accuracy_female", "value"] == pytest.approx((p < 0.5).mean())
    assert m.loc["precision", "value"] == 0.0  # some women predicted male: defined, zero
    # nobody predicted male and no men: precision and F1 undefined
    m2 = metrics(y, np.full(20, 0.1), n_bootstrap=10).set_index("metric")
    assert pd.isna(m2.loc["precision", "value"]) and "predicted male" in m2.loc["precision", "reason"]
    assert pd.isna(m2.loc["f1", "value"])
    assert m2.loc["accuracy", "value"] == 1.0


def test_all_correct_and_threshold():
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.5, 0.8, 0.9])
    m = metrics(y, p, n_bootstrap=100).set_index("metric")
    assert (m["value"] == 1.0).all()  # p == threshold counts as male
    assert (m["ci_low"] == 1.0).all() and (m["ci_high"] == 1.0).all()
    m = metrics(y, p, threshold=0.6, n_bootstrap=0).set_index("metric")
    assert m.loc["accuracy", "value"] == pytest.approx(0.8)
    assert m.loc["recall", "value"] == pytest.approx(2 / 3)
    assert pd.isna(m.loc["accuracy", "ci_low"]) and "n_bootstrap = 0" in m.loc["accuracy", "reason"]


def test_resamples_with_one_class_are_skipped_and_counted():
    y = np.array([1] + [0] * 29)
    p = np.where(y == 1, 0.9, 0.2)
    m = metrics(y, p, n_bootstrap=400, seed=0).set_index("metric")
    n_boot = m.loc["recall", "n_boot"]
    # P(no male in a resample) = (29/30)^30 ~ 0.36
    assert 200 < n_boot < 320
    assert m.loc["accuracy", "n_boot"] == 400
    assert m.loc["recall", "value"] == 1.0 and m.loc["recall", "ci_low"] == 1.0


def test_seeded_and_fast():
    y, p = _synthetic(200)
    a = metrics(y, p, seed=5)
    b = metrics(y, p, seed=5)
    pd.testing.assert_frame_equal(a, b)
    c = metrics(y, p, seed=6)
    assert not a["ci_low"].equals(c["ci_low"])
    t0 = time.perf_counter()
    metrics(y, p, n_bootstrap=1000)
    assert time.perf_counter() - t0 < 1.0


def test_bootstrap_ci_coverage():
    """95 % percentile intervals of the accuracy cover the true accuracy in roughly 90-99 % of datasets."""
    rng = np.random.default_rng(2024)
    true_acc, n, covered, n_sim = 0.85, 200, 0, 200
    for i in range(n_sim):
        y = rng.integers(0, 2, n)
        correct = rng.random(n) < true_acc
        pred = np.where(correct, y, 1 - y)
        p = np.where(pred == 1, 0.8, 0.2)
        m = metrics(y, p, n_bootstrap=400, seed=i, which=("accuracy",))
        covered += bool(m.loc[0, "ci_low"] <= true_acc <= m.loc[0, "ci_high"])
    assert 0.90 <= covered / n_sim <= 0.99


@pytest.mark.parametrize(
    ("y", "p", "match"),
    [
        ([0, 1], [0.2], "differ in length"),
        ([0, 2], [0.2, 0.4], "0/1"),
        ([0, 1], [0.2, 1.4], r"\[0, 1\]"),
        ([0, 1], [0.2, np.nan], "missing"),
        ([], [], "0 subjects"),
    ],
)
def test_bad_input(y, p, match):
    with pytest.raises(BrainsexError, match=match):
        metrics(y, p, n_bootstrap=0)


def test_bad_parameters():
    with pytest.raises(BrainsexError, match="threshold"):
        metrics([0, 1], [0.2, 0.8], threshold=1.5)
    with pytest.raises(BrainsexError, match="ci"):
        metrics([0, 1], [0.2, 0.8], ci=95)
    with pytest.raises(BrainsexError, match="unknown metric"):
        metrics([0, 1], [0.2, 0.8], which=("specificity",))


def test_sex_strings_accepted():
    m1 = metrics(["F", "M", "M"], [0.2, 0.7, 0.4], n_bootstrap=0)
    m2 = metrics([0, 1, 1], [0.2, 0.7, 0.4], n_bootstrap=0)
    pd.testing.assert_frame_equal(m1, m2)


# --------------------------------------------------------------------------------------------------
# age groups, subgroups
# --------------------------------------------------------------------------------------------------
def test_age_group_edges():
    g = age_group(pd.Series([20, 54.9, 55, 62, 70, 70.1, np.nan]))
    assert list(g.cat.categories) == list(AGE_GROUP_LABELS) == ["<55", "55\u201370", ">70"]
    assert g.tolist()[:6] == ["<55", "<55", "55\u201370", "55\u201370", "55\u201370", ">70"]
    assert pd.isna(g.iloc[6])
    with pytest.raises(BrainsexError, match="numeric"):
        age_group(["old", "young"])


def test_subgroup_table_shape_and_na():
    pred = _predictions(150)
    pred.loc[pred["dataset"] == "Cam-CAN", "sex"] = "F"  # a single-sex group
    pred["y_true"] = (pred["sex"] == "M").astype(int)
    pred.loc[3, "vendor"] = np.nan
    t = subgroup_metrics(pred, n_bootstrap=50)
    n_groups = (1 + pred["dataset"].nunique() + pred["vendor"].nunique() + 1 + pred["field"].nunique()
                + age_group(pred["age"]).nunique())
    assert len(t) == n_groups * len(METRICS)
    assert list(t.columns[:4]) == ["variable", "group", "n_female", "n_male"]
    for var in ("dataset", "vendor", "field", "age_group"):
        per = t[(t["variable"] == var) & (t["metric"] == "accuracy")]
        assert per["n"].sum() == len(pred), var
    assert set(t.loc[t["variable"] == "field", "group"]) == {"1.5 T", "3 T"}
    assert "missing" in set(t.loc[t["variable"] == "vendor", "group"])
    cam = t[(t["variable"] == "dataset") & (t["group"] == "Cam-CAN")].set_index("metric")
    assert cam["n_male"].iloc[0] == 0
    assert pd.isna(cam.loc["auc_roc", "value"]) and cam.loc["auc_roc", "reason"]
    assert not pd.isna(cam.loc["accuracy", "value"])
    wide = format_metrics_table(t)
    assert len(wide) == n_groups
    row = wide[(wide["variable"] == "dataset") & (wide["group"] == "Cam-CAN")].iloc[0]
    assert row["auc_roc"] == "n/a" and row["balanced_accuracy"] == "n/a"
    assert row["accuracy"].count("[") == 1
    all_row = wide[wide["variable"] == "all"].iloc[0]
    assert "n/a" not in all_row[list(METRICS)].tolist()


def test_subgroup_missing_column():
    with pytest.raises(BrainsexError, match="scanner"):
        subgroup_metrics(_predictions(20), by=("scanner",), n_bootstrap=0)


# --------------------------------------------------------------------------------------------------
# ROC, confusion
# --------------------------------------------------------------------------------------------------
def test_roc_and_confusion():
    y, p = _synthetic(80)
    roc = roc_curve_table(y, p)
    assert list(roc.columns) == ["fpr", "tpr", "threshold"]
    assert roc.attrs["auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert roc["fpr"].is_monotonic_increasing and roc["tpr"].iloc[-1] == 1.0
    with pytest.raises(BrainsexError, match="both sexes"):
        roc_curve_table([1, 1, 1], [0.2, 0.5, 0.9])
    cm = confusion([0, 0, 1, 1, 1], [0, 1, 1, 1, 0])
    assert cm.loc["F", "F"] == 1 and cm.loc["F", "M"] == 1 and cm.loc["M", "M"] == 2 and cm.loc["M", "F"] == 1
    assert cm.index.name == "true sex" and cm.columns.name == "predicted sex"


# --------------------------------------------------------------------------------------------------
# predictions table, missing TIV
# --------------------------------------------------------------------------------------------------
def test_make_predictions_table():
    parts = _predictions(10).drop(columns=["y_true", "prob_male", "y_pred", "split"])
    parts["image"] = "/x.nii.gz"
    probs = pd.Series([0.9, 0.2, 0.5], index=["sub-003", "sub-001", "sub-007"])
    split = pd.DataFrame({"participant_id": parts["participant_id"], "split": ["train"] * 5 + ["test"] * 5})
    t = make_predictions_table(parts, probs, split)
    assert list(t.columns) == list(PREDICTION_COLUMNS)
    assert t["participant_id"].tolist() == ["sub-003", "sub-001", "sub-007"]
    assert t["split"].tolist() == ["train", "train", "test"]
    assert t["y_pred"].tolist() == [1, 0, 1]
    assert (t["y_true"] == (t["sex"] == "M")).all()
    df_probs = pd.DataFrame({"participant_id": ["sub-002"], "prob_male": [0.3]})
    assert make_predictions_table(parts, df_probs, "test")["split"].iloc[0] == "test"
    with pytest.raises(BrainsexError, match="not in participants"):
        make_predictions_table(parts, {"sub-999": 0.5}, "test")
    with pytest.raises(BrainsexError, match="no split"):
        make_predictions_table(parts, probs, split.iloc[:2])
    with pytest.raises(BrainsexError, match="vendor"):
        make_predictions_table(parts.drop(columns="vendor"), probs, "test")


def test_exclude_missing_tiv():
    pred = _predictions(12)
    pred.loc[[2, 5], "etiv_ml"] = np.nan
    kept, n_excl = exclude_missing_tiv(pred, "etiv_ml")
    assert n_excl == 2 and len(kept) == 10
    assert "2 of 12" in kept.attrs["message"] and kept.attrs["excluded_ids"] == ["sub-002", "sub-005"]
    pred["etiv_ml"] = np.nan
    with pytest.raises(BrainsexError, match="no subject"):
        exclude_missing_tiv(pred, "etiv_ml")
    with pytest.raises(BrainsexError, match="lacks column"):
        exclude_missing_tiv(pred, "tiv_fs")


# --------------------------------------------------------------------------------------------------
# TIV-only baseline
# --------------------------------------------------------------------------------------------------
def test_tiv_baseline_separates_when_tiv_does():
    train, test = _predictions(200, seed=1), _predictions(100, seed=2)
    train.loc[0, "etiv_ml"] = np.nan
    prob = tiv_baseline(train, test)
    assert prob.name == "prob_male_tiv" and prob.index.equals(test.index)
    assert prob.attrs["n_train_dropped"] == 1 and prob.attrs["coef_per_sd"] > 0
    assert skm.roc_auc_score(test["y_true"], prob) > 0.85
    order = np.argsort(test["etiv_ml"].to_numpy())
    assert np.all(np.diff(prob.to_numpy()[order]) >= 0)  # monotonic in TIV
    bad = test.copy()
    bad.loc[1, "etiv_ml"] = np.nan
    with pytest.raises(BrainsexError, match="exclude_missing_tiv"):
        tiv_baseline(train, bad)
    with pytest.raises(BrainsexError, match="both sexes"):
        tiv_baseline(train[train["sex"] == "F"], test)
