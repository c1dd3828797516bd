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
# # Saliency maps: where does the model look?
#
# A class saliency map {cite:p}`simonyan2013saliency` is the gradient of the model's output with
# respect to every input voxel: large where a small change of intensity would change the decision most.
# As in the paper, we compute it with Captum {cite:p}`kokhlikyan2020captum` for every correctly
# classified test scan, rescale each map to [0, 1], warp it non-linearly onto the template and average.
#
# ```{note}
# The model has one output (the male logit). With Captum's default of taking absolute gradients, a
# "male map" and a "female map" are then the *same* quantity — the sensitivity of that one number.
# The signed gradient does differ in sign between directions; we compute it too.
# ```

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
device = "auto"
n_workers = 2
seed = 0
manifest = "data_manifest.yaml"
min_group_size = 5

# %% tags=["hide-input"]
import numpy as np
import pandas as pd
from myst_nb import glue

from brainsex.figures import fig_slice_viewer, plot_map_static, show, show_note
from brainsex.io import read_table, write_json_atomic, write_table
from brainsex.privacy import publication_policy, suppress_table
from brainsex.run import RunDir
from brainsex.saliency import average_maps, group_average, save_map, spearman_or_nan, template_space_maps
from brainsex.templates import load_brain_mask, load_template
from brainsex.tiv import assign_tertiles
from brainsex.train import load_model

run = RunDir(run_dir)
policy = publication_policy(run_dir, manifest, min_group_size)
map_sizes = []  # (file, n) of every average map, for the published bundle's group-size check
template, brain = load_template(voxel_size), load_brain_mask(voxel_size)
mask = np.asarray(brain.get_fdata()) > 0
pred = read_table(run.evaluate.predictions_with_baseline)
paths = read_table(run.preprocess.table)[["participant_id", "image_pp"]]
correct = pred[pred["y_true"] == pred["y_pred"]].merge(paths, on="participant_id").reset_index(drop=True)
if correct.empty:  # a small cohort's few test scans, all misclassified
    show_note(f"None of the {len(pred)} test scans was classified correctly, so the maps below average the "
              "saliency of all test scans instead (still the model's sensitivity, but not the paper's selection).")
    correct = pred.merge(paths, on="participant_id").reset_index(drop=True)
model = load_model(run.train.best, device="cpu" if device == "auto" else device)
maps = template_space_maps(model, correct, template, cache_dir=run.preprocess.warps, n_jobs=n_workers,
                           progress=False)
glue("n_correct", len(correct), display=False)
glue("n_test", len(pred), display=False)

# %% [markdown]
# {glue:text}`n_correct` of the {glue:text}`n_test` test scans were classified correctly; each
# contributes one map.
#
# ## Average maps by sex (the paper's Figure 3)

# %% tags=["hide-input"]
by_sex = group_average(maps, correct["sex"])
out = run.saliency
for sex, m in by_sex.items():
    save_map(m, template.affine, out.mean_correct(sex))
    map_sizes.append({"file": out.mean_correct(sex).name, "n": int((correct["sex"] == sex).sum())})
mean_all = average_maps(maps)
save_map(mean_all, template.affine, out.mean_correct("all"))
map_sizes.append({"file": out.mean_correct("all").name, "n": len(correct)})
if {"F", "M"} <= set(by_sex):
    rho, p = spearman_or_nan(by_sex["F"], by_sex["M"], mask)
else:  # a model that gets one sex always wrong (e.g. the tiny smoke model) has no map for it
    rho, p = float("nan"), float("nan")
glue("rho_fm", f"{rho:.2f}", display=False)
glue("p_fm", f"{p:.1g}", display=False)
import nibabel as nib

for sex, name in (("F", "female"), ("M", "male")):
    if sex in by_sex and policy.allows((correct["sex"] == sex).sum()):
        plot_map_static(nib.Nifti1Image(by_sex[sex], template.affine), bg_img=template,
                        title=f"Average saliency, correctly classified {name} scans")

# %% [markdown]
# The female and male average maps agree closely: Spearman's ρ = {glue:text}`rho_fm` inside the brain
# (p = {glue:text}`p_fm`). With a single-output model that is expected — both are averages of the same
# sensitivity, over different scans.
#
# ## The balanced subset inside the TIV overlap range (Figure 6)

# %% tags=["hide-input"]
subset_ids = set(read_table(run.tiv.rtiv_subset)["participant_id"])
in_subset = correct["participant_id"].isin(subset_ids).to_numpy()
mean_subset = average_maps(maps[in_subset]) if in_subset.any() else mean_all
save_map(mean_subset, template.affine, out.mean_rtiv_subset)
map_sizes.append({"file": out.mean_rtiv_subset.name, "n": int(in_subset.sum()) if in_subset.any() else len(correct)})
rho_s, p_s = spearman_or_nan(mean_all, mean_subset, mask)
glue("n_subset_maps", int(in_subset.sum()) if in_subset.any() else f"{len(correct)} (the subset was empty: all correct)",
     display=False)
write_json_atomic(out.spearman, {"female_vs_male": rho, "female_vs_male_p": p,
                                          "all_vs_rtiv_subset": rho_s, "all_vs_rtiv_subset_p": p_s})
glue("rho_subset", f"{rho_s:.2f}", display=False)
if policy.allows(map_sizes[-1]["n"]):
    show(fig_slice_viewer(nib.Nifti1Image(mean_subset, template.affine), background=template,
                          title="Average saliency, balanced subset inside R_tiv (move the sliders)"),
         alt="Interactive three-plane viewer of the average saliency map")
else:
    print(f"The subset's average map is not shown: fewer than {policy.k} subjects (restricted cohort).")

# %% [markdown]
# The map averaged over the {glue:text}`n_subset_maps` scans of the balanced subset correlates with the
# map over all correct scans at ρ = {glue:text}`rho_subset`.
#
# ## By TIV bin and sex (Figure 8)

# %% tags=["hide-input"]
from brainsex import BrainsexError
from brainsex.figures import show_table

try:
    tert = assign_tertiles(correct, tiv_col="etiv_ml")
except BrainsexError as exc:  # a small cohort's few correct scans
    tert = None
    show_note(f"The maps by TIV bin are not shown: {exc}. Build on a larger cohort to see them.")
if tert is not None:
    keys = tert["tertile"].astype(str) + " · " + tert["sex"]
    by_bin = group_average(maps, keys.to_numpy())
    rows = []
    for key, m in sorted(by_bin.items()):
        r, _ = spearman_or_nan(m, mean_all, mask)
        rows.append({"group": key, "n": int((keys == key).sum()), "spearman_vs_all": round(r, 3)})
        save_map(m, template.affine, out.mean_map(key))
        map_sizes.append({"file": out.mean_map(key).name, "n": rows[-1]["n"]})
    bins_table = pd.DataFrame(rows)
    show_table(bins_table if policy.shareable else suppress_table(bins_table, policy.k),
               caption="Average map per TIV bin and sex: agreement with the overall average")
write_table(pd.DataFrame(map_sizes), out.maps_table)

# %% [markdown]
# ```{exercise}
# :label: ex-saliency-methods
# `template_space_maps` takes `method="smoothgrad"` or `method="integrated_gradients"`. Compute the
# average map with one of them and its Spearman correlation with the plain gradient map. Which regions
# change?
# ```
#
# ```{solution} ex-saliency-methods
# :class: dropdown
# SmoothGrad averages gradients over noisy copies of each scan, which smooths the map; Integrated
# Gradients multiplies gradients by the input, so it weights voxels by their intensity and lowers the
# background. The validity chapter runs this comparison and scores each method against the planted
# regions.
# ```
