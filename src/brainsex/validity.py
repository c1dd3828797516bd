"""Validity: does the saliency method find what is really there?

The paper reads its ten top atlas regions (section 2.5, Table S1, Figure 7) as the regions the model
uses to tell the sexes apart. On the synthetic phantom the planted sex differences are known
(``ground_truth/regions.tsv``), so this module *measures* how well a region ranking recovers them
instead of assuming it:

- :func:`planted_truth` reads the planted regions (atlas label, sign, volume and contrast effect).
- :func:`truth_map_ranking` ranks regions by the phantom's own effect map: what a perfect region-level
  detector would find on this grid (its ceiling; a planted region with no voxel on a coarse atlas
  cannot be found by any method).
- :func:`tbm_region_test` is the **positive control**, a classical tensor-based morphometry: the
  log-Jacobian determinant of each subject's non-linear (ANTs SyN) warp to the template, averaged in
  each atlas region and tested between the sexes with TIV as a covariate
  (:func:`brainsex.atlas.region_group_test`). On a phantom with planted volume effects it must find
  them; if it does not, the phantom or the warps are wrong.
- :func:`ranking_report` scores a ranking against the planted set: precision@k and average
  precision, strict and tolerant (a planted region's neighbours within one voxel count), each with its
  chance level and p-value from a permutation null (:func:`brainsex.atlas.permutation_null`).
- :func:`compare_methods` runs the attribution methods on one trained model (plain gradient, absolute
  and signed, SmoothGrad, Integrated Gradients, occlusion of atlas regions), scores each with the
  paper's weighted saliency score and with the plain regional mean, and reports all of them.
- :func:`study` (command line ``python -m brainsex.validity study``) repeats the comparison over
  phantoms with other effect types (volume / intensity), grid resolutions and z-score variants; too
  heavy for the demo book, it writes a table the book shows when it is present.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainsex import BrainsexError
from brainsex.atlas import (
    _is_image,
    average_precision,
    permutation_null,
    precision_at_k,
    region_group_test,
    region_neighbours,
    region_scores,
    resample_atlas_to,
)
from brainsex.saliency import _as_array, average_maps, occlusion_by_region, template_space_maps

__all__ = [
    "DL_METHODS",
    "SCORINGS",
    "planted_truth",
    "has_truth",
    "truth_map_ranking",
    "registration_image",
    "TBM_SYN",
    "tbm_transform",
    "log_jacobian_map",
    "tbm_region_means",
    "tbm_region_test",
    "phantom_log_jacobians",
    "region_test_table",
    "PositiveControl",
    "positive_control",
    "planted_recovery",
    "ranking_report",
    "report_long",
    "select_scans",
    "method_rankings",
    "compare_methods",
    "reference_zscore",
    "study",
    "main",
]

#: Attribution methods :func:`compare_methods` knows.
DL_METHODS = ("saliency", "saliency_signed", "smoothgrad", "integrated_gradients", "occlusion")
#: Ways of turning an average map into a ranking: the paper's weighted saliency score, the plain mean.
SCORINGS = ("weighted_score", "mean_saliency")
#: Occlusion gives region values directly: the mean |change of the male logit| over scans, and the
#: same divided by the region's voxel count (comparable to a mean saliency).
OCCLUSION_SCORINGS = ("abs_delta", "abs_delta_per_voxel")

_METRICS = ("precision_at_k", "average_precision", "precision_at_k_tolerant", "average_precision_tolerant")


# --------------------------------------------------------------------------------------------------
# the truth
# --------------------------------------------------------------------------------------------------
def planted_truth(source: str | os.PathLike) -> pd.DataFrame:
    """The planted regions of a phantom: ``ground_truth/regions.tsv``.

    Parameters
    ----------
    source
        The file itself, the phantom's root folder (holding ``ground_truth/``) or a run directory
        (``<run_dir>/cohort/phantom/ground_truth/regions.tsv``).

    Returns
    -------
    pandas.DataFrame
        One row per planted region: ``label`` (int), ``name``, ``sign`` (+1 larger in males), ``effect``
        (signed volume effect), ``contrast`` (signed intensity effect; 0 when absent) and the other
        columns of the file.
    """
    p = Path(source)
    candidates = [p, p / "ground_truth" / "regions.tsv", p / "cohort" / "phantom" / "ground_truth" / "regions.tsv"]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise BrainsexError(f"{source}: no planted-region table (looked for {', '.join(str(c) for c in candidates)}); "
                            "the validity checks need the synthetic phantom's ground truth")
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


def has_truth(run_dir: str | os.PathLike) -> bool:
    """Whether a run knows the true sex differences of its cohort (a phantom run) or not (real scans).

    True when ``<run_dir>/cohort/phantom/ground_truth/regions.tsv`` exists *and* every subject of
    ``<run_dir>/cohort/participants.tsv`` is a scan of that phantom: a run directory reused for a real
    cohort after a phantom build keeps the old truth on disk, which must not be read as this run's.

    Parameters
    ----------
    run_dir : path
        The run directory.

    Returns
    -------
    bool
    """
    run = Path(run_dir)
    phantom = (run / "cohort" / "phantom").resolve()
    if not (phantom / "ground_truth" / "regions.tsv").is_file():
        return False
    table_path = run / "cohort" / "participants.tsv"
    if not table_path.is_file():
        return False
    images = pd.read_csv(table_path, sep="\t", usecols=["image"])["image"].astype(str)
    if images.empty:
        return False
    return bool(images.map(lambda im: Path(im).resolve().is_relative_to(phantom)).all())


def _atlas_on(atlas: Any, reference: Any) -> np.ndarray:
    """Integer label array on ``reference``'s grid (an image, resampled nearest-neighbour, or an array)."""
    if _is_image(atlas) and _is_image(reference):
        atlas = resample_atlas_to(atlas, reference)
    lab = _as_array(atlas, "atlas")
    shape = tuple(reference.shape[:3]) if hasattr(reference, "shape") else None
    if shape is not None and lab.shape != shape:
        raise BrainsexError(f"atlas: shape {lab.shape} differs from the template grid {shape}; pass nibabel images "
                            "so that the atlas can be resampled")
    if not np.allclose(lab, np.rint(lab)):
        raise BrainsexError("atlas: labels must be integers")
    return np.rint(lab).astype(np.int64)


