"""Privacy: a book built on restricted cohorts publishes aggregates only, and a guard checks the site.

Cohorts with ``shareable: false`` in the manifest (ADNI, OASIS-3, Cam-CAN, CC-359) may appear in the
published book only as aggregates. This module holds the three parts of that promise:

1. **What a chapter may show.** :func:`publication_policy` tells a chapter whether every cohort of
   the run is shareable (from the manifest and ``<run_dir>/cohort/participants.tsv``) and carries
   the minimum group size ``k``. Chapters branch on :attr:`Policy.shareable`; the aggregate views
   they show instead of per-subject detail are computed here (:func:`group_summary`,
   :func:`suppress_small_groups`, :func:`binned_counts`, :func:`binned_counts_2d`,
   :func:`qc_aggregate`, :func:`reason_counts`).
2. **Minimum group size.** Any published aggregate over fewer than ``k`` subjects of a non-shareable
   cohort (a table row, a mean map, a histogram bin) is suppressed with a visible note.
3. **The guard.** Before a build is swapped in, :func:`check_published` scans every file of the
   built site — HTML, sources, notebooks, JavaScript, the search index, image metadata (PNG text
   chunks), gzip members and the contents of every zip archive — case-insensitively, for the IDs of
   non-shareable subjects and the names of their files, and refuses the build naming the file and
   what it found.

Local detail stays local: the executed notebooks in ``runs/<profile>/`` may carry outputs marked
*local only* (``show(..., local_only=True)``); :func:`strip_local_outputs` removes them from the copy
that is published.
"""

from __future__ import annotations

import base64
import gzip
import html
import io
import re
import struct
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from brainsex import BrainsexError
from brainsex.run import RunDir

__all__ = [
    "PrivacyError",
    "DEFAULT_MIN_GROUP_SIZE",
    "WITHHELD",
    "LOCAL_ONLY_KEY",
    "SUPPRESSED_NOTE",
    "Policy",
    "publication_policy",
    "protected_ids",
    "protected_names",
    "scrub_reason",
    "suppress_small_groups",
    "group_summary",
    "suppress_table",
    "N_COLUMNS",
    "EXTREME_COLUMNS",
    "reason_counts",
    "quantile_summary",
    "pool_small_groups",
    "binned_counts",
    "binned_counts_2d",
    "qc_aggregate",
    "QCAggregate",
    "strip_local_outputs",
    "scan_html",
    "scan_published",
    "check_published",
    "check_published_html",
]

#: The default minimum group size ``k`` for a published aggregate of a non-shareable cohort.
DEFAULT_MIN_GROUP_SIZE = 5
#: Output metadata key that marks a notebook output as the researcher's local copy only.
LOCAL_ONLY_KEY = "brainsex_local_only"
#: The visible note on a suppressed row or bin (``{k}`` is filled in).
SUPPRESSED_NOTE = "suppressed: fewer than {k} subjects (restricted cohort)"
#: Shown in place of a value that a restricted cohort may not publish.
WITHHELD = "withheld (restricted cohort: aggregates only)"

_FALSE = {"false", "0", "no", "n", "f"}


class PrivacyError(BrainsexError):
    """Subject-level data of a non-shareable cohort would be published."""


