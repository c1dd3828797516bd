"""Post-hoc analysis of total intracranial volume (TIV): paper sections 2.6 and 3.1, Table 3, Figures 2, 4, 5.

The paper did not correct for TIV during training. Instead it asks afterwards how much the classifier
leans on head size:

* **TIV tertiles** (section 2.6, Table 3, Figure 2): the test set is cut into three equal-count TIV bins
  (70 subjects each of 210) and, per bin and sex, the correctly and wrongly classified subjects are
  counted; per bin the balanced accuracy accounts for the sex imbalance inside the bin.
* **Overlap range R_tiv** (section 2.6, Figure 5): a Gaussian kernel density estimate (KDE) of each sex's
  TIV; for each sex the TIV values where its density is at least 20 % of its own maximum; R_tiv is the
  intersection of the two intervals (1,378-1,666 ml on the paper's test set). Inside R_tiv, TIV says
  little about sex, so accuracy there is accuracy that head size cannot explain.
* **Balanced subset** (section 3.1): equal numbers of correctly classified women and men inside R_tiv
  (98 scans in the paper), used for the final saliency map.

Beyond the paper: bootstrap confidence intervals of R_tiv's ends (:func:`bootstrap_rtiv`) and metrics
inside versus outside R_tiv with confidence intervals (:func:`metrics_in_range`).

All functions take the predictions table of :mod:`brainsex.evaluate` (``evaluate/predictions.tsv``)
and expect subjects without TIV to have been removed with
:func:`brainsex.evaluate.exclude_missing_tiv`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from brainsex import BrainsexError
from brainsex._docs import fill_doc
from brainsex.evaluate import check_columns, labels_from_table, metrics_by_groups

__all__ = [
    "assign_tertiles",
    "tiv_tertiles",
    "kde_curves",
    "kde_overlap_range",
    "bootstrap_rtiv",
    "in_range",
    "metrics_in_range",
    "balanced_rtiv_subset",
]


def _tiv_values(predictions: pd.DataFrame, tiv_col: str) -> np.ndarray:
    check_columns(predictions, [tiv_col])
    tiv = pd.to_numeric(predictions[tiv_col], errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(tiv)
    if bad.any():
        raise BrainsexError(f"{int(bad.sum())} subject(s) have no {tiv_col!r}; remove them first with "
                            "brainsex.evaluate.exclude_missing_tiv()")
    return tiv


# --------------------------------------------------------------------------------------------------
# tertiles (Table 3, Figure 2)
# --------------------------------------------------------------------------------------------------
def assign_tertiles(
    predictions: pd.DataFrame,
    tiv_col: str = "etiv_ml",
    n_bins: int = 3,
    labels: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Put each subject in one of ``n_bins`` equal-count TIV bins (paper section 2.6, Figure 2).

    Bins are :func:`pandas.qcut` of the TIV *rank* (ties broken by row order), so their sizes differ by at
    most one even when TIVs tie; 210 subjects give 70 per bin as in the paper.

    Parameters
    ----------
    predictions
        Table with ``tiv_col`` (no missing values).
    tiv_col
        TIV column in ml.
    n_bins
        Number of bins (3: tertiles).
    labels
        Bin names, low to high; default ``('low', 'medium', 'high')`` for three bins, else ``Q1..Qk``.

    Returns
    -------
    pandas.DataFrame
        A copy of ``predictions`` with an ordered categorical column ``tertile``.

    Raises
    ------
    BrainsexError
        With fewer subjects than bins, a missing TIV, or labels of the wrong length.
    """
    tiv = _tiv_values(predictions, tiv_col)
    k = int(n_bins)
    if k < 1:
        raise BrainsexError(f"n_bins must be >= 1, got {n_bins!r}")
    if labels is None:
        labels = ("low", "medium", "high") if k == 3 else tuple(f"Q{i + 1}" for i in range(k))
    labels = list(labels)
    if len(labels) != k:
        raise BrainsexError(f"labels must have n_bins = {k} names, got {labels}")
    if len(tiv) < k:
        raise BrainsexError(f"{len(tiv)} subject(s) with a TIV are too few for {k} TIV bins (need at least {k})")
    rank = pd.Series(tiv).rank(method="first")
    bins = pd.qcut(rank, q=k, labels=labels)
    out = predictions.copy()
    out["tertile"] = pd.Categorical(bins.to_numpy(), categories=labels, ordered=True)
    return out


