# ---
# jupyter:
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
# # Validity: does the method find what is really there?
#
# The paper lists the ten atlas regions with the highest weighted saliency score (its Figure 7 and
# Table S1) and reads them as the regions that tell the sexes apart. That reading assumes that a
# region where the average saliency is high is a region where female and male brains differ. On real
# data nobody can check this. On the phantom we can: ten regions were planted with a known
# difference between the sexes (each is larger in one sex by a fixed share of its volume, independently of head
# size; the first section below gives the figure), so we measure how many of them each method finds, and compare with what chance would give.
#
# Three rankings of the same atlas regions are compared:
#
# 1. **The truth map.** The phantom's own effect map, averaged per region: the best any region-level
#    method can do on this grid (a region too small to keep a voxel on the coarse atlas is lost to
#    every method).
# 2. **A classical positive control**, tensor-based morphometry (TBM): warp every subject to the
#    template, take the log of the Jacobian determinant of the warp (how much each bit of the subject
#    is larger or smaller than the template), average it per region and test males against females
#    with TIV as a covariate. If this does not find the planted volume differences, either the phantom,
#    the test or the warps is wrong, and the chapter has to find out which before reading anything else.
# 3. **The deep-learning explanations** of the trained model: the paper's absolute gradient, the signed
#    gradient, SmoothGrad, Integrated Gradients and occlusion of whole atlas regions, each ranked by the
#    paper's weighted saliency score and by the plain regional mean.
#
# Every ranking gets the same metrics: **precision@10** (how many of the ten top regions are planted),
# **average precision** (the whole ranking), and *tolerant* versions of both in which a region
# touching a planted region counts as finding it. Each comes with its **chance level** — its mean over
# {glue:text}`n_perm` random orderings of the same regions — and a permutation p-value.

# %% tags=["remove-cell"]
import sys

if "google.colab" in sys.modules:
    import subprocess

    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "git+https://github.com/brainsex-book/brainsex-book"], check=True)

# %% tags=["parameters"]
profile = "demo"
run_dir = "runs/demo"
voxel_size = 4.0
n_workers = 2
seed = 0
device = "auto"
max_scans = 16
reliance_scans = 16
n_bootstrap = 1000
tbm_subjects = 16
tbm_warps = ["tbm"]
n_perm = 1000
atlas_source = "offline"
# committed study folders (benchmarks/validity/): the 8 and 6 mm sweep, and the 2 mm run with demo- and paper-width models
study_dirs = ["benchmarks/validity", "benchmarks/validity/grid-2mm"]
fine_grid = 2.0
# real cohorts: check the methods on a phantom matched to this run (same grid, widths, training settings)
matched_phantom = True
matched_subjects = 160
manifest = "data_manifest.yaml"
channels = [8, 16, 32, 32, 32, 16]
epochs = 12
scheduler = "cosine"
batch_size = 16
lr = 0.01
select = "last"
micro_batch = "auto"
# is it just head size? the same model trained on size-only and region-only phantoms (two more trainings)
size_experiments = True
min_group_size = 5

# %% tags=["hide-input"]
import json

import nibabel as nib
import numpy as np
import pandas as pd
from IPython.display import Markdown
from myst_nb import glue

from brainsex.atlas import region_neighbours
from brainsex.book import ChapterEnds
from brainsex.figures import fig_precision_at_k, fig_tbm_coefficients, show, show_table
from brainsex.io import read_table, write_table
from brainsex.matched import matched_phantom_run
from brainsex.run import RunDir
from brainsex.templates import load_atlas, load_template
from brainsex.validity import (
    PERFECT_ALL,
    compare_methods,
    comparison_table,
    control_verdict,
    format_p,
    has_truth,
    planted_recovery,
    planted_truth,
    positive_control,
    ranking_report,
    read_study,
    report_long,
    study_grid_summary,
    study_precision_table,
    study_width_table,
    truth_map_ranking,
)

run = RunDir(run_dir)
truth_known = has_truth(run)
if not truth_known:
    if not matched_phantom:
        raise ChapterEnds("This run is on real scans, which come with no known answer, and the phantom matched to "
                          "the run is turned off (`matched_phantom` false), so this build has nothing to check the "
                          "methods against and the chapter ends here. Build with `-p matched_phantom true` to see "
                          "the checks on a phantom with this run's grid, model and training settings.")
    n_real = len(read_table(run.cohort.participants))
    run = RunDir(matched_phantom_run(run, manifest=manifest, n_subjects=matched_subjects, voxel_size=voxel_size,
                                     channels=channels, epochs=epochs, batch_size=batch_size, lr=lr,
                                     scheduler=scheduler, select=select, device=device, seed=seed,
                                     n_workers=n_workers))
    n_matched = len(read_table(run.cohort.participants))
    glue("validity_case", Markdown(
        f"**This run is on real scans** ({n_real} subjects), which come with no known answer. The checks below "
        f"therefore run on a **phantom matched to this run**: {n_matched} phantom subjects on the same "
        f"{voxel_size:g} mm grid, with the same model widths and training settings, generated, preprocessed, "
        f"trained and explained inside this chapter (cached in `validity/matched_phantom/`). They measure how far "
        "a region ranking made at these settings can be trusted; they do not say which regions differ in the "
        "real cohort."), display=False)
