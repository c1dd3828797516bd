"""Quality control relative to the cohort: outlier flags and clearly failed registrations.

The paper checks its preprocessing visually (section 2.2). A fixed similarity cutoff tuned on the
phantom rejects ordinary real heads: the phantom's registered brains correlate with the template at
about 0.7-0.9, real IXI heads at 0.39-0.61. This module therefore judges each subject against its own
cohort:

- :func:`robust_z` is the modified z-score of Iglewicz & Hoaglin (median and MAD), which a few bad
  subjects cannot drag along.
- :func:`qc_flags` flags subjects whose registration similarity, brain-mask volume, eTIV or the
  agreement of the two volume estimates (log eTIV / mask volume: two independent measurements of head
  size that disagree when a registration or a brain extraction went wrong) lies more than
  :data:`Z_LIMIT` robust standard deviations from the cohort. Flags are shown, never used to exclude.
- :func:`review_registrations` fails a subject only when its registration is clearly wrong: its
  similarity is below :data:`FAIL_FRACTION` of the cohort median, i.e. its image matches the
  template less than half as well as a typical head of the same cohort, scanner mix and grid.

``preprocess/qc_flags.tsv`` holds the flags; failed subjects are marked in ``preprocessed.tsv``
(``status`` failed, with the reason) so that later chapters leave them out.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from brainsex import BrainsexError
from brainsex.io import read_table, write_table
from brainsex.run import PreprocessDir

__all__ = ["Z_LIMIT", "FAIL_FRACTION", "QC_MEASURES", "robust_z", "qc_flags", "review_registrations",
           "PUBLISHED_TIV_RATIO", "tiv_sanity"]

#: Modified z-score beyond which a value is an outlier (Iglewicz & Hoaglin 1993 recommend 3.5).
Z_LIMIT = 3.5
#: A registration is clearly wrong when its similarity is below this fraction of the cohort median.
FAIL_FRACTION = 0.5
#: Measures flagged by :func:`qc_flags` (``volume_agreement`` is log(eTIV / mask volume)).
QC_MEASURES = ("similarity", "mask_ml", "etiv_ml", "volume_agreement")
#: Fewest subjects for cohort-relative statistics; smaller cohorts get no flags (and a note).
MIN_SUBJECTS = 5

#: Published female/male volume ratios, from the meta-analysis of Ruigrok et al. (2014, their Table 3):
#: intracranial volume 12 % larger in males (77 studies, about 15,000 people), global compartments from
#: 8.6 % (cerebellum) to 12.9 % (white matter) larger; as female/male ratios.
PUBLISHED_TIV_RATIO = {"icv": 1 / 1.12, "low": 1 / 1.129, "high": 1 / 1.086, "cite": "ruigrok2014meta"}


def robust_z(values: Sequence[float] | pd.Series | np.ndarray) -> np.ndarray:
    """Modified z-score: 0.6745 (x - median) / MAD (Iglewicz & Hoaglin 1993).

    Parameters
    ----------
    values : array-like
        Numbers; NaN stay NaN and are ignored for the median and MAD.

    Returns
    -------
    numpy.ndarray
        One score per value; all zeros when the MAD is 0 (no spread).
    """
    x = np.asarray(pd.to_numeric(pd.Series(np.asarray(values, dtype=object)), errors="coerce"), dtype=float)
    finite = np.isfinite(x)
    if not finite.any():
        return np.full(x.shape, np.nan)
    med = float(np.median(x[finite]))
    mad = float(np.median(np.abs(x[finite] - med)))
    if mad == 0:
        return np.where(finite, 0.0, np.nan)
    return 0.6745 * (x - med) / mad


def qc_flags(table: pd.DataFrame, z_limit: float = Z_LIMIT) -> pd.DataFrame:
    """Cohort-relative outlier flags of preprocessed subjects.

    Parameters
    ----------
    table : pandas.DataFrame
        ``preprocessed.tsv`` rows (participant_id, similarity, mask_ml, etiv_ml); only subjects with
        ``status`` ok (when the column exists) are scored.
    z_limit : float, default=:data:`Z_LIMIT`
        Robust z beyond which a measure is flagged.

    Returns
    -------
    pandas.DataFrame
        participant_id, ``z_<measure>`` for each of :data:`QC_MEASURES`, ``flagged`` (bool) and
        ``flag_reason`` (e.g. ``"eTIV high (z 4.1)"``; empty when not flagged). Cohorts smaller than
        :data:`MIN_SUBJECTS` get no flags (``attrs['note']`` says why).
    """
    need = {"participant_id", "similarity", "mask_ml", "etiv_ml"}
    missing = need - set(table.columns)
    if missing:
        raise BrainsexError(f"qc_flags: the preprocessed table lacks column(s) {sorted(missing)}")
    t = table if "status" not in table.columns else table[table["status"] == "ok"]
    t = t.reset_index(drop=True)
    out = pd.DataFrame({"participant_id": t["participant_id"].astype(str)})
    mask_ml = pd.to_numeric(t["mask_ml"], errors="coerce")
    etiv = pd.to_numeric(t["etiv_ml"], errors="coerce")
    measures = {"similarity": pd.to_numeric(t["similarity"], errors="coerce"), "mask_ml": mask_ml, "etiv_ml": etiv,
                "volume_agreement": np.log(etiv.where(etiv > 0) / mask_ml.where(mask_ml > 0))}
    names = {"similarity": "similarity", "mask_ml": "mask volume", "etiv_ml": "eTIV",
             "volume_agreement": "eTIV / mask volume"}
    small = len(t) < MIN_SUBJECTS
    reasons: list[list[str]] = [[] for _ in range(len(t))]
    for key, values in measures.items():
        z = robust_z(values) if not small else np.full(len(t), np.nan)
        out[f"z_{key}"] = np.round(z, 2)
        for i, zi in enumerate(z):
            if np.isfinite(zi) and abs(zi) > z_limit:
                reasons[i].append(f"{names[key]} {'high' if zi > 0 else 'low'} (z {zi:+.1f})")
    out["flagged"] = [bool(r) for r in reasons]
    out["flag_reason"] = ["; ".join(r) for r in reasons]
    if small:
        out.attrs["note"] = (f"{len(t)} preprocessed subject(s): too few for cohort-relative QC flags "
                             f"(need {MIN_SUBJECTS})")
    return out


def review_registrations(pre_dir: str | os.PathLike, fail_fraction: float = FAIL_FRACTION,
                         z_limit: float = Z_LIMIT) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fail clearly wrong registrations and flag outliers; rewrite ``preprocessed.tsv``.

    A subject fails when its similarity is below ``fail_fraction`` times the median similarity of the
    cohort's successfully preprocessed subjects (with fewer than :data:`MIN_SUBJECTS` of them, no
    subject is failed). Its row in ``preprocessed.tsv`` gets ``status`` failed and the reason; the
    flags of :func:`qc_flags` go to ``qc_flags.tsv``. Running it again gives the same result.

    Parameters
    ----------
    pre_dir : path
        The preprocessing folder (``<run_dir>/preprocess``) holding ``preprocessed.tsv``.
    fail_fraction : float, default=:data:`FAIL_FRACTION`
        Fraction of the cohort median below which a registration is failed.
    z_limit : float, default=:data:`Z_LIMIT`
        Passed to :func:`qc_flags`.

    Returns
    -------
    table, flags : pandas.DataFrame
        The updated ``preprocessed.tsv`` and the flags (with a ``failed`` column).
    """
    folder = PreprocessDir(pre_dir)
    path = folder.table
    table = read_table(path)
    table["reason"] = table["reason"].astype(object).where(table["reason"].notna(), "").astype(str)
    table["status"] = table["status"].astype(str)
    reason_fail = "registration clearly wrong"
    # a re-run judges again from the similarities, not from an earlier verdict
    previous = table["reason"].str.contains(reason_fail, regex=False)
    table.loc[previous, "status"] = "ok"
    table.loc[previous, "reason"] = ""
    ok = table["status"] == "ok"
    sim = pd.to_numeric(table["similarity"], errors="coerce")
    failed = pd.Series(False, index=table.index)
    if int(ok.sum()) >= MIN_SUBJECTS:
        median = float(sim[ok].median())
        cut = fail_fraction * median
        failed = ok & (sim < cut)
        table.loc[failed, "reason"] = [
            f"{reason_fail}: similarity {s:.3f} is below {fail_fraction:g} x the cohort median {median:.3f}"
            for s in sim[failed]]
        table.loc[failed, "status"] = "failed"
    flags = qc_flags(table.assign(status=np.where(failed, "ok", table["status"])), z_limit=z_limit)
    flags["failed"] = flags["participant_id"].isin(set(table.loc[failed, "participant_id"].astype(str)))
    write_table(table, path)
    write_table(flags, folder.qc_flags)
    return table, flags


