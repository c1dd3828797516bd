# ---
# jupyter:
#   accelerator: GPU
#   colab:
#     gpuType: T4
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The paper's numbers beside this run's
#
# The paper reports its figures for a real test set of 211 scans from four cohorts at 1 mm. This run
# is whatever the chosen profile made it — by default a synthetic phantom on a coarse grid with a slim
# network — so the numbers *should* differ. What should carry over is the shape of the findings: an
# accuracy well above chance, errors that lean on head size at the extremes of TIV, and an overlap
# range of TIV inside which size no longer separates the sexes.

# %% tags=["parameters"]
profile = "demo"
run_dir = "runs/demo"
cohorts = ["phantom"]

# %% tags=["hide-input"]
from myst_nb import glue

from brainsex.book import paper_vs_run
from brainsex.figures import show_table

table = paper_vs_run(run_dir)
glue("profile", profile, display=False)
glue("cohorts_used", ", ".join(cohorts), display=False)
show_table(table, caption="Reported in the paper vs computed in this run")

# %% [markdown]
# This run: profile **{glue:text}`profile`** on **{glue:text}`cohorts_used`**. Why the two columns
# differ:
#
# - **The data.** The phantom's sex differences are the ones we planted: a head-size difference of
#   about ten percent and local volume changes in ten regions. Real brains differ in many more, subtler
#   ways, and real scans vary in ways the phantom does not model.
# - **The grid and the model.** The CPU profiles use 4 mm voxels and a network with an eighth of the
#   paper's channels; the `paper` profile restores both.
# - **The test set.** A test set of a few dozen scans gives confidence intervals several points wide;
#   the evaluation chapter reports them.
# - **The overlap range** follows from the TIV distributions. The phantom's were calibrated to give the
#   paper's range over the full 2,110-subject design, so a small test set lands near it but not on it.

# %% [markdown]
# ## What this run cost
#
# Wall time of every chapter in this run (profile **{glue:text}`profile`**), as the build driver
# recorded it; the course plan and the performance page quote these numbers.

# %% tags=["hide-input"]
from brainsex.book import chapter_timings, toc_notebooks

timings = chapter_timings(run_dir, [p.stem for p in toc_notebooks(".")])
glue("runtime_total_min", f"{timings['minutes'].sum():.1f}", display=False)
glue("runtime_slowest", timings.sort_values("seconds").iloc[-1]["chapter"] if len(timings) else "n/a",
     display=False)
glue("runtime_table", timings.set_index("chapter"), display=False)
show_table(timings, caption="Wall time per chapter, as each chapter was last executed in this run")

# %% [markdown]
# Executing the chapters took {glue:text}`runtime_total_min` minutes; the slowest
# was {glue:text}`runtime_slowest`.

# %% [markdown]
# ## Download this run's results
#
# The aggregate results of this run — metric tables, the TIV analysis, learning curves, region scores,
# average saliency maps as NIfTI and the timing of every chapter — are bundled as
# <a href="../results.zip" download>results.zip</a>. Per-subject tables stay in the run directory.
