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
# # Preprocessing: skull stripping, rigid registration, z-scores and TIV
#
# The paper keeps preprocessing minimal so that brain shape and size survive: extract the brain, move
# it rigidly (rotation and translation only — no scaling) onto the MNI152 template grid, and z-score
# the intensities. Total intracranial volume is estimated separately, for the post-hoc analysis. Here:
#
# | step | paper | here |
# |---|---|---|
# | brain extraction | SynthStrip (CC-359's own masks) | deepbet {cite:p}`fisch2021deepbet`, or a cohort's masks |
# | registration | FSL FLIRT, 6 degrees of freedom | ANTsPy rigid {cite:p}`avants2011ants`, estimated coarse, applied once |
# | intensities | z-score | z-score inside the brain mask (whole volume as an option) |
# | TIV | FreeSurfer eTIV | template TIV / determinant of a 12-parameter affine {cite:p}`buckner2004etiv`, and the mask volume |
#
# Each subject's outputs are written atomically with a marker written last, so a run that is killed
# resumes where it stopped; a subject that fails is recorded with its reason and left out downstream.

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
n_strip_check = 8
manifest = "data_manifest.yaml"
min_group_size = 5

# %% tags=["hide-input"]
import numpy as np
from myst_nb import glue

from brainsex.figures import (
    fig_binned_scatter,
    fig_qc_mosaic,
    fig_qc_summary,
    fig_step_times,
    fig_tiv_agreement,
    show,
    show_table,
)
from brainsex.io import read_table
from brainsex.preprocess import preprocess_cohort, qc_mosaic_slices, registration_errors, strip_agreement
from brainsex.privacy import (
    WITHHELD,
    binned_counts_2d,
    group_summary,
    publication_policy,
    qc_aggregate,
    reason_counts,
)
from brainsex.run import RunDir

run = RunDir(run_dir)
participants = read_table(run.cohort.participants)
table = preprocess_cohort(participants, run.preprocess, voxel_size=voxel_size, n_workers=n_workers,
                          progress=False)
qc = read_table(run.preprocess.qc)
ok = table["status"] == "ok"
glue("n_ok", int(ok.sum()), display=False)
glue("n_failed", int((~ok).sum()), display=False)
glue("s_per_subject", f"{qc.loc[qc['status'] == 'ok', 't_total_s'].median():.1f}", display=False)
glue("voxel_size", f"{voxel_size:g}", display=False)
policy = publication_policy(run_dir, manifest, min_group_size)
glue("privacy_note", policy.note, display=False)

# %% [markdown]
# {glue:text}`n_ok` subjects were preprocessed onto the {glue:text}`voxel_size` mm template grid and
# {glue:text}`n_failed` failed (listed below). The median subject took {glue:text}`s_per_subject` s
# (one worker; the run used several in parallel). {glue:text}`privacy_note`

# %% tags=["hide-input"]
show(fig_step_times(qc[qc["status"] == "ok"]), alt="Median time per preprocessing step")
failed = table.loc[~ok, ["participant_id", "cohort", "reason"]]
if len(failed) and policy.shareable:
    show_table(failed, caption="Subjects that failed preprocessing")
elif len(failed):
    show_table(reason_counts(failed["reason"], table["participant_id"]), caption="Subjects that failed preprocessing, by reason")
    show_table(failed, caption="Subjects that failed preprocessing (local copy only)", local_only=True)

# %% [markdown]
# ## Brain extraction, checked against the truth
#
# When a cohort ships brain masks — CC-359 does, and so does the phantom (its true masks) —
# preprocessing uses them, as the paper did for CC-359, and the extractor does not run (it costs a few
# seconds per scan on a CPU). To keep the extractor honest, we run deepbet on a random sample of
# subjects anyway and compare its masks with the reference masks.

# %% tags=["hide-input"]
if participants["mask"].fillna("").astype(str).str.len().gt(0).any():
    agreement = strip_agreement(participants, n=n_strip_check, seed=seed)
    glue("strip_dice", f"{agreement['dice'].mean():.3f}", display=False)
    glue("strip_dice_min", f"{agreement['dice'].min():.3f}" if policy.shareable else WITHHELD, display=False)
    glue("strip_n", len(agreement), display=False)
    glue("strip_s", f"{agreement['seconds'].median():.1f}", display=False)
    if policy.shareable:
        show_table(agreement.round(3), caption="deepbet against the reference brain masks")
    else:
        show_table(group_summary(agreement, ["dice", "mask_ml", "reference_ml", "seconds"], k=policy.k).round(3),
                   caption="deepbet against the reference brain masks (summary over the sample)")
        show_table(agreement.round(3), caption="deepbet against the reference brain masks (local copy only)",
                   local_only=True)
