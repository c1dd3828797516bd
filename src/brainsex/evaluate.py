"""Evaluation of the sex classifier on the test set (paper section 2.5, results section 3, Table 2).

The paper reports accuracy, balanced accuracy, recall, precision, F1-score and AUC-ROC on the test set,
the accuracy of each sex ("88 % for females and 86 % for males"), and the same metrics by dataset,
scanner vendor, magnetic field strength and age range (Table 2). This module computes them with
scikit-learn and adds what the paper does not report: a percentile-bootstrap confidence interval for every
number, the number of subjects behind it, and an explicit "n/a" (with the reason) for a metric that is
undefined in a group, e.g. recall in a group without men.

Conventions
-----------
* Male is the positive class: ``y_true = 1`` for ``sex == "M"``, ``prob_male`` is the sigmoid output.
* A subject is predicted male when ``prob_male >= threshold`` (0.5 by default): a probability of
  exactly 0.5 counts as male.
* ``accuracy_female`` is the fraction of women classified as women (the specificity) and
  ``accuracy_male`` the fraction of men classified as men (the recall); the paper reports both as
  per-sex accuracies.

Undefined metrics
-----------------
A metric is undefined when its denominator is zero: balanced accuracy and AUC-ROC need both sexes,
recall and ``accuracy_male`` need at least one man, ``accuracy_female`` one woman, precision one subject
predicted male, F1 one man or one subject predicted male. An undefined value is returned as ``<NA>``
(pandas' nullable ``Float64``) with the reason in the ``reason`` column, never a crash or a bare NaN.
Bootstrap resamples in which a metric is undefined are left out of its confidence interval; ``n_boot``
says how many resamples were used.

The TIV-only baseline (:func:`tiv_baseline`) is beyond the paper: a logistic regression on total
intracranial volume alone, trained on the same training subjects as the CNN, answers "how much of the
accuracy is just head size?".
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from brainsex import BrainsexError
from brainsex._docs import fill_doc

__all__ = [
    "METRICS",
    "PREDICTION_COLUMNS",
    "AGE_GROUP_LABELS",
    "metrics",
    "subgroup_metrics",
    "format_metrics_table",
    "age_group",
    "roc_curve_table",
    "confusion",
    "make_predictions_table",
    "exclude_missing_tiv",
    "tiv_baseline",
]

logger = logging.getLogger(__name__)

#: Metrics reported by :func:`metrics`, in table order.
METRICS: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "recall",
    "precision",
    "f1",
    "auc_roc",
    "accuracy_female",
    "accuracy_male",
)

#: Columns of ``evaluate/predictions.tsv`` (the run-directory contract).
PREDICTION_COLUMNS: tuple[str, ...] = (
    "participant_id", "sex", "y_true", "prob_male", "y_pred", "tiv_ml", "etiv_ml",
    "age", "dataset", "vendor", "field", "split",
)

#: Labels of :func:`age_group`; 55 and 70 belong to the middle group.
AGE_GROUP_LABELS: tuple[str, str, str] = ("<55", "55\u201370", ">70")

_METRIC_COLUMNS = ["metric", "value", "ci_low", "ci_high", "n", "n_boot", "reason"]


# --------------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------------
def _as_labels(y_true: Any, name: str = "y_true") -> np.ndarray:
    """0/1 labels as a boolean array (True = male); 'F'/'M' strings are accepted too."""
    arr = np.asarray(y_true)
    if arr.ndim != 1:
        raise BrainsexError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.dtype.kind in "OUS":
        values = set(pd.unique(arr))
        if values <= {"F", "M"}:
            return arr == "M"
        try:
            arr = arr.astype(float)
        except (TypeError, ValueError) as exc:
            raise BrainsexError(f"{name} must hold 0/1 (1 = male) or 'F'/'M', got values {sorted(map(str, values))[:5]}") from exc
    if arr.dtype.kind == "b":
        return arr.astype(bool)
    arr = arr.astype(float)
    bad = ~np.isin(arr, (0.0, 1.0))
    if bad.any():
        raise BrainsexError(
            f"{name} must hold 0/1 (1 = male); found {int(bad.sum())} other value(s), e.g. {arr[bad][:3].tolist()}"
        )
    return arr == 1.0


def _as_probs(y_prob: Any, n: int, name: str = "y_prob") -> np.ndarray:
    try:
        arr = np.asarray(y_prob, dtype=float)
    except (TypeError, ValueError) as exc:
        raise BrainsexError(f"{name} must be numeric probabilities in [0, 1] ({exc})") from exc
    if arr.ndim != 1:
        raise BrainsexError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if len(arr) != n:
        raise BrainsexError(f"y_true and {name} differ in length ({n} vs {len(arr)})")
    if not np.all(np.isfinite(arr)):
        raise BrainsexError(f"{name} has {int((~np.isfinite(arr)).sum())} missing or infinite value(s)")
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise BrainsexError(f"{name} must lie in [0, 1]; got range [{arr.min():g}, {arr.max():g}]")
    return arr


def _check_threshold(threshold: float) -> float:
    t = float(threshold)
    if not np.isfinite(t) or not 0.0 <= t <= 1.0:
        raise BrainsexError(f"threshold must be a probability in [0, 1], got {threshold!r}")
    return t


def check_columns(table: pd.DataFrame, columns: Sequence[str], what: str = "predictions") -> None:
    """Raise a :class:`brainsex.BrainsexError` naming the missing columns of ``table``.

    Parameters
    ----------
    table : pandas.DataFrame
        The table to check.
    columns : sequence of str
        Required columns.
    what : str, default="predictions"
        The table's name in the message.
    """
    if not isinstance(table, pd.DataFrame):
        raise BrainsexError(f"{what} must be a pandas DataFrame, got {type(table).__name__}")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise BrainsexError(f"{what} lacks column(s) {missing}; it has {list(table.columns)}")


@fill_doc
def labels_from_table(
    predictions: pd.DataFrame, prob_col: str = "prob_male", threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y_true as bool, probabilities, y_pred as bool) from a predictions table.

    ``y_true`` comes from the ``y_true`` column when present, else from ``sex``; ``y_pred`` is always
    recomputed as ``prob >= threshold`` so that one threshold rules every table.

    Parameters
    ----------
    predictions : pandas.DataFrame
        A predictions table (:func:`make_predictions_table`).
    prob_col : str, default="prob_male"
        %(prob_col)s
    threshold : float, default=0.5
        %(threshold)s

    Returns
    -------
    y_true, prob, y_pred : numpy.ndarray
        Boolean truth (male), float probabilities, boolean predictions.
    """
    truth_col = "y_true" if "y_true" in predictions.columns else "sex"
    check_columns(predictions, [truth_col, prob_col])
    y = _as_labels(predictions[truth_col].to_numpy(), name=truth_col)
    p = _as_probs(predictions[prob_col].to_numpy(), len(y), name=prob_col)
    return y, p, p >= _check_threshold(threshold)


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------
def _undefined_reason(metric: str, n_pos: int, n_neg: int, n_pred_pos: int) -> str:
    """Why ``metric`` is undefined for these counts ('' if it is defined)."""
    if metric in ("balanced_accuracy", "auc_roc") and (n_pos == 0 or n_neg == 0):
        only = "F" if n_pos == 0 else "M"
        return f"needs both sexes; only {only} here" if n_pos + n_neg else "no subjects"
    if metric in ("recall", "accuracy_male") and n_pos == 0:
        return "no males (y_true = 1)"
    if metric == "accuracy_female" and n_neg == 0:
        return "no females (y_true = 0)"
    if metric == "precision" and n_pred_pos == 0:
        return "no subject predicted male"
    if metric == "f1" and n_pos == 0 and n_pred_pos == 0:
        return "no males and no subject predicted male"
    if metric == "accuracy" and n_pos + n_neg == 0:
        return "no subjects"
    return ""


