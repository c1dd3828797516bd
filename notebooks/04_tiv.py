# ---
# jupyter:
#   accelerator: GPU
#   colab:
#     gpuType: T4
#     provenance: []
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,jupytext,colab,accelerator
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Does the model just measure head size?
#
# Female heads are smaller on average, so a classifier could score well by estimating total
# intracranial volume (TIV) and nothing else. The paper did not correct for TIV during training;
# instead it checked afterwards (its section 2.6): it split the test set into three equal-count TIV
# bins, and it located the TIV range where the two sexes overlap most — the range $R_{\mathrm{tiv}}$
# where each sex's kernel density stays above 20 % of its own peak — and looked at accuracy there.

# %% tags=["remove-cell"]
import sys

if "google.colab" in sys.modules:
    import subprocess

    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "git+https://github.com/brainsex-book/brainsex-book"], check=True)

# %% tags=["parameters"]
profile = "demo"
run_dir = "runs/demo"
seed = 0
n_bootstrap = 1000
kde_threshold = 0.2
manifest = "data_manifest.yaml"
min_group_size = 5

# %% tags=["hide-input"]
import numpy as np
import pandas as pd
from myst_nb import glue

from brainsex import BrainsexError
from brainsex.evaluate import exclude_missing_tiv, format_metrics_table
from brainsex.figures import (
    fig_binned_histogram,
    fig_binned_scatter,
    fig_kde_overlap,
    fig_prob_vs_tiv,
    fig_tiv_tertile_hist,
    show,
    show_note,
    show_table,
)
from brainsex.io import read_table, write_json_atomic, write_table
from brainsex.privacy import binned_counts, binned_counts_2d, publication_policy, suppress_table
from brainsex.run import RunDir
from brainsex.tiv import (
    assign_tertiles,
    balanced_rtiv_subset,
    bootstrap_rtiv,
    kde_curves,
    metrics_in_range,
    tiv_tertiles,
)

run = RunDir(run_dir)
policy = publication_policy(run_dir, manifest, min_group_size)
pred, n_excluded = exclude_missing_tiv(read_table(run.evaluate.predictions_with_baseline), "etiv_ml")
glue("n_tiv", len(pred), display=False)
glue("n_excluded", n_excluded, display=False)
glue("profile", profile, display=False)

# %% [markdown]
# TIV here is the affine-determinant estimate from the preprocessing chapter (the paper used
# FreeSurfer's eTIV). {glue:text}`n_tiv` test scans have one; {glue:text}`n_excluded` had none and are
# left out, as the paper left out its one unprocessable scan.
#
# ## Three TIV bins (the paper's Table 3 and Figure 2)

# %% tags=["hide-input"]
try:
    tertiles = tiv_tertiles(pred, tiv_col="etiv_ml")
except BrainsexError as exc:  # a small cohort's test set
    tertiles = None
    show_note(f"Table 3 and Figure 2 are not shown: {exc}. Build on a larger cohort to see them.")
if tertiles is not None:
    write_table(tertiles, run.tiv.tertiles)
    shown = tertiles.drop(columns=["note"], errors="ignore").round(3)
    show_table(shown if policy.shareable else suppress_table(shown, policy.k),
               caption="Accuracy by TIV bin and sex; balanced accuracy per bin")
    assigned = assign_tertiles(pred, tiv_col="etiv_ml")
    if policy.shareable:
        show(fig_tiv_tertile_hist(assigned, tiv_col="etiv_ml"), alt="Histogram of TIV in three equal-count bins")
    else:
        edges = np.linspace(assigned["etiv_ml"].min(), assigned["etiv_ml"].max(), 21)
        show(fig_binned_histogram({str(cat): binned_counts(assigned.loc[assigned["tertile"] == cat, "etiv_ml"],
                                                           edges, policy.k)
                                   for cat in assigned["tertile"].cat.categories},
                                  "TIV distribution in three equal-count bins (paper Figure 2)", "TIV (etiv_ml, ml)",
                                  k=policy.k),
             alt="Histogram of TIV in three equal-count bins, small bins suppressed")
    acc = tertiles.set_index(["tertile", "sex"])[["accuracy", "n"]]
    first, last = tertiles["tertile"].iloc[0], tertiles["tertile"].iloc[-1]

    def pct(tertile: str, sex: str) -> str:
        if (tertile, sex) not in acc.index or pd.isna(acc.loc[(tertile, sex), "accuracy"]):
            return "n/a (no such scan)"
        row = acc.loc[(tertile, sex)]
        return policy.value(f"{100 * row['accuracy']:.0f} %", row["n"])

    glue("tertile_text", (
        f"In the smallest-TIV bin, females are classified correctly {pct(first, 'F')} of the time and males "
        f"{pct(first, 'M')}; in the largest-TIV bin, {pct(last, 'F')} and {pct(last, 'M')}."), display=False)
else:
    glue("tertile_text", "This run's test set is too small for the three bins.", display=False)

# %% [markdown]
# {glue:text}`tertile_text` A model that leans on size gets the sex that is typical for the bin right
# and the other one wrong — the paper saw exactly this asymmetry.
#
# ## Probability against TIV (Figure 4) and the overlap range (Figure 5)

# %% tags=["hide-input"]
female, male = pred.loc[pred["sex"] == "F", "etiv_ml"], pred.loc[pred["sex"] == "M", "etiv_ml"]
try:
    curves = kde_curves(female, male, threshold=kde_threshold)
    rtiv = bootstrap_rtiv(female, male, n_bootstrap=n_bootstrap, seed=seed, threshold=kde_threshold)
