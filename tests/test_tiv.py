"""Tests of brainsex.tiv: tertiles (Table 3), KDE overlap range R_tiv (Figure 5), balanced subset."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score

from brainsex import BrainsexError
from brainsex.tiv import (
    assign_tertiles,
    balanced_rtiv_subset,
    bootstrap_rtiv,
    in_range,
    kde_curves,
    kde_overlap_range,
    metrics_in_range,
    tiv_tertiles,
)

Z20 = np.sqrt(2 * np.log(5))  # density >= 0.2 x max  <=>  |x - mu| <= sigma * sqrt(2 ln 5)


def _predictions(n: int = 210, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    sex = np.where(np.arange(n) % 2 == 0, "F", "M")
    rng.shuffle(sex)
    y = (sex == "M").astype(int)
    tiv = np.where(y == 1, rng.normal(1600, 120, n), rng.normal(1400, 110, n))
    prob = 1 / (1 + np.exp(-((tiv - 1500) / 100 + 2.0 * (y - 0.5) + rng.normal(0, 1.0, n))))
    return pd.DataFrame({"participant_id": [f"sub-{i:03d}" for i in range(n)], "sex": sex, "y_true": y,
                         "prob_male": prob, "etiv_ml": tiv})


# --------------------------------------------------------------------------------------------------
# KDE overlap range
# --------------------------------------------------------------------------------------------------
def test_kde_overlap_range_analytic_two_gaussians():
    rng = np.random.default_rng(0)
    n, (mf, sf), (mm, sm) = 4000, (1400.0, 110.0), (1600.0, 130.0)
    f, m = rng.normal(mf, sf, n), rng.normal(mm, sm, n)
    low, high = kde_overlap_range(f, m, threshold=0.2)
    # Scott's rule KDE of a normal sample is ~ normal with variance sigma^2 (1 + h^2), h = n^(-1/5)
    widen = np.sqrt(1 + n ** (-0.4))
    exp_low, exp_high = mm - sm * Z20 * widen, mf + sf * Z20 * widen
    assert low == pytest.approx(exp_low, abs=0.06 * sm)
    assert high == pytest.approx(exp_high, abs=0.06 * sf)
    # the smoothing-free bounds are close too, and smoothing only widens
    assert low == pytest.approx(mm - sm * Z20, abs=0.1 * sm)
    assert high == pytest.approx(mf + sf * Z20, abs=0.1 * sf)
    c = kde_curves(f, m)
    assert c["interval_female"][0] == pytest.approx(mf - sf * Z20 * widen, abs=0.06 * sf)
    assert c["interval_male"][1] == pytest.approx(mm + sm * Z20 * widen, abs=0.06 * sm)
    assert c["n_intervals_female"] == 1 and c["n_intervals_male"] == 1
    assert c["level_female"] == pytest.approx(0.2 * c["density_female"].max())
    # a stricter threshold gives a narrower range
    low5, high5 = kde_overlap_range(f, m, threshold=0.5)
    assert low5 > low and high5 < high


def test_empty_intersection_raises():
    rng = np.random.default_rng(1)
    f, m = rng.normal(1200, 50, 300), rng.normal(1800, 50, 300)
    c = kde_curves(f, m)
    assert c["overlap"] is False and c["low"] is None
    with pytest.raises(BrainsexError, match="do not overlap"):
        kde_overlap_range(f, m)


def test_multimodal_takes_hull_and_bad_input():
    rng = np.random.default_rng(2)
    f = np.concatenate([rng.normal(1250, 30, 300), rng.normal(1550, 30, 300)])
    m = rng.normal(1500, 120, 500)
    c = kde_curves(f, m)
    assert c["n_intervals_female"] == 2
    assert c["interval_female"][0] < 1250 and c["interval_female"][1] > 1550
    with pytest.raises(BrainsexError, match="two distinct"):
        kde_overlap_range([1400.0], m)
    with pytest.raises(BrainsexError, match="missing"):
        kde_overlap_range([1400.0, np.nan, 1300.0], m)
    with pytest.raises(BrainsexError, match="threshold"):
        kde_overlap_range(f, m, threshold=20)
    with pytest.raises(BrainsexError, match="wider grid"):
        kde_overlap_range(f, m, grid=np.linspace(1400, 1500, 50))


def test_bootstrap_rtiv():
    rng = np.random.default_rng(3)
    f, m = rng.normal(1400, 110, 100), rng.normal(1600, 120, 100)
    r = bootstrap_rtiv(f, m, n_bootstrap=60, seed=0)
    assert (r["low"], r["high"]) == pytest.approx(kde_overlap_range(f, m))
    assert r["low_ci"][0] < r["low"] < r["low_ci"][1]
    assert r["high_ci"][0] < r["high"] < r["high_ci"][1]
    assert r["n_valid"] == 60 and r["n_bootstrap"] == 60
    assert bootstrap_rtiv(f, m, n_bootstrap=60, seed=0) == r
    import json

    json.dumps(r)


# --------------------------------------------------------------------------------------------------
# tertiles (Table 3)
# --------------------------------------------------------------------------------------------------
def test_tertile_counts():
    pred = _predictions(210)
    t = tiv_tertiles(pred)
    assert list(t.columns[:8]) == ["tertile", "tiv_low", "tiv_high", "sex", "n", "correct", "wrong", "accuracy"]
    assert len(t) == 6
    per_bin = t.groupby("tertile", observed=True)["n"].sum()
    assert per_bin.tolist() == [70, 70, 70]
    assert (t["bin_n"] == 70).all()
    assert (t["correct"] + t["wrong"] == t["n"]).all()
    assert t.groupby("sex")["n"].sum().to_dict() == pred["sex"].value_counts().to_dict()
    # bins are ordered and do not overlap
    edges = t.drop_duplicates("tertile")[["tiv_low", "tiv_high"]].to_numpy()
    assert np.all(edges[:-1, 1] < edges[1:, 0])
    # per-bin balanced accuracy agrees with scikit-learn
    a = assign_tertiles(pred)
    yhat = (pred["prob_male"] >= 0.5).astype(int)
    for label in ("low", "medium", "high"):
        sel = (a["tertile"] == label).to_numpy()
        expected = balanced_accuracy_score(pred["y_true"][sel], yhat[sel])
        assert t.loc[t["tertile"] == label, "bin_balanced_accuracy"].iloc[0] == pytest.approx(expected)
    # women dominate the low bin, men the high bin (TIV differs by sex)
    low = t[t["tertile"] == "low"].set_index("sex")["n"]
    assert low["F"] > low["M"]


def test_tertiles_with_ties_and_few_subjects():
    pred = _predictions(10)
    pred["etiv_ml"] = [1500.0] * 10
    assert sorted(assign_tertiles(pred)["tertile"].value_counts().tolist()) == [3, 3, 4]
    with pytest.raises(BrainsexError, match="too few"):
        tiv_tertiles(pred.iloc[:2])
    pred.loc[0, "etiv_ml"] = np.nan
    with pytest.raises(BrainsexError, match="exclude_missing_tiv"):
        tiv_tertiles(pred)


def test_tertile_single_sex_bin_is_na():
    pred = _predictions(30)
    pred = pred.sort_values("etiv_ml").reset_index(drop=True)
    pred.loc[:9, "sex"] = "F"
    pred["y_true"] = (pred["sex"] == "M").astype(int)
    t = tiv_tertiles(pred)
    low = t[t["tertile"] == "low"].set_index("sex")
    assert low.loc["M", "n"] == 0 and pd.isna(low.loc["M", "accuracy"])
    assert pd.isna(low.loc["F", "bin_balanced_accuracy"]) and "only F" in low.loc["F", "note"]


# --------------------------------------------------------------------------------------------------
# inside / outside R_tiv, balanced subset
# --------------------------------------------------------------------------------------------------
def test_metrics_in_range():
    pred = _predictions(210)
    low, high = kde_overlap_range(pred.loc[pred["sex"] == "F", "etiv_ml"], pred.loc[pred["sex"] == "M", "etiv_ml"])
    inside = in_range(pred, low, high)
    t = metrics_in_range(pred, low, high, n_bootstrap=50)
    acc = t[t["metric"] == "accuracy"].set_index("group")
    assert list(acc.index) == ["all", "inside", "outside"]
    assert acc.loc["inside", "n"] == inside.sum() and acc.loc["outside", "n"] == (~inside).sum()
    assert acc.loc["all", "n"] == len(pred)
    assert (t["variable"] == "R_tiv").all()
    with pytest.raises(BrainsexError, match="low <= high"):
        in_range(pred, 1600, 1400)


def test_balanced_subset():
    pred = _predictions(210)
    low, high = 1400.0, 1650.0
    sub = balanced_rtiv_subset(pred, low, high, seed=0)
    counts = sub["sex"].value_counts()
    assert counts["F"] == counts["M"] and len(sub) == 2 * counts["F"]
    assert ((sub["prob_male"] >= 0.5).astype(int) == sub["y_true"]).all()
    assert sub["etiv_ml"].between(low, high).all()
    ok = in_range(pred, low, high) & ((pred["prob_male"] >= 0.5).astype(int) == pred["y_true"])
    assert counts["F"] == min((ok & (pred["sex"] == "F")).sum(), (ok & (pred["sex"] == "M")).sum())
    # deterministic and independent of row order
    shuffled = pred.sample(frac=1.0, random_state=1)
    pd.testing.assert_frame_equal(sub, balanced_rtiv_subset(shuffled, low, high, seed=0))
    with pytest.raises(BrainsexError, match="no balanced subset"):
        balanced_rtiv_subset(pred, 900.0, 1000.0)