def _label_ids(labels: pd.DataFrame | Sequence[int] | None, lab: np.ndarray) -> list[int]:
    if labels is None:
        return [int(v) for v in np.unique(lab) if v != 0]
    if isinstance(labels, pd.DataFrame):
        if "label" not in labels.columns:
            raise BrainsexError("labels: the label table needs a 'label' column")
        ids = [int(v) for v in labels["label"] if int(v) != 0]
    else:
        ids = [int(v) for v in labels if int(v) != 0]
    unknown = sorted(set(np.unique(lab).tolist()) - {0} - set(ids))
    if unknown:
        raise BrainsexError(f"atlas: label id(s) {unknown[:20]} are not in the label table")
    return ids


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

    m = _as_array(effect_map, "effect_map").astype(np.float64)
    lab = _atlas_on(atlas, effect_map) if _is_image(effect_map) else _atlas_on(atlas, m)
    if m.shape != lab.shape:
        raise BrainsexError(f"effect_map {m.shape} and atlas {lab.shape} are on different grids")
    if not np.isfinite(m).all():
        raise BrainsexError("effect_map: contains NaN or infinite values")
    if log:
        if (m <= -1).any():
            raise BrainsexError("effect_map: values <= -1 are not volume ratios - 1; pass log=False")
        m = np.log1p(m)
    table = labels.reset_index(drop=True).copy()
    ids = _label_ids(table, lab)
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


# --------------------------------------------------------------------------------------------------
# tensor-based morphometry (positive control)
# --------------------------------------------------------------------------------------------------
def registration_image(image: Any) -> Any:
    """A copy of a preprocessed scan fit to drive a registration: brain above background.

    The preprocessed scan is z-scored inside the brain and 0 outside (``zscore(mode="brain")``), so the
    background has the brain's *mean* intensity: for the registration metric (mutual information)
    background and mid-grey tissue look alike, and the brain's outline can slide. Registering the
    z-scored template to the template itself gave log-Jacobians with a standard deviation of 0.10 in
    the brain on the 4 mm grid (as large as the planted effects); with the brain shifted above the
    background (``z - min(z) + 0.1`` inside, 0 outside) 0.03. The shift does not change the geometry,
    so the transform applies to the original scan and its maps unchanged. Idempotent.
    """
    import nibabel as nib

    data = np.asarray(image.get_fdata(dtype=np.float32))
    brain = data != 0
    if not brain.any():
        raise BrainsexError("registration_image: the image is all zero")
    out = np.where(brain, data - float(data[brain].min()) + 0.1, 0.0).astype(np.float32)
    return nib.Nifti1Image(out, image.affine)


def _subject_transforms(moving: Any, template: Any, prefix: str) -> list[Path]:
    """The subject's cached SyN transform to the template, exactly as the saliency chapter makes it.

    :func:`brainsex.preprocess.nonlinear_transform` with its defaults on the scan itself (as
    :func:`brainsex.saliency.template_space_maps` calls it), so that the two chapters share one cache
    whichever runs first.
    """
    from brainsex.preprocess import nonlinear_transform

    warp, aff = Path(prefix + "warp.nii.gz"), Path(prefix + "affine.mat")
    if warp.is_file() and aff.is_file():
        return [warp, aff]
    return nonlinear_transform(moving, template, prefix)


#: SyN settings of the tensor-based-morphometry warps (:func:`tbm_transform`): neighbourhood cross-
#: correlation (radius 1 voxel) and a full-resolution level. On the 4 mm demo grid, a pair of clean
#: phantoms differing only by the planted effects (template warped by the planted male and female
#: fields) gave male - female region log-Jacobians that correlated 0.92 with the truth (slope 0.69)
#: with these settings, against 0.11 (slope 0.11) with the defaults of
#: :func:`brainsex.preprocess.nonlinear_transform` (Mattes mutual information, no iteration at full
#: resolution) and about 0.6 with Mattes and a full-resolution level. A 10 % volume change is a 3 %
#: change of length, under a millimetre, which the coarse warps do not resolve. On the phantom's real
#: scans (noise, bias field, two resamplings) even these warps carry only part of the planted
#: difference (see the validity chapter); 40x20x20 iterations follow the anatomy a little better at
#: about three times the cost.
#: Measured on a 4 mm phantom-2 (native brain-masked scans, one resampling): regional log-Jacobians
#: correlate 0.78-0.86 (median over planted regions) with the true ones across subjects, but the
#: male - female difference is 0.3-0.5 of the true one (10-30 % in regions under 40 voxels); N4,
#: a smaller update sigma, MeanSquares or a study template did not do better; about 7-15 s a subject on
#: one busy core. Registered-warp TBM at 4 mm recovers 0 of 9 planted regions at n=96 (true warps: 3).
TBM_SYN: dict[str, Any] = {"syn_metric": "CC", "syn_sampling": 1, "reg_iterations": (20, 10, 5),
                           "flow_sigma": 3.0, "total_sigma": 0.0}


