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
# # Evaluation by subgroup
#
# A single accuracy hides who the model fails. Following the paper's Table 2, we report accuracy,
# balanced accuracy, recall, precision, F1 and the area under the ROC curve on the held-out test set,
# overall and separately by dataset, scanner vendor, field strength and age range, each with a
# bootstrap 95 % confidence interval. We add what the paper does not: a baseline that sees **only the
# head size** (TIV), to show how much of the task size alone solves.

# %% tags=["remove-cell"]
import sys

if "google.colab" in sys.modules:
    import subprocess

    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "git+https://github.com/brainsex-book/brainsex-book"], check=True)

# %% tags=["parameters"]
profile = "demo"
run_dir = "runs/demo"
device = "auto"
seed = 0
n_bootstrap = 1000
manifest = "data_manifest.yaml"
min_group_size = 5

# %% tags=["hide-input"]
from myst_nb import glue

from brainsex.evaluate import (
    confusion,
    exclude_missing_tiv,
    format_metrics_table,
    metrics,
    roc_curve_table,
    subgroup_metrics,
    tiv_baseline,
)
from brainsex.figures import fig_confusion, fig_roc, show, show_table
from brainsex.io import read_table, write_table
from brainsex.privacy import publication_policy, suppress_table
from brainsex.run import RunDir
from brainsex.stages import evaluate_predictions, predict_split

run = RunDir(run_dir)
policy = publication_policy(run_dir, manifest, min_group_size)
table = read_table(run.preprocess.table).merge(read_table(run.train.split), on="participant_id")
pred = predict_split(run.train.best, table, split="test", device=device)
write_table(pred, run.evaluate.predictions)

# %% tags=["hide-input"]
value = evaluate_predictions(pred, n_bootstrap=n_bootstrap, seed=seed)
for name in ("accuracy", "balanced_accuracy", "auc_roc", "f1", "precision", "recall",
             "accuracy_female", "accuracy_male"):
    glue(name, f"{100 * value.loc[name, 'value']:.1f}", display=False)
    glue(f"{name}_ci", f"{100 * value.loc[name, 'ci_low']:.1f}–{100 * value.loc[name, 'ci_high']:.1f}",
         display=False)
glue("n_test", len(pred), display=False)
glue("profile", profile, display=False)

# %% [markdown]
# ## Overall
#
# On the {glue:text}`n_test` test scans of profile **{glue:text}`profile`** the model is right
# {glue:text}`accuracy` % of the time (95 % CI {glue:text}`accuracy_ci`), with an AUC-ROC of
# {glue:text}`auc_roc` % ({glue:text}`auc_roc_ci`). Female scans are classified correctly
# {glue:text}`accuracy_female` % of the time, male scans {glue:text}`accuracy_male` %.
# Recall {glue:text}`recall` %, precision {glue:text}`precision` % and F1 {glue:text}`f1` % treat
# *male* as the positive class, as the paper does.

# %% tags=["hide-input"]
show_table(format_metrics_table(subgroup_metrics(pred, by=(), n_bootstrap=n_bootstrap, seed=seed)),
           caption="Test-set metrics with bootstrap 95 % confidence intervals")
show(fig_roc(roc_curve_table(pred["y_true"], pred["prob_male"])), alt="ROC curve of the classifier")
show(fig_confusion(confusion(pred["y_true"], pred["y_pred"])), alt="Confusion matrix of the test set")

# %% [markdown]
# ## By subgroup (the paper's Table 2)
#
# Age ranges are `<55`, `55–70` and `>70`, with ages of exactly 55 and 70 counted in the middle range.
# Groups that contain one sex only cannot have a balanced accuracy or an AUC: those cells read *n/a*.
# Small groups have wide intervals — read them before reading the point estimates.

# %% tags=["hide-input"]
sub = subgroup_metrics(pred, by=("dataset", "vendor", "field", "age_group"), n_bootstrap=n_bootstrap, seed=seed)
write_table(sub, run.evaluate.subgroup_metrics)
by_group = format_metrics_table(sub, which=("accuracy", "balanced_accuracy", "f1", "auc_roc"))
show_table(by_group if policy.shareable else suppress_table(by_group, policy.k),
           caption="Metrics by dataset, vendor, field strength and age range (95 % CI)")

# %% [markdown]
# ## How much does head size alone explain?
#
# A logistic regression on the estimated TIV alone, trained on the same training subjects, gives the
# accuracy that head size buys without looking at anatomy.

# %% tags=["hide-input"]
kept, n_excluded = exclude_missing_tiv(pred, tiv_col="etiv_ml")
train_rows = table[table["split"] == "train"]
kept = kept.assign(prob_male_tiv=tiv_baseline(train_rows, kept, tiv_col="etiv_ml").to_numpy())
write_table(kept, run.evaluate.predictions_with_baseline)
base = metrics(kept["y_true"], kept["prob_male_tiv"], n_bootstrap=n_bootstrap, seed=seed).set_index("metric")
glue("tiv_only_accuracy", f"{100 * base.loc['accuracy', 'value']:.1f}", display=False)
glue("tiv_only_auc", f"{100 * base.loc['auc_roc', 'value']:.1f}", display=False)
glue("n_missing_tiv", n_excluded, display=False)
show(fig_roc({"SFCN": roc_curve_table(kept["y_true"], kept["prob_male"]),
              "TIV only": roc_curve_table(kept["y_true"], kept["prob_male_tiv"])}),
     alt="ROC curves of the CNN and of the TIV-only baseline")

# %% [markdown]
# TIV alone reaches {glue:text}`tiv_only_accuracy` % accuracy (AUC {glue:text}`tiv_only_auc` %)
# on the same test scans ({glue:text}`n_missing_tiv` scans without a TIV estimate were left out). The
# gap between this and the CNN is what the network learned beyond head size — the TIV chapter asks where
# that gap lives.
#
# ```{exercise}
# :label: ex-eval-by-hand
# Take the rows of this run's predictions table (`RunDir("runs/demo").evaluate.predictions`) for one vendor and compute its accuracy and balanced
# accuracy by hand with pandas. Do you get the numbers in the table?
# ```
#
# ::::{solution} ex-eval-by-hand
# :class: dropdown
# ```python
# from brainsex.io import read_table
# from brainsex.run import RunDir
# p = read_table(RunDir("runs/demo").evaluate.predictions)
# g = p[p["vendor"] == "Siemens"]
# acc = (g["y_true"] == g["y_pred"]).mean()
# recall_m = (g.loc[g["y_true"] == 1, "y_pred"] == 1).mean()
# recall_f = (g.loc[g["y_true"] == 0, "y_pred"] == 0).mean()
# print(acc, (recall_m + recall_f) / 2)
# ```
# Balanced accuracy is the mean of the per-sex accuracies, so it is not pulled towards the larger sex.
# ::::