else:
    glue("validity_case", Markdown("This run is on the phantom: the checks below use its own planted truth."),
         display=False)
out = run.validity
template = load_template(voxel_size, source=atlas_source)
atlas, labels = load_atlas(voxel_size, source=atlas_source)
truth = planted_truth(run)
neighbours = region_neighbours(np.asarray(atlas.dataobj))
K = 10
effect_pct = 100 * float(json.loads(run.phantom.generation.read_text())["args"]["region_effect"])
length_pct = 100 * ((1 + effect_pct / 100) ** (1 / 3) - 1)
glue("region_effect_pct", f"{effect_pct:g}", display=False)
glue("n_perm", f"{n_perm:,}", display=False)

effect_map = nib.load(run.phantom.effect_map)
ceiling = truth_map_ranking(effect_map, atlas, labels)
ceiling_rep = ranking_report(ceiling, truth, neighbours=neighbours, n_perm=n_perm, seed=seed, k=K)
rec_ceiling = planted_recovery(ceiling, truth, k=K)
absent = rec_ceiling.loc[~rec_ceiling["on_grid"], "name"].tolist()
glue("n_planted", len(truth), display=False)
glue("n_on_grid", int(rec_ceiling["on_grid"].sum()), display=False)
glue("voxel_size", f"{voxel_size:g}", display=False)
glue("absent_regions", ", ".join(absent) if absent else "none", display=False)
glue("ceiling_p10", f"{ceiling_rep.loc[0, 'precision_at_k']:.1f}", display=False)
glue("ceiling_ap", f"{ceiling_rep.loc[0, 'average_precision']:.2f}", display=False)
glue("chance_p10", f"{ceiling_rep.loc[0, 'precision_at_k_chance']:.2f}", display=False)
glue("chance_p10_tol", f"{ceiling_rep.loc[0, 'precision_at_k_tolerant_chance']:.2f}", display=False)
glue("n_ranked", int(ceiling_rep.loc[0, "n_ranked"]), display=False)

# %% [markdown]
# {glue:md}`validity_case`
#
# ## The ceiling: what is there to find on this grid
#
# Each planted region is larger in one sex by {glue:text}`region_effect_pct` % of its volume.
# Of the {glue:text}`n_planted` planted regions, {glue:text}`n_on_grid` keep at least one voxel on the
# {glue:text}`voxel_size` mm atlas (lost: {glue:text}`absent_regions`); {glue:text}`n_ranked` regions
# are ranked in all. Ranked by the phantom's own effect map, the planted regions come first:
# precision@10 = {glue:text}`ceiling_p10` and average precision {glue:text}`ceiling_ap`. A random
# ordering scores {glue:text}`chance_p10` at precision@10 ({glue:text}`chance_p10_tol` with the
# neighbour tolerance, which is generous: many regions touch a planted one).
#
# ## Positive control: tensor-based morphometry
#
# The phantom knows each subject's deformation (its individual random warp, the planted sex effect,
# the age-related ventricle enlargement), so the morphometry can run with **perfect warps** — the
# phantom's true deformations — on every subject, at no registration cost: this checks the phantom and
# the statistics. It also runs with **registered warps** (ANTs SyN tuned for morphometry: local
# cross-correlation and a full-resolution level, `brainsex.validity.TBM_SYN`) on a random,
# sex-balanced sample of {glue:text}`tbm_n_subjects` subjects — registration costs seconds per
# subject — beside the perfect warps on that same sample, which is the fair comparison.

# %% tags=["hide-input"]
pre = read_table(run.preprocess.table)
control = positive_control(pre, run.phantom, template, atlas, labels, truth, run.preprocess.warps,
                           warps=tbm_warps, max_subjects=tbm_subjects, n_jobs=n_workers, n_perm=n_perm, k=K,
                           neighbours=neighbours, seed=seed)
for name, res in control.tables.items():
    write_table(res, out.tbm_regions(name, res.attrs["n_subjects"]))