def tbm_transform(moving: Any, template: Any, cache_prefix: str | os.PathLike, recompute: bool = False,
                  **syn: Any) -> list[Path]:
    """Affine + SyN transform of a preprocessed scan to the template, tuned for morphometry, cached.

    Like :func:`brainsex.preprocess.nonlinear_transform` (same affine pyramid, identity start, the same
    file order for ``ants.apply_transforms``) but with :data:`TBM_SYN` (overridable through ``syn``),
    on :func:`registration_image` of the scan, and in two ANTs calls: an ``Affine`` stage with that
    pyramid, then ``SyNOnly`` started from it (ANTsPy's one-call ``"SyN"`` ignores the affine pyramid
    arguments and runs its own, longer one). Files: ``<cache_prefix>tbm_warp.nii.gz`` and
    ``<cache_prefix>tbm_affine.mat``, next to the saliency chapter's ``warp``/``affine`` files.
    On coarse grids the SyN schedule keeps only as many levels as leave 12 voxels a side.
    """
    import shutil
    import tempfile

    from brainsex.io import atomic_path
    from brainsex.preprocess import PreprocessError, _ants, _to_ants

    prefix = str(cache_prefix)
    warp, aff = Path(prefix + "tbm_warp.nii.gz"), Path(prefix + "tbm_affine.mat")
    if not recompute and warp.is_file() and aff.is_file():
        return [warp, aff]
    settings = {**TBM_SYN, **syn}
    smallest = min(min(template.shape[:3]), min(moving.shape[:3]))
    pyramid = [(f, i, g) for f, i, g in zip((6, 4, 2, 1), (200, 100, 50, 10), (3, 2, 1, 0), strict=True)
               if f == 1 or smallest / f >= 12]
    levels = int(np.clip(np.floor(np.log2(smallest / 12.0)) + 1, 1, len(settings["reg_iterations"])))
    settings["reg_iterations"] = tuple(settings["reg_iterations"])[-levels:]
    ants = _ants()
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    fixed, mov = _to_ants(template), _to_ants(registration_image(moving))
    with tempfile.TemporaryDirectory(prefix="brainsex-tbm-") as tmp:
        try:
            # two stages: ants.registration(type_of_transform="SyN") ignores aff_iterations & co. and runs
            # a fixed 2100x1200x1200 affine pyramid; a separate "Affine" stage honours the coarse pyramid
            # and SyNOnly starts from it. Measured on 4 mm phantom scans: no clear change in time (the
            # full-resolution CC SyN iterations dominate, about 1.5 s each on one busy core)
            aff_reg = ants.registration(fixed=fixed, moving=mov, type_of_transform="Affine",
                                        outprefix=str(Path(tmp) / "aff_"), initial_transform="Identity",
                                        aff_shrink_factors=tuple(p[0] for p in pyramid),
                                        aff_iterations=tuple(p[1] for p in pyramid),
                                        aff_smoothing_sigmas=tuple(p[2] for p in pyramid))
            reg = ants.registration(fixed=fixed, moving=mov, type_of_transform="SyNOnly",
                                    outprefix=str(Path(tmp) / "tbm_"), initial_transform=aff_reg["fwdtransforms"],
                                    **settings)
        except RuntimeError as exc:
            raise PreprocessError(f"{prefix}: non-linear registration for morphometry failed ({exc})") from exc
        files = [f for f in reg["fwdtransforms"] if f.endswith("Warp.nii.gz")] + list(aff_reg["fwdtransforms"])
        if len(files) != 2:
            raise PreprocessError(f"{prefix}: ANTs returned transforms {reg['fwdtransforms']}, expected a warp")
        out: list[Path] = []
        for f, dst in zip(files, (warp, aff), strict=True):
            with atomic_path(dst) as t:
                shutil.copyfile(f, t)
            out.append(dst)
    return out


