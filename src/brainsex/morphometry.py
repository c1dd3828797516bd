"""Tensor-based morphometry: the validity chapter's positive control (paper section 2.5, tested).

A classical voxel-free morphometry on the phantom: the log-Jacobian determinant of each subject's
non-linear warp to the template (:func:`brainsex.registration.tbm_transform`, or the saliency
chapter's :func:`brainsex.registration.nonlinear_transform`), averaged in each atlas region and tested
between the sexes with TIV as a covariate (:func:`brainsex.atlas.region_group_test`). On a phantom
with planted volume effects it must find them; if it does not, the phantom or the warps are wrong.

- :func:`log_jacobian_map`, :func:`tbm_region_means`, :func:`tbm_region_test` -- registered warps;
- :func:`phantom_log_jacobians` -- the phantom's *true* deformations (perfect warps), read from the
  generator's named draws (:func:`brainsex.synthetic.subject_draws`);
- :func:`region_test_table` -- the group test of any subjects x regions table, as a ranking;
- :func:`positive_control` -- all of these on one phantom, with the rankings scored against the
  planted regions (:mod:`brainsex.ranking`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainsex import BrainsexError
from brainsex._docs import fill_doc
from brainsex.atlas import label_ids, labels_on, region_group_test, region_means
from brainsex.io import is_image
from brainsex.ranking import planted_recovery, ranking_report, select_scans
from brainsex.registration import TBM_SYN, log_jacobian, nonlinear_transform, set_threads, tbm_transform

__all__ = [
    "TBM_SYN",
    "log_jacobian_map",
    "tbm_region_means",
    "tbm_region_test",
    "phantom_log_jacobians",
    "region_test_table",
    "PositiveControl",
    "PERFECT_ALL",
    "PERFECT_SAMPLE",
    "WARP_NAMES",
    "positive_control",
]

def log_jacobian_map(image: Any, template: Any, cache_prefix: str | os.PathLike, warps: str = "tbm") -> np.ndarray:
    """Log det of the Jacobian of one subject's non-linear warp to the template (tensor-based morphometry).

    The warp is the SyN part of :func:`tbm_transform` (``warps="tbm"``, the default) or the saliency
    chapter's warp (:func:`brainsex.registration.nonlinear_transform` with its defaults,
    ``warps="shared"``; too coarse to see the planted effects, see :data:`TBM_SYN`), cached under
    ``cache_prefix``. Its displacement field lives on the template grid and maps template points into the (affinely
    aligned) subject, so ``ants.create_jacobian_determinant_image(..., do_log=True)`` is the log of
    the subject's local volume relative to the template, after the affine part (head size) is removed:
    positive where the subject's structure is larger.

    Parameters
    ----------
    image
        The subject's preprocessed image (path or nibabel image) -- the moving image of the warp.
    template
        The template image (the fixed image; defines the output grid).
    cache_prefix
        Prefix of the cached transform files (``<cache_dir>/<participant_id>_``).
    warps
        ``"tbm"`` or ``"shared"`` (see above).

    Returns
    -------
    numpy.ndarray
        float32 map on the template grid.
    """
    import nibabel as nib

    moving = nib.load(str(image)) if isinstance(image, str | os.PathLike) else image
    if warps == "tbm":
        transforms = tbm_transform(moving, template, cache_prefix)
    elif warps == "shared":
        transforms = nonlinear_transform(moving, template, cache_prefix)
    else:
        raise BrainsexError(f"warps={warps!r}: expected 'tbm' or 'shared'")
    warp = [t for t in transforms if str(t).endswith("warp.nii.gz")]
    if not warp:
        raise BrainsexError(f"{cache_prefix}: the cached transform has no displacement field (affine only?); "
                            "tensor-based morphometry needs the non-linear warp")
    out = log_jacobian(template, warp[0])
    if out.shape != tuple(template.shape[:3]):
        raise BrainsexError(f"log-Jacobian of {cache_prefix} has shape {out.shape}, expected the template's "
                            f"{tuple(template.shape[:3])}")
    if not np.isfinite(out).all():
        raise BrainsexError(f"{warp[0]}: the warp folds (non-positive Jacobian); recompute it (recompute=True)")
    return out


def _tbm_one(image: str, template: Any, prefix: str, lab: np.ndarray, ids: list[int], warps: str) -> np.ndarray:
    """Region means of one subject's log-Jacobian (a joblib task)."""
    set_threads(1)
    return region_means(log_jacobian_map(image, template, prefix, warps=warps), lab, ids)