def tiv_sanity(table: pd.DataFrame, tiv_col: str = "etiv_ml") -> dict[str, Any]:
    """Mean TIV (``tiv_col``) by sex and the female/male ratio, next to :data:`PUBLISHED_TIV_RATIO`.

    Parameters
    ----------
    table : pandas.DataFrame
        Subjects with ``sex`` (F/M), ``mask_ml`` and ``tiv_col``.
    tiv_col : str, default="etiv_ml"
        The TIV column.

    Returns
    -------
    dict
        ``mean_f``, ``sd_f``, ``mean_m``, ``sd_m`` (ml), ``ratio`` (female/male mean), ``published_icv``,
        ``published_low``, ``published_high``, ``within`` (bool: inside low-high), ``r_mask`` (Pearson r of the TIV with the mask volume),
        ``n_f``, ``n_m``; NaN where a sex is missing.
    """
    t = table[pd.to_numeric(table[tiv_col], errors="coerce").notna()]
    f = pd.to_numeric(t.loc[t["sex"] == "F", tiv_col])
    m = pd.to_numeric(t.loc[t["sex"] == "M", tiv_col])
    ratio = float(f.mean() / m.mean()) if len(f) and len(m) else float("nan")
    both = t[[tiv_col, "mask_ml"]].apply(pd.to_numeric, errors="coerce").dropna()
    r = float(np.corrcoef(both[tiv_col], both["mask_ml"])[0, 1]) if len(both) > 2 else float("nan")
    lo, hi = PUBLISHED_TIV_RATIO["low"], PUBLISHED_TIV_RATIO["high"]
    return {"n_f": len(f), "n_m": len(m), "mean_f": float(f.mean()) if len(f) else float("nan"),
            "sd_f": float(f.std()) if len(f) > 1 else float("nan"),
            "mean_m": float(m.mean()) if len(m) else float("nan"),
            "sd_m": float(m.std()) if len(m) > 1 else float("nan"), "ratio": ratio,
            "published_icv": PUBLISHED_TIV_RATIO["icv"], "published_low": lo,
            "published_high": hi, "within": bool(lo <= ratio <= hi) if np.isfinite(ratio) else False, "r_mask": r}