def _point_estimate(metric: str, y: np.ndarray, p: np.ndarray, yhat: np.ndarray) -> float:
    """One metric with scikit-learn (only called when the metric is defined)."""
    from sklearn import metrics as skm

    if metric == "accuracy":
        return float(skm.accuracy_score(y, yhat))
    if metric == "balanced_accuracy":
        return float(skm.balanced_accuracy_score(y, yhat))
    if metric == "recall":
        return float(skm.recall_score(y, yhat, zero_division=np.nan))
    if metric == "precision":
        return float(skm.precision_score(y, yhat, zero_division=np.nan))
    if metric == "f1":
        return float(skm.f1_score(y, yhat, zero_division=np.nan))
    if metric == "auc_roc":
        return float(skm.roc_auc_score(y, p))
    if metric == "accuracy_female":
        return float(skm.recall_score(y, yhat, pos_label=False, zero_division=np.nan))
    if metric == "accuracy_male":
        return float(skm.recall_score(y, yhat, pos_label=True, zero_division=np.nan))
    raise BrainsexError(f"unknown metric {metric!r}; choose from {list(METRICS)}")


def _bootstrap_values(
    y: np.ndarray, p: np.ndarray, yhat: np.ndarray, idx: np.ndarray, names: Sequence[str]
) -> np.ndarray:
    """Every metric on every resample at once; ``idx`` is (B, n) indices. NaN where undefined.

    Uses the confusion-matrix formulas (identical to scikit-learn's) and, for AUC-ROC, the Mann-Whitney
    statistic with ties counted as one half (identical to :func:`sklearn.metrics.roc_auc_score`),
    computed from per-resample counts of each distinct score.
    """
    yt, yp = y[idx], yhat[idx]
    tp = (yt & yp).sum(1).astype(float)
    fn = (yt & ~yp).sum(1).astype(float)
    fp = (~yt & yp).sum(1).astype(float)
    tn = (~yt & ~yp).sum(1).astype(float)
    pos, neg = tp + fn, tn + fp
    out = np.full((idx.shape[0], len(names)), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        rec = np.where(pos > 0, tp / pos, np.nan)
        spec = np.where(neg > 0, tn / neg, np.nan)
        vals = {
            "accuracy": (tp + tn) / idx.shape[1],
            "balanced_accuracy": (rec + spec) / 2.0,
            "recall": rec,
            "precision": np.where(tp + fp > 0, tp / (tp + fp), np.nan),
            "f1": np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan),
            "accuracy_female": spec,
            "accuracy_male": rec,
        }
        if "auc_roc" in names:
            uniq, inv = np.unique(p, return_inverse=True)
            k, b = len(uniq), idx.shape[0]
            flat = np.arange(b)[:, None] * k + inv[idx]
            npos = np.bincount(flat[yt], minlength=b * k).reshape(b, k)
            nneg = np.bincount(flat[~yt], minlength=b * k).reshape(b, k)
            below = np.cumsum(nneg, axis=1) - nneg
            u = (npos * (below + 0.5 * nneg)).sum(1)
            vals["auc_roc"] = np.where((pos > 0) & (neg > 0), u / (pos * neg), np.nan)
    for j, name in enumerate(names):
        out[:, j] = vals[name]
    return out