def log_jacobian_map(image: Any, template: Any, cache_prefix: str | os.PathLike, warps: str = "tbm") -> np.ndarray:
    """log det of the Jacobian of one subject's non-linear warp to the template (tensor-based morphometry).

    The warp is the SyN part of :func:`tbm_transform` (``warps="tbm"``, the default) or the saliency
    chapter's warp (:func:`brainsex.preprocess.nonlinear_transform` with its defaults,
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

    from brainsex.preprocess import _ants, _to_ants

    moving = nib.load(str(image)) if isinstance(image, str | os.PathLike) else image
    if warps == "tbm":
        transforms = tbm_transform(moving, template, cache_prefix)
    elif warps == "shared":
        transforms = _subject_transforms(moving, template, str(cache_prefix))
    else:
        raise BrainsexError(f"warps={warps!r}: expected 'tbm' or 'shared'")
    warp = [t for t in transforms if str(t).endswith("warp.nii.gz")]
    if not warp:
        raise BrainsexError(f"{cache_prefix}: the cached transform has no displacement field (affine only?); "
                            "tensor-based morphometry needs the non-linear warp")
    ants = _ants()
    jac = ants.create_jacobian_determinant_image(_to_ants(template), str(warp[0]), do_log=True)
    out = np.asarray(jac.numpy(), dtype=np.float32)
    if out.shape != tuple(template.shape[:3]):
        raise BrainsexError(f"log-Jacobian of {cache_prefix} has shape {out.shape}, expected the template's "
                            f"{tuple(template.shape[:3])}")
    if not np.isfinite(out).all():
        raise BrainsexError(f"{warp[0]}: the warp folds (non-positive Jacobian); delete it to recompute")
    return out


def _tbm_one(image: str, template: Any, prefix: str, lab: np.ndarray, ids: list[int], warps: str) -> np.ndarray:
    """Region means of one subject's log-Jacobian (a joblib task)."""
    from scipy import ndimage

    from brainsex.preprocess import set_threads

    set_threads(1)
    m = log_jacobian_map(image, template, prefix, warps=warps).astype(np.float64)
    n = np.asarray(ndimage.sum_labels(np.ones_like(m), lab, index=ids))
    s = np.asarray(ndimage.sum_labels(m, lab, index=ids))
    return np.where(n > 0, s / np.maximum(n, 1), np.nan)


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
    ``cache_dir`` (the saliency chapter's ``<run_dir>/preprocess/warps``): ``<participant_id>_tbm_warp.nii.gz``
    / ``_tbm_affine.mat`` for ``warps="tbm"``, the saliency warps themselves for ``warps="shared"``.

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
    if not _is_image(template):
        raise BrainsexError("template: expected a nibabel image (the fixed image of the warps)")
    lab = _atlas_on(atlas, template)
    ids = _label_ids(labels, lab)
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
    """Tensor-based morphometry: which regions differ in volume between males and females?

    For every subject the log-Jacobian of its SyN warp to the template (:func:`log_jacobian_map`) is
    averaged within each atlas region (:func:`tbm_region_means`); then each region is tested with
    ``value ~ 1 + male + TIV`` (:func:`brainsex.atlas.region_group_test`; Benjamini-Hochberg q-values).
    The warp's affine part is not in the Jacobian, so the values are volumes relative to the whole
    head; TIV is a covariate as well, as in the paper's TIV analysis (section 2.6).

    Parameters
    ----------
    table
        Subjects: ``participant_id``, ``sex`` ('M'/'F'), ``image_col`` and ``tiv_col``
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
    alpha
        FDR level of the ``significant`` column.
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


def phantom_log_jacobians(
    phantom_dir: str | os.PathLike,
    atlas: Any,
    labels: pd.DataFrame | Sequence[int] | None = None,
    participants: Sequence[str] | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """The phantom's *true* regional log-Jacobians: what a perfect registration would measure.

    Each subject's non-linear deformation (its individual random warp, the planted sex effect and the
    age-dependent ventricle enlargement; :mod:`brainsex.synthetic`) is rebuilt from the generation
    arguments in ``generation.json`` and the subject's random stream, and its log-Jacobian (log of the
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

    Returns
    -------
    pandas.DataFrame
        Subjects (index ``participant_id``) x label ids (NaN for labels with no voxel).
    """
    from scipy import ndimage
    from tqdm.auto import tqdm

    from brainsex import synthetic as syn
    from brainsex import templates

    root = Path(phantom_dir)
    gen = root / "generation.json"
    if not gen.is_file():
        raise BrainsexError(f"{gen}: not found; the true Jacobians exist only for a synthetic phantom")
    info = json.loads(gen.read_text())
    args = info.get("args", {})
    if args.get("generator") != syn.GENERATOR_VERSION:
        raise BrainsexError(f"{gen}: made by generator {args.get('generator')!r}, this code is "
                            f"{syn.GENERATOR_VERSION!r}; the deformations cannot be rebuilt")
    vs = float(args["voxel_size"])
    shape, affine = templates.target_grid(vs)
    ref = __import__("nibabel").Nifti1Image(np.zeros(shape, np.float32), affine)
    lab = _atlas_on(atlas, ref)
    ids = _label_ids(labels, lab)
    regions = [(tuple(r) if isinstance(r, list) else r, int(sg)) for r, sg in args["sex_regions"]]
    ctx, _, _ = syn._context(vs, regions, float(args["region_effect"]), float(args["contrast_effect"]),
                             args.get("reference_source", "offline"))
    part = syn.paper_demographics(n=args["n"], seed=int(args["seed"]), tiv_effect=bool(args["tiv_effect"]))
    seeds = np.random.SeedSequence(int(args["seed"])).spawn(len(part) + 1)[1:]
    wanted = None if participants is None else {str(p) for p in participants}
    n_vox = np.asarray(ndimage.sum_labels(np.ones(shape), lab, index=ids))
    rows, index = [], []
    records = part.to_dict("records")
    for row, ss in tqdm(list(zip(records, seeds, strict=True)), desc="true Jacobians", disable=not progress,
                        leave=False):
        if wanted is not None and str(row["participant_id"]) not in wanted:
            continue
        # the generator's own deformation (same draws, same code as synthetic._make_subject)
        p, rng = syn._subject_params(row, ss)
        disp, _ = syn.subject_displacement(ctx, row, p, rng, vs)
        # a backward field: subject point y shows the template at y + D(y), so the subject's local
        # volume relative to the template is 1 / det(I + grad D)
        logjac = -np.log(np.abs(syn._jacobian_det(disp, vs)).astype(np.float64))
        s = np.asarray(ndimage.sum_labels(logjac, lab, index=ids))
        rows.append(np.where(n_vox > 0, s / np.maximum(n_vox, 1), np.nan))
        index.append(str(row["participant_id"]))
    if wanted is not None and len(index) != len(wanted):
        missing = sorted(wanted - set(index))[:5]
        raise BrainsexError(f"participants {missing} are not in the phantom at {root}")
    return pd.DataFrame(np.vstack(rows), columns=ids, index=pd.Index(index, name="participant_id"))


def region_test_table(values: pd.DataFrame, table: pd.DataFrame, atlas: Any, labels: pd.DataFrame,
                      template: Any, tiv_col: str | None = "etiv_ml", sex_col: str = "sex",
                      alpha: float = 0.05) -> pd.DataFrame:
    """:func:`brainsex.atlas.region_group_test` of subjects x regions ``values`` (rows matched to ``table``
    by ``participant_id``), as a ranking like :func:`tbm_region_test`'s (``n_voxels``, ``rank``)."""
    t = table.assign(participant_id=table["participant_id"].astype(str)).set_index("participant_id")
    missing = [i for i in values.index if i not in t.index]
    if missing:
        raise BrainsexError(f"region_test_table: subjects {missing[:5]} are not in the table")
    t = t.loc[list(values.index)]
    tiv = pd.to_numeric(t[tiv_col]).to_numpy() if tiv_col else None
    result = region_group_test(values, t[sex_col], tiv=tiv, labels=labels, alpha=alpha)
    lab = _atlas_on(atlas, template)
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
        """One row per version: subjects, planted regions recovered, precision@k and AP with chance."""
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
    max_subjects: int = 24,
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
        Sample size of the registered versions (registration costs seconds per subject); 0 for none.
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
    for w in (warps if max_subjects and max_subjects > 0 else ()):
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


# --------------------------------------------------------------------------------------------------
# ranking metrics with chance levels
# --------------------------------------------------------------------------------------------------
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

    ``id_cols`` (e.g. ``method``, ``scoring``) are carried along.
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


