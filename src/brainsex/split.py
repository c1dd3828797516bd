"""Stratified train/validation/test split of the cohort (paper section 2.5).

The paper divides the aggregated data 80 % / 10 % / 10 % "in a stratified manner, ensuring consistent
representation of key features -- sex, vendor, and magnetic field strength -- across subsets", and uses
only the earliest scan of each subject "to avoid data leakage" (section 2.1). This module does the same
with scikit-learn's :func:`~sklearn.model_selection.train_test_split` (called twice: test off the whole
table, then validation off the rest), reports the composition of each subset as the paper does, and
checks that no subject is in two subsets.

Small strata
------------
``train_test_split(..., stratify=key)`` needs every stratum to have at least two members and at least as
many rows in each subset as there are strata. Real cohorts break both (the paper's ADNI has one GE 3 T
woman). Before splitting, strata are therefore merged, coarsest last:

1. A stratum with fewer than ``min_stratum_size`` members (default ``ceil(1 / min(fractions))``, i.e.
   enough for one expected member in the smallest subset: 10 for 80/10/10) is merged with the other small
   strata that share its first ``len(by) - 1`` variables (e.g. ``F|GE|3.0`` joins ``F|GE|*``); the merged
   strata are checked again and coarsened one variable at a time, down to a single ``other`` stratum.
2. If ``other`` is still too small, it joins the smallest remaining stratum.
3. While there are more strata than rows in the smallest subset, the smallest stratum joins ``other``.

The stratum each row was split in is returned in the ``stratum`` column, so the merging is visible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from brainsex import BrainsexError

__all__ = [
    "SPLITS",
    "stratified_split",
    "earliest_scan",
    "stratum_keys",
    "split_composition",
    "check_no_leakage",
]

#: Names of the three subsets, in the order of ``fractions``.
SPLITS: tuple[str, str, str] = ("train", "val", "test")

_SESSION_CANDIDATES = ("session", "ses", "session_id", "visit", "age")


def _fmt(value: object) -> str:
    """A stable string for a stratum value (3.0 and 3 give the same key)."""
    if isinstance(value, float | np.floating):
        if np.isnan(value):
            return "nan"
        return f"{float(value):g}"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return str(value)


def earliest_scan(
    table: pd.DataFrame,
    id_col: str = "participant_id",
    session_col: str | None = None,
) -> pd.DataFrame:
    """Keep only the earliest scan of each subject (paper section 2.1).

    Parameters
    ----------
    table
        One row per scan.
    id_col
        Column identifying the subject.
    session_col
        Column ordering a subject's scans (a session label, a scan date, or the age at scan); the row with
        the smallest value is kept. ``None`` looks for ``session``, ``ses``, ``session_id``, ``visit`` or
        ``age``, in that order; this is only needed when some subject has several rows.

    Returns
    -------
    pandas.DataFrame
        The rows kept, in their original order.

    Raises
    ------
    BrainsexError
        If a subject has several rows and no column says which is the earliest.
    """
    if id_col not in table.columns:
        raise BrainsexError(f"table has no '{id_col}' column (columns: {', '.join(map(str, table.columns))})")
    dup = table[id_col].duplicated(keep=False)
    if not dup.any():
        return table
    if session_col is None:
        session_col = next((c for c in _SESSION_CANDIDATES if c in table.columns), None)
        if session_col is None:
            ids = sorted(map(str, table.loc[dup, id_col].unique()))[:5]
            raise BrainsexError(
                f"{int(dup.sum())} rows share a '{id_col}' (e.g. {', '.join(ids)}) but there is no session or "
                f"age column to pick each subject's earliest scan; pass session_col="
            )
    elif session_col not in table.columns:
        raise BrainsexError(f"session_col '{session_col}' is not a column of the table")
    pos = pd.DataFrame({"id": table[id_col].to_numpy(), "s": table[session_col].to_numpy(),
                        "pos": np.arange(len(table))})
    order = pos.sort_values(["id", "s"], kind="mergesort", na_position="last")
    keep = np.sort(order.drop_duplicates(subset="id", keep="first")["pos"].to_numpy())
    return table.iloc[keep]


def stratum_keys(
    table: pd.DataFrame,
    by: Sequence[str] = ("sex", "vendor", "field"),
    min_stratum_size: int = 10,
    max_strata: int | None = None,
) -> pd.Series:
    """The stratum of each row, with small strata merged as described in the module docstring.

    Parameters
    ----------
    table
        One row per subject, with the columns named in ``by``.
    by
        Variables whose combinations define the strata (paper section 2.5: sex, vendor, field strength).
    min_stratum_size
        Strata smaller than this are merged into coarser ones.
    max_strata
        At most this many strata are returned (the smallest subset's size); ``None`` for no limit.

    Returns
    -------
    pandas.Series
        A string key per row, e.g. ``"F|Siemens|3"``, ``"F|GE|*"`` (merged over field strength) or
        ``"other"``.
    """
    by = list(by)
    missing = [c for c in by if c not in table.columns]
    if missing:
        raise BrainsexError(f"stratification column(s) {missing} not in the table (columns: {list(table.columns)})")
    parts = [table[c].map(_fmt).astype(str) for c in by]

    def key_at(level: int) -> pd.Series:
        if level == 0:
            return pd.Series("other", index=table.index)
        out = parts[0].copy()
        for p in parts[1:level]:
            out = out + "|" + p
        return out + "|*" * (len(by) - level) if level < len(by) else out

    key = key_at(len(by))
    for level in range(len(by) - 1, -1, -1):
        small = key.map(key.value_counts()) < min_stratum_size
        if not small.any():
            break
        key = key.where(~small, key_at(level))
    counts = key.value_counts()
    if "other" in counts.index and counts["other"] < min_stratum_size and len(counts) > 1:
        target = counts.drop("other").sort_values(kind="mergesort").index[0]
        key = key.replace("other", target)
    if max_strata is not None:
        while key.nunique() > max(1, max_strata):
            counts = key.value_counts().sort_values(kind="mergesort")
            smallest = counts.index[0] if counts.index[0] != "other" else counts.index[1]
            key = key.replace(smallest, "other")
    return key


def stratified_split(
    table: pd.DataFrame,
    by: Sequence[str] = ("sex", "vendor", "field"),
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    id_col: str = "participant_id",
    session_col: str | None = None,
    min_stratum_size: int | None = None,
) -> pd.DataFrame:
    """Split subjects into train/validation/test, stratified by sex, vendor and field (paper section 2.5).

    Parameters
    ----------
    table
        One row per scan (e.g. ``preprocess/preprocessed.tsv``), with ``id_col`` and the ``by`` columns.
    by
        Stratification variables; the paper uses sex, vendor and magnetic field strength.
    fractions
        Fractions of subjects for ``train``, ``val`` and ``test`` (the paper: 80 %, 10 %, 10 %). They must
        be positive and sum to 1; subset sizes are rounded, ``train`` takes the remainder.
    seed
        Random state passed to both :func:`sklearn.model_selection.train_test_split` calls.
    id_col
        Subject identifier; a subject appears in exactly one subset.
    session_col
        Column ordering repeated scans of a subject; only the earliest is kept (see :func:`earliest_scan`).
    min_stratum_size
        Strata with fewer subjects are merged (see the module docstring). Default
        ``ceil(1 / min(fractions))``.

    Returns
    -------
    pandas.DataFrame
        The table (one row per subject, original order, index reset) with two new columns: ``split``
        (``train``/``val``/``test``) and ``stratum`` (the possibly merged stratum key).

    Raises
    ------
    BrainsexError
        For an empty table, missing columns, invalid fractions, or too few subjects to give every subset at
        least one.
    """
    from sklearn.model_selection import train_test_split

    if not isinstance(table, pd.DataFrame):
        raise BrainsexError(f"table must be a pandas DataFrame, got {type(table).__name__}")
    if len(table) == 0:
        raise BrainsexError("cannot split an empty table (0 rows)")
    fr = np.asarray(list(fractions), dtype=float)
    if fr.shape != (3,) or not np.all(np.isfinite(fr)) or np.any(fr <= 0) or abs(fr.sum() - 1) > 1e-6:
        raise BrainsexError(
            f"fractions must be three positive numbers (train, val, test) summing to 1, got {tuple(fractions)}"
        )
    df = earliest_scan(table, id_col=id_col, session_col=session_col).reset_index(drop=True)
    n = len(df)
    n_test = int(round(n * fr[2]))
    n_val = int(round(n * fr[1]))
    n_train = n - n_test - n_val
    if min(n_train, n_val, n_test) < 1:
        raise BrainsexError(
            f"{n} subject(s) are too few to split with fractions {tuple(fractions)} "
            f"(train/val/test would get {n_train}/{n_val}/{n_test}); at least one per subset is needed"
        )
    if min_stratum_size is None:
        min_stratum_size = math.ceil(1.0 / fr.min() - 1e-9)
    key = stratum_keys(df, by=by, min_stratum_size=max(2, int(min_stratum_size)),
                       max_strata=min(n_train, n_val, n_test))
    stratify = key.to_numpy() if key.nunique() > 1 and key.value_counts().min() >= 2 else None
    idx = np.arange(n)
    try:
        rest, test = train_test_split(idx, test_size=n_test, random_state=seed, stratify=stratify)
        strat_rest = stratify[rest] if stratify is not None else None
        if strat_rest is not None and pd.Series(strat_rest).value_counts().min() < 2:
            strat_rest = None
        train, val = train_test_split(rest, test_size=n_val, random_state=seed, stratify=strat_rest)
    except ValueError as exc:  # pragma: no cover - stratum_keys is built to avoid this
        raise BrainsexError(f"stratified split failed for {n} subjects with strata {key.value_counts().to_dict()}: "
                            f"{exc}") from exc
    split = np.empty(n, dtype=object)
    split[train], split[val], split[test] = SPLITS
    out = df.copy()
    out["split"] = split
    out["stratum"] = key.to_numpy()
    return out


def _pct(s: pd.Series, value: object) -> float:
    return float(100.0 * (s == value).mean()) if len(s) else float("nan")


def split_composition(
    table: pd.DataFrame,
    split_col: str = "split",
    sex_col: str = "sex",
    vendor_col: str = "vendor",
    field_col: str = "field",
    dataset_col: str = "dataset",
) -> pd.DataFrame:
    """Composition of each subset, as the paper reports it (section 2.5).

    Parameters
    ----------
    table
        A table with a ``split`` column (from :func:`stratified_split`). Columns other than ``split`` that
        are missing are skipped.
    split_col, sex_col, vendor_col, field_col, dataset_col
        Column names.

    Returns
    -------
    pandas.DataFrame
        One row per subset (``train``, ``val``, ``test``, then ``all``) with ``n``, ``pct_F``, ``pct_M``,
        ``pct_<vendor>`` for each vendor, ``pct_<field>T`` for each field strength (e.g. ``pct_1.5T``),
        and ``n_<dataset>`` for each dataset. Percentages are of the subset's subjects.
    """
    if split_col not in table.columns:
        raise BrainsexError(f"table has no '{split_col}' column; run stratified_split first")
    if len(table) == 0:
        raise BrainsexError("cannot describe an empty table")
    groups = [s for s in SPLITS if (table[split_col] == s).any()]
    groups += sorted(set(map(str, table[split_col].unique())) - set(SPLITS))
    rows = []
    for name in [*groups, "all"]:
        sub = table if name == "all" else table[table[split_col].astype(str) == name]
        row: dict[str, object] = {"split": name, "n": len(sub)}
        if sex_col in table.columns:
            for v in ("F", "M"):
                row[f"pct_{v}"] = _pct(sub[sex_col], v)
        if vendor_col in table.columns:
            for v in sorted(table[vendor_col].dropna().unique(), key=str):
                row[f"pct_{v}"] = _pct(sub[vendor_col], v)
        if field_col in table.columns:
            for v in sorted(table[field_col].dropna().unique()):
                row[f"pct_{_fmt(v)}T"] = _pct(sub[field_col], v)
        if dataset_col in table.columns:
            for v in sorted(table[dataset_col].dropna().unique(), key=str):
                row[f"n_{v}"] = int((sub[dataset_col] == v).sum())
        rows.append(row)
    return pd.DataFrame(rows)


def check_no_leakage(
    table: pd.DataFrame,
    id_col: str = "participant_id",
    split_col: str = "split",
) -> None:
    """Raise if any subject appears in more than one subset, or a split label is unknown.

    Parameters
    ----------
    table
        A table with ``id_col`` and ``split_col`` (one row per scan or per subject).
    id_col, split_col
        Column names.

    Raises
    ------
    BrainsexError
        Naming (up to ten of) the subjects found in two or more subsets.
    """
    for c in (id_col, split_col):
        if c not in table.columns:
            raise BrainsexError(f"table has no '{c}' column")
    bad_labels = sorted(set(map(str, table[split_col].unique())) - set(SPLITS))
    if bad_labels:
        raise BrainsexError(f"unknown split label(s) {bad_labels}; expected {list(SPLITS)}")
    n_splits = table.groupby(id_col)[split_col].nunique()
    leaked = n_splits[n_splits > 1]
    if len(leaked):
        ids = ", ".join(map(str, leaked.index[:10]))
        raise BrainsexError(f"{len(leaked)} subject(s) are in more than one split (data leakage): {ids}")