summary = control.summary(k=K)
show_table(summary.assign(**{f"P@{K} p": summary[f"P@{K} p"].map(format_p)}),
           caption="Tensor-based morphometry (recovered: FDR q < 0.05 with the planted sign)")
names = labels.set_index("label").loc[control.coef.index, "name"]
show(fig_tbm_coefficients(control.coef, names),
     alt="Grouped bars: each planted region's sex difference measured with perfect and with registered warps")

verdict = control_verdict(control)
n_on_grid = len(control.coef)
oracle = verdict.n_recovered
glue("n_all", control.tables[PERFECT_ALL].attrs["n_subjects"], display=False)
glue("oracle_n_recovered", oracle, display=False)
glue("oracle_hits10", int(control.reports[PERFECT_ALL].loc[0, "hits_at_k"]), display=False)
glue("oracle_verdict", (
    f"the positive control passes: the phantom and the test are sound ({oracle} of {len(truth)} planted regions, "
    f"{n_on_grid} of which exist on this grid)" if verdict.passes else
    f"the positive control falls short ({oracle} of {len(truth)}): at this sample size even perfect warps miss "
    "planted regions, so the effects are small for this design"), display=False)
registered = verdict.registered is not None
glue("tbm_n_subjects", verdict.n_registered_subjects, display=False)
glue("registered_text", (
    f"On the sample of {verdict.n_registered_subjects}, the registered warps recover "
    f"{verdict.registered_recovered} planted regions against {verdict.sample_recovered} with perfect warps. They do "
    f"follow each subject's anatomy — their regional log-Jacobians correlate at a median {control.agreement:.2f} "
    f"with the true ones across subjects — but they carry only {control.ratio:.2f} (median over the planted "
    "regions) of the planted sex difference." if registered else
    "The registered warps were not run in this build (`tbm_subjects = 0`)."), display=False)
glue("tbm_conclusion", (
    "registration, not the phantom or the test, is what loses the planted differences on this grid. A "
    f"{effect_pct:g} % volume change is a {length_pct:.1f} % change of length, under a millimetre, and regions of "
    "a few dozen voxels lose most of it. That sets the bar for the saliency methods below: they see the same coarse images."
    if registered and verdict.passes and verdict.loses_difference else
    "the registered warps keep most of the planted difference, so a larger sample would recover it."
    if registered and verdict.passes else
    "the perfect-warp control is the reference; read the results below against it."), display=False)

# %% [markdown]
# With perfect warps on all {glue:text}`n_all` subjects, {glue:text}`oracle_verdict`; {glue:text}`oracle_hits10`
# of the ten top-ranked regions are planted. {glue:text}`registered_text`
#
# In short: {glue:text}`tbm_conclusion`
#
# ```{note}
# While building the book we tried to make registered-warp morphometry work on the 4 mm phantom:
# registering the native scan instead of the preprocessed one, N4 bias correction, weaker
# regularisation, a mean-squares metric, a study-specific template. None closed the gap, and small
# regions lost the most; finer grids, not more subjects, are what this control needs (see the issue
# notes in the repository's history).
# ```
#
# ## Is it just head size?
#
# The phantom plants two differences between the sexes: male heads are larger on average, and ten
# regions are larger or smaller in one sex whatever the head size. A model can reach a high accuracy
# with the first alone, and the paper's own check of this (its TIV-matched subset, chapter 04) only
# looks inside the range where head sizes overlap. Here the same model, with the same split (the same
# participants in train, validation and test) and the same training settings, is trained twice more:
# on the phantom with **no regional difference** (the sexes differ only in size) and on the phantom with
# **one head-size distribution for both sexes** (they differ only in the planted regions). Both variants
# are generated with this run's seed, so every subject keeps its age, site, pose, scanner settings and
# noise; only the factor switched off changes. Accuracy and balanced accuracy come with 95 % bootstrap
# intervals, on all test subjects and on those inside this run's $R_{\mathrm{tiv}}$.

# %% tags=["hide-input"]
from brainsex.figures import fig_size_experiments
from brainsex.privacy import publication_policy, suppress_table
from brainsex.validity import size_experiments as run_size_experiments
from brainsex.validity import size_summary

