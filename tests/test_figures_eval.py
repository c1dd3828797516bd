"""Smoke tests of the evaluation/TIV figure builders (brainsex.figures)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from brainsex.evaluate import confusion, roc_curve_table
from brainsex.figures import (
    SEX_COLORS,
    fig_confusion,
    fig_kde_overlap,
    fig_prob_vs_tiv,
    fig_roc,
    fig_tiv_tertile_hist,
)
from brainsex.tiv import assign_tertiles, kde_curves


def _pred(n: int = 90) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    sex = np.where(np.arange(n) % 2 == 0, "F", "M")
    y = (sex == "M").astype(int)
    tiv = np.where(y == 1, rng.normal(1600, 120, n), rng.normal(1400, 110, n))
    prob = 1 / (1 + np.exp(-((tiv - 1500) / 100 + rng.normal(0, 1.0, n))))
    return pd.DataFrame({"participant_id": [f"sub-{i}" for i in range(n)], "sex": sex, "y_true": y,
                         "prob_male": prob, "etiv_ml": tiv})


def _check(fig, n_traces_min: int = 1) -> None:
    assert fig.layout.title.text
    assert len(fig.data) >= n_traces_min
    fig.to_json()  # serialises: every property is valid


def test_figures_build():
    pred = _pred()
    roc = roc_curve_table(pred["y_true"], pred["prob_male"])
    fig = fig_roc({"CNN": roc, "TIV only": roc})
    _check(fig, 3)
    assert "AUC" in fig.data[1].name and fig.layout.xaxis.title.text
    fig = fig_confusion(confusion(pred["y_true"], (pred["prob_male"] >= 0.5).astype(int)))
    _check(fig)
    assert fig.layout.yaxis.title.text == "True sex"
    fig = fig_tiv_tertile_hist(assign_tertiles(pred))
    _check(fig, 3)
    assert fig.layout.xaxis.title.text.startswith("TIV")
    f, m = pred.loc[pred["sex"] == "F", "etiv_ml"], pred.loc[pred["sex"] == "M", "etiv_ml"]
    curves = kde_curves(f, m)
    for c in (curves, None):
        fig = fig_prob_vs_tiv(pred, rtiv=(curves["low"], curves["high"]), curves=c)
        _check(fig, 6)
        assert {t.marker.color for t in fig.data if getattr(t, "mode", None) == "markers"} == set(SEX_COLORS.values())
    fig = fig_kde_overlap(curves, f, m)
    _check(fig, 4)
    lines = {t.name.split(" ")[0]: t.line.color for t in fig.data if t.mode == "lines" and "n=" in t.name}
    assert lines == {"female": SEX_COLORS["F"], "male": SEX_COLORS["M"]}
    assert any(s.type == "rect" for s in fig.layout.shapes)  # shaded R_tiv
    far = kde_curves(f - 600, m + 600)
    _check(fig_kde_overlap(far))