def metrics(
    y_true: Any,
    y_prob: Any,
    threshold: float = 0.5,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    which: Sequence[str] = METRICS,
) -> pd.DataFrame:
    """Binary classification metrics with percentile-bootstrap confidence intervals (paper section 3).

    Parameters
    ----------
    y_true
        True sex, 1 (or ``"M"``) for male and 0 (or ``"F"``) for female.
    y_prob
        Predicted probability of male (the sigmoid output), in [0, 1].
    threshold
        A subject is predicted male when ``y_prob >= threshold``.
    n_bootstrap
        Number of bootstrap resamples (subjects drawn with replacement); 0 skips the intervals.
    seed
        Seed of the resampling (:func:`numpy.random.default_rng`); the same seed gives the same intervals.
    ci
        Confidence level of the percentile intervals, e.g. 0.95 for the 2.5th and 97.5th percentiles.
    which
        Metrics to compute, a subset of :data:`METRICS`.

    Returns
    -------
    pandas.DataFrame
        One row per metric with columns ``metric``, ``value``, ``ci_low``, ``ci_high`` (nullable
        ``Float64``), ``n`` (subjects), ``n_boot`` (resamples in which the metric was defined, i.e. used
        for the interval) and ``reason`` (why a value or interval is ``<NA>``; empty otherwise).

    Raises
    ------
    BrainsexError
        For empty or mismatched inputs, labels other than 0/1, probabilities outside [0, 1], or an
        invalid ``threshold``/``ci``/``n_bootstrap``.
    """
    y = _as_labels(y_true)
    p = _as_probs(y_prob, len(y))
    t = _check_threshold(threshold)
    if len(y) == 0:
        raise BrainsexError("cannot compute metrics on 0 subjects")
    if not 0.0 < float(ci) < 1.0:
        raise BrainsexError(f"ci must be in (0, 1), e.g. 0.95; got {ci!r}")
    if int(n_bootstrap) < 0:
        raise BrainsexError(f"n_bootstrap must be >= 0, got {n_bootstrap!r}")
    names = list(which)
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise BrainsexError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")
    yhat = p >= t
    n = len(y)
    n_pos, n_pred_pos = int(y.sum()), int(yhat.sum())
    n_neg = n - n_pos

    boot = None
    if int(n_bootstrap) > 0:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n, size=(int(n_bootstrap), n))
        boot = _bootstrap_values(y, p, yhat, idx, names)
    alpha = (1.0 - float(ci)) / 2.0

    rows = []
    for j, name in enumerate(names):
        reason = _undefined_reason(name, n_pos, n_neg, n_pred_pos)
        value = pd.NA if reason else _point_estimate(name, y, p, yhat)
        lo = hi = pd.NA
        n_boot = 0
        if boot is not None:
            col = boot[:, j]
            col = col[np.isfinite(col)]
            n_boot = int(col.size)
            if not reason:
                if n_boot == 0:
                    reason = "CI n/a: undefined in every bootstrap resample"
                else:
                    lo, hi = (float(v) for v in np.quantile(col, [alpha, 1.0 - alpha]))
        elif not reason:
            reason = "CI n/a: n_bootstrap = 0"
        rows.append({"metric": name, "value": value, "ci_low": lo, "ci_high": hi, "n": n,
                     "n_boot": n_boot, "reason": reason})
    out = pd.DataFrame(rows, columns=_METRIC_COLUMNS)
    for c in ("value", "ci_low", "ci_high"):
        out[c] = out[c].astype("Float64")
    return out