size_keys = [f"{p}_{s}" for p in ("default", "size_only", "regions_only") for s in ("all", "inside_rtiv")]
if size_experiments:
    train_settings = {"channels": channels, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                      "scheduler": scheduler, "select": select, "device": device, "seed": seed,
                      "micro_batch": micro_batch}
    size_table = run_size_experiments(run, train_settings, out=RunDir(run_dir).validity, n_bootstrap=n_bootstrap,
                                      n_workers=n_workers, progress=False)
    size_policy = publication_policy(run.root, manifest, min_group_size)  # the run the rows come from
    published = size_table if size_policy.shareable else size_table[size_table["n"] >= size_policy.k]
    if (published["metric"] == "balanced_accuracy").any():
        show(fig_size_experiments(published, chance=0.5), alt="Balanced accuracy of the same model trained on the "
             "run's phantom, a size-only and a regions-only phantom")
    shown = size_table.copy()
    shown[["value", "ci_low", "ci_high"]] = shown[["value", "ci_low", "ci_high"]].round(3)
    show_table(shown if size_policy.shareable else suppress_table(shown, size_policy.k),
               caption="The same model on three phantoms: accuracy and balanced accuracy, all test subjects "
               "and inside R_tiv, with 95 % bootstrap CIs")
    texts = size_summary(published, chance=0.5)
    for key in size_keys:
        glue(f"size_{key}", texts.get(key, "n/a (too few or no test subjects there)"), display=False)
        glue(f"size_{key}_vs_chance", texts.get(f"{key}_vs_chance", "not measurable"), display=False)
    low, high = size_table.attrs["rtiv"]
    glue("size_rtiv", f"{low:,.0f}–{high:,.0f} ml", display=False)
    glue("size_chance_acc", f"{100 * size_table.attrs['chance_accuracy']:.0f} %", display=False)
    glue("size_status", Markdown(""), display=False)
else:
    for key in size_keys:
        glue(f"size_{key}", "not run", display=False)
        glue(f"size_{key}_vs_chance", "not run", display=False)
    glue("size_rtiv", "not computed", display=False)
    glue("size_chance_acc", "not computed", display=False)
    glue("size_status", Markdown("**This build skipped the experiment** (`size_experiments` is off); the numbers "
                                 "below read \"not run\". Build with `-p size_experiments true` to fill them in."),
         display=False)

# %% [markdown]
# {glue:md}`size_status`
#
# Balanced accuracy, whose chance level is 50 % (plain accuracy's chance level here, always answering
# the commoner sex of the test set, is {glue:text}`size_chance_acc`); $R_{\mathrm{tiv}}$ is
# {glue:text}`size_rtiv`.
#
# - **Size alone** (no planted regions): {glue:text}`size_size_only_all` on all test subjects,
#   {glue:text}`size_size_only_all_vs_chance`; inside $R_{\mathrm{tiv}}$ {glue:text}`size_size_only_inside_rtiv`,
#   {glue:text}`size_size_only_inside_rtiv_vs_chance`.
# - **Regions alone** (one head-size distribution): {glue:text}`size_regions_only_all` on all test subjects,
#   {glue:text}`size_regions_only_all_vs_chance`; inside $R_{\mathrm{tiv}}$
#   {glue:text}`size_regions_only_inside_rtiv`, {glue:text}`size_regions_only_inside_rtiv_vs_chance`.
# - **Both, this run's model**: {glue:text}`size_default_all` on all test subjects; inside
#   $R_{\mathrm{tiv}}$ {glue:text}`size_default_inside_rtiv`.
#
# Read the rows against each other. The size-only model shows how far head size alone carries this
# classifier, and its row inside $R_{\mathrm{tiv}}$ how much of that survives where the two sexes' head
# sizes overlap. $R_{\mathrm{tiv}}$ is the range where *both* densities are high, not a range where the
# sexes have equal heads: inside it men's heads are still larger on average, so a size-only model need
# not fall to chance there, and a model's accuracy inside $R_{\mathrm{tiv}}$ is not by itself proof
# that it uses anything but size. The regions-only model shows whether the planted regions alone are
# learnable by this model at this grid and training budget; if it stays near chance, an explanation of
# the run's model has little reason to point at them, whatever the explanation method. The intervals
# are wide: the test set is small, so differences of a few points between rows mean nothing.
#
# ```{exercise}
# :label: ex-validity-size
# Before looking at the table, predict the size-only model's balanced accuracy inside
# $R_{\mathrm{tiv}}$. Then say what a regions-only model near chance would mean for the saliency
# rankings below.
# ```
#
# ```{solution} ex-validity-size
# :class: dropdown
# Lower than on all test subjects, but not necessarily at chance: $R_{\mathrm{tiv}}$ keeps the head
# sizes both sexes commonly have, and inside it the male density still sits to the right of the female
# one, so size keeps part of its power. Compare the two rows of the size-only model above. If the
# regions-only model is near chance, the model cannot see the planted regions at this grid and budget,
# and a saliency ranking that misses them is not evidence against the explanation method.
# ```
#
# ## The deep-learning explanations

# %% tags=["hide-input"]
import torch

from brainsex.train import load_model