def tiv_tertiles(
    predictions: pd.DataFrame,
    tiv_col: str = "etiv_ml",
    prob_col: str = "prob_male",
    threshold: float = 0.5,
    n_bins: int = 3,
    labels: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Classification per TIV tertile and sex: the paper's Table 3.

    Parameters
    ----------
    predictions
        Predictions table with ``y_true`` (or ``sex``), ``prob_col`` and ``tiv_col``.
    tiv_col, n_bins, labels
        As in :func:`assign_tertiles`.
    prob_col, threshold
        A subject is predicted male when ``prob_col >= threshold``.

    Returns
    -------
    pandas.DataFrame
        One row per (bin, sex): ``tertile``, ``tiv_low``/``tiv_high`` (smallest and largest TIV in the
        bin, ml), ``sex``, ``n``, ``correct``, ``wrong``, ``accuracy`` (``correct / n``, the per-sex
        accuracy), and per bin (repeated on both rows) ``bin_n``, ``bin_accuracy`` and
        ``bin_balanced_accuracy`` (mean of the two per-sex accuracies; ``<NA>`` when the bin holds
        one sex, with the reason in ``note``).
    """
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    table = assign_tertiles(predictions, tiv_col=tiv_col, n_bins=n_bins, labels=labels)
    y, _, yhat = labels_from_table(table, prob_col=prob_col, threshold=threshold)
    tiv = _tiv_values(table, tiv_col)
    rows = []
    for label in table["tertile"].cat.categories:
        in_bin = (table["tertile"] == label).to_numpy()
        yb, pb = y[in_bin], yhat[in_bin]
        both = yb.any() and not yb.all()
        bal = float(balanced_accuracy_score(yb, pb)) if both else pd.NA
        note = "" if both else f"balanced accuracy needs both sexes; only {'M' if yb.any() else 'F'} in this bin"
        for sex, is_male in (("F", False), ("M", True)):
            s = yb == is_male
            n = int(s.sum())
            correct = int((pb[s] == yb[s]).sum())
            rows.append({
                "tertile": label, "tiv_low": float(tiv[in_bin].min()), "tiv_high": float(tiv[in_bin].max()),
                "sex": sex, "n": n, "correct": correct, "wrong": n - correct,
                "accuracy": correct / n if n else pd.NA,
                "bin_n": int(in_bin.sum()), "bin_accuracy": float(accuracy_score(yb, pb)),
                "bin_balanced_accuracy": bal,
                "note": note if n else (note + "; " if note else "") + f"no {sex} subject in this bin",
            })
    out = pd.DataFrame(rows)
    for c in ("accuracy", "bin_balanced_accuracy"):
        out[c] = out[c].astype("Float64")
    out["tertile"] = pd.Categorical(out["tertile"], categories=table["tertile"].cat.categories, ordered=True)
    return out


# --------------------------------------------------------------------------------------------------
# KDE overlap range R_tiv (Figure 5)
# --------------------------------------------------------------------------------------------------
def _sample(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=float).ravel()
    if not np.all(np.isfinite(arr)):
        raise BrainsexError(f"{name} has {int((~np.isfinite(arr)).sum())} missing or infinite TIV value(s)")
    if arr.size < 2 or np.unique(arr).size < 2:
        raise BrainsexError(f"{name} needs at least two distinct TIV values for a KDE, got {arr.size} value(s)")
    return arr


def _kde(x: np.ndarray, bw_method: Any, name: str) -> Any:
    from scipy.stats import gaussian_kde

    try:
        return gaussian_kde(x, bw_method=bw_method)
    except (ValueError, TypeError, np.linalg.LinAlgError) as exc:
        raise BrainsexError(f"KDE of {name} failed (bw_method={bw_method!r}): {exc}") from exc


def _default_grid(f: np.ndarray, m: np.ndarray, bw: float, n_grid: int = 1024, margin: float = 6.0) -> np.ndarray:
    lo = min(f.min(), m.min()) - margin * bw
    hi = max(f.max(), m.max()) + margin * bw
    return np.linspace(lo, hi, n_grid)


def _superlevel_interval(grid: np.ndarray, dens: np.ndarray, level: float, name: str) -> tuple[float, float, int]:
    """Hull of ``{x : dens(x) >= level}`` on the grid, edges refined by linear interpolation.

    Returns (low, high, number of separate intervals in the superlevel set).
    """
    above = dens >= level
    idx = np.flatnonzero(above)
    if idx[0] == 0 or idx[-1] == len(grid) - 1:
        raise BrainsexError(f"the grid [{grid[0]:g}, {grid[-1]:g}] ml does not cover where the {name} density "
                            "exceeds the threshold; pass a wider grid")
    n_runs = int(np.sum(np.diff(above.astype(int)) == 1))

    def cross(i0: int, i1: int) -> float:
        d0, d1 = dens[i0], dens[i1]
        if d1 == d0:
            return float(grid[i1])
        return float(grid[i0] + (level - d0) * (grid[i1] - grid[i0]) / (d1 - d0))

    return cross(idx[0] - 1, idx[0]), cross(idx[-1] + 1, idx[-1]), n_runs


@fill_doc
def kde_curves(
    tiv_female: Any,
    tiv_male: Any,
    threshold: float = 0.2,
    bw_method: Any = None,
    grid: Any = None,
) -> dict[str, Any]:
    """Both sexes' TIV densities and their superlevel intervals (paper section 2.6, Figure 5).

    For each sex a Gaussian KDE (:class:`scipy.stats.gaussian_kde`) is evaluated on ``grid``; its
    interval is the set of TIVs where the density is at least ``threshold`` x its own maximum. If that set
    is not one interval (a multimodal density), the interval is its hull (smallest to largest such TIV) and
    ``n_intervals_*`` says how many pieces there were. R_tiv is the intersection of the two intervals.

    Parameters
    ----------
    tiv_female, tiv_male
        %(tiv_female_male)s
    threshold
        %(kde_threshold)s
    bw_method
        %(bw_method)s
    grid
        Evaluation points in ml (increasing); default 1024 points spanning the data +- 6 bandwidths. The
        edges of the intervals are interpolated linearly between grid points.

    Returns
    -------
    dict
        ``grid``, ``density_female``, ``density_male`` (arrays), ``level_female``/``level_male``
        (``threshold`` x maximum), ``interval_female``/``interval_male`` ((low, high) ml),
        ``n_intervals_female``/``n_intervals_male``, ``bandwidth_female``/``bandwidth_male`` (ml),
        ``threshold``, ``n_female``, ``n_male``, and ``low``/``high`` (R_tiv, ``None`` when the intervals do
        not intersect) with ``overlap`` (bool).
    """
    from threadpoolctl import threadpool_limits

    # scipy's KDE does many tiny BLAS solves; several BLAS threads only make them slower
    with threadpool_limits(limits=1):
        return _kde_curves(tiv_female, tiv_male, threshold, bw_method, grid)


def _kde_curves(tiv_female: Any, tiv_male: Any, threshold: float, bw_method: Any, grid: Any) -> dict[str, Any]:
    t = float(threshold)
    if not 0.0 < t < 1.0:
        raise BrainsexError(f"threshold must be in (0, 1), e.g. 0.2 for 20 % of the maximum density; got {threshold!r}")
    f = _sample(tiv_female, "tiv_female")
    m = _sample(tiv_male, "tiv_male")
    kf, km = _kde(f, bw_method, "tiv_female"), _kde(m, bw_method, "tiv_male")
    bw_f, bw_m = float(np.sqrt(kf.covariance[0, 0])), float(np.sqrt(km.covariance[0, 0]))
    if grid is None:
        g = _default_grid(f, m, max(bw_f, bw_m))
    else:
        g = np.asarray(grid, dtype=float).ravel()
        if g.size < 3 or not np.all(np.isfinite(g)) or np.any(np.diff(g) <= 0):
            raise BrainsexError("grid must be at least three finite, strictly increasing TIV values (ml)")
    df, dm = kf(g), km(g)
    lf, lm = t * df.max(), t * dm.max()
    f_lo, f_hi, n_f = _superlevel_interval(g, df, lf, "female")
    m_lo, m_hi, n_m = _superlevel_interval(g, dm, lm, "male")
    low, high = max(f_lo, m_lo), min(f_hi, m_hi)
    overlap = low <= high
    return {
        "grid": g, "density_female": df, "density_male": dm,
        "level_female": float(lf), "level_male": float(lm),
        "interval_female": (f_lo, f_hi), "interval_male": (m_lo, m_hi),
        "n_intervals_female": n_f, "n_intervals_male": n_m,
        "bandwidth_female": bw_f, "bandwidth_male": bw_m,
        "threshold": t, "n_female": int(f.size), "n_male": int(m.size),
        "low": float(low) if overlap else None, "high": float(high) if overlap else None,
        "overlap": bool(overlap),
    }


@fill_doc
def kde_overlap_range(
    tiv_female: Any,
    tiv_male: Any,
    threshold: float = 0.2,
    bw_method: Any = None,
    grid: Any = None,
) -> tuple[float, float]:
    """R_tiv: the TIV range where both sexes' densities exceed ``threshold`` x their maximum (section 2.6).

    See :func:`kde_curves` for the method. For a normal density the interval is
    ``mu +- sigma * sqrt(2 ln(1 / threshold))`` (``sqrt(2 ln 5)`` = 1.794 for 0.2), widened slightly by the
    KDE's smoothing. The paper found 1,378-1,666 ml.

    Parameters
    ----------
    tiv_female, tiv_male : array-like
        %(tiv_female_male)s
    threshold : float, default=0.2
        %(kde_threshold)s
    bw_method : str or float or callable, optional
        %(bw_method)s
    grid : array-like, optional
        Evaluation points in ml (see :func:`kde_curves`).

    Returns
    -------
    (low, high)
        In ml.

    Raises
    ------
    BrainsexError
        When the two intervals do not intersect, or for bad input.
    """
    c = kde_curves(tiv_female, tiv_male, threshold=threshold, bw_method=bw_method, grid=grid)
    if not c["overlap"]:
        f, m = c["interval_female"], c["interval_male"]
        raise BrainsexError(
            f"the female ({f[0]:.0f}-{f[1]:.0f} ml) and male ({m[0]:.0f}-{m[1]:.0f} ml) TIV intervals at "
            f"{threshold:g} x maximum density do not overlap: no R_tiv; lower the threshold"
        )
    return c["low"], c["high"]


@fill_doc
def bootstrap_rtiv(
    tiv_female: Any,
    tiv_male: Any,
    n_bootstrap: int = 1000,
    seed: int = 0,
    threshold: float = 0.2,
    bw_method: Any = None,
    ci: float = 0.95,
    progress: bool = False,
) -> dict[str, Any]:
    """Percentile-bootstrap confidence intervals of R_tiv's two ends (beyond the paper).

    Women and men are resampled separately (keeping each sex's size) and R_tiv recomputed on a grid fixed
    from the full data; resamples without overlap are left out and counted.

    Parameters
    ----------
    tiv_female, tiv_male : array-like
        %(tiv_female_male)s
    n_bootstrap : int, default=1000
        Resamples (at least 1).
    seed : int, default=0
        %(seed_bootstrap)s
    threshold : float, default=0.2
        %(kde_threshold)s
    bw_method : str or float or callable, optional
        %(bw_method)s
    ci : float, default=0.95
        %(ci)s
    progress : bool, default=False
        %(progress)s

    Returns
    -------
    dict
        JSON-ready: ``low``, ``high`` (R_tiv on the data), ``low_ci``, ``high_ci`` ([lower, upper] ml or
        ``None``), ``ci``, ``threshold``, ``n_bootstrap``, ``n_valid``, ``seed``.
    """
    from threadpoolctl import threadpool_limits
    from tqdm.auto import tqdm

    if int(n_bootstrap) < 1:
        raise BrainsexError(f"n_bootstrap must be >= 1, got {n_bootstrap!r}")
    if not 0.0 < float(ci) < 1.0:
        raise BrainsexError(f"ci must be in (0, 1), got {ci!r}")
    f, m = _sample(tiv_female, "tiv_female"), _sample(tiv_male, "tiv_male")
    full = kde_curves(f, m, threshold=threshold, bw_method=bw_method)
    span = max(full["bandwidth_female"], full["bandwidth_male"])
    grid = _default_grid(f, m, span, margin=10.0)
    rng = np.random.default_rng(seed)
    ends = []
    with threadpool_limits(limits=1):
        for _ in tqdm(range(int(n_bootstrap)), desc="R_tiv bootstrap", disable=not progress):
            fb, mb = rng.choice(f, f.size), rng.choice(m, m.size)
            try:
                c = _kde_curves(fb, mb, threshold, bw_method, grid)
            except BrainsexError:  # a degenerate resample (one distinct value) or a set beyond the grid
                continue
            if c["overlap"]:
                ends.append((c["low"], c["high"]))
    alpha = (1.0 - float(ci)) / 2.0
    arr = np.asarray(ends, dtype=float).reshape(-1, 2)
    q = np.quantile(arr, [alpha, 1 - alpha], axis=0) if len(arr) else None
    return {
        "low": full["low"], "high": full["high"],
        "low_ci": None if q is None else [float(q[0, 0]), float(q[1, 0])],
        "high_ci": None if q is None else [float(q[0, 1]), float(q[1, 1])],
        "ci": float(ci), "threshold": float(threshold), "n_bootstrap": int(n_bootstrap),
        "n_valid": int(len(arr)), "seed": int(seed),
    }


# --------------------------------------------------------------------------------------------------
# inside / outside R_tiv
# --------------------------------------------------------------------------------------------------
@fill_doc
def in_range(predictions: pd.DataFrame, low: float, high: float, tiv_col: str = "etiv_ml") -> pd.Series:
    """Boolean Series: ``low <= TIV <= high`` (R_tiv is closed at both ends).

    Parameters
    ----------
    predictions : pandas.DataFrame
        Subjects with ``tiv_col``.
    low, high : float
        %(rtiv_low_high)s
    tiv_col : str, default="etiv_ml"
        %(tiv_col)s

    Returns
    -------
    pandas.Series
        ``in_rtiv``, on the table's index.
    """
    if not float(low) <= float(high):
        raise BrainsexError(f"R_tiv must have low <= high, got ({low}, {high})")
    tiv = _tiv_values(predictions, tiv_col)
    return pd.Series((tiv >= float(low)) & (tiv <= float(high)), index=predictions.index, name="in_rtiv")


@fill_doc
def metrics_in_range(
    predictions: pd.DataFrame,
    low: float,
    high: float,
    tiv_col: str = "etiv_ml",
    prob_col: str = "prob_male",
    threshold: float = 0.5,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> pd.DataFrame:
    """Metrics of :func:`brainsex.evaluate.metrics` for all subjects, inside and outside R_tiv.

    Parameters
    ----------
    predictions : pandas.DataFrame
        A predictions table with ``tiv_col``.
    low, high : float
        %(rtiv_low_high)s
    tiv_col : str, default="etiv_ml"
        %(tiv_col)s
    prob_col : str, default="prob_male"
        %(prob_col)s
    threshold : float, default=0.5
        %(threshold)s
    n_bootstrap : int, default=1000
        %(n_bootstrap)s
    seed : int, default=0
        %(seed_bootstrap)s
    ci : float, default=0.95
        %(ci)s

    Returns
    -------
    pandas.DataFrame
        The long format of :func:`brainsex.evaluate.subgroup_metrics` with ``variable = 'R_tiv'`` and
        ``group`` in ``'all'``, ``'inside'``, ``'outside'`` (a group with no subject is left out). Format
        with :func:`brainsex.evaluate.format_metrics_table`.
    """
    inside = in_range(predictions, low, high, tiv_col=tiv_col).to_numpy()
    groups = [("R_tiv", "all", np.ones(len(inside), dtype=bool)), ("R_tiv", "inside", inside),
              ("R_tiv", "outside", ~inside)]
    return metrics_by_groups(predictions, groups, prob_col, threshold, n_bootstrap, seed, ci)


@fill_doc
def balanced_rtiv_subset(
    predictions: pd.DataFrame,
    low: float,
    high: float,
    tiv_col: str = "etiv_ml",
    prob_col: str = "prob_male",
    threshold: float = 0.5,
    seed: int = 0,
) -> pd.DataFrame:
    """Equal numbers of correctly classified women and men inside R_tiv (paper section 3.1, 98 scans).

    All correctly classified subjects of the rarer sex inside R_tiv are kept; as many of the other sex are
    drawn at random without replacement (:func:`numpy.random.default_rng` with ``seed``). Candidates are
    sorted by ``participant_id`` first, so the result does not depend on the table's row order.

    Parameters
    ----------
    predictions : pandas.DataFrame
        A predictions table with ``participant_id`` and ``tiv_col``.
    low, high : float
        %(rtiv_low_high)s
    tiv_col : str, default="etiv_ml"
        %(tiv_col)s
    prob_col : str, default="prob_male"
        %(prob_col)s
    threshold : float, default=0.5
        %(threshold)s
    seed : int, default=0
        Seed of the draw of the more frequent sex.

    Returns
    -------
    pandas.DataFrame
        The selected rows (sorted by sex, then ``participant_id``, index reset), ``2 k`` of them.

    Raises
    ------
    BrainsexError
        When one sex has no correctly classified subject inside R_tiv.
    """
    check_columns(predictions, ["participant_id"])
    y, _, yhat = labels_from_table(predictions, prob_col=prob_col, threshold=threshold)
    inside = in_range(predictions, low, high, tiv_col=tiv_col).to_numpy()
    ok = inside & (y == yhat)
    cand = predictions.loc[ok].assign(_male=y[ok], _id=predictions.loc[ok, "participant_id"].astype(str))
    cand = cand.sort_values("_id", kind="mergesort")
    women, men = cand[~cand["_male"]], cand[cand["_male"]]
    k = min(len(women), len(men))
    if k == 0:
        raise BrainsexError(f"no balanced subset: inside R_tiv [{low:.0f}, {high:.0f}] ml there are {len(women)} "
                            f"correctly classified women and {len(men)} correctly classified men")
    rng = np.random.default_rng(seed)
    parts = []
    for group in (women, men):
        pick = np.sort(rng.choice(len(group), size=k, replace=False)) if len(group) > k else np.arange(k)
        parts.append(group.iloc[pick])
    out = pd.concat(parts).drop(columns=["_male", "_id"]).reset_index(drop=True)
    return out