# --------------------------------------------------------------------------------------------------
# attribution methods on one model
# --------------------------------------------------------------------------------------------------
def select_scans(table: pd.DataFrame, max_scans: int | None = 24, seed: int = 0, sex_col: str = "sex") -> pd.DataFrame:
    """Correctly classified scans to explain, at most ``max_scans``, balanced by sex where possible.

    Rows with ``y_true`` and ``y_pred`` columns are kept only when they agree (the paper explains
    correctly classified test scans, section 2.4). The draw is deterministic for a ``seed``; the
    result keeps the table's order.
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


def _scores_ranking(mean_map: Any, atlas: Any, labels: pd.DataFrame, scoring: str, threshold: float) -> pd.DataFrame:
    scores = region_scores(mean_map, atlas, labels, threshold=threshold)
    if scoring == "weighted_score":
        return scores
    key = scores["mean_saliency"].fillna(-np.inf)
    out = scores.assign(_k=key).sort_values(["_k", "label"], ascending=[False, True], kind="mergesort")
    out = out.drop(columns="_k").reset_index(drop=True)
    out["rank"] = np.arange(1, len(out) + 1)
    return out


def _atlas_in_subject(atlas_img: Any, subject_img: Any, transforms: Sequence[Path] | None) -> np.ndarray:
    """The template atlas on a subject's (rigidly registered) grid.

    With the subject's cached transforms, the inverse of their affine part (nearest neighbour) takes
    the atlas to the subject, so a region covers the same anatomy in a larger or a smaller head; the
    non-linear part is not inverted (its inverse is not cached). Without transforms the atlas is used
    as it is (the grids are the same).
    """
    if transforms is None:
        return _atlas_on(atlas_img, subject_img)
    from brainsex.preprocess import _ants, _to_ants

    aff = [str(t) for t in transforms if str(t).endswith(".mat")]
    if not aff:
        return _atlas_on(atlas_img, subject_img)
    ants = _ants()
    out = ants.apply_transforms(fixed=_to_ants(subject_img), moving=_to_ants(atlas_img), transformlist=aff,
                                whichtoinvert=[True], interpolator="nearestNeighbor")
    return np.rint(out.numpy()).astype(np.int64)


def _occlusion_rankings(model: Any, scans: pd.DataFrame, template: Any, atlas_img: Any, labels: pd.DataFrame,
                        warp: str, cache_dir: Path | None, image_col: str, batch_size: int, device: Any,
                        progress: bool) -> dict[str, pd.DataFrame]:
    import nibabel as nib
    from tqdm.auto import tqdm

    atlas_t = resample_atlas_to(atlas_img, template) if _is_image(atlas_img) else atlas_img
    ids = [int(v) for v in labels["label"] if int(v) != 0]
    abs_delta = np.zeros(len(ids))
    per_voxel = np.zeros(len(ids))
    seen = np.zeros(len(ids))
    for pid, path in tqdm(list(zip(scans["participant_id"], scans[image_col], strict=True)), desc="occlusion",
                          disable=not progress, leave=False):
        img = nib.load(str(path))
        tx = _subject_transforms(img, template, str(cache_dir / f"{pid}_")) if warp == "syn" else None
        lab = _atlas_in_subject(atlas_t, img, tx)
        res = occlusion_by_region(model, img, lab, labels=ids, batch_size=batch_size, device=device)
        res = res.set_index("label").loc[ids]
        present = res["n_voxels"].to_numpy() > 0
        abs_delta += np.where(present, res["abs_delta"].to_numpy(), 0.0)
        per_voxel += np.where(present, res["abs_delta"].to_numpy() / np.maximum(res["n_voxels"].to_numpy(), 1), 0.0)
        seen += present
    base = labels[labels["label"].astype(int).isin(ids)].set_index("label").loc[ids].reset_index()
    base = base.drop(columns=[c for c in ("n_voxels",) if c in base.columns])
    out = {}
    for name, total in (("abs_delta", abs_delta), ("abs_delta_per_voxel", per_voxel)):
        t = base.copy()
        t["n_voxels"] = seen.astype(int)  # scans in which the region has voxels
        t[name] = np.where(seen > 0, total / np.maximum(seen, 1), np.nan)
        t = t.assign(_k=t[name].fillna(-np.inf)).sort_values(["_k", "label"], ascending=[False, True],
                                                              kind="mergesort").drop(columns="_k")
        t = t.reset_index(drop=True)
        t["rank"] = np.arange(1, len(t) + 1)
        out[name] = t
    return out


def method_rankings(
    model: Any,
    table: pd.DataFrame,
    template: Any,
    atlas: Any,
    labels: pd.DataFrame,
    methods: Sequence[str] = DL_METHODS,
    scorings: Sequence[str] = SCORINGS,
    warp: str = "syn",
    cache_dir: str | os.PathLike | None = None,
    threshold: float = 0.1,
    image_col: str = "image_pp",
    batch_size: int = 8,
    device: Any = None,
    n_jobs: int = 1,
    smoothgrad_samples: int = 4,
    smoothgrad_noise: float = 0.15,
    ig_steps: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> tuple[dict[tuple[str, str], pd.DataFrame], dict[str, np.ndarray]]:
    """Region rankings of every attribution method x scoring, on the scans of ``table``.

    Map methods (:func:`brainsex.saliency.template_space_maps`, warped to the template with the cached
    SyN transforms, as in the saliency chapter) are averaged over the scans and scored with
    :func:`brainsex.atlas.region_scores`:

    - ``saliency``: absolute input gradient (Captum ``Saliency``, the paper's method), min-max per scan;
    - ``saliency_signed``: the signed gradient, each scan divided by its largest absolute value,
      averaged with its sign (consistent directions add up, inconsistent ones cancel), and the absolute
      value of the average min-max normalised before scoring;
    - ``smoothgrad``: absolute gradient averaged over ``smoothgrad_samples`` noisy copies;
    - ``integrated_gradients``: |IG| from a zero baseline with ``ig_steps`` steps.

    Scorings: ``weighted_score`` (the paper's weighted saliency score) and ``mean_saliency`` (the
    plain regional mean). ``occlusion`` sets each atlas region (carried to the scan with the inverse
    of the cached affine) to the brain mean and records the change of the male logit
    (:func:`brainsex.saliency.occlusion_by_region`); its scorings are ``abs_delta`` and
    ``abs_delta_per_voxel``, whatever ``scorings`` says.

    Returns
    -------
    rankings
        ``{(method, scoring): ranking table}``, best first.
    mean_maps
        ``{method: average map on the template grid}`` for the map methods.
    """
    from brainsex.saliency import minmax_normalise

    unknown = set(methods) - set(DL_METHODS)
    if unknown:
        raise BrainsexError(f"methods: unknown {sorted(unknown)}; expected some of {', '.join(DL_METHODS)}")
    bad = set(scorings) - set(SCORINGS)
    if bad:
        raise BrainsexError(f"scorings: unknown {sorted(bad)}; expected some of {', '.join(SCORINGS)}")
    if warp not in ("syn", "none"):
        raise BrainsexError(f"warp must be 'syn' or 'none' (got {warp!r})")
    if warp == "syn" and cache_dir is None:
        raise BrainsexError("method_rankings: warp='syn' needs the cache_dir of the subjects' transforms")
    if not isinstance(labels, pd.DataFrame):
        raise BrainsexError("labels: expected the atlas label table")
    cache = Path(cache_dir) if cache_dir is not None else None
    if warp == "syn":
        # compute (or find) each scan's transform with the identity start (see _subject_transforms)
        import nibabel as nib

        for pid, path in zip(table["participant_id"], table[image_col], strict=True):
            _subject_transforms(nib.load(str(path)), template, str(cache / f"{pid}_"))
    atlas_t = resample_atlas_to(atlas, template) if _is_image(atlas) else atlas
    rankings: dict[tuple[str, str], pd.DataFrame] = {}
    mean_maps: dict[str, np.ndarray] = {}
    import nibabel as nib

    for method in methods:
        if method == "occlusion":
            for name, r in _occlusion_rankings(model, table, template, atlas, labels, warp, cache, image_col,
                                               batch_size, device, progress).items():
                rankings[(method, name)] = r
            continue
        base, signed, kw = method, False, {}
        if method == "saliency_signed":
            base, signed = "saliency", True
        elif method == "smoothgrad":
            kw = {"nt_samples": int(smoothgrad_samples), "noise_level": float(smoothgrad_noise), "seed": int(seed)}
        elif method == "integrated_gradients":
            kw = {"n_steps": int(ig_steps)}
        maps = template_space_maps(model, table, template, method=base, signed=signed, warp=warp,
                                   cache_dir=cache, image_col=image_col, batch_size=batch_size, device=device,
                                   n_jobs=n_jobs, progress=progress, **kw)
        mean = average_maps(maps)
        if signed:
            mean = minmax_normalise(np.abs(mean), constant="zeros")
        mean_maps[method] = mean
        img = nib.Nifti1Image(mean.astype(np.float32), template.affine)
        for scoring in scorings:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                rankings[(method, scoring)] = _scores_ranking(img, atlas_t, labels, scoring, threshold)
    return rankings, mean_maps


def compare_methods(
    model: Any,
    table: pd.DataFrame,
    template: Any,
    atlas: Any,
    labels: pd.DataFrame,
    truth: Iterable[int] | pd.DataFrame,
    methods: Sequence[str] = DL_METHODS,
    scorings: Sequence[str] = SCORINGS,
    max_scans: int | None = 24,
    warp: str = "syn",
    cache_dir: str | os.PathLike | None = None,
    neighbours: dict[int, set[int]] | None = None,
    n_perm: int = 1000,
    k: int = 10,
    seed: int = 0,
    threshold: float = 0.1,
    image_col: str = "image_pp",
    batch_size: int = 8,
    device: Any = None,
    n_jobs: int = 1,
    smoothgrad_samples: int = 4,
    ig_steps: int = 8,
    progress: bool = False,
    return_rankings: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, dict[tuple[str, str], pd.DataFrame]]:
    """Every attribution method x scoring on the same model and scans, scored against the planted regions.

    Up to ``max_scans`` correctly classified scans of ``table`` (:func:`select_scans`) are explained
    with each method (:func:`method_rankings`); each ranking gets :func:`ranking_report` (precision@k,
    average precision, tolerant versions when ``neighbours`` is given -- by default computed from the
    atlas on the template grid -- with permutation chance levels).

    Returns
    -------
    pandas.DataFrame
        Long table: ``method``, ``scoring``, ``metric``, ``observed``, ``chance``, ``p_value``,
        ``n_scans``, ``top_k`` (the names of the top ``k`` regions, planted ones marked with ``*``).
        With ``return_rankings`` also the ``{(method, scoring): ranking}`` dict.
    """
    scans = select_scans(table, max_scans=max_scans, seed=seed)
    if isinstance(truth, pd.DataFrame):
        truth = truth["label"]
    t = {int(v) for v in truth}
    if neighbours is None:
        neighbours = region_neighbours(_atlas_on(atlas, template))
    rankings, _ = method_rankings(model, scans, template, atlas, labels, methods=methods, scorings=scorings, warp=warp,
                                  cache_dir=cache_dir, threshold=threshold, image_col=image_col,
                                  batch_size=batch_size, device=device, n_jobs=n_jobs,
                                  smoothgrad_samples=smoothgrad_samples, ig_steps=ig_steps, seed=seed,
                                  progress=progress)
    parts = []
    for (method, scoring), r in rankings.items():
        rep = ranking_report(r, t, neighbours=neighbours, n_perm=n_perm, seed=seed, k=k)
        rep.insert(0, "scoring", scoring)
        rep.insert(0, "method", method)
        long = report_long(rep, id_cols=("method", "scoring"))
        present = r[r["n_voxels"] > 0] if "n_voxels" in r.columns else r
        names = [f"{n}{'*' if int(lab) in t else ''}" for n, lab in
                 zip(present["name"].head(k), present["label"].head(k), strict=True)]
        long["n_scans"] = len(scans)
        long["top_k"] = "; ".join(names)
        parts.append(long)
    out = pd.concat(parts, ignore_index=True)
    return (out, rankings) if return_rankings else out


# --------------------------------------------------------------------------------------------------
# z-scoring against a fixed reference tissue (study variant)
# --------------------------------------------------------------------------------------------------
def reference_zscore(image: Any, reference_mask: Any, brain_mask: Any | None = None) -> Any:
    """Re-standardise a scan with the mean and sd of a fixed reference region.

    The paper z-scores each scan over the whole brain (section 2.2), so a local change (a planted
    region that is larger, or brighter) moves the mean and sd and with them every voxel's value: the
    local difference leaks into the whole image. Standardising with the statistics of a reference
    tissue that the effect does not touch (e.g. deep white matter away from the planted regions)
    removes that path. A z-scored image is an affine function of the raw one, so re-standardising it
    gives the same result as standardising the raw image with the reference statistics.

    Parameters
    ----------
    image
        nibabel image (e.g. ``image_pp``).
    reference_mask
        Boolean array or image on the same grid: the reference voxels.
    brain_mask
        Voxels outside it are set to 0 (default: the image's non-zero voxels).

    Returns
    -------
    nibabel.Nifti1Image
        float32 image on the same grid.
    """
    import nibabel as nib

    data = np.asarray(image.get_fdata(dtype=np.float32), dtype=np.float64)
    ref = _as_array(reference_mask, "reference_mask").astype(bool)
    if ref.shape != data.shape:
        raise BrainsexError(f"reference_mask: shape {ref.shape} differs from the image's {data.shape}")
    brain = (data != 0) if brain_mask is None else _as_array(brain_mask, "brain_mask").astype(bool)
    vals = data[ref & brain]
    if vals.size < 10:
        raise BrainsexError(f"reference_mask: only {vals.size} reference voxels inside the brain; need >= 10")
    sd = float(vals.std())
    if not sd > 0:
        raise BrainsexError("reference_mask: the reference voxels have zero standard deviation")
    out = np.where(brain, (data - float(vals.mean())) / sd, 0.0).astype(np.float32)
    return nib.Nifti1Image(out, image.affine)


def _reference_mask(voxel_size: float, planted: Sequence[int], atlas: Any, margin_mm: float = 12.0) -> np.ndarray:
    """Template white matter (probability > 0.9), at least ``margin_mm`` from every planted region."""
    from scipy import ndimage

    from brainsex.templates import load_tissue_maps

    wm = np.asarray(load_tissue_maps(voxel_size)["wm"].dataobj) > 0.9
    lab = np.rint(np.asarray(atlas.dataobj)).astype(int)
    dist = ndimage.distance_transform_edt(~np.isin(lab, list(planted))) * float(voxel_size)
    mask = wm & (dist > margin_mm)
    if mask.sum() < 10:
        raise BrainsexError("reference mask: too few white-matter voxels far from the planted regions")
    return mask


# --------------------------------------------------------------------------------------------------
# the study: effect types x grids x z-score variants (too heavy for the demo book)
# --------------------------------------------------------------------------------------------------
def _study_config(effect: str, region_effect: float, contrast_effect: float) -> dict[str, float]:
    if effect == "volume":
        return {"region_effect": float(region_effect), "contrast_effect": 0.0}
    if effect == "contrast":
        return {"region_effect": 0.0, "contrast_effect": float(contrast_effect)}
    raise BrainsexError(f"effect {effect!r}: expected 'volume' or 'contrast'")


def study(
    out_dir: str | os.PathLike = "benchmarks/validity",
    work_dir: str | os.PathLike | None = None,
    voxel_sizes: Sequence[float] = (8.0, 6.0),
    effects: Sequence[str] = ("volume", "contrast"),
    zscores: Sequence[str] = ("brain", "reference"),
    n_subjects: int = 160,
    region_effect: float = 0.10,
    contrast_effect: float = 0.10,
    epochs: int = 8,
    channels: Sequence[int] = (4, 8, 8, 8, 8, 4),
    batch_size: int = 8,
    lr: float = 0.01,
    methods: Sequence[str] = ("saliency", "saliency_signed", "integrated_gradients", "occlusion"),
    scorings: Sequence[str] = SCORINGS,
    max_scans: int = 16,
    warp: str = "syn",
    tbm: bool = True,
    n_perm: int = 500,
    n_workers: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Sweep phantoms (effect type x grid) and z-score variants; write ``validity_study.tsv``.

    For each voxel size and effect type a phantom is made (:func:`brainsex.synthetic.make_cohort`:
    ``volume`` plants ``region_effect`` volume changes, ``contrast`` plants ``contrast_effect``
    intensity changes in the same ten regions and no volume change), preprocessed with the cohort's
    true brain masks (skull stripping is not what is studied here, and it is the slowest step), split,
    and for each z-score variant (``brain``: the paper's per-scan z-score; ``reference``: the same
    scans re-standardised on deep white matter far from the planted regions, :func:`reference_zscore`)
    an SFCN is trained and :func:`compare_methods` run on its correctly classified test scans. With
    ``tbm`` the positive control (:func:`tbm_region_test`) runs once per phantom (it does not depend
    on the z-score), with registered warps and with the phantom's true deformations
    (:func:`phantom_log_jacobians`); the truth-map ceiling (:func:`truth_map_ranking`) is reported too.

    Everything intermediate goes to ``work_dir`` (default ``<out_dir>/work``, not meant to be kept);
    the result is ``<out_dir>/validity_study.tsv`` (one row per configuration x method x scoring x
    metric, with accuracy, scan counts and the chance level) and ``<out_dir>/validity_study.json``
    (the arguments and the time taken). Re-running reuses phantoms, preprocessing, warps and
    trainings that match.
    """
    import nibabel as nib

    from brainsex.preprocess import preprocess_cohort
    from brainsex.split import stratified_split
    from brainsex.synthetic import make_cohort
    from brainsex.templates import load_atlas, load_template
    from brainsex.train import TrainConfig, predict, train

    t_start = time.time()
    out = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else out / "work"
    args = {k: v for k, v in locals().items() if k in (
        "voxel_sizes", "effects", "zscores", "n_subjects", "region_effect", "contrast_effect", "epochs", "channels",
        "batch_size", "lr", "methods", "scorings", "max_scans", "warp", "tbm", "n_perm", "seed")}
    args = json.loads(json.dumps(args, default=list))
    for z in zscores:
        if z not in ("brain", "reference"):
            raise BrainsexError(f"zscores: {z!r} is not 'brain' or 'reference'")
    rows: list[pd.DataFrame] = []

    def add(df: pd.DataFrame, **ids: Any) -> None:
        for key, val in reversed(list(ids.items())):
            df.insert(0, key, val)
        rows.append(df)

    for vs in voxel_sizes:
        template = load_template(vs, source="offline")
        atlas, labels = load_atlas(vs, source="offline")
        lab = np.rint(np.asarray(atlas.dataobj)).astype(int)
        neighbours = region_neighbours(lab)
        for effect in effects:
            cfg = _study_config(effect, region_effect, contrast_effect)
            tag = f"{effect}_{vs:g}mm"
            base = work / tag
            phantom = base / "phantom"
            participants = make_cohort(phantom, n=n_subjects, voxel_size=vs, seed=seed, n_jobs=n_workers,
                                       progress=progress, **cfg)
            truth = planted_truth(phantom)
            participants = participants.assign(
                image=[str(phantom / p / "anat" / f"{p}_T1w.nii.gz") for p in participants["participant_id"]],
                mask=[str(phantom / "ground_truth" / "masks" / f"{p}_desc-brain_mask.nii.gz")
                      for p in participants["participant_id"]])
            pre = preprocess_cohort(participants, base / "preprocess", voxel_size=vs, n_workers=n_workers,
                                    method="mask", progress=progress)
            pre = pre[pre["status"] == "ok"].reset_index(drop=True)
            split = stratified_split(pre, seed=seed)
            cache = base / "preprocess" / "warps"
            effect_file = phantom / "ground_truth" / ("sex_effect_map.nii.gz" if effect == "volume"
                                                       else "sex_contrast_map.nii.gz")
            ceiling = truth_map_ranking(nib.load(effect_file), atlas, labels)
            rep = ranking_report(ceiling, truth, neighbours=neighbours, n_perm=n_perm, seed=seed)
            add(report_long(rep), effect=effect, voxel_size=vs, zscore="-", method="truth_map", scoring="abs_effect",
                accuracy=np.nan, n_scans=np.nan)
            if tbm:
                tb = tbm_region_test(pre, template, atlas, labels, cache, tiv_col="etiv_ml", n_jobs=n_workers,
                                     progress=progress)
                rec = planted_recovery(tb, truth)
                rep = ranking_report(tb, truth, neighbours=neighbours, n_perm=n_perm, seed=seed)
                long = report_long(rep)
                long["n_recovered"] = int(rec["recovered"].sum())
                add(long, effect=effect, voxel_size=vs, zscore="-", method="tbm", scoring="abs_t", accuracy=np.nan,
                    n_scans=tb.attrs["n_subjects"])
                # the same test with the phantom's true deformations (perfect warps)
                ok = pre[pre["etiv_ml"].notna()]
                true_vals = phantom_log_jacobians(phantom, atlas, labels,
                                                  participants=ok["participant_id"].astype(str).tolist())
                tp = region_test_table(true_vals, ok, atlas, labels, template)
                long = report_long(ranking_report(tp, truth, neighbours=neighbours, n_perm=n_perm, seed=seed))
                long["n_recovered"] = int(planted_recovery(tp, truth)["recovered"].sum())
                add(long, effect=effect, voxel_size=vs, zscore="-", method="tbm_perfect_warps", scoring="abs_t",
                    accuracy=np.nan, n_scans=len(ok))
            for z in zscores:
                table = split.copy()
                if z == "reference":
                    ref = _reference_mask(vs, truth["label"].tolist(), atlas)
                    zdir = base / "zscore_reference"
                    zdir.mkdir(parents=True, exist_ok=True)
                    paths = []
                    for pid, p in zip(table["participant_id"], table["image_pp"], strict=True):
                        dst = zdir / f"{pid}_zref.nii.gz"
                        if not dst.is_file():
                            nib.save(reference_zscore(nib.load(p), ref), dst)
                        paths.append(str(dst))
                    table["image_pp"] = paths
                config = TrainConfig(epochs=int(epochs), batch_size=int(batch_size), lr=float(lr), seed=int(seed),
                                     device="cpu")
                res = train(table, config, out_dir=base / f"train_{z}", channels=list(channels), resume="auto",
                            progress=progress)
                test = table[table["split"] == "test"].reset_index(drop=True)
                probs = predict(res.model, test, device="cpu", progress=False)
                test = test.assign(prob_male=probs["prob_male"].to_numpy())
                test["y_true"] = (test["sex"] == "M").astype(int)
                test["y_pred"] = (test["prob_male"] >= 0.5).astype(int)
                acc = float((test["y_true"] == test["y_pred"]).mean())
                # the rigidly registered image is the moving image of the warps whatever the z-score:
                # warps are cached per subject, so both variants share them
                cmp_ = compare_methods(res.model, test, template, atlas, labels, truth, methods=methods,
                                       scorings=scorings, max_scans=max_scans, warp=warp, cache_dir=cache,
                                       neighbours=neighbours, n_perm=n_perm, seed=seed, device="cpu",
                                       n_jobs=n_workers, progress=progress)
                add(cmp_.drop(columns=["top_k"]), effect=effect, voxel_size=vs, zscore=z, accuracy=acc)
    result = pd.concat(rows, ignore_index=True)
    cols = ["effect", "voxel_size", "zscore", "method", "scoring", "metric", "observed", "chance", "p_value",
            "accuracy", "n_scans", "n_recovered"]
    for c in cols:
        if c not in result.columns:
            result[c] = np.nan
    result = result[cols]
    from brainsex.io import write_json_atomic, write_table

    write_table(result, out / "validity_study.tsv")
    write_json_atomic(out / "validity_study.json", {"args": args, "seconds": round(time.time() - t_start, 1),
                                                    "command": "python -m brainsex.validity study " +
                                                    " ".join(sys.argv[2:]) if sys.argv[1:2] == ["study"] else ""})
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m brainsex.validity", description=(
        "Validity study: do saliency rankings recover the phantom's planted regions? Sweeps effect type, grid "
        "and z-score variant and writes <out>/validity_study.tsv."))
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("study", help="run the sweep (minutes to hours, depending on the sizes)")
    s.add_argument("--out", default="benchmarks/validity", help="output folder (default: benchmarks/validity)")
    s.add_argument("--work", default=None, help="folder for phantoms, preprocessing and models (default: <out>/work)")
    s.add_argument("--voxel-sizes", type=float, nargs="+", default=[8.0, 6.0])
    s.add_argument("--effects", nargs="+", default=["volume", "contrast"], choices=["volume", "contrast"])
    s.add_argument("--zscores", nargs="+", default=["brain", "reference"], choices=["brain", "reference"])
    s.add_argument("--n-subjects", type=int, default=160)
    s.add_argument("--region-effect", type=float, default=0.10)
    s.add_argument("--contrast-effect", type=float, default=0.10)
    s.add_argument("--epochs", type=int, default=8)
    s.add_argument("--channels", type=int, nargs=6, default=[4, 8, 8, 8, 8, 4])
    s.add_argument("--methods", nargs="+", default=["saliency", "saliency_signed", "integrated_gradients", "occlusion"],
                   choices=list(DL_METHODS))
    s.add_argument("--max-scans", type=int, default=16)
    s.add_argument("--warp", default="syn", choices=["syn", "none"])
    s.add_argument("--no-tbm", action="store_true", help="skip the tensor-based morphometry control")
    s.add_argument("--n-perm", type=int, default=500)
    s.add_argument("--n-workers", type=int, default=2)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m brainsex.validity study [options]`` (see ``--help``)."""
    args = _parser().parse_args(argv)
    try:
        import torch

        torch.set_num_threads(max(1, int(args.n_workers)))
        res = study(out_dir=args.out, work_dir=args.work, voxel_sizes=args.voxel_sizes, effects=args.effects,
                    zscores=args.zscores, n_subjects=args.n_subjects, region_effect=args.region_effect,
                    contrast_effect=args.contrast_effect, epochs=args.epochs, channels=args.channels,
                    methods=args.methods, max_scans=args.max_scans, warp=args.warp, tbm=not args.no_tbm,
                    n_perm=args.n_perm, n_workers=args.n_workers, seed=args.seed, progress=not args.no_progress)
    except BrainsexError as exc:
        print(f"brainsex: error: {exc}", file=sys.stderr)
        return 2
    p10 = res[res["metric"] == "precision_at_10"]
    with pd.option_context("display.width", 160, "display.max_rows", 200):
        print(p10[["effect", "voxel_size", "zscore", "method", "scoring", "observed", "chance", "p_value"]]
              .to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