torch.manual_seed(seed)
pred = read_table(run.evaluate.predictions)
if "split" in pred.columns:
    pred = pred[pred["split"] == "test"]
paths = pre[["participant_id", "image_pp"]]
scans = pred.merge(paths, on="participant_id").reset_index(drop=True)
model = load_model(run.train.best, device="cpu" if device == "auto" else device)
compared = compare_methods(
    model, scans, template, atlas, labels, truth, max_scans=max_scans, warp="syn",
    cache_dir=run.preprocess.warps, neighbours=neighbours, n_perm=n_perm, k=K, seed=seed,
    n_jobs=n_workers)
comparison, rankings = compared.table, compared.rankings
reference = pd.concat([
    report_long(ceiling_rep.assign(method="truth map", scoring="effect"), id_cols=("method", "scoring")),
    *[report_long(rep.assign(method=f"TBM, {name}", scoring="|t|"), id_cols=("method", "scoring"))
      for name, rep in control.reports.items()],
], ignore_index=True)
everything = pd.concat([reference, comparison.drop(columns=["top_k"])], ignore_index=True)
write_table(comparison, out.method_comparison)
write_table(everything, out.summary)
n_scans = int(comparison["n_scans"].iloc[0])
glue("n_scans", n_scans, display=False)

p10 = everything[everything["metric"] == f"precision_at_{K}"].copy()
p10["label"] = p10["method"] + " · " + p10["scoring"]
show(fig_precision_at_k(p10, k=K,
                        title=f"Precision@{K}: planted regions among the ten top-ranked (dark: p < 0.05)"),
     alt="Precision at 10 of every method and scoring against its chance level")
show_table(comparison_table(everything, k=K), caption="Every ranking against the planted regions, with permutation chance levels and p-values")
show_table(comparison[comparison["metric"] == f"precision_at_{K}"][["method", "scoring", "top_k"]]
           .rename(columns={"top_k": f"top {K} regions (* planted)"}),
           caption="The ten top regions of every method and scoring")

dl = comparison[comparison["metric"] == f"precision_at_{K}"]
above = dl[dl["p_value"] < 0.05]
best = dl.sort_values(["observed", "p_value"], ascending=[False, True]).iloc[0]
glue("dl_n_combos", len(dl), display=False)
glue("dl_n_above", len(above), display=False)
glue("dl_best", f"{best['method']} · {best['scoring']}", display=False)
glue("dl_best_p10", f"{best['observed']:.1f}", display=False)
glue("dl_best_chance", f"{best['chance']:.2f}", display=False)
glue("dl_best_p", format_p(best["p_value"]), display=False)
glue("dl_range", f"{dl['observed'].min():.1f}–{dl['observed'].max():.1f}", display=False)
glue("dl_above_list", "; ".join(f"{m} · {s} ({o:.1f})" for m, s, o in
                                zip(above["method"], above["scoring"], above["observed"], strict=True)) or "none",
     display=False)
ap = comparison[comparison["metric"] == "average_precision"]
ap_above = ap[ap["p_value"] < 0.05]
glue("dl_ap_range", f"{ap['observed'].min():.2f}–{ap['observed'].max():.2f}", display=False)
glue("dl_ap_chance", f"{ap['chance'].mean():.2f}", display=False)
glue("dl_ap_n_above", len(ap_above), display=False)
glue("dl_expected_false", f"{0.05 * len(dl):.1f}", display=False)
paper_way = dl[(dl["method"] == "saliency") & (dl["scoring"] == "weighted_score")].iloc[0]
glue("paper_p10", f"{paper_way['observed']:.1f}", display=False)
glue("paper_p", format_p(paper_way["p_value"]), display=False)
glue("paper_top", paper_way["top_k"].replace("*", " (planted)"), display=False)

