"""Ranking metrics against a phantom's planted truth (paper section 2.5, measured rather than assumed).

The paper reads its ten top atlas regions (Table S1, Figure 7) as the regions the model uses to tell
the sexes apart. On the synthetic phantom the planted sex differences are known
(``ground_truth/regions.tsv``), so a ranking can be *scored*:

- :func:`planted_truth` reads the planted regions (atlas label, sign, volume and contrast effect);
- :func:`truth_map_ranking` ranks regions by the phantom's own effect map (the ceiling of any
  region-level method on this grid);
- :func:`ranking_report` scores a ranking: precision@k and average precision, strict and tolerant,
  each with its chance level and p-value from a permutation null; :func:`report_long` reshapes it;
- :func:`planted_recovery` says where each planted region ended up;
- :func:`select_scans` draws the (correctly classified, sex-balanced) scans or subjects to explain.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainsex import BrainsexError
from brainsex.atlas import average_precision, label_ids, labels_on, permutation_null, precision_at_k
from brainsex.io import as_array, is_image
from brainsex.run import PhantomDir, RunDir

__all__ = [
    "has_truth",
    "planted_truth",
    "truth_map_ranking",
    "planted_recovery",
    "ranking_report",
    "report_long",
    "select_scans",
]

_METRICS = ("precision_at_k", "average_precision", "precision_at_k_tolerant", "average_precision_tolerant")


def has_truth(run_dir: str | os.PathLike) -> bool:
    """Whether a run knows the true sex differences of its cohort (a phantom run) or not (real scans).

    True when the run's phantom has its planted-region table (:attr:`brainsex.run.PhantomDir.regions`)
    *and* every subject of the run's participants table is a scan of that phantom: a run directory reused for a real
    cohort after a phantom build keeps the old truth on disk, which must not be read as this run's.

    Parameters
    ----------
    run_dir : path
        The run directory.

    Returns
    -------
    bool
    """
    run = RunDir(run_dir)
    phantom = run.phantom.root.resolve()
    if not run.phantom.regions.is_file():
        return False
    table_path = run.cohort.participants
    if not table_path.is_file():
        return False
    images = pd.read_csv(table_path, sep="\t", usecols=["image"])["image"].astype(str)
    if images.empty:
        return False
    return bool(images.map(lambda im: Path(im).resolve().is_relative_to(phantom)).all())


def planted_truth(source: str | os.PathLike | RunDir | PhantomDir) -> pd.DataFrame:
    """The planted regions of a phantom (:attr:`brainsex.run.PhantomDir.regions`).

    Parameters
    ----------
    source
        A run (:class:`brainsex.run.RunDir`: its :attr:`~brainsex.run.RunDir.truth`), a phantom
        (:class:`brainsex.run.PhantomDir`, or the path of its root folder) or the table file itself.

    Returns
    -------
    pandas.DataFrame
        One row per planted region: ``label`` (int), ``name``, ``sign`` (+1 larger in males), ``effect``
        (signed volume effect), ``contrast`` (signed intensity effect; 0 when absent) and the other
        columns of the file.
    """
    if isinstance(source, RunDir):
        if source.truth is None:
            raise BrainsexError(f"{source.root}: this run has no ground truth (no phantom at {source.phantom.root}); "
                                "the validity checks need the synthetic phantom's planted regions")
        source = source.truth
    if not isinstance(source, PhantomDir) and Path(source).is_dir():
        source = PhantomDir(source)
    path = source.regions if isinstance(source, PhantomDir) else Path(source)
    if not path.is_file():
        raise BrainsexError(f"{path}: no planted-region table; the validity checks need the synthetic phantom's "
                            "ground truth")
    table = pd.read_csv(path, sep="\t")
    missing = {"label", "sign"} - set(table.columns)
    if missing:
        raise BrainsexError(f"{path}: missing column(s) {sorted(missing)}")
    if table.empty:
        raise BrainsexError(f"{path}: no planted region")
    table["label"] = table["label"].astype(int)
    table["sign"] = table["sign"].astype(int)
    for col in ("effect", "contrast"):
        if col not in table.columns:
            table[col] = 0.0
    table.attrs["path"] = str(path)
    return table


def truth_map_ranking(effect_map: Any, atlas: Any, labels: pd.DataFrame, log: bool = True) -> pd.DataFrame:
    """Rank atlas regions by the phantom's own effect map: the best any region-level method can do.

    Parameters
    ----------
    effect_map
        ``ground_truth/sex_effect_map.nii.gz`` (male/female local volume ratio - 1) or
        ``sex_contrast_map.nii.gz``, on the template grid.
    atlas
        Label image (resampled to the map's grid when both are images) or array on the map's grid.
    labels
        Label table (``label``, ``name``; other columns are copied).
    log
        Average ``log(1 + effect)`` (a log volume ratio, what the log-Jacobian measures) rather than
        the effect itself.

    Returns
    -------
    pandas.DataFrame
        The label table with ``n_voxels``, ``mean_effect`` and ``abs_effect``, sorted by
        ``abs_effect`` descending (regions with no voxel on the grid last), with ``rank``.
    """
    from scipy import ndimage

    m = as_array(effect_map, "effect_map").astype(np.float64)
    lab = labels_on(atlas, effect_map) if is_image(effect_map) else labels_on(atlas, m)
    if m.shape != lab.shape:
        raise BrainsexError(f"effect_map {m.shape} and atlas {lab.shape} are on different grids")
    if not np.isfinite(m).all():
        raise BrainsexError("effect_map: contains NaN or infinite values")
    if log:
        if (m <= -1).any():
            raise BrainsexError("effect_map: values <= -1 are not volume ratios - 1; pass log=False")
        m = np.log1p(m)
    table = labels.reset_index(drop=True).copy()
    ids = label_ids(table, lab)
    table = table[table["label"].astype(int).isin(ids)].reset_index(drop=True)
    ids = table["label"].astype(int).to_numpy()
    n = np.asarray(ndimage.sum_labels(np.ones_like(m), lab, index=ids)).astype(int)
    s = np.asarray(ndimage.sum_labels(m, lab, index=ids))
    table["n_voxels"] = n
    table["mean_effect"] = np.where(n > 0, s / np.maximum(n, 1), np.nan)
    table["abs_effect"] = table["mean_effect"].abs()
    table = table.assign(_key=table["abs_effect"].fillna(-1.0)).sort_values(
        ["_key", "label"], ascending=[False, True], kind="mergesort").drop(columns="_key")
    table = table.reset_index(drop=True)
    table["rank"] = np.arange(1, len(table) + 1)
    return table


def planted_recovery(ranking: pd.DataFrame, truth: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """Where each planted region ended up in a ranking.

    Parameters
    ----------
    ranking
        A ranking table in order (``label``; ``n_voxels``, ``coef_male``, ``q``, ``significant`` used
        when present, e.g. :func:`tbm_region_test`).
    truth
        :func:`planted_truth`.
    k
        The cut-off of ``in_top_k``.

    Returns
    -------
    pandas.DataFrame
        One row per planted region: ``label``, ``name``, ``sign``, ``on_grid`` (the region has voxels),
        ``rank`` (among regions on the grid; NaN when absent), ``in_top_k`` and, for a group test,
        ``coef_male``, ``q``, ``significant``, ``sign_agrees`` and ``recovered`` (significant with the
        planted sign).
    """
    if "label" not in ranking.columns:
        raise BrainsexError("ranking: needs a 'label' column")
    r = ranking.reset_index(drop=True).copy()
    r["label"] = r["label"].astype(int)
    if "n_voxels" in r.columns:
        r = r[r["n_voxels"] > 0].reset_index(drop=True)
    pos = {lab: i + 1 for i, lab in enumerate(r["label"])}
    rows = []
    for _, t in truth.iterrows():
        lab = int(t["label"])
        row = {"label": lab, "name": t.get("name", str(lab)), "sign": int(t["sign"]), "on_grid": lab in pos,
               "rank": pos.get(lab, np.nan), "in_top_k": pos.get(lab, np.inf) <= k}
        if lab in pos and {"coef_male", "q"} <= set(r.columns):
            rr = r.iloc[pos[lab] - 1]
            row.update({"coef_male": float(rr["coef_male"]), "q": float(rr["q"]),
                        "significant": bool(rr.get("significant", rr["q"] < 0.05)),
                        "sign_agrees": bool(np.sign(rr["coef_male"]) == np.sign(t["sign"]))})
            row["recovered"] = row["significant"] and row["sign_agrees"]
        elif {"coef_male", "q"} <= set(r.columns):
            row.update({"coef_male": np.nan, "q": np.nan, "significant": False, "sign_agrees": False,
                        "recovered": False})
        rows.append(row)
    return pd.DataFrame(rows)


def _ranked_labels(ranking: Any) -> list[int]:
    """Labels of a ranking in order; for a table, regions with no voxel on the grid are left out."""
    if isinstance(ranking, pd.DataFrame):
        if "label" not in ranking.columns:
            raise BrainsexError("ranking: a DataFrame ranking needs a 'label' column")
        r = ranking
        if "n_voxels" in r.columns:
            r = r[r["n_voxels"] > 0]
        items = [int(v) for v in r["label"]]
    else:
        items = [int(v) for v in ranking]
    if not items:
        raise BrainsexError("ranking: no region to rank")
    if len(set(items)) != len(items):
        raise BrainsexError("ranking: lists a region more than once")
    return items


def ranking_report(
    ranking: Any,
    truth: Iterable[int] | pd.DataFrame,
    neighbours: dict[int, set[int]] | None = None,
    n_perm: int = 1000,
    seed: int = 0,
    k: int = 10,
) -> pd.DataFrame:
    """How well one region ranking recovers the planted regions, against chance.

    Metrics (:mod:`brainsex.atlas`): precision@k (fraction of the top ``k`` that are planted) and
    average precision; with ``neighbours`` (:func:`brainsex.atlas.region_neighbours`) also their
    tolerant versions, where a region within one voxel of a planted region counts as finding it (each
    planted region once). Each metric's chance level is the mean of a permutation null (the ranking
    shuffled ``n_perm`` times, the same permutations for every metric) and its p-value the one-sided
    ``(1 + #{null >= observed}) / (1 + n_perm)`` (:func:`brainsex.atlas.permutation_null`).

    Parameters
    ----------
    ranking
        Labels best first, or a ranking table (its ``label`` column in order; rows with ``n_voxels``
        0 are dropped: a region absent from the grid cannot be ranked).
    truth
        Planted label ids, or :func:`planted_truth`'s table. Planted regions absent from the ranking
        stay in the truth (no method can find them; ``n_planted_ranked`` says how many can be).
    neighbours
        ``{label: neighbour labels}`` for the tolerant metrics; None leaves them out.
    n_perm, seed
        Permutations of the null and their seed.
    k
        The cut-off of precision@k (at most the number of ranked regions).

    Returns
    -------
    pandas.DataFrame
        One row: ``k``, ``n_ranked``, ``n_planted``, ``n_planted_ranked``, ``hits_at_k``, and for each
        metric ``<metric>``, ``<metric>_chance``, ``<metric>_p`` (metrics ``precision_at_k``,
        ``average_precision`` and, with neighbours, ``precision_at_k_tolerant``,
        ``average_precision_tolerant``).
    """
    items = _ranked_labels(ranking)
    if isinstance(truth, pd.DataFrame):
        if "label" not in truth.columns:
            raise BrainsexError("truth: the planted table needs a 'label' column")
        truth = truth["label"]
    t = {int(v) for v in truth}
    if not t:
        raise BrainsexError("truth: the planted set is empty")
    if not 1 <= int(k) <= len(items):
        raise BrainsexError(f"k={k}: must be between 1 and the number of ranked regions ({len(items)})")
    if int(n_perm) < 1:
        raise BrainsexError(f"n_perm={n_perm}: must be >= 1")
    metric_fns = {"precision_at_k": partial(precision_at_k, k=int(k)), "average_precision": average_precision}
    if neighbours is not None:
        metric_fns["precision_at_k_tolerant"] = partial(precision_at_k, k=int(k), neighbours=neighbours)
        metric_fns["average_precision_tolerant"] = partial(average_precision, neighbours=neighbours)
    row: dict[str, Any] = {"k": int(k), "n_ranked": len(items), "n_planted": len(t),
                           "n_planted_ranked": len(t & set(items)),
                           "hits_at_k": len(t & set(items[: int(k)]))}
    for name, fn in metric_fns.items():
        res = permutation_null(fn, items, t, n_perm=int(n_perm), seed=int(seed))
        row[name] = res["observed"]
        row[f"{name}_chance"] = res["chance"]
        row[f"{name}_p"] = res["p_value"]
    return pd.DataFrame([row])


def report_long(report: pd.DataFrame, id_cols: Sequence[str] = ()) -> pd.DataFrame:
    """One row per metric from :func:`ranking_report` rows: ``metric``, ``observed``, ``chance``, ``p_value``.

    Parameters
    ----------
    report : pandas.DataFrame
        Rows of :func:`ranking_report` (several stacked, e.g. one per method).
    id_cols : sequence of str, default=()
        Columns carried along (e.g. ``method``, ``scoring``).

    Returns
    -------
    pandas.DataFrame
        ``id_cols``, ``metric`` (``precision_at_k`` named with its k, e.g. ``precision_at_10``),
        ``observed``, ``chance``, ``p_value``; metrics missing from a row are left out.
    """
    rows = []
    for _, r in report.iterrows():
        for m in _METRICS:
            if m in r.index and pd.notna(r[m]):
                rec = {c: r[c] for c in id_cols}
                rec.update({"metric": m.replace("_k", f"_{int(r['k'])}") if "precision_at_k" in m else m,
                            "observed": float(r[m]), "chance": float(r[f"{m}_chance"]),
                            "p_value": float(r[f"{m}_p"])})
                rows.append(rec)
    return pd.DataFrame(rows, columns=[*id_cols, "metric", "observed", "chance", "p_value"])


def select_scans(table: pd.DataFrame, max_scans: int | None = 24, seed: int = 0, sex_col: str = "sex") -> pd.DataFrame:
    """Correctly classified scans to explain, at most ``max_scans``, balanced by sex where possible.

    Rows with ``y_true`` and ``y_pred`` columns are kept only when they agree (the paper explains
    correctly classified test scans, section 2.4). The draw is deterministic for a ``seed``; the
    result keeps the table's order.

    Parameters
    ----------
    table : pandas.DataFrame
        Scans, e.g. the test predictions.
    max_scans : int or None, default=24
        At most this many (at least 1); None keeps every correctly classified scan.
    seed : int, default=0
        Seed of the draw.
    sex_col : str, default="sex"
        Column the draw is balanced on (each sex gets an equal share; a smaller group gives its spare
        share to the other); without it the draw is uniform.

    Returns
    -------
    pandas.DataFrame
        The chosen rows, index reset.
    """
    t = table.reset_index(drop=True)
    if {"y_true", "y_pred"} <= set(t.columns):
        t = t[t["y_true"].astype(int) == t["y_pred"].astype(int)].reset_index(drop=True)
    if t.empty:
        raise BrainsexError("select_scans: no correctly classified scan to explain")
    if max_scans is None or len(t) <= int(max_scans):
        return t
    if int(max_scans) < 1:
        raise BrainsexError(f"max_scans={max_scans}: must be >= 1")
    rng = np.random.default_rng(seed)
    if sex_col in t.columns:
        groups = [np.flatnonzero((t[sex_col] == s).to_numpy()) for s in sorted(t[sex_col].unique())]
    else:
        groups = [np.arange(len(t))]
    share = [int(max_scans) // len(groups)] * len(groups)
    for i in range(int(max_scans) - sum(share)):
        share[i % len(groups)] += 1
    # a group smaller than its share gives the rest to the others
    chosen: list[int] = []
    spare = 0
    for g, n in sorted(zip(groups, share, strict=True), key=lambda x: len(x[0])):
        take = min(len(g), n + spare)
        spare = n + spare - take
        chosen.extend(rng.choice(g, size=take, replace=False).tolist())
    return t.iloc[sorted(chosen)].reset_index(drop=True)