except BrainsexError as exc:  # a small cohort's test set: the overlap of head sizes is a cohort property
    cohort_tiv = read_table(run.preprocess.table).query("status == 'ok'")
    female = cohort_tiv.loc[cohort_tiv["sex"] == "F", "etiv_ml"].dropna()
    male = cohort_tiv.loc[cohort_tiv["sex"] == "M", "etiv_ml"].dropna()
    show_note(f"The test set is too small for the TIV densities ({exc}). R_tiv below is computed from all "
              f"{len(female) + len(male)} preprocessed subjects instead: it describes how the cohort's head sizes "
              "overlap, not the model.")
    curves = kde_curves(female, male, threshold=kde_threshold)
    rtiv = bootstrap_rtiv(female, male, n_bootstrap=n_bootstrap, seed=seed, threshold=kde_threshold)
write_json_atomic(run.tiv.rtiv, rtiv)
low, high = rtiv["low"], rtiv["high"]
glue("rtiv_low", f"{low:,.0f}", display=False)
glue("rtiv_high", f"{high:,.0f}", display=False)
glue("rtiv_low_ci", f"{rtiv['low_ci'][0]:,.0f}–{rtiv['low_ci'][1]:,.0f}", display=False)
glue("rtiv_high_ci", f"{rtiv['high_ci'][0]:,.0f}–{rtiv['high_ci'][1]:,.0f}", display=False)
glue("kde_threshold_pct", f"{100 * kde_threshold:.0f}", display=False)
if policy.shareable:
    show(fig_prob_vs_tiv(pred, rtiv=(low, high), curves=curves), alt="Predicted probability of male against TIV")
    show(fig_kde_overlap(curves, female, male), alt="TIV densities of both sexes and the overlap range")
else:
    for sex, name in (("F", "female"), ("M", "male")):
        s = pred[pred["sex"] == sex]
        show(fig_binned_scatter(binned_counts_2d(s["etiv_ml"], s["prob_male"], k=policy.k), "TIV (etiv_ml, ml)",
                                "Predicted probability of male",
                                f"Predicted probability of male against TIV, {name} scans (paper Figure 4)",
                                k=policy.k, hline=0.5),
             alt=f"Predicted probability of male against TIV for {name} scans, subjects counted per cell")
    show(fig_kde_overlap(curves), alt="TIV densities of both sexes and the overlap range")

# %% [markdown]
# With a {glue:text}`kde_threshold_pct` % density threshold, the overlap range on this run is
# $R_{\mathrm{tiv}}$ = {glue:text}`rtiv_low`–{glue:text}`rtiv_high` ml. A bootstrap over subjects puts
# its lower end between {glue:text}`rtiv_low_ci` ml and its upper end between {glue:text}`rtiv_high_ci` ml
# (95 %): with a test set of this size the range itself is uncertain, which the paper does not report.
#
# ## Accuracy inside and outside the overlap range

# %% tags=["hide-input"]
inside = metrics_in_range(pred, low, high, n_bootstrap=n_bootstrap, seed=seed)
inside_tiv = metrics_in_range(pred, low, high, prob_col="prob_male_tiv", n_bootstrap=n_bootstrap, seed=seed)
write_table(inside, run.tiv.metrics_in_rtiv)
table = format_metrics_table(inside, which=("accuracy", "balanced_accuracy", "accuracy_female", "accuracy_male"))
table_tiv = format_metrics_table(inside_tiv, which=("accuracy", "balanced_accuracy"))
show_table(table if policy.shareable else suppress_table(table, policy.k), caption="SFCN: inside vs outside R_tiv")
show_table(table_tiv if policy.shareable else suppress_table(table_tiv, policy.k),
           caption="TIV-only baseline: inside vs outside R_tiv")
v = inside.set_index("group").query("metric == 'balanced_accuracy'")["value"]
vt = inside_tiv.set_index("group").query("metric == 'balanced_accuracy'")["value"]


def pct_of(values, group: str) -> str:
    value = values.get(group, float("nan"))
    return f"{100 * float(value):.1f}" if pd.notna(value) else "n/a"


glue("bacc_inside", pct_of(v, "inside"), display=False)
glue("bacc_tiv_inside", pct_of(vt, "inside"), display=False)

# %% [markdown]
# Inside $R_{\mathrm{tiv}}$ the CNN's balanced accuracy is {glue:text}`bacc_inside` %, while the TIV-only
# baseline manages {glue:text}`bacc_tiv_inside` % there (chance is 50 %). Where head size stops telling
# the sexes apart, whatever accuracy remains must come from something other than size.
#
# Finally, as in the paper, we keep a balanced set of correctly classified scans inside the range —
# equal numbers of females and males — for the saliency chapter.

# %% tags=["hide-input"]
try:
    subset = balanced_rtiv_subset(pred, low, high, seed=seed)
    why = ""
except BrainsexError as exc:  # e.g. no correctly classified scan of one sex inside the range
    subset, why = pred.iloc[0:0], f" ({exc})"
write_table(subset, run.tiv.rtiv_subset)
glue("n_subset", len(subset), display=False)
glue("subset_note", why or " ", display=False)

# %% [markdown]
# The balanced subset holds {glue:text}`n_subset` scans{glue:text}`subset_note`. When it is empty, the
# saliency chapter averages over all correctly classified scans instead and says so.
#
# ```{exercise}
# :label: ex-kde-threshold
# Re-run this chapter with `-p kde_threshold 0.1` and then `0.4`. How does $R_{\mathrm{tiv}}$ move, and
# how many test scans fall inside it each time?
# ```
#
# ```{solution} ex-kde-threshold
# :class: dropdown
# A lower threshold keeps more of each density's tails, so each sex's interval widens and their
# intersection widens with it; a higher threshold shrinks it towards the region between the two peaks.
# Fewer scans inside the range means wider confidence intervals for the accuracy there.
# ```