# ------------------------------------------------------------------------------------ what may be shown
@dataclass(frozen=True)
class Policy:
    """What the published book may show for a run.

    Attributes
    ----------
    shareable
        True when every cohort of the run allows subject-level data (phantom, IXI): chapters show
        today's detail. False when at least one cohort is ``shareable: false``: chapters show aggregates.
    k
        Minimum group size of a published aggregate (applies only when ``shareable`` is False).
    restricted_cohorts
        Names of the run's non-shareable cohorts.
    """

    shareable: bool
    k: int = DEFAULT_MIN_GROUP_SIZE
    restricted_cohorts: tuple[str, ...] = field(default_factory=tuple)

    @property
    def min_n(self) -> int:
        """The smallest group that may be published (1 for a shareable run, ``k`` otherwise)."""
        return 1 if self.shareable else self.k

    def allows(self, n: Any) -> bool:
        """Whether an aggregate over ``n`` subjects may be published.

        Parameters
        ----------
        n
            Group size.
        """
        try:
            return self.shareable or float(n) >= self.k
        except (TypeError, ValueError):
            return False

    def value(self, text: str, n: Any) -> str:
        """``text`` (a number for the prose) when it may be published, else :data:`WITHHELD`.

        Parameters
        ----------
        text
            The formatted value.
        n
            How many subjects it summarises.
        """
        return text if self.allows(n) else WITHHELD

    @property
    def note(self) -> str:
        """One sentence for the chapter: what is published for this run."""
        if self.shareable:
            return "All cohorts of this run are shareable: the book shows subject-level detail."
        return (f"Cohort(s) {', '.join(self.restricted_cohorts)} may not be published subject by subject: "
                f"this page shows aggregates only, and any group of fewer than {self.k} subjects is "
                "suppressed. The full detail is in the run directory.")


def _closed_cohorts(manifest: Any) -> set[str]:
    if manifest is None:
        return set()
    from brainsex.manifest import Manifest, load_manifest

    if not isinstance(manifest, Manifest):
        if not Path(manifest).is_file():
            return set()
        manifest = load_manifest(manifest)
    return {c.name for c in manifest.cohorts if not c.shareable}