# %% [markdown]
# Each method explains the same {glue:text}`n_scans` correctly classified test scans (a sample, to keep
# the book fast). Across the {glue:text}`dl_n_combos` combinations of method and scoring,
# precision@10 ranges over {glue:text}`dl_range` against a chance level of about
# {glue:text}`chance_p10`. The paper's own combination — absolute gradient, weighted saliency score —
# reaches {glue:text}`paper_p10` (p {glue:text}`paper_p`); its ten top regions are
# {glue:text}`paper_top`. The best combination is {glue:text}`dl_best` with {glue:text}`dl_best_p10`
# (chance {glue:text}`dl_best_chance`, p {glue:text}`dl_best_p`). Combinations above chance at
# p < 0.05: {glue:text}`dl_above_list`. Over the whole ranking, average precision ranges over
# {glue:text}`dl_ap_range` against a chance level of about {glue:text}`dl_ap_chance`, and
# {glue:text}`dl_ap_n_above` of the {glue:text}`dl_n_combos` combinations beat chance at p < 0.05 —
# with {glue:text}`dl_n_combos` tests, about {glue:text}`dl_expected_false` would do so by luck alone, and
# the same scans and model are behind all of them. One planted region among the ten top regions (marked
# with * in the table above) is what a random ranking gives about as often as not.
#
# ## What the model really uses
#
# A ranking at chance has two readings: the model does not use the planted regions, or the explanation
# fails to show what the model uses. The phantom can tell them apart. Every subject was drawn from named
# random streams, so a test scan can be **re-rendered with one factor switched** and everything else
# identical — the same pose, individual warp, bias field and noise (`brainsex.synthetic.render_counterfactual`):
# every planted region given the other sex's effect; one planted region alone; the head size moved to the
# other sex's distribution; both together (the phantom's whole sex difference); and the age-related
# changes (ventricles, grey-matter thinning) moved ten years either way. Each counterfactual goes through
# the subject's own recorded preprocessing (its brain extraction, its rigid transform, the z-score) and
# the trained model. The change of the model's logit is what the model really uses; it is signed so that
# **positive means towards the other sex** (`brainsex.reliance`).

# %% tags=["hide-input"]
from brainsex.figures import fig_model_reliance
from brainsex.reliance import explanation_vs_reliance, model_reliance, reliance_shares, tracking_methods

reliance = model_reliance(run, model=model, max_scans=reliance_scans, n_bootstrap=n_bootstrap, seed=seed,
                          n_jobs=n_workers)
write_table(reliance, out.model_reliance)
show(fig_model_reliance(reliance),
     alt="Horizontal bars: mean change of the model's logit for each switched factor, with bootstrap intervals")
show_table(reliance.round(3), caption="Mean change of the logit per counterfactual (positive: towards the other sex), "
           "with 95 % bootstrap intervals over the test scans")
vs_reliance = explanation_vs_reliance(rankings, reliance, n_perm=n_perm, seed=seed, versus_truth=comparison,
                                      truth_metric=f"precision_at_{K}")
write_table(vs_reliance, out.explanation_vs_reliance)
show_table(vs_reliance[["method", "scoring", "spearman", "spearman_p", "precision_at_k", "precision_chance",
                        "truth_observed", "truth_chance"]].round(2)
           .rename(columns={"spearman": "ρ vs reliance", "spearman_p": "p", "precision_at_k": "P@k vs reliance",
                            "precision_chance": "chance", "truth_observed": f"P@{K} vs truth",
                            "truth_chance": "chance (truth)"}),
           caption="Every explanation ranking scored against the model's own per-region reliance (planted regions "
                   "only) and, beside it, against the planted truth")

shares = reliance_shares(reliance)
rows = reliance.set_index(["factor", "region"])
tracking = tracking_methods(vs_reliance)
one = reliance[reliance["factor"] == "planted region"]
strongest = one.loc[one["delta_logit"].abs().idxmax()]
glue("rel_n_scans", int(reliance["n_scans"].max()), display=False)
glue("rel_size", f"{shares['size_delta']:+.2f}", display=False)
glue("rel_size_ci", "{:+.2f} to {:+.2f}".format(*rows.loc[("head size", ""), ["ci_low", "ci_high"]]), display=False)
glue("rel_regions", f"{shares['regions_delta']:+.2f}", display=False)
glue("rel_regions_ci", "{:+.2f} to {:+.2f}".format(*rows.loc[("planted regions (all)", ""), ["ci_low", "ci_high"]]),
     display=False)