else:
    for k in ("strip_dice", "strip_dice_min", "strip_n", "strip_s"):
        glue(k, "n/a (no reference masks: deepbet ran on every subject)", display=False)

# %% [markdown]
# On {glue:text}`strip_n` subjects, deepbet's masks overlap the reference masks with a mean Dice of
# {glue:text}`strip_dice` (lowest {glue:text}`strip_dice_min`), at a median {glue:text}`strip_s` s per scan.
#
# ## Quality control
#
# Below, one mid-axial slice per subject after registration (a sample when the cohort is large).
# Subjects whose similarity to the template is unusually low are flagged: look at those first. For a
# cohort that may not be published subject by subject, the book shows the mean and standard deviation
# of that slice over every registered subject and counts the flagged and failed subjects by reason;
# the mosaic stays in the executed notebook in the run directory.

# %% tags=["hide-input"]
slices, names, flagged = qc_mosaic_slices(table[ok], n=32, seed=seed)
if policy.shareable:
    show(fig_qc_mosaic(slices, names, flagged), alt="Mosaic of registered brains with outliers flagged")
else:
    all_slices, _, all_flagged = qc_mosaic_slices(table[ok], n=int(ok.sum()), seed=seed)
    summary = qc_aggregate(all_slices, all_flagged, failed["reason"], ids=table["participant_id"], k=policy.k)
    show(fig_qc_summary(summary.mean, summary.sd, summary.n, summary.note),
         alt="Mean and standard deviation of the registered brains")
    show_table(summary.counts, caption="Subjects flagged or failed, by reason")
    show(fig_qc_mosaic(slices, names, flagged), alt="Mosaic of registered brains (local copy only)", local_only=True)

# %% [markdown]
# ## Did registration undo the pose? (phantom only)
#
# The phantom heads were placed in the scanner with a random rotation and translation that the
# registration has to undo. Comparing the recovered transform with the true one measures the
# registration's error directly.

# %% tags=["hide-input"]
errors = registration_errors(table[ok], run.cohort, qc=qc)
if errors is not None and len(errors):
    glue("rot_err", f"{errors['rotation_error_deg'].median():.2f}", display=False)
    glue("trans_err", f"{errors['translation_error_mm'].median():.2f}", display=False)
    if policy.shareable:
        show_table(errors.describe().loc[["mean", "50%", "max"]].round(2).rename(index={"50%": "median"}),
                   caption="Registration error against the true pose")
    else:
        show_table(group_summary(errors, list(errors.select_dtypes("number").columns), k=policy.k).round(2),
                   caption="Registration error against the true pose")
else:
    glue("rot_err", "n/a", display=False)
    glue("trans_err", "n/a", display=False)

# %% [markdown]
# Median rotation error {glue:text}`rot_err`° and translation error {glue:text}`trans_err` mm.
#
# ## TIV: two estimates and the truth

# %% tags=["hide-input"]
good = table[ok]
pairs = [("mask_ml", "etiv_ml", "brain-mask volume (ml)", "eTIV, affine determinant (ml)")]
if good["tiv_ml"].notna().any():
    r = float(np.corrcoef(good["tiv_ml"], good["etiv_ml"])[0, 1])
    pairs.insert(0, ("tiv_ml", "etiv_ml", "true TIV (ml)", "eTIV, affine determinant (ml)"))
else:
    r = float("nan")
for x, y, x_title, y_title in pairs:
    if policy.shareable:
        show(fig_tiv_agreement(good, x, y, x_title, y_title), alt=f"{y_title} against {x_title}")
    else:
        show(fig_binned_scatter(binned_counts_2d(good[x], good[y], k=policy.k), x_title, y_title,
                                f"{y_title} against {x_title}", k=policy.k, identity=True),
             alt=f"{y_title} against {x_title}, subjects counted per cell")
glue("r_etiv", f"{r:.3f}", display=False)

# %% [markdown]
# The affine eTIV correlates with the phantom's true TIV at r = {glue:text}`r_etiv`. The brain-mask
# volume measures something smaller (brain tissue, not the whole intracranial cavity), but the two rank
# heads alike. The analyses that follow use the affine eTIV, as the paper used FreeSurfer's eTIV.