def _read_tsv(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def _closed_mask(table: pd.DataFrame, closed: set[str]) -> pd.Series:
    mask = pd.Series(False, index=table.index)
    if "shareable" in table.columns:
        mask |= table["shareable"].astype(str).str.strip().str.lower().isin(_FALSE)
    if "cohort" in table.columns:
        mask |= table["cohort"].astype(str).isin(closed)
    return mask


def publication_policy(run_dir: str | Path, manifest: Any = None, min_group_size: int = DEFAULT_MIN_GROUP_SIZE,
                       cohorts: Sequence[str] | None = None) -> Policy:
    """Whether the run's cohorts are all shareable, and the minimum group size of published aggregates.

    Parameters
    ----------
    run_dir
        The run directory; ``cohort/participants.tsv`` (its ``shareable`` and ``cohort`` columns) and
        ``cohort/exclusions.tsv`` are read when present.
    manifest
        ``data_manifest.yaml`` (path or :class:`brainsex.manifest.Manifest`); a cohort it marks
        ``shareable: false`` is restricted even when the tables do not say so.
    min_group_size
        ``k``: the smallest group a published aggregate of a restricted cohort may describe (at least 1).
    cohorts
        The cohorts the run uses (the profile's ``cohorts``); checked against the manifest when the
        participants table does not exist yet.

    Returns
    -------
    Policy
    """
    k = int(min_group_size)
    if k < 1:
        raise BrainsexError(f"min_group_size must be at least 1, got {min_group_size}")
    closed = _closed_cohorts(manifest)
    restricted: set[str] = {c for c in (cohorts or []) if c in closed}
    folder = RunDir(run_dir).cohort
    for path in (folder.participants, folder.exclusions):
        table = _read_tsv(path)
        if table is None or table.empty:
            continue
        mask = _closed_mask(table, closed)
        if mask.any():
            names = table.loc[mask, "cohort"] if "cohort" in table.columns else pd.Series(["(unnamed)"])
            restricted |= {str(c) for c in names}
    return Policy(shareable=not restricted, k=k, restricted_cohorts=tuple(sorted(restricted)))


def protected_ids(run_dir: str | Path, manifest: str | Path | None = None) -> set[str]:
    """Participant IDs of non-shareable cohorts in ``<run_dir>/cohort/`` (participants and exclusions).

    A row counts as non-shareable when its ``shareable`` column says so, or when its ``cohort`` is marked
    ``shareable: false`` in ``manifest`` (used for the exclusions table, which has no ``shareable`` column).

    Parameters
    ----------
    run_dir
        The run directory.
    manifest
        ``data_manifest.yaml``, optional.
    """
    closed = _closed_cohorts(manifest)
    ids: set[str] = set()
    folder = RunDir(run_dir).cohort
    for path in (folder.participants, folder.exclusions):
        table = _read_tsv(path)
        if table is None or "participant_id" not in table.columns:
            continue
        ids |= {i for i in table.loc[_closed_mask(table, closed), "participant_id"] if i}
    return ids


_NIFTI_EXT = re.compile(r"(\.nii(\.gz)?|\.mgz|\.mgh|\.img|\.hdr|\.dcm|\.gz)$", re.IGNORECASE)


def protected_names(run_dir: str | Path, manifest: str | Path | None = None) -> set[str]:
    """Everything the guard looks for: protected IDs and the file names of their images and masks.

    The file names (with and without extension) come from ``participants.tsv`` (``image``, ``mask``)
    and the preprocessing tables (``image_pp``, ``mask_pp``) when present.

    Parameters
    ----------
    run_dir
        The run directory.
    manifest
        ``data_manifest.yaml``, optional.
    """
    closed = _closed_cohorts(manifest)
    ids = protected_ids(run_dir, manifest)
    needles = set(ids)
    run = RunDir(run_dir)
    tables = [run.cohort.participants, run.preprocess.table]
    for path in tables:
        table = _read_tsv(path)
        if table is None or "participant_id" not in table.columns:
            continue
        mask = table["participant_id"].isin(ids) | _closed_mask(table, closed)
        for col in ("image", "mask", "image_pp", "mask_pp"):
            if col not in table.columns:
                continue
            for value in table.loc[mask, col]:
                name = PurePosixPath(str(value).replace("\\", "/")).name
                if not name:
                    continue
                stem = _NIFTI_EXT.sub("", name)
                # a generic name (``T1w.nii.gz``, ``brain.nii.gz``) does not identify anyone; keep names
                # that carry an ID or are long enough to be specific
                for candidate in (name, stem):
                    if any(i.lower() in candidate.lower() for i in ids) or len(stem) >= 12:
                        needles.add(candidate)
    return {n for n in needles if n.strip()}


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|`[^`]*`")
_PATHLIKE = re.compile(r"[^\s:;,()'\"]*[/\\][^\s:;,()'\"]*|[^\s:;,()'\"/\\]+\.[A-Za-z][A-Za-z0-9]{0,5}(\.gz)?\b")


def scrub_reason(reason: str, ids: Iterable[str] = ()) -> str:
    """A reason string with no subject ID, file name, path or quoted value left in it.

    ``"image file is empty: S0002_T1w.nii.gz"`` -> ``"image file is empty: <file>"``;
    ``"no image matches 'img/S0009_T1w.nii.gz' under /data"`` -> ``"no image matches <value> under <file>"``.
    Reasons that differ only in those details then group together.

    Parameters
    ----------
    reason
        The reason as recorded (cohort exclusions, preprocessing failures).
    ids
        Subject IDs to blank wherever they appear (case-insensitive).
    """
    text = _QUOTED.sub("<value>", str(reason))
    text = _PATHLIKE.sub("<file>", text)
    for i in sorted((str(i) for i in ids if str(i)), key=len, reverse=True):
        text = re.sub(r"(?<![A-Za-z0-9])" + re.escape(i) + r"(?![A-Za-z0-9])", "<id>", text, flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", text).strip()


# ------------------------------------------------------------------------------------ aggregate views
def suppress_small_groups(table: pd.DataFrame, k: int, n_col: str = "n", keep: Sequence[str] = ()) -> pd.DataFrame:
    """Blank every row of ``table`` that describes fewer than ``k`` subjects, with a visible note.

    The group's label columns (``keep``) stay, its other columns become missing, ``n_col`` shows
    ``"<k"`` and a ``note`` column says why. Rows with ``n >= k`` are unchanged.

    Parameters
    ----------
    table
        One row per group, with the group size in ``n_col``.
    k
        Minimum group size.
    n_col
        Column with each row's number of subjects.
    keep
        Label columns to keep on a suppressed row (default: the non-numeric columns).
    """
    if n_col not in table.columns:
        raise BrainsexError(f"suppress_small_groups: the table has no '{n_col}' column (columns: {list(table.columns)})")
    out = table.copy()
    n = pd.to_numeric(out[n_col], errors="coerce")
    small = n.notna() & (n < int(k))
    labels = list(keep) if keep else [c for c in out.columns
                                      if c != n_col and not pd.api.types.is_numeric_dtype(out[c])]
    if small.any():
        for c in out.columns:
            if c in labels:
                continue
            out[c] = out[c].astype(object)
            out.loc[small, c] = None
        out[n_col] = out[n_col].astype(object)
        out.loc[small, n_col] = f"<{int(k)}"
    if "note" in table.columns:  # keep the table's own notes beside the suppression note
        old = table["note"].fillna("").astype(str)
        out["note"] = np.where(small, SUPPRESSED_NOTE.format(k=int(k)), old)
    elif small.any():
        out["note"] = np.where(small, SUPPRESSED_NOTE.format(k=int(k)), "")
    return out


#: Columns that hold one subject's value (the smallest or largest of a group): dropped from public tables.
EXTREME_COLUMNS = ("tiv_low", "tiv_high", "min", "max")
#: Columns that hold a row's number of subjects (any of them under ``k`` suppresses the row).
N_COLUMNS = ("n", "n_female", "n_male", "n_subjects", "N")


def suppress_table(table: pd.DataFrame, k: int, n_columns: Sequence[str] = N_COLUMNS) -> pd.DataFrame:
    """:func:`suppress_small_groups` on whatever group-size columns a table has (:data:`N_COLUMNS`).

    Columns holding one subject's value (:data:`EXTREME_COLUMNS`) are dropped. A row is suppressed
    when any of its group sizes is under ``k`` (accuracy among the females of a
    group is an aggregate over its females). A table without such a column is returned unchanged.

    Parameters
    ----------
    table
        A table of group results (metrics by subgroup, accuracy by TIV bin, ...).
    k
        Minimum group size.
    n_columns
        Candidate group-size columns.
    """
    table = table.drop(columns=[c for c in EXTREME_COLUMNS if c in table.columns])
    cols = [c for c in n_columns if c in table.columns]
    if not cols:
        return table
    eff = pd.concat([pd.to_numeric(table[c], errors="coerce") for c in cols], axis=1).min(axis=1)
    tmp = table.assign(_n_min=eff)
    keep = [c for c in table.columns if c not in cols and not pd.api.types.is_numeric_dtype(table[c])
            and not str(c).startswith(("value", "ci_", "accuracy", "balanced", "auc", "f1", "precision", "recall"))]
    out = suppress_small_groups(tmp, k, n_col="_n_min", keep=[*keep, *cols])
    small = out["_n_min"].astype(str).str.startswith("<")
    for c in cols:
        out[c] = out[c].astype(object)
        out.loc[small, c] = f"<{int(k)}" if small.any() else out.loc[small, c]
    return out.drop(columns="_n_min")


def group_summary(table: pd.DataFrame, columns: Sequence[str], by: Sequence[str] = (), k: int = 1) -> pd.DataFrame:
    """Mean, standard deviation and median of ``columns`` per group, groups under ``k`` suppressed.

    The replacement for a per-subject table: one row per group (or one row overall when ``by`` is
    empty) and statistic, never a single subject's value (no minimum or maximum).

    Parameters
    ----------
    table
        Per-subject rows.
    columns
        Numeric columns to summarise.
    by
        Grouping columns.
    k
        Minimum group size (:func:`suppress_small_groups`).
    """
    missing = [c for c in [*columns, *by] if c not in table.columns]
    if missing:
        raise BrainsexError(f"group_summary: columns {missing} not in the table (columns: {list(table.columns)})")
    groups = table.groupby(list(by), sort=True, dropna=False) if by else [((), table)]
    rows = []
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        for stat in ("mean", "sd", "median"):
            row: dict[str, Any] = dict(zip(by, key, strict=True))
            row.update({"statistic": stat, "n": len(g)})
            for c in columns:
                v = pd.to_numeric(g[c], errors="coerce")
                row[c] = {"mean": v.mean(), "sd": v.std(ddof=1), "median": v.median()}[stat]
            rows.append(row)
    out = pd.DataFrame(rows, columns=[*by, "statistic", "n", *columns])
    return suppress_small_groups(out, k, keep=[*by, "statistic"])


def reason_counts(reasons: Iterable[str], ids: Iterable[str] = (), label: str = "reason") -> pd.DataFrame:
    """How many subjects share each (scrubbed) reason: the public form of a list of failures or flags.

    Counts are the aggregate itself and are shown even when small; the reasons are passed through
    :func:`scrub_reason` so that no ID or file name survives.

    Parameters
    ----------
    reasons
        One reason per subject.
    ids
        Subject IDs to blank in the reasons.
    label
        Name of the reason column.
    """
    ids = list(ids)
    scrubbed = pd.Series([scrub_reason(r, ids) for r in reasons], dtype=object)
    if scrubbed.empty:
        return pd.DataFrame(columns=[label, "n"])
    return scrubbed.value_counts().rename_axis(label).rename("n").reset_index()


def quantile_summary(table: pd.DataFrame, value: str, by: Sequence[str], k: int = 1) -> pd.DataFrame:
    """10th, 25th, 50th, 75th and 90th percentiles of ``value`` per group, groups under ``k`` suppressed.

    The public form of a box plot with points: whiskers at the 10th and 90th percentiles instead of
    the extreme subjects.

    Parameters
    ----------
    table
        Per-subject rows.
    value
        The numeric column.
    by
        Grouping columns.
    k
        Minimum group size.
    """
    rows = []
    for key, g in table.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        v = pd.to_numeric(g[value], errors="coerce").dropna()
        row: dict[str, Any] = dict(zip(by, key, strict=True))
        row["n"] = len(v)
        for name, q in (("q10", 0.10), ("q25", 0.25), ("median", 0.5), ("q75", 0.75), ("q90", 0.90)):
            row[name] = float(v.quantile(q)) if len(v) else np.nan
        rows.append(row)
    out = pd.DataFrame(rows, columns=[*by, "n", "q10", "q25", "median", "q75", "q90"])
    return suppress_small_groups(out, k, keep=list(by))


def pool_small_groups(table: pd.DataFrame, column: str, k: int = DEFAULT_MIN_GROUP_SIZE) -> pd.DataFrame:
    """Relabel the groups of ``column`` with fewer than ``k`` rows as one pooled group.

    When the pool itself is under ``k``, the next smallest group joins it (complementary
    suppression), so that a total minus the shown groups cannot give a small group away. The pooled
    label (``"other datasets (pooled: 2)"``) is in ``attrs["pooled_label"]`` (``None`` when nothing
    was pooled).

    Parameters
    ----------
    table
        Per-subject rows.
    column
        The grouping column (e.g. ``dataset``).
    k
        Minimum group size.
    """
    out = table.copy()
    sizes = out[column].value_counts()
    pooled: set[Any] = set(sizes[sizes < int(k)].index)
    while pooled and sizes[list(pooled)].sum() < int(k) and len(pooled) < len(sizes):
        pooled.add(sizes.drop(list(pooled)).idxmin())
    label = f"other {column}s (pooled: {len(pooled)})" if pooled else None
    if pooled:
        out[column] = out[column].where(~out[column].isin(pooled), label)
    out.attrs["pooled_label"] = label
    return out


def binned_counts(values: Any, bins: int | Sequence[float] = 30, k: int = 1,
                  range_: tuple[float, float] | None = None) -> pd.DataFrame:
    """Histogram counts with every bin of 1 to ``k - 1`` subjects suppressed.

    Published histograms of a restricted cohort are drawn from this table (never from the raw values,
    which an interactive figure would otherwise embed in the page).

    Parameters
    ----------
    values
        One value per subject (missing values are dropped).
    bins
        Number of equal-width bins or their edges (``numpy.histogram``).
    k
        Minimum count of a shown bin; empty bins stay 0.
    range_
        (low, high) of the bins.

    Returns
    -------
    pandas.DataFrame
        ``left``, ``right``, ``center``, ``n`` (float; missing where suppressed), ``suppressed``.
    """
    v = pd.to_numeric(pd.Series(np.asarray(values).ravel()), errors="coerce").dropna().to_numpy(dtype=float)
    counts, edges = np.histogram(v, bins=bins, range=range_)
    small = (counts > 0) & (counts < int(k))
    n = np.where(small, np.nan, counts.astype(float))
    return pd.DataFrame({"left": edges[:-1], "right": edges[1:], "center": (edges[:-1] + edges[1:]) / 2,
                         "n": n, "suppressed": small})


def binned_counts_2d(x: Any, y: Any, bins: int | tuple[int, int] = 12, k: int = 1) -> dict[str, np.ndarray]:
    """A 2-D histogram (the public form of a scatter) with every cell of 1 to ``k - 1`` subjects blanked.

    Parameters
    ----------
    x, y
        One value per subject each (pairs with a missing value are dropped).
    bins
        Bins per axis.
    k
        Minimum count of a shown cell.

    Returns
    -------
    dict
        ``counts`` (x bins by y bins, float, NaN where suppressed), ``x_edges``, ``y_edges``,
        ``n_suppressed`` (subjects in suppressed cells).
    """
    xy = pd.DataFrame({"x": pd.to_numeric(pd.Series(np.asarray(x).ravel()), errors="coerce"),
                       "y": pd.to_numeric(pd.Series(np.asarray(y).ravel()), errors="coerce")}).dropna()
    counts, xe, ye = np.histogram2d(xy["x"].to_numpy(), xy["y"].to_numpy(), bins=bins)
    small = (counts > 0) & (counts < int(k))
    return {"counts": np.where(small, np.nan, counts), "x_edges": xe, "y_edges": ye,
            "n_suppressed": int(counts[small].sum())}


@dataclass
class QCAggregate:
    """The public QC view of a restricted cohort: mean and spread of the registered brains, flag counts."""

    mean: np.ndarray | None
    sd: np.ndarray | None
    n: int
    counts: pd.DataFrame
    note: str = ""


def qc_aggregate(slices: Sequence[np.ndarray], flagged: Sequence[bool], failed_reasons: Iterable[str] = (),
                 ids: Iterable[str] = (), k: int = DEFAULT_MIN_GROUP_SIZE,
                 flag_reason: str = "low similarity to the template") -> QCAggregate:
    """Voxel-wise mean and standard deviation of the registered subjects' slices, and flag counts.

    Parameters
    ----------
    slices
        The same 2-D slice of every registered subject (:func:`brainsex.preprocess.qc_mosaic_slices`
        with ``n`` = all subjects).
    flagged
        Per slice, whether its subject was flagged by the QC rule.
    failed_reasons
        Reasons of the subjects that failed preprocessing (scrubbed, counted).
    ids
        Subject IDs to blank in the reasons.
    k
        Minimum number of subjects for the mean and SD images to be shown.
    flag_reason
        Label of the flag in the counts table.

    Returns
    -------
    QCAggregate
        ``mean``/``sd`` are ``None`` (with a note) when fewer than ``k`` subjects were registered.
    """
    n = len(slices)
    fails = reason_counts(failed_reasons, ids)
    flags = pd.DataFrame([{"reason": f"flagged: {flag_reason}", "n": int(np.sum(np.asarray(flagged, bool)))}])
    counts = pd.concat([flags, fails.assign(reason="failed: " + fails["reason"].astype(str))], ignore_index=True)
    if n < int(k):
        return QCAggregate(None, None, n, counts, SUPPRESSED_NOTE.format(k=int(k)))
    stack = np.stack([np.asarray(s, dtype=np.float64) for s in slices])
    return QCAggregate(stack.mean(axis=0).astype(np.float32), stack.std(axis=0, ddof=1).astype(np.float32), n, counts)


# ------------------------------------------------------------------------------------ local-only outputs
def strip_local_outputs(nb: Any) -> int:
    """Remove, in place, the outputs of a notebook marked local only; return how many were removed.

    :func:`brainsex.figures.show` and :func:`brainsex.figures.show_table` with ``local_only=True``
    mark their output's metadata with :data:`LOCAL_ONLY_KEY`: the researcher's executed notebook keeps
    it, the published copy does not.

    Parameters
    ----------
    nb
        An ``nbformat`` notebook node.
    """
    removed = 0
    for cell in nb.cells:
        outputs = cell.get("outputs")
        if not outputs:
            continue
        keep = [o for o in outputs if not (o.get("metadata") or {}).get(LOCAL_ONLY_KEY)]
        removed += len(outputs) - len(keep)
        cell["outputs"] = keep
    return removed


# ------------------------------------------------------------------------------------ the guard
def _pattern(needles: Iterable[str]) -> re.Pattern[str] | None:
    items = sorted({n for n in needles if n}, key=len, reverse=True)
    if not items:
        return None
    return re.compile(r"(?<![A-Za-z0-9])(" + "|".join(re.escape(i) for i in items) + r")(?![A-Za-z0-9])",
                      re.IGNORECASE)


def scan_html(html_dir: str | Path, ids: set[str]) -> dict[str, list[str]]:
    """Pages (``*.html``) of ``html_dir`` that contain any of ``ids`` as whole tokens: ``{page: [ids]}``.

    Kept for the page-level check; :func:`scan_published` scans every file.

    Parameters
    ----------
    html_dir
        The built site.
    ids
        The IDs to look for (case-insensitive).
    """
    pattern = _pattern(ids)
    found: dict[str, list[str]] = {}
    if pattern is None:
        return found
    for page in sorted(Path(html_dir).rglob("*.html")):
        hits = sorted(set(pattern.findall(page.read_text(errors="ignore"))))
        if hits:
            found[str(page.relative_to(html_dir))] = hits
    return found


def _png_text(data: bytes) -> list[str]:
    """Texts of a PNG's ``tEXt``, ``zTXt`` and ``iTXt`` chunks."""
    out = []
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        try:
            if kind == b"tEXt":
                out.append(body.decode("latin-1"))
            elif kind == b"zTXt":
                key, _, rest = body.partition(b"\0")
                out.append(key.decode("latin-1") + " " + zlib.decompress(rest[1:]).decode("latin-1"))
            elif kind == b"iTXt":
                key, _, rest = body.partition(b"\0")
                flag, _method, rest = rest[0], rest[1], rest[2:]
                lang, _, rest = rest.partition(b"\0")
                tkey, _, text = rest.partition(b"\0")
                text = zlib.decompress(text) if flag else text
                out.append(" ".join(s.decode("utf-8", "ignore") for s in (key, lang, tkey, text)))
        except (zlib.error, IndexError):
            out.append(body.decode("latin-1"))
        if kind == b"IEND":
            break
    return out


_DATA_URI = re.compile(rb"data:[a-z]+/[a-z0-9.+-]+;base64,([A-Za-z0-9+/=\s\\n]{16,})")
_NB_IMAGE = re.compile(rb'"image/(?:png|jpeg|gif)"\s*:\s*"([A-Za-z0-9+/=\\n]{16,})"')
_MAX_DEPTH = 4
_TAG = re.compile(r"<[^>]*>")


def _texts(name: str, data: bytes, depth: int = 0) -> list[tuple[str, str]]:
    """``(where, text)`` pieces of one published file: itself, and what is packed inside it."""
    text = data.decode("utf-8", "replace")
    out = [(name, text)]
    if name.lower().endswith((".html", ".htm", ".xhtml", ".svg")) or "<span" in text[:100_000]:
        # text as the reader sees it: an ID split over highlighting spans or written with entities
        out.append((name, html.unescape(_TAG.sub("", text))))
    if depth >= _MAX_DEPTH:
        return out
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        out += [(f"{name} (PNG text)", t) for t in _png_text(data)]
    if data[:2] == b"\x1f\x8b":
        try:
            inner = gzip.decompress(data)
        except (OSError, EOFError, zlib.error):
            inner = b""
        if inner:
            out += _texts(f"{name} (gzip content)", inner, depth + 1)
    if data[:4] == b"PK\x03\x04" or name.lower().endswith(".zip"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                for info in zf.infolist():
                    where = f"{name}!{info.filename}"
                    out.append((where, info.filename))
                    if not info.is_dir():
                        out += _texts(where, zf.read(info), depth + 1)
        except zipfile.BadZipFile:
            pass
    for regex in (_DATA_URI, _NB_IMAGE):  # images embedded in HTML pages and notebook outputs
        for j, m in enumerate(regex.finditer(data)):
            try:
                blob = base64.b64decode(m.group(1).replace(b"\\n", b"").replace(b"\n", b""), validate=False)
            except (ValueError, TypeError):
                continue
            out += _texts(f"{name} (embedded image {j + 1})", blob, depth + 1)
    return out


def scan_published(site_dir: str | Path, needles: Iterable[str]) -> dict[str, list[str]]:
    """Every file of ``site_dir`` that names a protected subject: ``{file: [what was found]}``.

    Scans each file's path, its bytes (as UTF-8, which covers HTML, ``_sources``,
    notebooks, ``searchindex.js``, JavaScript and uncompressed image metadata), the text chunks of
    PNG images, images embedded as base64 in pages and notebooks, gzip content, and the names and
    contents of every zip archive (recursively). Matching is case-insensitive and on whole tokens
    (``S0002`` matches in ``S0002_T1w.nii.gz`` but not in ``S00021``).

    Parameters
    ----------
    site_dir
        The built site (the folder with ``index.html``).
    needles
        What to look for (:func:`protected_names`).
    """
    pattern = _pattern(needles)
    found: dict[str, list[str]] = {}
    if pattern is None:
        return found
    site = Path(site_dir)
    for path in sorted(p for p in site.rglob("*") if p.is_file()):
        rel = path.relative_to(site).as_posix()
        for where, text in [(rel, rel), *_texts(rel, path.read_bytes())]:
            hits = {h.lower() for h in pattern.findall(text)}
            if hits:
                found.setdefault(where, [])
                found[where] = sorted(set(found[where]) | hits)
    return found


def check_published(run_dir: str | Path, site_dir: str | Path, manifest: str | Path | None = None,
                    max_listed: int = 12) -> float:
    """Raise :class:`PrivacyError` if any file of the built site names a subject of a non-shareable cohort.

    Parameters
    ----------
    run_dir
        The run directory (its ``cohort/`` tables say who is protected).
    site_dir
        The built site, before it is published.
    manifest
        ``data_manifest.yaml``.
    max_listed
        How many offending files the message lists.

    Returns
    -------
    float
        Seconds the scan took (the build log reports it).
    """
    import time

    t0 = time.perf_counter()
    found = scan_published(site_dir, protected_names(run_dir, manifest))
    if found:
        items = list(found.items())
        lines = "; ".join(f"{f}: {', '.join(v[:3])}{' ...' if len(v) > 3 else ''}" for f, v in items[:max_listed])
        more = f"; and {len(items) - max_listed} more files" if len(items) > max_listed else ""
        raise PrivacyError(
            f"refusing to publish: subject IDs or file names of non-shareable cohorts appear in {len(items)} "
            f"published file(s) ({lines}{more}). Show only aggregate tables and maps for cohorts with "
            "'shareable: false'; the previous build was left in place."
        )
    return time.perf_counter() - t0


def check_published_html(run_dir: str | Path, html_dir: str | Path, manifest: str | Path | None = None) -> None:
    """Former name of :func:`check_published` (now every file is scanned, not only HTML pages).

    Parameters
    ----------
    run_dir
        The run directory.
    html_dir
        The built site.
    manifest
        ``data_manifest.yaml``.
    """
    check_published(run_dir, html_dir, manifest)