glue("rel_everything", f"{shares['everything_delta']:+.2f}", display=False)
glue("rel_age", f"{shares['age_delta']:+.2f}", display=False)
glue("rel_single_sum", f"{shares['sum_single_regions']:+.2f}", display=False)
glue("rel_strongest", f"{strongest['region']} ({strongest['delta_logit']:+.3f})", display=False)
glue("rel_share_size", f"{100 * shares['size']:.0f}", display=False)
glue("rel_share_regions", f"{100 * shares['regions']:.0f}", display=False)
glue("rel_share_age", f"{100 * shares['age']:.0f}", display=False)
glue("rel_k", int(vs_reliance["k"].max()), display=False)
glue("rel_n_rankings", len(vs_reliance), display=False)
glue("rel_rho_range", f"{vs_reliance['spearman'].min():+.2f} to {vs_reliance['spearman'].max():+.2f}", display=False)
glue("rel_tracking", "; ".join(tracking) if tracking else "none of them", display=False)
glue("rel_verdict", Markdown(
    f"**Verdict for this run.** Of the model's response to the three kinds of difference, about "
    f"{100 * shares['size']:.0f} % comes from head size, {100 * shares['regions']:.0f} % from the planted regions "
    f"and {100 * shares['age']:.0f} % from age-related change. "
    + ("The model decides mostly from head size, so the explanations had little of the planted regions to show: "
       "their failure above is first a fact about the model, not only about the methods. "
       if shares["size"] > max(shares["regions"], shares["age"]) else
       "The model does use the planted regions, so an explanation that misses them fails to show what the model uses. "
       if shares["regions"] > max(shares["size"], shares["age"]) else
       "The model responds most to age-related change, which is not a sex difference of the phantom at all. ")
    + (f"Against the model's own per-region reliance, {len(tracking)} of {len(vs_reliance)} rankings follow it "
       f"(Spearman p < 0.05: {'; '.join(tracking)})." if tracking else
       f"No ranking follows the model's own per-region reliance (none of {len(vs_reliance)} has a Spearman "
       "correlation above chance at p < 0.05).")), display=False)

# %% [markdown]
# Over {glue:text}`rel_n_scans` test scans, giving a subject the other sex's head size moves the logit by
# {glue:text}`rel_size` (95 % interval {glue:text}`rel_size_ci`) towards the other sex; giving it the other
# sex's effect in all planted regions moves it by {glue:text}`rel_regions` ({glue:text}`rel_regions_ci`), and
# both together by {glue:text}`rel_everything`. Ten years of age-related change move it by
# {glue:text}`rel_age` at most. The one-region switches add up to {glue:text}`rel_single_sum`; the largest
# single region is {glue:text}`rel_strongest`.
#
# Only the planted regions have a one-region counterfactual, so the explanation rankings are scored against
# the reliance over those regions: the rank correlation (Spearman ρ, with a permutation p-value) between
# the method's order and the size of each region's logit change, and the overlap of the method's
# {glue:text}`rel_k` top planted regions with the {glue:text}`rel_k` the model relies on most (chance:
# {glue:text}`rel_k` / number of planted regions). Across the {glue:text}`rel_n_rankings` rankings ρ ranges
# over {glue:text}`rel_rho_range`; rankings that follow the model's reliance: {glue:text}`rel_tracking`.
# When the per-region changes are all tiny, as they are when the model hardly uses the regions, their
# order is mostly noise and no ranking can follow it: read this score together with the size of the changes.
#
# {glue:md}`rel_verdict`
#
# ```{exercise}
# :label: ex-validity-counterfactual
# Pick a female test subject of the run and predict, before running anything, the sign and rough size of
# the change in the model's logit when (a) only her head size is switched to the male distribution and (b)
# only her Right Pallidum (or any planted region) takes the male effect. Then check:
# `img, mask = brainsex.synthetic.render_counterfactual(run.phantom.root, pid, size="other")`, put it through
# `brainsex.reliance.preprocess_like(img, mask, run, pid)` and the model, and compare with the original.
# ```
#
# ```{solution} ex-validity-counterfactual
# :class: dropdown
# The table above is the prediction for the average scan: the head-size switch moved the logit by
# {glue:text}`rel_size` towards the other sex, the strongest single planted region by
# {glue:text}`rel_strongest`. One subject scatters around that mean (the interval is the uncertainty of
# the mean, not the spread of single scans). A size switch can move the model even though preprocessing is
# rigid: a rigid, size-keeping registration leaves a larger head larger on the template grid, so the brain's
# outline and volume are there for the network to read. A planted region changes by a few per cent of its
# volume, which on a coarse grid moves few voxels, and the per-scan z-score spreads that change over the
# whole brain.
# ```
#
# ## What this means for reading the paper's region list
#
# On a phantom where the *only* local differences between the sexes are the ten planted regions, and
# where morphometry with the true deformations finds them, a saliency ranking is a different kind of
# object: it says where the trained network's output is *sensitive* to the intensities, which is not
# the same as where the two groups *differ*. A planted volume change moves tissue boundaries, often outside the
# region that changed; the per-scan z-score spreads a local change over the whole image; gradients are
# largest at high-contrast edges; and a network can reach its decision from head size and shape alone.
# Read the paper's top-ten list as a description of the model, not as a map of sex differences in the
# brain — unless a check like this one, on data with a known answer, shows that the method recovers
# what is there at the resolution used.
#
# This run makes the point with its own numbers. Of the model's response to switching a factor, head size
# accounted for {glue:text}`rel_share_size` %, the planted regions for {glue:text}`rel_share_regions` % and
# ten years of ageing for {glue:text}`rel_share_age` %; rankings that follow the model's own per-region
# reliance: {glue:text}`rel_tracking`. A region list drawn from such a model and such explanations says
# little about where the two groups differ: at these settings, trust it no further than the checks above
# reach.
#
# ## A wider sweep: effect types, grids and z-scoring
#
# The demo book runs one phantom, one grid and one z-score. `python -m brainsex.validity study`
# repeats the comparison over phantoms with **volume** or **intensity (contrast)** effects, two grid
# resolutions, and two z-scores: the paper's per-scan z-score, and one whose statistics come from deep
# white matter far from the planted regions, which a local change cannot move. It can also train
# models of several widths on each phantom (`--widths demo paper`: the demo's slim SFCN and the paper's
# full-width one, channels 32-64-128-256-256-64). It trains one model per configuration, so it runs
# outside the book; its table is committed with the date and the command that made it:
# {glue:text}`study_made`.