# --------------------------------------------------------------------------------------------------
# subgroups (Table 2)
# --------------------------------------------------------------------------------------------------
def age_group(age: Any, edges: tuple[float, float] = (55.0, 70.0)) -> pd.Series:
    """Age range of the paper's Table 2: under 55, 55 to 70, over 70 (discussion, section 4).

    The paper reads "under 55", "between 55 and 70" and "over 70" years, and its test set has subjects
    aged exactly 55 and 70. Both edges are put in the middle group: ``'<55'`` is ``age < 55``,
    ``'55–70'`` is ``55 <= age <= 70`` and ``'>70'`` is ``age > 70``.

    Parameters
    ----------
    age
        Ages in years (array-like or Series); missing ages give a missing group.
    edges
        The two thresholds, default (55, 70); labels follow them.

    Returns
    -------
    pandas.Series
        Ordered categorical with categories ``('<55', '55–70', '>70')`` (for the default edges), the index
        of ``age`` when it is a Series.
    """
    lo, hi = float(edges[0]), float(edges[1])
    if not lo < hi:
        raise BrainsexError(f"age edges must be increasing, got {edges!r}")
    index = age.index if isinstance(age, pd.Series) else None
    try:
        a = np.asarray(pd.to_numeric(pd.Series(np.asarray(age, dtype=object)), errors="raise"), dtype=float)
    except (TypeError, ValueError) as exc:
        raise BrainsexError(f"age must be numeric (years); {exc}") from exc
    labels = (f"<{lo:g}", f"{lo:g}\u2013{hi:g}", f">{hi:g}")
    codes = np.select([a < lo, (a >= lo) & (a <= hi), a > hi], [0, 1, 2], default=-1)
    cat = pd.Categorical.from_codes(codes, categories=list(labels), ordered=True)
    return pd.Series(cat, index=index, name="age_group")