@fill_doc
def tbm_region_means(
    table: pd.DataFrame,
    template: Any,
    atlas: Any,
    labels: pd.DataFrame | Sequence[int] | None,
    cache_dir: str | os.PathLike,
    image_col: str = "image_pp",
    n_jobs: int = 1,
    progress: bool = True,
    warps: str = "tbm",
) -> pd.DataFrame:
    """Mean log-Jacobian (:func:`log_jacobian_map`) of every subject in every atlas region.

    Subjects are processed in parallel (joblib, one ITK thread each); only the region means travel
    back, so memory does not grow with the number of subjects. Transforms are cached per subject in
    ``cache_dir`` (the saliency chapter's ``<run_dir>/preprocess/warps``), in the entries ``<participant_id>_tbm-<key>/``
    for ``warps="tbm"`` (:func:`brainsex.registration.tbm_transform`), the saliency warps themselves for ``warps="shared"``.

    Parameters
    ----------
    table : pandas.DataFrame
        Subjects: ``participant_id`` and ``image_col``.
    template : nibabel image
        The template (the warps' fixed image).
    atlas : nibabel image or array
        Label atlas, resampled to the template grid when needed.
    labels : pandas.DataFrame or sequence of int or None
        Label table (``label`` column) or label ids; None: every non-zero label of the atlas.
    cache_dir : path
        Folder of the cached transforms.
    image_col : str, default="image_pp"
        Column of the subjects' (preprocessed) images.
    n_jobs : int, default=1
        Parallel subjects (joblib).
    progress : bool, default=True
        %(progress)s
    warps : {"tbm", "shared"}, default="tbm"
        Which cached transforms to use (see above).

    Returns
    -------
    pandas.DataFrame
        Subjects (index: ``participant_id``) x label ids; NaN for a label with no voxel on the grid.
    """
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    for col in ("participant_id", image_col):
        if col not in table.columns:
            raise BrainsexError(f"tbm: the table has no '{col}' column")
    if len(table) == 0:
        raise BrainsexError("tbm: the table of subjects is empty")
    if not is_image(template):
        raise BrainsexError("template: expected a nibabel image (the fixed image of the warps)")
    lab = labels_on(atlas, template)
    ids = label_ids(labels, lab)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    tasks = [delayed(_tbm_one)(str(img), template, str(cache / f"{pid}_"), lab, ids, warps)
             for pid, img in zip(table["participant_id"], table[image_col], strict=True)]
    if n_jobs == 1:
        rows = [t[0](*t[1], **t[2]) for t in tqdm(tasks, desc="log-Jacobians", disable=not progress, leave=False)]
    else:
        rows = list(tqdm(Parallel(n_jobs=n_jobs, return_as="generator")(tasks), total=len(tasks),
                         desc="log-Jacobians", disable=not progress, leave=False))
    out = pd.DataFrame(np.vstack(rows), columns=ids, index=pd.Index(table["participant_id"].astype(str),
                                                                   name="participant_id"))
    return out