# %% tags=["hide-input"]
studies = [read_study(d) for d in study_dirs]
glue("study_made", "; ".join(f"`{rec.folder}` {rec.made}" for rec in studies), display=False)
study_notes = []
for rec in studies:
    if rec.table is None:
        study_notes.append(f"No study table was found in {rec.folder}; run its command to make it.")
        continue
    show_table(study_width_table(rec.table, k=K),
               caption=f"Validity study in {rec.folder}, by grid and model width: precision@{K} (chance level) of every "
               "method, the paper's per-scan z-score; the first row is each model's test accuracy")
    s10 = study_precision_table(rec.table, k=K)
    show_table(s10, caption=f"Validity study in {rec.folder}: precision@{K} of every configuration, with its chance level")
    weak = s10.attrs["n_weak"]
    study_notes.append(f"{rec.folder}: {len(s10)} rankings" + (
        f"; {weak} of its trained models are near chance, so their saliency rows say little (a larger run, with "
        "more subjects and epochs, is needed for those)" if weak else "") + ".")
glue("study_status", " ".join(study_notes) + " `tbm` is morphometry with registered warps, `tbm_perfect_warps` with the "
     "phantom's true deformations, `truth_map` the ceiling.", display=False)

fine = next((rec.table for rec in studies if rec.table is not None
             and (rec.table["voxel_size"].astype(float) == fine_grid).any()), None)
if fine is not None:
    g = study_grid_summary(fine, fine_grid, k=K)
    glue("fine_grid", (
        f"On the {fine_grid:g} mm grid the models reached a test accuracy of "
        + ", ".join(f"{acc:.2f} ({w} width)" for w, acc in g["accuracy"].items())
        + f". The best explanation of each model scored precision@{K} "
        + ", ".join(f"{v[2]:.2f} ({w} width: {v[0]}, {v[1]})" for w, v in g["best_method"].items())
        + f" against a chance level of about {g['chance']:.2f}; morphometry scored "
        + ", ".join(f"{v[0]:.2f} ({m})" for m, v in g["morphometry"].items()) + "."), display=False)
else:
    glue("fine_grid", f"No committed study has a {fine_grid:g} mm grid yet.", display=False)

# %% [markdown]
# {glue:text}`study_status`
#
# {glue:text}`fine_grid`
#
# ```{exercise}
# :label: ex-validity-chance
# Precision@10 of a random ordering is about 10 planted / (number of ranked regions). Why is the chance
# level of the *tolerant* precision@10 so much higher, and why does a method that outlines the
# neighbours of every planted region not get full marks for it?
# ```
#
# ```{solution} ex-validity-chance
# :class: dropdown
# With the tolerance, a ranked region is a hit if it is a planted region *or touches one*; on a coarse
# atlas most regions touch several others, so a random region often touches a planted one and the chance
# level rises. Each planted region can be found only once, though (the hits are a one-to-one matching
# between ranked and planted regions), so ten neighbours of the same planted region count as one hit.
# Always read a metric next to its chance level.
# ```
#
# ```{exercise}
# :label: ex-validity-contrast
# Re-run the comparison on a phantom with an intensity effect instead of a volume effect
# (`brainsex.synthetic.make_cohort(..., region_effect=0.0, contrast_effect=0.1)`, or the study command
# with `--effects contrast`). What should the tensor-based morphometry control find now, and why?
# ```
#
# ```{solution} ex-validity-contrast
# :class: dropdown
# Nothing above chance: tensor-based morphometry measures volume through the warps, and an intensity
# change inside a region does not change its volume (the registration may bend a little around a
# brighter region, but there is no consistent expansion). It is a control for volume effects only. The
# saliency methods, which read intensities, have their best chance on this kind of effect, which is a
# useful contrast with the volume phantom.
# ```
