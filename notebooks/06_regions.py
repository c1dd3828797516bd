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
# # Which regions? Atlas scores of the saliency map
#
# The paper turns the average saliency map into a ranking of brain regions with the CerebrA atlas
# {cite:p}`manera2020cerebra`. For every region it computes the fraction of voxels whose saliency exceeds
# 0.1 (the *saliency score*), the mean saliency in the region rescaled across regions to [0, 1], and the
# product of the two — the *weighted saliency score* — and reports the ten highest (its Figure 7 and
# Table S1). On the phantom we know which ten regions really differ between the sexes, so we can ask
# how many of them the ranking finds; on real scans we cannot, and the chapter says so.

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
saliency_threshold = 0.1
atlas_source = "offline"
seed = 0
n_perm = 1000
manifest = "data_manifest.yaml"
min_group_size = 5

# %% tags=["hide-input"]
import nibabel as nib
import numpy as np
from myst_nb import glue

from brainsex.atlas import average_precision, permutation_null, precision_at_k, region_scores
from brainsex.figures import fig_slice_viewer, fig_top_regions, show, show_table
from brainsex.io import read_table, write_table
from brainsex.privacy import WITHHELD, publication_policy
from brainsex.run import RunDir
from brainsex.templates import load_atlas, load_template

run = RunDir(run_dir)
policy = publication_policy(run_dir, manifest, min_group_size)
maps_tsv = run.saliency.maps_table
sizes = read_table(maps_tsv).set_index("file")["n"] if maps_tsv.is_file() else {}
# a map over fewer than k subjects of a restricted cohort is not published, nor what is read off it
publish = policy.allows(sizes.get(run.saliency.mean_rtiv_subset.name))
atlas, labels = load_atlas(voxel_size, source=atlas_source)
template = load_template(voxel_size)
mean_map = nib.load(run.saliency.mean_rtiv_subset)
scores = region_scores(mean_map, atlas, labels, threshold=saliency_threshold)
write_table(scores, run.atlas.region_scores)
glue("atlas_name", labels.attrs.get("atlas", atlas_source), display=False)
glue("n_regions", int((scores["n_voxels"] > 0).sum()), display=False)

# %% [markdown]
# Atlas used here: **{glue:text}`atlas_name`** ({glue:text}`n_regions` labelled regions on this grid).
# The full table (the paper's Table S1) is saved in the run (`run.atlas.region_scores`); the top of it:

# %% tags=["hide-input"]
top = scores.head(10)
if not publish:
    print(f"Withheld: the average map covers fewer than {policy.k} subjects of a restricted cohort.")
show_table(top[["rank", "name", "n_voxels", "saliency_score", "mean_saliency_norm", "weighted_score"]].round(3),
           caption="Top ten regions by weighted saliency score", local_only=not publish)

# %% [markdown]
# ## Against a known truth

# %% tags=["hide-input"]
from IPython.display import Markdown

from brainsex.validity import has_truth, planted_truth

truth_known = has_truth(run)
glue("truth_known", truth_known, display=False)
if truth_known:
    truth = set(planted_truth(run)["label"].astype(int))
    ranking = scores[scores["n_voxels"] > 0]["label"].astype(int).tolist()
    p10 = permutation_null(lambda r, t: precision_at_k(r, t, k=10), ranking, truth, n_perm=n_perm, seed=seed)
    ap = permutation_null(average_precision, ranking, truth, n_perm=n_perm, seed=seed)
    show(fig_top_regions(scores, k=10, highlight=truth), alt="Top ten regions by weighted saliency score",
         local_only=not publish)

    def shown(text: str) -> str:
        return text if publish else WITHHELD

    glue("truth_text", Markdown(
        f"This run is on the phantom, so the answer is known. Of the ten top-ranked regions, a fraction "
        f"{shown(format(p10['observed'], '.2f'))} are among the {len(truth)} planted ones "
        f"(precision@10); a random ranking would score {p10['chance']:.2f} on average (permutation p = "
        f"{shown(format(p10['p_value'], '.3f'))}). Over the whole ranking the average precision is "
        f"{shown(format(ap['observed'], '.2f'))} against a chance level of {ap['chance']:.2f}. The validity "
        "chapter looks at why, and whether other attribution methods do better."), display=False)
else:
    show(fig_top_regions(scores, k=10), alt="Top ten regions by weighted saliency score", local_only=not publish)
    glue("truth_text", Markdown(
        "This run is on **real scans**: nobody knows which regions truly differ between the sexes in this "
        "cohort, so the ranking above cannot be scored here. Read it as a description of where this model's "
        "output is sensitive, not as a map of sex differences. The validity chapter measures, on a phantom "
        "matched to this run's settings, how far a ranking like this one can be trusted."), display=False)

# %% [markdown]
# {glue:md}`truth_text`
#
# ## The map with the top regions outlined (Figure 7)

# %% tags=["hide-input"]
top_ids = top["label"].astype(int).tolist()
outlines = np.where(np.isin(np.asarray(atlas.dataobj), top_ids), np.asarray(atlas.dataobj), 0)
names = dict(zip(top["label"].astype(int), top["name"], strict=True))
show(fig_slice_viewer(mean_map, background=template, regions=nib.Nifti1Image(outlines.astype(np.int16), atlas.affine),
                      region_names=names, title="Average saliency with the ten top regions outlined"),
     alt="Saliency map with the ten highest-scoring atlas regions outlined", local_only=not publish)