def strip_sample_slices(participants: pd.DataFrame, qc: pd.DataFrame, n: int = 8, seed: int = 0
                        ) -> tuple[list[np.ndarray], list[str]]:
    """Mid-sagittal slices of native scans with the brain mask preprocessing used, for a sample.

    Inside the mask the scan is shown as it is; outside it is dimmed to a quarter, so a mask that
    cuts brain or keeps skull is visible at a glance.

    Parameters
    ----------
    participants : pandas.DataFrame
        ``cohort/participants.tsv`` (participant_id, image).
    qc : pandas.DataFrame
        ``preprocess/qc.tsv`` (participant_id, status, mask_native).
    n : int, default=8
        Sample size (seeded).
    seed : int, default=0
        Seed of the sample.

    Returns
    -------
    slices, names
        2D arrays and participant IDs.
    """
    import nibabel as nib

    from brainsex.preprocess import load_t1

    ok = qc[(qc["status"] == "ok") & qc["mask_native"].notna()][["participant_id", "mask_native"]]
    t = participants[["participant_id", "image"]].astype({"participant_id": str}).merge(
        ok.astype({"participant_id": str}), on="participant_id")
    if t.empty:
        return [], []
    pick = t.sample(n=min(n, len(t)), random_state=seed).sort_values("participant_id")
    slices, names = [], []
    for row in pick.itertuples(index=False):
        img = np.asarray(load_t1(row.image).dataobj, dtype=np.float32)
        mask = np.asarray(nib.load(row.mask_native).dataobj) > 0
        if img.shape != mask.shape:
            continue
        x = img.shape[0] // 2
        sl = img[x] * np.where(mask[x], 1.0, 0.25)
        slices.append(sl)
        names.append(str(row.participant_id))
    return slices, names