@fill_doc
def tbm_region_test(
    table: pd.DataFrame,
    template: Any,
    atlas: Any,
    labels: pd.DataFrame,
    cache_dir: str | os.PathLike,
    tiv_col: str | None = "etiv_ml",
    n_jobs: int = 1,
    image_col: str = "image_pp",
    sex_col: str = "sex",
    alpha: float = 0.05,
    progress: bool = True,
    warps: str = "tbm",
    max_subjects: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Tensor-based morphometry: test which regions differ in volume between males and females.

    For every subject the log-Jacobian of its SyN warp to the template (:func:`log_jacobian_map`) is
    averaged within each atlas region (:func:`tbm_region_means`); then each region is tested with
    ``value ~ 1 + male + TIV`` (:func:`brainsex.atlas.region_group_test`; Benjamini-Hochberg q-values).
    The warp's affine part is not in the Jacobian, so the values are volumes relative to the whole
    head; TIV is a covariate as well, as in the paper's TIV analysis (section 2.6).

    Parameters
    ----------
    table
        Subjects: ``participant_id``, ``sex_col`` ('M'/'F'), ``image_col`` and ``tiv_col``
        (``preprocess/preprocessed.tsv``). Rows whose ``status`` is not ``ok`` and rows without a TIV
        are left out (counted in ``attrs``).
    template, atlas, labels
        The template image (warps' fixed image), the atlas (image, resampled to the template grid) and
        its label table.
    cache_dir
        Folder of the cached warps (``<run_dir>/preprocess/warps``, shared with the saliency chapter).
    tiv_col
        Covariate column; None for no covariate.
    n_jobs
        Parallel registrations.
    image_col
        Column of the preprocessed images.
    sex_col
        Column of the sex labels.
    alpha
        FDR level of the ``significant`` column.
    progress
        %(progress)s
    warps
        ``"tbm"`` (:func:`tbm_transform`, default) or ``"shared"`` (the saliency warps).
    max_subjects, seed
        Test at most this many subjects, drawn at random (``seed``) with the two sexes balanced as far
        as possible (registration is the cost: a few seconds per subject); None: everyone.

    Returns
    -------
    pandas.DataFrame
        One row per label: ``label``, ``coef_male`` (difference in mean log-Jacobian, male - female:
        about the log volume ratio), ``se``, ``t``, ``p``, ``q``, ``significant``, ``n``, label-table
        columns, ``n_voxels`` (on the template grid) and ``rank``; sorted by ``|t|`` descending, regions
        with no voxel last. ``attrs``: ``n_subjects``, ``n_excluded``, ``sample`` (the participant ids).
    """
    need = {"participant_id", sex_col, image_col} | ({tiv_col} if tiv_col else set())
    missing = need - set(table.columns)
    if missing:
        raise BrainsexError(f"tbm_region_test: the table lacks column(s) {sorted(missing)}")
    keep = pd.Series(True, index=table.index)
    if "status" in table.columns:
        keep &= table["status"].astype(str) == "ok"
    if tiv_col:
        keep &= pd.to_numeric(table[tiv_col], errors="coerce").notna()
    used = table[keep].reset_index(drop=True)
    if used[sex_col].nunique() < 2:
        raise BrainsexError("tbm_region_test: both sexes are needed for a group test")
    if max_subjects is not None and len(used) > int(max_subjects):
        used = select_scans(used.drop(columns=[c for c in ("y_true", "y_pred") if c in used.columns]),
                            max_scans=int(max_subjects), seed=seed, sex_col=sex_col)
    values = tbm_region_means(used, template, atlas, labels, cache_dir, image_col=image_col, n_jobs=n_jobs,
                              progress=progress, warps=warps)
    result = region_test_table(values, used, atlas, labels, template, tiv_col=tiv_col, sex_col=sex_col, alpha=alpha)
    result.attrs.update({"n_subjects": len(used), "n_excluded": int((~keep).sum()),
                         "sample": used["participant_id"].astype(str).tolist()})
    return result


@fill_doc
def phantom_log_jacobians(
    phantom_dir: str | os.PathLike,
    atlas: Any,
    labels: pd.DataFrame | Sequence[int] | None = None,
    participants: Sequence[str] | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """The phantom's *true* regional log-Jacobians: what a perfect registration would measure.

    Each subject's non-linear deformation (its individual random warp, the planted sex effect and the
    age-dependent ventricle enlargement; :mod:`brainsex.synthetic`) is read from the phantom
    (:meth:`brainsex.synthetic.PhantomTruth.draws`), and its log-Jacobian (log of the
    subject's local volume relative to the template, before head-size scaling) averaged per region on
    the template grid. :func:`brainsex.atlas.region_group_test` on these values is tensor-based
    morphometry with perfect warps: it separates "the phantom or the test is wrong" from "the warps
    are too coarse".

    Parameters
    ----------
    phantom_dir
        The phantom's root (``<run_dir>/cohort/phantom``).
    atlas, labels
        Atlas image on the phantom's template grid (resampled if needed) and its label table.
    participants
        Participant ids to rebuild (default: all).
    progress
        %(progress)s

    Returns
    -------
    pandas.DataFrame
        Subjects (index ``participant_id``) x label ids (NaN for labels with no voxel).
    """
    from tqdm.auto import tqdm

    from brainsex import templates
    from brainsex.synthetic import phantom_truth

    truth = phantom_truth(phantom_dir)
    vs = truth.voxel_size
    shape, affine = templates.target_grid(vs)
    ref = __import__("nibabel").Nifti1Image(np.zeros(shape, np.float32), affine)
    lab = labels_on(atlas, ref)
    ids = label_ids(labels, lab)
    every = truth.participants["participant_id"].astype(str).tolist()
    wanted = every if participants is None else [str(p) for p in participants]
    missing = sorted(set(wanted) - set(every))[:5]
    if missing:
        raise BrainsexError(f"participants {missing} are not in the phantom at {phantom_dir}")
    rows, index = [], []
    for pid in tqdm([p for p in every if p in set(wanted)], desc="true Jacobians", disable=not progress, leave=False):
        rows.append(region_means(truth.draws(pid).log_jacobian(), lab, ids))  # the generator's deformation
        index.append(pid)
    return pd.DataFrame(np.vstack(rows), columns=ids, index=pd.Index(index, name="participant_id"))


def region_test_table(values: pd.DataFrame, table: pd.DataFrame, atlas: Any, labels: pd.DataFrame,
                      template: Any, tiv_col: str | None = "etiv_ml", sex_col: str = "sex",
                      alpha: float = 0.05) -> pd.DataFrame:
    """Region-wise sex test of subjects x regions ``values``, as a ranking like :func:`tbm_region_test`'s.

    :func:`brainsex.atlas.region_group_test` (``value ~ 1 + male + TIV``, Benjamini-Hochberg), with
    ``n_voxels`` on the template grid and ``rank``; regions with no voxel go last.

    Parameters
    ----------
    values : pandas.DataFrame
        Subjects (index: ``participant_id``) x label ids, e.g. :func:`tbm_region_means`.
    table : pandas.DataFrame
        Subjects with ``participant_id``, ``sex_col`` and ``tiv_col``; every row of ``values`` must be in it.
    atlas : nibabel image or array
        Label atlas (resampled to ``template``'s grid for the voxel counts).
    labels : pandas.DataFrame
        Label table of the atlas.
    template : nibabel image
        The template grid the voxels are counted on.
    tiv_col : str or None, default="etiv_ml"
        Covariate column; None for no covariate.
    sex_col : str, default="sex"
        Column of the sex labels.
    alpha : float, default=0.05
        FDR level of the ``significant`` column.

    Returns
    -------
    pandas.DataFrame
        The :func:`brainsex.atlas.region_group_test` table plus ``n_voxels`` and ``rank``;
        ``attrs["n_subjects"]``.
    """
    t = table.assign(participant_id=table["participant_id"].astype(str)).set_index("participant_id")
    missing = [i for i in values.index if i not in t.index]
    if missing:
        raise BrainsexError(f"region_test_table: subjects {missing[:5]} are not in the table")
    t = t.loc[list(values.index)]
    tiv = pd.to_numeric(t[tiv_col]).to_numpy() if tiv_col else None
    result = region_group_test(values, t[sex_col], tiv=tiv, labels=labels, alpha=alpha)
    lab = labels_on(atlas, template)
    counts = np.bincount(lab.ravel(), minlength=int(result["label"].max()) + 1)
    result["n_voxels"] = counts[result["label"].astype(int).to_numpy()]
    result = result.assign(_present=result["n_voxels"] > 0).sort_values(
        "_present", ascending=False, kind="mergesort").drop(columns="_present").reset_index(drop=True)
    result["rank"] = np.arange(1, len(result) + 1)
    result.attrs.update({"n_subjects": len(values)})
    return result


@dataclass
class PositiveControl:
    """Tensor-based morphometry run several ways on the same phantom (:func:`positive_control`).

    Attributes
    ----------
    tables
        Version name -> region test table (:func:`region_test_table`), in display order.
    reports
        Version name -> :func:`ranking_report` against the planted regions.
    recoveries
        Version name -> :func:`planted_recovery`.
    coef
        Planted regions on the grid (index: label) x versions: the TIV-adjusted male - female
        difference in mean log-Jacobian each version measures.
    agreement
        Median over regions of the across-subject correlation of registered and true regional
        log-Jacobians (NaN without a registered version).
    ratio
        Median over the planted regions of (registered coefficient / true coefficient) on the same
        subjects: the share of the planted difference the registered warps carry (NaN without one).
    """

    tables: dict[str, pd.DataFrame]
    reports: dict[str, pd.DataFrame]
    recoveries: dict[str, pd.DataFrame]
    coef: pd.DataFrame
    agreement: float
    ratio: float

    def summary(self, k: int = 10) -> pd.DataFrame:
        """One row per version: subjects, planted regions recovered, precision@k and AP with chance.

        Parameters
        ----------
        k : int, default=10
            The cut-off of the precision column's label (the reports were computed with their own ``k``).

        Returns
        -------
        pandas.DataFrame
            One row per version, in display order.
        """
        rows = []
        for name, res in self.tables.items():
            rep, rec = self.reports[name].iloc[0], self.recoveries[name]
            rows.append({"morphometry with": name, "subjects": int(res.attrs.get("n_subjects", np.nan)),
                         "planted recovered": int(rec["recovered"].sum()), f"planted in top {k}": int(rep["hits_at_k"]),
                         f"P@{k}": round(float(rep["precision_at_k"]), 2),
                         f"P@{k} chance": round(float(rep["precision_at_k_chance"]), 2),
                         f"P@{k} p": float(rep["precision_at_k_p"]),
                         "AP": round(float(rep["average_precision"]), 2),
                         "AP chance": round(float(rep["average_precision_chance"]), 2),
                         "significant regions": int(res["significant"].sum())})
        return pd.DataFrame(rows)


#: Names of the versions :func:`positive_control` runs.
PERFECT_ALL, PERFECT_SAMPLE = "perfect warps, everyone", "perfect warps, same sample"


WARP_NAMES = {"tbm": "morphometry warps (registered)", "shared": "saliency chapter's warps (registered)"}


def positive_control(
    table: pd.DataFrame,
    phantom_dir: str | os.PathLike,
    template: Any,
    atlas: Any,
    labels: pd.DataFrame,
    truth: pd.DataFrame,
    cache_dir: str | os.PathLike,
    warps: Sequence[str] = ("tbm",),
    max_subjects: int | None = 24,
    tiv_col: str = "etiv_ml",
    n_jobs: int = 1,
    n_perm: int = 1000,
    k: int = 10,
    neighbours: Any = None,
    seed: int = 0,
    progress: bool = False,
) -> PositiveControl:
    """The validity chapter's positive control: tensor-based morphometry with perfect and registered warps.

    With the phantom's true deformations (:func:`phantom_log_jacobians`) on every usable subject, the
    per-region test (:func:`region_test_table`) checks the phantom and the statistics; with registered
    warps (:func:`tbm_region_test`, one version per entry of ``warps``) on a random, sex-balanced
    sample of ``max_subjects`` it measures what registration keeps of the planted differences, and the
    perfect warps on that same sample give the fair comparison (same subjects, same power).

    Parameters
    ----------
    table
        Preprocessed subjects (``preprocessed.tsv``): rows with ``status == 'ok'`` and a TIV are used.
    phantom_dir
        The phantom's root (``<run_dir>/cohort/phantom``).
    template, atlas, labels, truth
        Template and atlas on the analysis grid; planted regions (:func:`planted_truth`).
    cache_dir
        Where warps are cached (shared with the saliency chapter).
    warps
        Registered versions to run: ``"tbm"`` (:data:`TBM_SYN`) and/or ``"shared"``; empty for none.
    max_subjects
        Sample size of the registered versions (registration costs seconds per subject); 0 for none,
        None for everyone (then the "same sample" version repeats the perfect warps on everyone).
    tiv_col, n_jobs, n_perm, k, neighbours, seed, progress
        As in :func:`tbm_region_test` and :func:`ranking_report`.

    Returns
    -------
    PositiveControl
    """
    ok = table
    if "status" in ok.columns:
        ok = ok[ok["status"] == "ok"]
    ok = ok[pd.to_numeric(ok[tiv_col], errors="coerce").notna()].reset_index(drop=True)
    if ok.empty:
        raise BrainsexError(f"positive_control: no subject with status 'ok' and a value in {tiv_col!r}")
    true_vals = phantom_log_jacobians(phantom_dir, atlas, labels, participants=ok["participant_id"].astype(str).tolist(),
                                      progress=progress)
    tables = {PERFECT_ALL: region_test_table(true_vals, ok, atlas, labels, template, tiv_col=tiv_col)}
    sample: list[str] = []
    registered: dict[str, pd.DataFrame] = {}
    for w in (warps if max_subjects is None or max_subjects > 0 else ()):
        if w not in WARP_NAMES:
            raise BrainsexError(f"positive_control: warps must be among {sorted(WARP_NAMES)}, got {w!r}")
        res = tbm_region_test(ok, template, atlas, labels, cache_dir, tiv_col=tiv_col, n_jobs=n_jobs, progress=progress,
                              warps=w, max_subjects=max_subjects, seed=seed)
        sample = res.attrs["sample"]
        tables[WARP_NAMES[w]] = res
        registered[w] = res
    if sample:
        tables[PERFECT_SAMPLE] = region_test_table(true_vals.loc[sample], ok, atlas, labels, template, tiv_col=tiv_col)
    reports = {name: ranking_report(res, truth, neighbours=neighbours, n_perm=n_perm, seed=seed, k=k)
               for name, res in tables.items()}
    recoveries = {name: planted_recovery(res, truth, k=k) for name, res in tables.items()}
    on_grid = [int(lab) for lab in truth["label"] if lab in true_vals.columns and true_vals[lab].notna().all()]
    coef = pd.DataFrame({name: res.set_index("label")["coef_male"].reindex(on_grid) for name, res in tables.items()})
    coef.index.name = "label"
    agreement = ratio = float("nan")
    if registered:
        first = next(iter(registered))
        est = tbm_region_means(ok.set_index(ok["participant_id"].astype(str)).loc[sample].reset_index(drop=True),
                               template, atlas, labels, cache_dir, n_jobs=n_jobs, progress=False, warps=first)
        cols = [c for c in est.columns if c in true_vals.columns and est[c].notna().all() and est[c].std() > 0]
        if cols:
            agreement = float(np.median([np.corrcoef(est[c], true_vals.loc[est.index, c])[0, 1] for c in cols]))
        ratio = float((coef[WARP_NAMES[first]] / coef[PERFECT_SAMPLE]).median())
    return PositiveControl(tables=tables, reports=reports, recoveries=recoveries, coef=coef, agreement=agreement,
                           ratio=ratio)
