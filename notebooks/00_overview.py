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
# # Overview: the study and this run
#
# This chapter sets the scene: which analysis we reproduce, which cohorts this run reads, and the
# template space in which every brain ends up. Nothing heavy happens here.

# %% tags=["remove-cell"]
# On Colab, install the package first (elsewhere it is already installed by `make book`).
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
other_edition = ""  # URL of the book's other edition (the published site sets it)

# %% tags=["hide-input"]
from IPython.display import Markdown
from myst_nb import glue
from nilearn import datasets, plotting

from brainsex.figures import fig_cohort_status, fig_study_design, show, show_table
from brainsex.manifest import load_manifest, manifest_table
from brainsex.profiles import load_profiles

m = load_manifest(manifest)
cohort_table = manifest_table(m)
glue("profile", profile, display=False)
glue("cohorts_used", ", ".join(cohorts), display=False)
glue("n_declared", len(cohort_table), display=False)
glue("n_enabled", int(cohort_table["enabled"].sum()), display=False)
real = any(m.cohort(c).kind != "synthetic" for c in cohorts)
edition = ("the **real-data edition**: every chapter runs on real scans, which come without a known answer"
           if real else "the **phantom edition**: every chapter runs on a synthetic cohort with planted sex "
           "differences, so later chapters can check what each method recovers")
other = ("the phantom edition, where the answer is known" if real else "the real-data edition, on open IXI scans")
glue("edition_text", Markdown(f"This is {edition}." + (f" See also [{other}]({other_edition})." if other_edition
                                                        else "")), display=False)

# %% [markdown]
# This run uses the profile **{glue:text}`profile`** on the cohort(s) **{glue:text}`cohorts_used`**.
# {glue:md}`edition_text`
#
# ## The study design
#
# The paper's pipeline has five stages (its Figure 1): data from four public cohorts, minimal
# preprocessing, an SFCN classifier trained on a stratified split, an evaluation by subgroup with a
# post-hoc look at head size, and saliency maps scored against the CerebrA atlas. Each box below is a
# chapter of this book; hover to see which.

# %% tags=["hide-input"]
show(fig_study_design(), alt="Flow of the analysis from cohorts to region scores")

# %% [markdown]
# ## Cohorts declared in the manifest
#
# `data_manifest.yaml` declares {glue:text}`n_declared` cohorts, {glue:text}`n_enabled` of them enabled
# here. Cohorts whose data-use terms forbid publishing individual data are marked "aggregates only":
# the book shows only group summaries for them.

# %% tags=["hide-input"]
show(fig_cohort_status(cohort_table), alt="Cohorts in the manifest and whether they are enabled")
show_table(cohort_table, caption="Cohorts declared in data_manifest.yaml")

# %% [markdown]
# ## Profiles
#
# A profile fixes the grid, the model size and the training length for every chapter at once.

# %% tags=["hide-input"]
import pandas as pd

profiles = load_profiles()
show_table(pd.DataFrame([{"profile": k, "description": " ".join(str(v["description"]).split())}
                         for k, v in profiles.items()]), caption="Parameter profiles")

# %% [markdown]
# ## The template space
#
# Every brain is rigidly aligned to the MNI152 template, the space in which saliency maps are later
# averaged and scored. Below, the MNI152 template that ships with nilearn.

# %% tags=["hide-input"]
template = datasets.load_mni152_template(resolution=1)
display_ = plotting.plot_anat(template, display_mode="ortho", title="MNI152 template (nilearn)",
                              draw_cross=False, annotate=True)