def _group_label(variable: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return "missing"
    if isinstance(value, float | np.floating):
        text = f"{float(value):g}"
        return f"{text} T" if variable == "field" else text
    return str(value)


@fill_doc
def metrics_by_groups(
    predictions: pd.DataFrame,
    groups: Sequence[tuple[str, str, np.ndarray]],
    prob_col: str,
    threshold: float,
    n_bootstrap: int,
    seed: int,
    ci: float,
) -> pd.DataFrame:
    """Long table of :func:`metrics` for each (variable, group, boolean mask).

    Parameters
    ----------
    predictions : pandas.DataFrame
        A predictions table (:func:`make_predictions_table`).
    groups : sequence of (str, str, numpy.ndarray)
        ``(variable, group, mask)``: a boolean row mask per group; empty groups are skipped.
    prob_col : str
        %(prob_col)s
    threshold : float
        %(threshold)s
    n_bootstrap : int
        %(n_bootstrap)s
    seed : int
        %(seed_bootstrap)s
    ci : float
        %(ci)s

    Returns
    -------
    pandas.DataFrame
        ``variable``, ``group``, ``n_female``, ``n_male`` and the columns of :func:`metrics`.
    """
    y, p, _ = labels_from_table(predictions, prob_col=prob_col, threshold=threshold)
    parts = []
    for variable, group, mask in groups:
        if not mask.any():
            continue
        m = metrics(y[mask], p[mask], threshold=threshold, n_bootstrap=n_bootstrap, seed=seed, ci=ci)
        m.insert(0, "n_male", int(y[mask].sum()))
        m.insert(0, "n_female", int((~y[mask]).sum()))
        m.insert(0, "group", group)
        m.insert(0, "variable", variable)
        parts.append(m)
    cols = ["variable", "group", "n_female", "n_male", *_METRIC_COLUMNS]
    if not parts:
        return pd.DataFrame(columns=cols)
    out = pd.concat(parts, ignore_index=True)
    return out[cols]


def subgroup_metrics(
    predictions: pd.DataFrame,
    by: Sequence[str] = ("dataset", "vendor", "field", "age_group"),
    prob_col: str = "prob_male",
    threshold: float = 0.5,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    include_overall: bool = True,
) -> pd.DataFrame:
    """Metrics per dataset, vendor, field strength and age range: the paper's Table 2, with CIs.

    Parameters
    ----------
    predictions
        The predictions table (:func:`make_predictions_table`): ``y_true`` (or ``sex``), ``prob_col`` and
        the ``by`` columns. ``age_group`` is derived from ``age`` with :func:`age_group` when the table
        has no such column.
    by
        Grouping variables, each analysed on its own (not crossed), as in Table 2.
    prob_col
        Column of probabilities of male (e.g. another model's, such as the TIV baseline).
    threshold, n_bootstrap, seed, ci
        As in :func:`metrics`; every group is resampled with the same ``seed``.
    include_overall
        Add the whole table as ``variable = group = 'all'`` first.

    Returns
    -------
    pandas.DataFrame
        Long table, one row per (variable, group, metric): ``variable``, ``group`` (string; ``'missing'``
        for a missing value, field strengths as ``'3 T'``), ``n_female``, ``n_male`` and the columns of
        :func:`metrics`. A group with one sex gets the metrics that are defined and ``<NA>`` with a reason
        for the others. Use :func:`format_metrics_table` for a one-row-per-group display.
    """
    check_columns(predictions, [])
    table = predictions
    if "age_group" in by and "age_group" not in table.columns:
        check_columns(table, ["age"])
        table = table.assign(age_group=age_group(table["age"]).to_numpy())
    check_columns(table, list(by))
    groups: list[tuple[str, str, np.ndarray]] = []
    if include_overall:
        groups.append(("all", "all", np.ones(len(table), dtype=bool)))
    for variable in by:
        col = table[variable]
        if isinstance(col.dtype, pd.CategoricalDtype):
            values = list(col.cat.categories) + ([np.nan] if col.isna().any() else [])
        else:
            values = sorted(col.dropna().unique().tolist(), key=lambda v: (str(type(v)), v))
            if col.isna().any():
                values.append(np.nan)
        for value in values:
            mask = col.isna().to_numpy() if _group_label(variable, value) == "missing" else (col == value).to_numpy()
            groups.append((variable, _group_label(variable, value), mask))
    return metrics_by_groups(table, groups, prob_col, threshold, n_bootstrap, seed, ci)


def format_metrics_table(
    long: pd.DataFrame,
    which: Sequence[str] = METRICS,
    digits: int = 3,
    with_ci: bool = True,
) -> pd.DataFrame:
    """One row per (variable, group), one column per metric, as ``'0.872 [0.821, 0.917]'`` or ``'n/a'``.

    Parameters
    ----------
    long
        Output of :func:`subgroup_metrics` (or :func:`metrics`, which gives a single row).
    which
        Metrics to show, in order.
    digits
        Decimals.
    with_ci
        Append the confidence interval when it is defined.
    """
    check_columns(long, ["metric", "value", "ci_low", "ci_high"], what="metrics table")
    keys = [c for c in ("variable", "group", "n", "n_female", "n_male") if c in long.columns]

    def cell(r: pd.Series) -> str:
        if pd.isna(r["value"]):
            return "n/a"
        text = f"{r['value']:.{digits}f}"
        if with_ci and not pd.isna(r["ci_low"]):
            text += f" [{r['ci_low']:.{digits}f}, {r['ci_high']:.{digits}f}]"
        return text

    sub = long[long["metric"].isin(list(which))].copy()
    sub["cell"] = sub.apply(cell, axis=1)
    if keys:
        wide = sub.pivot_table(index=keys, columns="metric", values="cell", aggfunc="first", sort=False)
    else:
        wide = sub.set_index("metric")[["cell"]].T
    wide = wide.reindex(columns=[m for m in which if m in wide.columns]).reset_index()
    wide.columns.name = None
    if not keys:
        wide = wide.drop(columns="index")
    return wide


# --------------------------------------------------------------------------------------------------
# ROC curve, confusion matrix
# --------------------------------------------------------------------------------------------------
def roc_curve_table(y_true: Any, y_prob: Any) -> pd.DataFrame:
    """ROC curve as a table (:func:`sklearn.metrics.roc_curve`), male as the positive class.

    Parameters
    ----------
    y_true : array-like
        True sex, 1 (or ``"M"``) for male and 0 (or ``"F"``) for female.
    y_prob : array-like
        Predicted probability of male, in [0, 1].

    Returns
    -------
    pandas.DataFrame
        Columns ``fpr`` (1 - accuracy_female), ``tpr`` (recall), ``threshold`` (the first row's threshold
        is ``inf``: nobody predicted male). The AUC is in ``.attrs["auc"]``.

    Raises
    ------
    BrainsexError
        When only one sex is present (the curve is undefined).
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    y = _as_labels(y_true)
    p = _as_probs(y_prob, len(y))
    if y.all() or not y.any():
        raise BrainsexError(f"the ROC curve needs both sexes; got {len(y)} subject(s), "
                            f"all {'M' if y.any() else 'F'}")
    fpr, tpr, thr = roc_curve(y, p)
    out = pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thr})
    out.attrs["auc"] = float(roc_auc_score(y, p))
    return out


def confusion(y_true: Any, y_pred: Any) -> pd.DataFrame:
    """Confusion matrix (:func:`sklearn.metrics.confusion_matrix`) with sexes as labels.

    Parameters
    ----------
    y_true, y_pred
        0/1 (1 = male) or ``'F'``/``'M'``.

    Returns
    -------
    pandas.DataFrame
        2 x 2 counts; index ``true sex`` (F, M), columns ``predicted sex`` (F, M).
    """
    from sklearn.metrics import confusion_matrix

    y = _as_labels(y_true)
    yhat = _as_labels(y_pred, name="y_pred")
    if len(y) != len(yhat):
        raise BrainsexError(f"y_true and y_pred differ in length ({len(y)} vs {len(yhat)})")
    cm = confusion_matrix(y, yhat, labels=[False, True])
    return pd.DataFrame(cm, index=pd.Index(["F", "M"], name="true sex"),
                        columns=pd.Index(["F", "M"], name="predicted sex"))


# --------------------------------------------------------------------------------------------------
# predictions table
# --------------------------------------------------------------------------------------------------
def _probs_series(probs: Any) -> pd.Series:
    if isinstance(probs, pd.DataFrame):
        check_columns(probs, ["participant_id", "prob_male"], what="probs")
        s = pd.Series(probs["prob_male"].to_numpy(), index=probs["participant_id"].astype(str))
    elif isinstance(probs, pd.Series):
        s = probs.copy()
        s.index = s.index.astype(str)
    elif isinstance(probs, Mapping):
        s = pd.Series(dict(probs))
        s.index = s.index.astype(str)
    else:
        raise BrainsexError("probs must be a Series or mapping indexed by participant_id, or a DataFrame with "
                            f"participant_id and prob_male; got {type(probs).__name__}")
    if s.index.duplicated().any():
        raise BrainsexError(f"probs has duplicate participant_id(s): {s.index[s.index.duplicated()][:5].tolist()}")
    s = pd.Series(_as_probs(s.to_numpy(), len(s), name="probs"), index=s.index)
    return s


def make_predictions_table(
    participants: pd.DataFrame,
    probs: Any,
    split: pd.DataFrame | str = "test",
    threshold: float = 0.5,
) -> pd.DataFrame:
    """The predictions table of the run directory (``evaluate/predictions.tsv``).

    Parameters
    ----------
    participants
        ``cohort/participants.tsv`` or ``preprocess/preprocessed.tsv``: ``participant_id``, ``sex``
        (F/M), ``age``, ``dataset``, ``vendor``, ``field``; ``tiv_ml`` and ``etiv_ml`` are copied when
        present (missing TIV stays missing: see :func:`exclude_missing_tiv`).
    probs
        Probability of male per subject: a Series or mapping indexed by ``participant_id``, or a
        DataFrame with ``participant_id`` and ``prob_male``. Its subjects (in its order) are the rows.
    split
        ``train/split.tsv`` (``participant_id``, ``split``), or one split name for every row.
    threshold
        ``y_pred = prob_male >= threshold``.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`PREDICTION_COLUMNS`: ``y_true`` is 1 for male, ``y_pred`` 1 for predicted male.
    """
    required = ["participant_id", "sex", "age", "dataset", "vendor", "field"]
    check_columns(participants, required, what="participants")
    t = _check_threshold(threshold)
    s = _probs_series(probs)
    part = participants.assign(participant_id=participants["participant_id"].astype(str))
    if part["participant_id"].duplicated().any():
        dup = part.loc[part["participant_id"].duplicated(), "participant_id"].tolist()[:5]
        raise BrainsexError(f"participants has duplicate participant_id(s) {dup}")
    part = part.set_index("participant_id")
    unknown = s.index.difference(part.index)
    if len(unknown):
        raise BrainsexError(f"{len(unknown)} participant_id(s) in probs are not in participants, "
                            f"e.g. {unknown[:5].tolist()}")
    rows = part.loc[s.index]
    bad_sex = ~rows["sex"].isin(["F", "M"])
    if bad_sex.any():
        raise BrainsexError(f"sex must be 'F' or 'M'; participants {rows.index[bad_sex][:5].tolist()} have "
                            f"{rows['sex'][bad_sex].unique()[:5].tolist()}")
    out = pd.DataFrame({"participant_id": s.index.to_numpy(), "sex": rows["sex"].to_numpy()})
    out["y_true"] = (out["sex"] == "M").astype(int)
    out["prob_male"] = s.to_numpy()
    out["y_pred"] = (out["prob_male"] >= t).astype(int)
    for c in ("tiv_ml", "etiv_ml"):
        out[c] = pd.to_numeric(rows[c], errors="coerce").to_numpy() if c in rows.columns else np.nan
    for c in ("age", "dataset", "vendor", "field"):
        out[c] = rows[c].to_numpy()
    if isinstance(split, str):
        out["split"] = split
    else:
        check_columns(split, ["participant_id", "split"], what="split")
        sp = split.assign(participant_id=split["participant_id"].astype(str)).drop_duplicates("participant_id")
        sp = sp.set_index("participant_id")["split"]
        missing = out.loc[~out["participant_id"].isin(sp.index), "participant_id"]
        if len(missing):
            raise BrainsexError(f"{len(missing)} participant(s) have no split in the split table, "
                                f"e.g. {missing[:5].tolist()}")
        out["split"] = sp.loc[out["participant_id"]].to_numpy()
    return out[list(PREDICTION_COLUMNS)]


@fill_doc
def exclude_missing_tiv(predictions: pd.DataFrame, tiv_col: str = "etiv_ml") -> tuple[pd.DataFrame, int]:
    """Drop subjects without a TIV before the TIV analysis (paper section 2.6).

    The paper excluded one test scan that FreeSurfer could not process (211 -> 210 subjects).

    Parameters
    ----------
    predictions : pandas.DataFrame
        A predictions table with ``tiv_col`` (and ``participant_id`` for the list of dropped ids).
    tiv_col : str, default="etiv_ml"
        %(tiv_col)s

    Returns
    -------
    (kept, n_excluded)
        The rows with a finite, positive ``tiv_col`` (index reset) and the number dropped. A sentence for
        the chapter is in ``kept.attrs["message"]`` and the dropped ids in ``kept.attrs["excluded_ids"]``;
        the message is also logged.

    Raises
    ------
    BrainsexError
        When ``tiv_col`` is absent or no subject has a TIV.
    """
    check_columns(predictions, [tiv_col])
    tiv = pd.to_numeric(predictions[tiv_col], errors="coerce")
    ok = (np.isfinite(tiv) & (tiv > 0)).to_numpy()
    if not ok.any():
        raise BrainsexError(f"no subject has a usable {tiv_col!r} (all {len(predictions)} missing or <= 0)")
    kept = predictions.loc[ok].reset_index(drop=True)
    n_excluded = int((~ok).sum())
    ids = (predictions.loc[~ok, "participant_id"].astype(str).tolist()
           if "participant_id" in predictions.columns else [])
    msg = (f"{n_excluded} of {len(predictions)} subject(s) excluded for a missing {tiv_col}; "
           f"{len(kept)} remain for the TIV analysis")
    kept.attrs["message"] = msg
    kept.attrs["excluded_ids"] = ids
    kept.attrs["n_excluded"] = n_excluded
    logger.info(msg)
    return kept, n_excluded


# --------------------------------------------------------------------------------------------------
# TIV-only baseline (beyond the paper)
# --------------------------------------------------------------------------------------------------
def tiv_baseline(
    train_table: pd.DataFrame,
    test_table: pd.DataFrame,
    tiv_col: str = "etiv_ml",
    sex_col: str = "sex",
) -> pd.Series:
    """Probability of male from TIV alone: standardised logistic regression (scikit-learn).

    Trained on the CNN's training subjects and applied to its test subjects, it measures how much of the
    classification head size alone explains. Not in the paper.

    Parameters
    ----------
    train_table, test_table
        Tables with ``tiv_col`` and (for training) ``sex_col`` (F/M or 0/1). Training rows without a TIV
        are dropped (their number is in ``.attrs["n_train_dropped"]``); test rows must all have one
        (use :func:`exclude_missing_tiv` first).
    tiv_col
        TIV column in ml.
    sex_col
        Sex column of the training table.

    Returns
    -------
    pandas.Series
        ``prob_male_tiv`` aligned with ``test_table`` (same index).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    check_columns(train_table, [tiv_col, sex_col], what="train_table")
    check_columns(test_table, [tiv_col], what="test_table")
    x_train = pd.to_numeric(train_table[tiv_col], errors="coerce").to_numpy(dtype=float)
    keep = np.isfinite(x_train)
    if not keep.any():
        raise BrainsexError(f"train_table has no usable {tiv_col!r}")
    y_train = _as_labels(train_table[sex_col].to_numpy()[keep], name=f"train_table[{sex_col!r}]")
    if y_train.all() or not y_train.any():
        raise BrainsexError(f"train_table must contain both sexes with a {tiv_col}; "
                            f"got {len(y_train)} subject(s), all {'M' if y_train.any() else 'F'}")
    x_test = pd.to_numeric(test_table[tiv_col], errors="coerce").to_numpy(dtype=float)
    if not np.isfinite(x_test).all():
        raise BrainsexError(f"test_table has {int((~np.isfinite(x_test)).sum())} subject(s) without {tiv_col}; "
                            "drop them first with exclude_missing_tiv()")
    model = make_pipeline(StandardScaler(), LogisticRegression())
    model.fit(x_train[keep, None], y_train.astype(int))
    prob = model.predict_proba(x_test[:, None])[:, 1] if len(x_test) else np.empty(0)
    out = pd.Series(prob, index=test_table.index, name="prob_male_tiv")
    out.attrs["n_train_dropped"] = int((~keep).sum())
    out.attrs["coef_per_sd"] = float(model[-1].coef_[0, 0])
    return out
