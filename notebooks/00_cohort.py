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
# # The cohort
#
# The paper pooled four public datasets — CC-359 {cite:p}`souza2018cc359`, OASIS-3
# {cite:p}`lamontagne2019oasis3`, ADNI {cite:p}`jack2008adni` and Cam-CAN {cite:p}`shafto2014camcan` —
# keeping each subject's earliest scan, for a mix of three scanner vendors, two field strengths and ages
# from young adulthood to old age. Its Table 1 describes that mix.
#
# By default this book does not read those datasets (each needs its own data agreement). It generates a
# **synthetic phantom** with the same structure: the same counts per dataset, vendor, field strength and
# sex, the same age distributions, heads built from the MNI template with individual shapes, a skull,
# scanner-dependent contrast, bias field and noise, and **sex differences planted on purpose**: a
# difference in head size and local volume differences in ten atlas regions (the ten regions the paper
# found most salient). Because we know what was planted, later chapters can check what each method
# recovers.

# %% tags=["remove-cell"]
import sys

if "google.colab" in sys.modules:
    import subprocess

    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "git+https://github.com/brainsex-book/brainsex-book"], check=True)

# %% tags=["parameters"]
profile = "demo"
run_dir = "runs/demo"
manifest = "data_manifest.yaml"
cohorts = ["phantom"]
n_subjects = 320
voxel_size = 4.0
n_workers = 2
seed = 0
min_group_size = 5

# %% tags=["hide-input"]

import numpy as np
from IPython.display import Markdown
from myst_nb import glue

from brainsex.cohorts import load_cohorts, public_exclusions, table1, table1_public
from brainsex.figures import (
    SEX_COLORS,
    fig_age_by_dataset,
    fig_binned_histogram,
    fig_box_summary,
    fig_cohort_composition,
    fig_tiv_by_sex,
    show,
    show_table,
)
from brainsex.manifest import load_manifest
from brainsex.privacy import (
    binned_counts,
    pool_small_groups,
    publication_policy,
    quantile_summary,
)

m = load_manifest(manifest)
participants, exclusions = load_cohorts(m, cohorts, run_dir=run_dir, n=n_subjects, voxel_size=voxel_size,
                                        seed=seed, n_workers=n_workers, progress=False)
glue("n_subjects", len(participants), display=False)
glue("n_excluded", len(exclusions), display=False)
glue("cohorts_used", ", ".join(cohorts), display=False)
glue("profile", profile, display=False)
glue("voxel_size", f"{voxel_size:g}", display=False)
glue("pct_female", f"{100 * (participants['sex'] == 'F').mean():.0f}", display=False)
policy = publication_policy(run_dir, m, min_group_size, cohorts=cohorts)
glue("privacy_note", policy.note, display=False)
real = [m.cohort(c) for c in cohorts if m.cohort(c).kind != "synthetic"]
glue("cohort_case", Markdown(
    "**This run reads real scans** (" + "; ".join(
        f"{e.name}: {e.license or 'see its terms'}" + (f", {e.citation}" if e.citation else "") for e in real)
    + "). Real scans come without a known answer: the chapters that score a method against planted differences "
    "say so and, where they can, check the method on a phantom matched to this run instead."
    if real else "This run reads the **synthetic phantom** described above."), display=False)

# %% [markdown]
# Profile **{glue:text}`profile`** reads the cohort(s) **{glue:text}`cohorts_used`**:
# {glue:text}`n_subjects` subjects ({glue:text}`pct_female` % female), {glue:text}`n_excluded` excluded.
# Images are generated on a {glue:text}`voxel_size` mm grid in the CPU profiles (the paper's images are
# 1 mm); the `paper` profile generates or reads 1 mm images. {glue:text}`privacy_note`
#
# {glue:md}`cohort_case`
#
# ## Table 1

# %% tags=["hide-input"]
if policy.shareable:
    show_table(table1(participants), caption="Subjects, sex, age (mean ± sd, range), vendor and field strength per dataset")
else:
    show_table(table1_public(participants, policy.k),
               caption="Subjects, sex, age (mean ± sd), vendor and field strength per dataset")
public = participants if policy.shareable else pool_small_groups(participants, "dataset", policy.k)
show(fig_cohort_composition(public), alt="Subjects per dataset by sex, vendor and field strength")
if policy.shareable:
    show(fig_age_by_dataset(participants), alt="Age distribution per dataset and sex")
else:
    show(fig_box_summary(quantile_summary(public, "age", ["dataset", "sex"], policy.k), "dataset",
                         "Age by dataset and sex (box: quartiles; whiskers: 10th and 90th percentiles)", "age (years)"),
         alt="Age distribution per dataset and sex, from percentiles")

# %% [markdown]
# ## Head size
#
# For the phantom, the true total intracranial volume of each head is known (real cohorts rarely list
# it; the preprocessing chapter estimates it from every image). Female heads are drawn
# about ten percent smaller on average, with wide overlap — the paper's Figure 5 shows the same picture
# for real heads. The preprocessing chapter will estimate TIV from the images and compare.

# %% tags=["hide-input"]
if participants["tiv_ml"].notna().any() and policy.shareable:
    show(fig_tiv_by_sex(participants, "tiv_ml", title="True TIV of the phantom heads by sex"),
         alt="Histogram of true TIV by sex")
elif participants["tiv_ml"].notna().any():
    tiv = participants["tiv_ml"].dropna()
    edges = np.linspace(tiv.min(), tiv.max(), 31)
    show(fig_binned_histogram({name: binned_counts(participants.loc[participants["sex"] == sex, "tiv_ml"], edges,
                                                   policy.k) for sex, name in (("F", "female"), ("M", "male"))},
                              "True TIV of the phantom heads by sex", "TIV (ml)",
                              colors={"female": SEX_COLORS["F"], "male": SEX_COLORS["M"]}, k=policy.k),
         alt="Histogram of true TIV by sex, small bins suppressed")

# %% [markdown]
# ## Exclusions
#
# Subjects that cannot be used — an unreadable or missing image, a missing or unknown sex, a duplicate
# identifier — are listed here with the reason and left out of everything that follows. Cohorts whose
# terms forbid publishing individual data are summarised as counts.

# %% tags=["hide-input"]
show_table(public_exclusions(exclusions, m), caption="Excluded subjects and why")

# %% [markdown]
# ```{exercise}
# :label: ex-cohort-truth
# Open the phantom's planted-region table (`brainsex.run.RunDir("runs/demo").phantom.regions`). Which regions were made larger in males
# and which smaller? Would you expect a saliency map to tell you the direction?
# ```
#
# ```{solution} ex-cohort-truth
# :class: dropdown
# The sign column gives the direction (+1: larger in males). A plain (absolute) gradient map cannot
# show direction: it only says where the output is sensitive. A signed gradient or a group comparison
# of volumes (the validity chapter) can.
# ```
