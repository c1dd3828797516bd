"""Validity: whether the attribution methods find what is really there.

The paper reads its ten top atlas regions (section 2.5, Table S1, Figure 7) as the regions the model
uses to tell the sexes apart. On the synthetic phantom the planted sex differences are known, so this
module *measures* how well the attribution methods recover them, with the ranking metrics of
:mod:`brainsex.ranking` and the tensor-based-morphometry positive control of
:mod:`brainsex.morphometry`:

- :func:`compare_methods` runs the attribution methods on one trained model (plain gradient, absolute
  and signed, SmoothGrad, Integrated Gradients, occlusion of atlas regions), scores each with the
  paper's weighted saliency score and with the plain regional mean, and reports all of them
  (:func:`brainsex.ranking.ranking_report`).
- :func:`reference_zscore` re-standardises a scan on a reference tissue (a study variant).
- :func:`study` (command line ``python -m brainsex.validity study``) repeats the comparison over
  phantoms with other effect types (volume / intensity), grid resolutions and z-score variants, with
  :func:`brainsex.morphometry.positive_control` on each phantom; too heavy for the demo book, it
  writes a table the book shows when it is present.

The ranking and morphometry names are re-exported here for the chapters written against them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainsex import BrainsexError
from brainsex._docs import fill_doc
from brainsex.atlas import labels_on, region_neighbours, region_scores, resample_atlas_to
from brainsex.cache import FileCache
from brainsex.io import as_array, is_image
from brainsex.morphometry import (
    PERFECT_ALL,
    PERFECT_SAMPLE,
    TBM_SYN,
    WARP_NAMES,
    PositiveControl,
    log_jacobian_map,
    phantom_log_jacobians,
    positive_control,
    region_test_table,
    tbm_region_means,
    tbm_region_test,
)
from brainsex.ranking import (
    has_truth,
    planted_recovery,
    planted_truth,
    ranking_report,
    report_long,
    select_scans,
    truth_map_ranking,
)
from brainsex.registration import labels_to_subject, nonlinear_transform, registration_image, tbm_transform
from brainsex.run import PhantomDir, PreprocessDir, TrainDir, ValidityDir
from brainsex.saliency import average_maps, occlusion_by_region, template_space_maps

__all__ = [
    "DL_METHODS",
    "SCORINGS",
    "ExplainSettings",
    "MethodComparison",
    "method_rankings",
    "compare_methods",
    "reference_zscore",
    "cached_reference_zscores",
    "SIZE_PHANTOMS",
    "size_metrics",
    "size_experiments",
    "size_variant_plan",
    "size_summary",
    "study",
    "study_widths",
    "main",
    # re-exported from brainsex.ranking, brainsex.morphometry and brainsex.registration
    "planted_truth",
    "has_truth",
    "has_truth",
    "truth_map_ranking",
    "planted_recovery",
    "ranking_report",
    "report_long",
    "select_scans",
    "registration_image",
    "TBM_SYN",
    "tbm_transform",
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
    "CONTROL_MIN_RECOVERED",
    "CONTROL_MAX_RATIO",
    "MIN_MODEL_ACCURACY",
    "ControlVerdict",
    "control_verdict",
    "format_p",
    "comparison_table",
    "study_precision_table",
    "study_width_table",
    "StudyRecord",
    "read_study",
    "study_grid_summary",
]

#: Code version of the cached reference z-scores (:func:`study`).
ZREF_VERSION = "zref-1"


#: Attribution methods :func:`compare_methods` knows.
DL_METHODS = ("saliency", "saliency_signed", "smoothgrad", "integrated_gradients", "occlusion")


#: Ways of turning an average map into a ranking: the paper's weighted saliency score, the plain mean.
SCORINGS = ("weighted_score", "mean_saliency")


#: Occlusion gives region values directly: the mean |change of the male logit| over scans, and the
#: same divided by the region's voxel count (comparable to a mean saliency).
OCCLUSION_SCORINGS = ("abs_delta", "abs_delta_per_voxel")


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
    if transforms is None or not any(str(t).endswith(".mat") for t in transforms):
        return labels_on(atlas_img, subject_img)
    return labels_to_subject(atlas_img, subject_img, transforms)


def _occlusion_rankings(model: Any, scans: pd.DataFrame, template: Any, atlas_img: Any, labels: pd.DataFrame,
                        warp: str, cache_dir: Path | None, image_col: str, batch_size: int | str, device: Any,
                        progress: bool) -> dict[str, pd.DataFrame]:
    import nibabel as nib
    from tqdm.auto import tqdm

    atlas_t = resample_atlas_to(atlas_img, template) if is_image(atlas_img) else atlas_img
    ids = [int(v) for v in labels["label"] if int(v) != 0]
    abs_delta = np.zeros(len(ids))
    per_voxel = np.zeros(len(ids))
    seen = np.zeros(len(ids))
    for pid, path in tqdm(list(zip(scans["participant_id"], scans[image_col], strict=True)), desc="occlusion",
                          disable=not progress, leave=False):
        img = nib.load(str(path))
        tx = nonlinear_transform(img, template, cache_dir / f"{pid}_") if warp == "syn" else None
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


@dataclass(frozen=True)
class ExplainSettings:
    """How the attribution maps are computed and scored (:func:`method_rankings`, :func:`compare_methods`).

    Parameters
    ----------
    threshold : float, default=0.1
        Saliency threshold of the weighted saliency score (:func:`brainsex.atlas.region_scores`), in
        [0, 1] (the maps are min-max normalised).
    batch_size : int or "auto", default="auto"
        Scans per gradient pass, or occluded copies per forward pass for occlusion;
        ``"auto"`` chooses from the free memory.
    device : torch.device or str or None, default=None
        Device to run on; None: the device of the model's parameters.
    smoothgrad_samples : int, default=4
        Noisy copies per scan for ``smoothgrad``.
    smoothgrad_noise : float, default=0.15
        Noise level of ``smoothgrad`` (:func:`brainsex.saliency.saliency_maps`).
    ig_steps : int, default=8
        Integration steps of ``integrated_gradients``.
    """

    threshold: float = 0.1
    batch_size: int | str = "auto"
    device: Any = None
    smoothgrad_samples: int = 4
    smoothgrad_noise: float = 0.15
    ig_steps: int = 8

    def __post_init__(self) -> None:
        def count(v: Any) -> bool:
            return isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= 1

        checks = [
            (isinstance(self.threshold, int | float) and 0.0 <= float(self.threshold) <= 1.0,
             "threshold must be in [0, 1]"),
            (self.batch_size == "auto" or count(self.batch_size), "batch_size must be 'auto' or an integer >= 1"),
            (count(self.smoothgrad_samples), "smoothgrad_samples must be an integer >= 1"),
            (isinstance(self.smoothgrad_noise, int | float) and float(self.smoothgrad_noise) >= 0.0,
             "smoothgrad_noise must be >= 0"),
            (count(self.ig_steps), "ig_steps must be an integer >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise BrainsexError(f"ExplainSettings: {msg} (got {self!r})")


@dataclass(frozen=True)
class MethodComparison:
    """What :func:`compare_methods` returns.

    Attributes
    ----------
    table : pandas.DataFrame
        Long table: ``method``, ``scoring``, ``metric``, ``observed``, ``chance``, ``p_value``,
        ``n_scans``, ``top_k`` (the names of the top ``k`` regions, planted ones marked with ``*``).
    rankings : dict
        ``{(method, scoring): ranking table}``, best first (:func:`method_rankings`).
    """

    table: pd.DataFrame
    rankings: dict[tuple[str, str], pd.DataFrame]


@fill_doc
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
    image_col: str = "image_pp",
    n_jobs: int = 1,
    explain: ExplainSettings | None = None,
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
    - ``smoothgrad``: absolute gradient averaged over ``explain.smoothgrad_samples`` noisy copies;
    - ``integrated_gradients``: |IG| from a zero baseline with ``explain.ig_steps`` steps.

    Scorings: ``weighted_score`` (the paper's weighted saliency score) and ``mean_saliency`` (the
    plain regional mean). ``occlusion`` sets each atlas region (carried to the scan with the inverse
    of the cached affine) to the brain mean and records the change of the male logit
    (:func:`brainsex.saliency.occlusion_by_region`); its scorings are ``abs_delta`` and
    ``abs_delta_per_voxel``, whatever ``scorings`` says.

    Parameters
    ----------
    model : torch.nn.Module
        The trained classifier whose male logit is explained.
    table : pandas.DataFrame
        The scans to explain: ``participant_id`` and ``image_col``.
    template : nibabel.Nifti1Image
        The template image: the grid the maps are warped to and averaged on.
    atlas : nibabel.Nifti1Image or numpy.ndarray
        Atlas labels; an image is resampled to the template grid (nearest neighbour), an array must
        already be on it.
    labels : pandas.DataFrame
        The atlas label table (``label``, ``name``, ...).
    methods : sequence of str, default=DL_METHODS
        Attribution methods, some of :data:`DL_METHODS`.
    scorings : sequence of str, default=SCORINGS
        Scorings of the map methods, some of :data:`SCORINGS`.
    warp : {"syn", "none"}, default="syn"
        ``"syn"``: warp each map to the template with the subject's cached SyN transform (computed first
        when missing); ``"none"``: the maps stay on the rigidly registered grid.
    cache_dir : path or None, default=None
        Folder of the per-subject transforms; required for ``warp="syn"``.
    image_col : str, default="image_pp"
        Column of the preprocessed scans.
    n_jobs : int, default=1
        Parallel warps (joblib).
    explain : ExplainSettings or None, default=None
        Threshold of the weighted saliency score, batch size, device, SmoothGrad and Integrated
        Gradients settings (:class:`ExplainSettings`); None: its defaults.
    seed : int, default=0
        Seed of the SmoothGrad noise.
    progress : bool, default=False
        %(progress)s

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
    ex = ExplainSettings() if explain is None else explain
    if not isinstance(ex, ExplainSettings):
        raise BrainsexError(f"explain: expected ExplainSettings or None, got {type(ex).__name__}")
    cache = Path(cache_dir) if cache_dir is not None else None
    if warp == "syn":
        # compute (or find) each scan's transform exactly as the saliency chapter does (one shared cache)
        import nibabel as nib

        for pid, path in zip(table["participant_id"], table[image_col], strict=True):
            nonlinear_transform(nib.load(str(path)), template, cache / f"{pid}_")
    atlas_t = resample_atlas_to(atlas, template) if is_image(atlas) else atlas
    rankings: dict[tuple[str, str], pd.DataFrame] = {}
    mean_maps: dict[str, np.ndarray] = {}
    import nibabel as nib

    for method in methods:
        if method == "occlusion":
            for name, r in _occlusion_rankings(model, table, template, atlas, labels, warp, cache, image_col,
                                               ex.batch_size, ex.device, progress).items():
                rankings[(method, name)] = r
            continue
        base, signed, kw = method, False, {}
        if method == "saliency_signed":
            base, signed = "saliency", True
        elif method == "smoothgrad":
            kw = {"nt_samples": int(ex.smoothgrad_samples), "noise_level": float(ex.smoothgrad_noise),
                  "seed": int(seed)}
        elif method == "integrated_gradients":
            kw = {"n_steps": int(ex.ig_steps)}
        maps = template_space_maps(model, table, template, method=base, signed=signed, warp=warp,
                                   cache_dir=cache, image_col=image_col, batch_size=ex.batch_size, device=ex.device,
                                   n_jobs=n_jobs, progress=progress, **kw)
        mean = average_maps(maps)
        if signed:
            mean = minmax_normalise(np.abs(mean), constant="zeros")
        mean_maps[method] = mean
        img = nib.Nifti1Image(mean.astype(np.float32), template.affine)
        for scoring in scorings:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                rankings[(method, scoring)] = _scores_ranking(img, atlas_t, labels, scoring, ex.threshold)
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
    image_col: str = "image_pp",
    n_jobs: int = 1,
    explain: ExplainSettings | None = None,
    progress: bool = False,
) -> MethodComparison:
    """Every attribution method x scoring on the same model and scans, scored against the planted regions.

    Up to ``max_scans`` correctly classified scans of ``table`` (:func:`select_scans`) are explained
    with each method (:func:`method_rankings`); each ranking gets :func:`ranking_report` (precision@k,
    average precision, tolerant versions when ``neighbours`` is given -- by default computed from the
    atlas on the template grid -- with permutation chance levels).

    Parameters
    ----------
    model, table, template, atlas, labels
        As in :func:`method_rankings`; ``table`` is the pool the scans are drawn from (with ``y_true``
        and ``y_pred``, only the correctly classified ones).
    truth : iterable of int or pandas.DataFrame
        The planted region labels, or a table with a ``label`` column (:func:`planted_truth`).
    methods, scorings, warp, cache_dir, image_col, n_jobs, explain, progress
        Passed to :func:`method_rankings`.
    max_scans : int or None, default=24
        At most this many scans, balanced by sex (:func:`select_scans`); None keeps them all.
    neighbours : dict of int to set of int or None, default=None
        ``{label: neighbour labels}`` for the tolerant metrics; None computes them from the atlas on
        the template grid (:func:`brainsex.atlas.region_neighbours`).
    n_perm : int, default=1000
        Permutations of each metric's chance level.
    k : int, default=10
        The k of precision@k and the number of top regions listed.
    seed : int, default=0
        Seed of the scan draw, of the permutations and of the SmoothGrad noise.

    Returns
    -------
    MethodComparison
        ``table``: the long table (``method``, ``scoring``, ``metric``, ``observed``, ``chance``,
        ``p_value``, ``n_scans``, ``top_k``: the names of the top ``k`` regions, planted ones marked
        with ``*``); ``rankings``: the ``{(method, scoring): ranking}`` dict it scores.
    """
    scans = select_scans(table, max_scans=max_scans, seed=seed)
    if isinstance(truth, pd.DataFrame):
        truth = truth["label"]
    t = {int(v) for v in truth}
    if neighbours is None:
        neighbours = region_neighbours(labels_on(atlas, template))
    rankings, _ = method_rankings(model, scans, template, atlas, labels, methods=methods, scorings=scorings, warp=warp,
                                  cache_dir=cache_dir, image_col=image_col, n_jobs=n_jobs, explain=explain, seed=seed,
                                  progress=progress)
    parts = [_scored_ranking(r, method, scoring, t, neighbours, n_perm=n_perm, seed=seed, k=k, n_scans=len(scans))
             for (method, scoring), r in rankings.items()]
    return MethodComparison(table=pd.concat(parts, ignore_index=True), rankings=rankings)


def _scored_ranking(ranking: pd.DataFrame, method: str, scoring: str, truth: set[int],
                    neighbours: dict[int, set[int]], n_perm: int, seed: int, k: int, n_scans: int) -> pd.DataFrame:
    """One ranking's :func:`ranking_report` in long form, with the scan count and its top ``k`` names."""
    rep = ranking_report(ranking, truth, neighbours=neighbours, n_perm=n_perm, seed=seed, k=k)
    rep.insert(0, "scoring", scoring)
    rep.insert(0, "method", method)
    long = report_long(rep, id_cols=("method", "scoring"))
    present = ranking[ranking["n_voxels"] > 0] if "n_voxels" in ranking.columns else ranking
    names = [f"{n}{'*' if int(lab) in truth else ''}" for n, lab in
             zip(present["name"].head(k), present["label"].head(k), strict=True)]
    long["n_scans"] = n_scans
    long["top_k"] = "; ".join(names)
    return long


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
    ref = as_array(reference_mask, "reference_mask").astype(bool)
    if ref.shape != data.shape:
        raise BrainsexError(f"reference_mask: shape {ref.shape} differs from the image's {data.shape}")
    brain = (data != 0) if brain_mask is None else as_array(brain_mask, "brain_mask").astype(bool)
    vals = data[ref & brain]
    if vals.size < 10:
        raise BrainsexError(f"reference_mask: only {vals.size} reference voxels inside the brain; need >= 10")
    sd = float(vals.std())
    if not sd > 0:
        raise BrainsexError("reference_mask: the reference voxels have zero standard deviation")
    out = np.where(brain, (data - float(vals.mean())) / sd, 0.0).astype(np.float32)
    return nib.Nifti1Image(out, image.affine)


def cached_reference_zscores(table: pd.DataFrame, reference_mask: np.ndarray, cache_dir: str | os.PathLike,
                             image_col: str = "image_pp") -> list[str]:
    """:func:`reference_zscore` of every scan of ``table``, cached by content (:class:`brainsex.cache.FileCache`).

    Parameters
    ----------
    table : pandas.DataFrame
        ``participant_id`` and ``image_col`` (paths of the scans to re-standardise).
    reference_mask : numpy.ndarray
        The reference voxels (:func:`reference_zscore`).
    cache_dir : path
        Folder of the entries ``<participant_id>_zref-<key>/zref.nii.gz``; the key is the scan's and
        the mask's content and :data:`ZREF_VERSION`, so another scan or mask never gets an old file.
    image_col : str, default="image_pp"
        Column of the scans.

    Returns
    -------
    list of str
        The re-standardised scans' paths, in the table's order.
    """
    import nibabel as nib

    cache = FileCache("zref", ZREF_VERSION)
    mask = np.asarray(reference_mask, dtype=bool)
    out = []
    for pid, p in zip(table["participant_id"], table[image_col], strict=True):
        img = nib.load(str(p))

        def compute(folder: Path, img: Any = img) -> None:
            nib.save(reference_zscore(img, mask), folder / "zref.nii.gz")

        files = cache.get_or_compute(Path(cache_dir) / f"{pid}_", {"image": Path(p), "mask": mask}, {},
                                     compute, names=("zref.nii.gz",))
        out.append(str(files["zref.nii.gz"]))
    return out


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
# the validity chapter's verdicts and tables
# --------------------------------------------------------------------------------------------------
#: The positive control passes when perfect warps on everyone recover at least this many planted regions
#: (FDR q < 0.05 with the planted sign; the phantom plants ten, a few of which a coarse grid may lose).
CONTROL_MIN_RECOVERED = 8
#: Registered warps that carry less than this share of the planted difference (median over the planted
#: regions, :attr:`PositiveControl.ratio`) are said to lose it.
CONTROL_MAX_RATIO = 0.7
#: A study model with a test accuracy below this is near chance: its maps explain little.
MIN_MODEL_ACCURACY = 0.7


@dataclass
class ControlVerdict:
    """What the positive control (:func:`positive_control`) says, as the validity chapter reads it.

    Attributes
    ----------
    n_recovered
        Planted regions recovered with perfect warps on every subject.
    passes
        ``n_recovered >= min_recovered``: the phantom and the test are sound.
    registered
        Name of the first registered version (None when none ran).
    n_registered_subjects
        Its sample size (0 when none ran).
    registered_recovered, sample_recovered
        Planted regions it recovers, and perfect warps on the same sample (None when none ran).
    loses_difference
        The registered warps carry less than ``max_ratio`` of the planted difference.
    """

    n_recovered: int
    passes: bool
    registered: str | None
    n_registered_subjects: int
    registered_recovered: int | None
    sample_recovered: int | None
    loses_difference: bool


def control_verdict(
    control: PositiveControl,
    min_recovered: int = CONTROL_MIN_RECOVERED,
    max_ratio: float = CONTROL_MAX_RATIO,
) -> ControlVerdict:
    """Verdict of a positive control: whether it passes and whether the registered warps keep the planted difference.

    Parameters
    ----------
    control
        The result of :func:`positive_control`.
    min_recovered
        Planted regions perfect warps must recover for the control to pass (:data:`CONTROL_MIN_RECOVERED`).
    max_ratio
        Below this share of the planted difference the registered warps lose it (:data:`CONTROL_MAX_RATIO`).

    Returns
    -------
    ControlVerdict
    """
    recovered = {name: int(r["recovered"].sum()) for name, r in control.recoveries.items()}
    n_recovered = recovered[PERFECT_ALL]
    registered = [n for n in control.tables if n not in (PERFECT_ALL, PERFECT_SAMPLE)]
    first = registered[0] if registered else None
    return ControlVerdict(
        n_recovered=n_recovered,
        passes=n_recovered >= int(min_recovered),
        registered=first,
        n_registered_subjects=int(control.tables[first].attrs["n_subjects"]) if first else 0,
        registered_recovered=recovered[first] if first else None,
        sample_recovered=recovered.get(PERFECT_SAMPLE) if first else None,
        loses_difference=bool(first) and bool(control.ratio < float(max_ratio)),
    )


def format_p(p: float) -> str:
    """A p-value for a table: three decimals, ``< 0.001`` below that, ``n/a`` when missing.

    Parameters
    ----------
    p
        The p-value (None or NaN for a missing one).

    Returns
    -------
    str
    """
    if p is None or not np.isfinite(p):
        return "n/a"
    return f"{p:.3f}" if p >= 0.001 else "< 0.001"


def comparison_table(summary: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """One row per method and scoring: precision@k, average precision and tolerant precision@k with chance.

    Parameters
    ----------
    summary
        Long rows (:func:`report_long` with ``method`` and ``scoring`` columns), e.g. the chapter's
        ``validity_summary.tsv``.
    k
        The k of precision@k.

    Returns
    -------
    pandas.DataFrame
        ``method``, ``scoring`` and the observed values, chance levels (rounded to two decimals) and
        p-values (:func:`format_p`) of each metric, in the order of ``summary``.
    """
    wide = summary.pivot_table(index=["method", "scoring"], columns="metric",
                               values=["observed", "chance", "p_value"], sort=False)
    return pd.DataFrame({
        f"P@{k}": wide[("observed", f"precision_at_{k}")].round(2),
        f"P@{k} chance": wide[("chance", f"precision_at_{k}")].round(2),
        f"P@{k} p": wide[("p_value", f"precision_at_{k}")].map(format_p),
        "AP": wide[("observed", "average_precision")].round(2),
        "AP chance": wide[("chance", "average_precision")].round(2),
        "AP p": wide[("p_value", "average_precision")].map(format_p),
        f"P@{k} tolerant": wide[("observed", f"precision_at_{k}_tolerant")].round(2),
        "chance ": wide[("chance", f"precision_at_{k}_tolerant")].round(2),
    }).reset_index()


def study_precision_table(study: pd.DataFrame, k: int = 10, min_accuracy: float = MIN_MODEL_ACCURACY) -> pd.DataFrame:
    """The validity study's precision@k rows for display, with a note on models near chance.

    Parameters
    ----------
    study
        The study table (:func:`study`).
    k
        The k of precision@k.
    min_accuracy
        Models below this test accuracy are noted as near chance (:data:`MIN_MODEL_ACCURACY`).

    Returns
    -------
    pandas.DataFrame
        ``effect``, ``voxel_size``, ``width`` (the model's width; ``-`` for rows without a model),
        ``zscore``, ``method``, ``scoring``, ``accuracy``, ``n_scans``, ``observed``, ``chance``,
        ``p_value`` (formatted) and ``note``, in the order of ``study``; ``attrs["n_weak"]`` is the
        number of trained models near chance.
    """
    if "width" not in study.columns:  # a table from before the study trained several widths
        study = study.assign(width=np.where(study["zscore"] == "-", "-", "study"))
    s10 = study[study["metric"] == f"precision_at_{k}"].copy()
    s10["observed"] = s10["observed"].round(2)
    s10["chance"] = s10["chance"].round(2)
    s10["p_value"] = s10["p_value"].map(format_p)
    s10["note"] = np.where(s10["accuracy"] < min_accuracy, "model near chance: its maps explain little", "")
    s10["accuracy"] = s10["accuracy"].round(2)
    out = s10[["effect", "voxel_size", "width", "zscore", "method", "scoring", "accuracy", "n_scans", "observed",
               "chance", "p_value", "note"]]
    configs = study[study["zscore"] != "-"].drop_duplicates(["effect", "voxel_size", "zscore", "width"])
    out.attrs["n_weak"] = int((configs["accuracy"] < min_accuracy).sum())
    return out


def study_width_table(study: pd.DataFrame, k: int = 10, zscore: str = "brain") -> pd.DataFrame:
    """Precision@k of every method side by side for each grid and model width (the study's main view).

    Parameters
    ----------
    study
        The study table (:func:`study`).
    k
        The k of precision@k.
    zscore
        The z-score variant of the trained models shown (rows without a model -- truth map,
        morphometry -- are shown whatever it is).

    Returns
    -------
    pandas.DataFrame
        One row per effect x method x scoring (plus a ``model accuracy`` row per effect), one column per
        ``"<grid> mm · <width>"``; cells ``"0.20 (chance 0.09)"``, empty where the configuration did not run.
    """
    if "width" not in study.columns:
        study = study.assign(width=np.where(study["zscore"] == "-", "-", "study"))
    rows = study[(study["metric"] == f"precision_at_{k}") & study["zscore"].isin(["-", zscore])].copy()
    widths = [w for w in dict.fromkeys(rows["width"]) if w != "-"]
    long = []
    for (effect, vs), group in rows.groupby(["effect", "voxel_size"], sort=False):
        fixed = group[group["width"] == "-"]
        for w in widths or ["-"]:
            col = f"{vs:g} mm · {w}"
            acc = group.loc[group["width"] == w, "accuracy"].dropna()
            if len(acc):
                long.append((effect, "model accuracy", "test", col, f"{acc.iloc[0]:.2f}"))
            for r in pd.concat([fixed, group[group["width"] == w]]).itertuples(index=False):
                long.append((effect, r.method, r.scoring, col, f"{r.observed:.2f} (chance {r.chance:.2f})"))
    if not long:
        return pd.DataFrame()
    t = pd.DataFrame(long, columns=["effect", "method", "scoring", "column", "cell"])
    keys = ["effect", "method", "scoring"]
    order = list(dict.fromkeys(map(tuple, t[keys].to_numpy().tolist())))
    out = t.pivot(index=keys, columns="column", values="cell")
    out = out.reindex(index=pd.MultiIndex.from_tuples(order, names=keys), columns=list(dict.fromkeys(t["column"])))
    out.columns.name = None
    return out.fillna("").reset_index()


@dataclass(frozen=True)
class StudyRecord:
    """A committed validity-study folder as the chapter reads it (:func:`read_study`).

    Attributes
    ----------
    folder : pathlib.Path
        The study's output folder (``--out``).
    table : pandas.DataFrame or None
        Its table (:func:`study`), None when the folder has none.
    made : str
        When and how it was made ("made on <date> in <h> h with `<command>`"), or what is missing.
    """

    folder: Path
    table: pd.DataFrame | None
    made: str


def read_study(folder: str | os.PathLike) -> StudyRecord:
    """The table and the making of a study folder written by :func:`study` (for the validity chapter).

    Parameters
    ----------
    folder : path
        The study's ``--out`` folder (for example ``benchmarks/validity``).

    Returns
    -------
    StudyRecord
        ``table`` None when the folder holds no table; ``made`` says so.
    """
    from brainsex.io import read_table
    from brainsex.run import ValidityDir

    out = ValidityDir(folder)
    table = read_table(out.study_table) if out.study_table.is_file() else None
    if not out.study_info.is_file():
        made = "no record of the command was found" if table is not None else f"no study table at {out.study_table}"
        return StudyRecord(Path(folder), table, made)
    try:
        info = json.loads(out.study_info.read_text())
    except json.JSONDecodeError as exc:
        raise BrainsexError(f"{out.study_info}: not valid JSON ({exc})") from exc
    hours = info.get("seconds")
    made = (f"made on {str(info['date'])[:10] if info.get('date') else 'an unrecorded date'}"
            + (f" in {float(hours) / 3600:.1f} h" if hours is not None else "")
            + f" with `{info.get('command') or 'an unrecorded command'}`")
    return StudyRecord(Path(folder), table, made)


def study_grid_summary(study: pd.DataFrame, voxel_size: float, k: int = 10, zscore: str = "brain",
                       effect: str = "volume") -> dict[str, Any]:
    """What one grid of the study found, for the chapter's prose.

    Parameters
    ----------
    study : pandas.DataFrame
        The study table (:func:`study`).
    voxel_size : float
        The grid (mm) summarised.
    k : int, default=10
        The k of precision@k.
    zscore : str, default="brain"
        The z-score variant of the trained models summarised.
    effect : str, default="volume"
        The phantom's effect type summarised.

    Returns
    -------
    dict
        ``accuracy`` (width -> test accuracy), ``best_method`` (width -> (method, scoring, precision@k,
        chance) of the explanation with the highest precision@k), ``morphometry`` (method -> (precision@k,
        chance) for the registered- and perfect-warp controls and the truth map), ``chance`` (the median
        chance level of the explanations' precision@k).
    """
    rows = study[(study["voxel_size"].astype(float) == float(voxel_size)) & (study["metric"] == f"precision_at_{k}")
                 & (study["effect"] == effect)]
    if rows.empty:
        raise BrainsexError(f"the study table has no precision_at_{k} rows for the {effect} effect at {voxel_size:g} mm")
    if "width" not in rows.columns:
        rows = rows.assign(width=np.where(rows["zscore"] == "-", "-", "study"))
    models = rows[(rows["zscore"] == zscore) & (rows["width"] != "-")]
    fixed = rows[rows["zscore"] == "-"]
    accuracy, best = {}, {}
    for width, group in models.groupby("width", sort=False):
        acc = group["accuracy"].dropna()
        accuracy[str(width)] = float(acc.iloc[0]) if len(acc) else float("nan")
        top = group.sort_values("observed", ascending=False, kind="stable").iloc[0]
        best[str(width)] = (str(top["method"]), str(top["scoring"]), float(top["observed"]), float(top["chance"]))
    morph = {str(r.method): (float(r.observed), float(r.chance)) for r in fixed.itertuples(index=False)}
    chance = float(models["chance"].median()) if len(models) else float("nan")
    return {"accuracy": accuracy, "best_method": best, "morphometry": morph, "chance": chance}


# --------------------------------------------------------------------------------------------------
# is it just head size? the run's model beside models trained on size-only and region-only phantoms
# --------------------------------------------------------------------------------------------------
#: The phantoms of :func:`size_experiments`: name -> the :func:`brainsex.synthetic.make_cohort`
#: arguments that differ from the run's phantom. ``default`` is the run itself.
SIZE_PHANTOMS = {
    "default": {},
    "size_only": {"region_effect": 0.0},
    "regions_only": {"tiv_effect": False},
}

#: Metrics and subsets of the size-experiments table.
SIZE_METRICS = ("accuracy", "balanced_accuracy")
SIZE_SUBSETS = ("all", "inside_rtiv")
#: Columns of the size-experiments table (:attr:`brainsex.run.ValidityDir.size_experiments`).
SIZE_COLUMNS = ("phantom", "subset", "metric", "value", "ci_low", "ci_high", "n")
#: Code version of the cached size-experiments table.
SIZE_VERSION = "size-2"  # size-2: training scans through the run's recorded preprocessing

#: The training settings a size experiment copies from the run (what the training chapter passes).
SIZE_TRAIN_KEYS = ("channels", "epochs", "batch_size", "micro_batch", "lr", "scheduler", "select", "device", "seed",
                   "dropout")


def _rtiv_of(run: Any, predictions: pd.DataFrame) -> tuple[float, float]:
    """The run's R_tiv (chapter 04's ``rtiv.json``), or the overlap range of its test TIVs, or its cohort's."""
    from brainsex.io import read_table
    from brainsex.tiv import kde_overlap_range

    if run.tiv.rtiv.is_file():
        r = json.loads(run.tiv.rtiv.read_text())
        return float(r["low"]), float(r["high"])
    for table in (predictions, read_table(run.preprocess.table)):
        ok = table[table["status"] == "ok"] if "status" in table.columns else table
        f = pd.to_numeric(ok.loc[ok["sex"] == "F", "etiv_ml"], errors="coerce").dropna()
        m = pd.to_numeric(ok.loc[ok["sex"] == "M", "etiv_ml"], errors="coerce").dropna()
        try:
            return kde_overlap_range(f, m)
        except BrainsexError:
            continue
    raise BrainsexError(f"{run.root}: no R_tiv (no tiv/rtiv.json, and the TIVs of both sexes do not overlap)")


def size_metrics(predictions: pd.DataFrame, rtiv: tuple[float, float], phantom: str, n_bootstrap: int = 1000,
                 seed: int = 0) -> pd.DataFrame:
    """Accuracy and balanced accuracy of one model's test predictions, overall and inside R_tiv.

    Parameters
    ----------
    predictions
        Test predictions (:func:`brainsex.stages.predict_split`) with ``etiv_ml``.
    rtiv
        ``(low, high)`` of R_tiv in ml (paper section 2.6, :func:`brainsex.tiv.kde_overlap_range`).
    phantom
        Name written in the ``phantom`` column.
    n_bootstrap, seed
        Bootstrap resamples and seed of the 95 % confidence intervals (:func:`brainsex.evaluate.metrics`).

    Returns
    -------
    pandas.DataFrame
        :data:`SIZE_COLUMNS`, one row per subset x metric (a subset with no subject is left out).
    """
    from brainsex.tiv import metrics_in_range

    m = metrics_in_range(predictions, rtiv[0], rtiv[1], n_bootstrap=int(n_bootstrap), seed=int(seed))
    m = m[m["group"].isin(["all", "inside"]) & m["metric"].isin(SIZE_METRICS)].copy()
    m["subset"] = m["group"].map({"all": "all", "inside": "inside_rtiv"})
    m["phantom"] = phantom
    return m[list(SIZE_COLUMNS)].reset_index(drop=True)


def size_experiments(
    run_dir: str | os.PathLike,
    params: dict[str, Any],
    out: str | os.PathLike | None = None,
    rtiv: tuple[float, float] | None = None,
    phantoms: Sequence[str] = tuple(SIZE_PHANTOMS),
    n_bootstrap: int = 1000,
    n_workers: int = 1,
    progress: bool = True,
) -> pd.DataFrame:
    """Is it just head size? The run's model beside the same model trained on size-only and region-only phantoms.

    The phantom plants two sex differences: head size (TIV) and local volume changes in ten regions.
    Each variant of :data:`SIZE_PHANTOMS` keeps one of them: ``size_only`` is the run's phantom with
    ``region_effect=0`` (the sexes differ only in head size), ``regions_only`` the run's phantom with
    ``tiv_effect=False`` (both sexes draw their head size from one distribution; they differ only in
    the planted regions). A variant is generated with the run's seed and size, so each subject keeps
    its sex, age, site, pose, warp and noise (the phantom draws them from named streams; the
    participants are checked against the run's); with ``tiv_effect=False`` the head sizes differ by
    design. The variant's training and validation scans go through the run's own recorded
    preprocessing of the same subject (:func:`brainsex.reliance.preprocess_like`: the true brain mask,
    the run's rigid transform, the same z-score; the pose is the same, so nothing is estimated again);
    its test scans are preprocessed afresh (:func:`brainsex.preprocess.preprocess_cohort` with the
    true masks and the run's registration, :func:`brainsex.preprocess.recorded_registration`), since
    they also need eTIV for R_tiv. Each variant is then trained on **the run's split** (the same participant IDs in train, val and test) with
    the run's training settings (:func:`brainsex.stages.train_model`), and its test subjects are
    predicted (:func:`brainsex.stages.predict_split`). ``default`` is the run's own model and
    predictions. Accuracy and balanced accuracy with bootstrap CIs are computed overall and inside the
    run's R_tiv (:func:`size_metrics`).

    The table is cached in the run (:class:`brainsex.cache.FileCache`, keyed by the run's phantom,
    split and predictions, R_tiv and every setting); the variants' phantoms, preprocessing and
    training resume on their own too (``validity/size_experiments/<phantom>/``).

    Parameters
    ----------
    run_dir
        A phantom run (``cohort/phantom``, ``preprocess/``, ``train/split.tsv``,
        ``evaluate/predictions.tsv``), e.g. ``runs/demo`` or a matched phantom run
        (:func:`brainsex.matched.matched_phantom_run`).
    params
        The run's training settings (the keys of :data:`SIZE_TRAIN_KEYS` present are used, as in
        :func:`brainsex.stages.train_model`).
    out
        Folder of the table (:class:`brainsex.run.ValidityDir`); default the run's ``validity/``.
    rtiv
        R_tiv ``(low, high)`` in ml; default the run's ``tiv/rtiv.json`` (chapter 04), else the overlap
        range of the run's test TIVs (:func:`brainsex.tiv.kde_overlap_range`).
    phantoms
        Which of :data:`SIZE_PHANTOMS` to report.
    n_bootstrap
        Bootstrap resamples of the confidence intervals.
    n_workers
        Parallel workers. On a CPU the variant phantoms are computed side by side, each with its share of
        the workers, of torch's threads and of the memory (:func:`size_variant_plan`); the trainings'
        last digits depend on the thread count, so a table is reproducible for a given ``n_workers``.
    progress
        Show a progress bar over the phantoms (and the stages' own bars).

    Returns
    -------
    pandas.DataFrame
        :data:`SIZE_COLUMNS`: ``phantom``, ``subset`` (``all`` / ``inside_rtiv``), ``metric``
        (``accuracy`` / ``balanced_accuracy``), ``value``, ``ci_low``, ``ci_high``, ``n``; also written
        to :attr:`brainsex.run.ValidityDir.size_experiments`. ``attrs["rtiv"]`` holds R_tiv and
        ``attrs["chance_accuracy"]`` the accuracy of always answering the test set's commoner sex.
    """
    from brainsex.io import read_table, write_json_atomic, write_table
    from brainsex.run import RunDir, ValidityDir

    run = RunDir(run_dir)
    bad = [p for p in phantoms if p not in SIZE_PHANTOMS]
    if bad or not phantoms:
        raise BrainsexError(f"phantoms: unknown {bad}; expected some of {', '.join(SIZE_PHANTOMS)}")
    for path, what in ((run.phantom.generation, "the phantom's generation record (a phantom run)"),
                       (run.train.split, "the run's split (chapter 02)"),
                       (run.evaluate.predictions, "the run's test predictions (chapter 03)")):
        if not Path(path).is_file():
            raise BrainsexError(f"{path}: missing; size_experiments needs {what}")
    target = ValidityDir(out) if out is not None else run.validity
    predictions = read_table(run.evaluate.predictions, dtype={"participant_id": str})
    low, high = rtiv if rtiv is not None else _rtiv_of(run, predictions)
    settings = {k: params[k] for k in SIZE_TRAIN_KEYS if k in params}
    key_params = {"settings": json.loads(json.dumps(settings, default=str)), "rtiv": [float(low), float(high)],
                  "phantoms": list(phantoms), "n_bootstrap": int(n_bootstrap)}
    inputs = {"generation": Path(run.phantom.generation), "split": Path(run.train.split),
              "predictions": Path(run.evaluate.predictions)}
    name = target.size_experiments.name

    def compute(folder: Path) -> None:
        seed = int(settings.get("seed", 0))
        variants = _size_variants(run, [p for p in phantoms if p != "default"], settings, n_workers, progress)
        parts = [size_metrics(predictions if phantom == "default" else variants[phantom], (low, high), phantom,
                              n_bootstrap=n_bootstrap, seed=seed) for phantom in phantoms]
        write_table(pd.concat(parts, ignore_index=True), folder / name)
        y = predictions["y_true"].astype(int)
        write_json_atomic(folder / "info.json", {"rtiv": [float(low), float(high)],
                                                 "chance_accuracy": float(max(y.mean(), 1 - y.mean())),
                                                 "n_test": int(len(y))})

    files = FileCache(kind="size", version=SIZE_VERSION).get_or_compute(
        target.size_cache, inputs, key_params, compute, names=[name, "info.json"])
    table = read_table(files[name])
    write_table(table, target.size_experiments)
    info = json.loads(files["info.json"].read_text())
    table.attrs.update({"rtiv": tuple(info["rtiv"]), "chance_accuracy": info["chance_accuracy"],
                        "n_test": info["n_test"]})
    return table


def size_summary(table: pd.DataFrame, metric: str = "balanced_accuracy", chance: float = 0.5) -> dict[str, str]:
    """Short texts of the size-experiments table for the chapter's prose.

    Parameters
    ----------
    table
        The table of :func:`size_experiments`.
    metric
        The metric summarised.
    chance
        Its chance level (0.5 for balanced accuracy).

    Returns
    -------
    dict
        ``"<phantom>_<subset>"`` -> ``"87 % (95 % CI 79-93 %, n = 32)"`` for every row of ``metric``, and
        ``"<phantom>_<subset>_vs_chance"`` -> ``"above chance"`` when the CI's lower end is above
        ``chance``, else ``"not distinguishable from chance"``.
    """
    out: dict[str, str] = {}
    for r in table[table["metric"] == metric].itertuples(index=False):
        key = f"{r.phantom}_{r.subset}"
        ci = (f"95 % CI {100 * r.ci_low:.0f}–{100 * r.ci_high:.0f} %, " if pd.notna(r.ci_low) and pd.notna(r.ci_high)
              else "")
        out[key] = f"{100 * r.value:.0f} % ({ci}n = {int(r.n)})"
        out[f"{key}_vs_chance"] = ("above chance" if pd.notna(r.ci_low) and r.ci_low > chance
                                   else "not distinguishable from chance")
    return out


def size_variant_plan(n_variants: int, n_workers: int, device: str = "auto") -> tuple[int, int, int]:
    """How :func:`size_experiments` shares the CPU between its variant phantoms.

    On a CPU, variants run side by side in separate processes, one per worker (up to the number of
    variants), each with its share of the workers and of torch's threads: a small 3D CNN uses one
    thread more efficiently than two (measured on the demo's model: 0.48 s per batch of 16 on one
    thread, 0.33 s on two, so two single-threaded trainings finish ~27 % sooner than two two-threaded
    ones in turn). On a GPU (one device) they run in turn.

    Parameters
    ----------
    n_variants
        Variant phantoms to compute.
    n_workers
        Parallel workers allowed (``n_workers`` of :func:`size_experiments`).
    device
        The training device setting (:func:`brainsex.train.resolve_device`).

    Returns
    -------
    tuple of int
        ``(n_jobs, workers_per_job, threads_per_job)``; ``threads_per_job`` is 0 for "leave torch's
        setting alone" (one job).
    """
    from brainsex.train import resolve_device

    if int(n_variants) < 0 or int(n_workers) < 1:
        raise BrainsexError(f"size_variant_plan: n_variants must be >= 0 and n_workers >= 1, got {n_variants}, "
                            f"{n_workers}")
    jobs = min(int(n_variants), int(n_workers)) if resolve_device(device).type == "cpu" else 1
    if jobs <= 1:
        return 1, int(n_workers), 0
    import torch

    return jobs, max(1, int(n_workers) // jobs), max(1, torch.get_num_threads() // jobs)


def _size_variants(run: Any, variants: Sequence[str], settings: dict[str, Any], n_workers: int,
                   progress: bool) -> dict[str, pd.DataFrame]:
    """Test predictions of each variant phantom, side by side on a CPU (:func:`size_variant_plan`)."""
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    from brainsex.memory import USABLE_FRACTION, memory_budget

    jobs, workers, threads = size_variant_plan(len(variants), n_workers, str(settings.get("device", "auto")))
    bar = tqdm(total=len(variants), desc="size experiments", disable=not progress)
    if jobs == 1:
        out = {}
        for phantom in variants:
            out[phantom] = _size_variant_predictions(run, phantom, settings, n_workers, progress)
            bar.update()
        bar.close()
        return out
    # each process plans its micro-batches within its share of the memory (memory_budget's fraction once)
    budget = int(memory_budget("cpu") / USABLE_FRACTION / jobs)
    tasks = (delayed(_size_variant_job)(run.root, phantom, {**settings, "num_threads": threads}, workers, budget)
             for phantom in variants)
    out = {}
    for phantom, pred in Parallel(n_jobs=jobs, backend="loky", return_as="generator_unordered")(tasks):
        out[phantom] = pred
        bar.update()
    bar.close()
    return {phantom: out[phantom] for phantom in variants}


def _size_variant_job(run_root: Path, phantom: str, settings: dict[str, Any], n_workers: int,
                      budget_bytes: int) -> tuple[str, pd.DataFrame]:
    """One variant in a worker process, within ``budget_bytes`` of memory (a joblib task)."""
    from brainsex.memory import BUDGET_ENV
    from brainsex.run import RunDir

    before = os.environ.get(BUDGET_ENV)
    os.environ[BUDGET_ENV] = str(int(budget_bytes))
    try:
        return phantom, _size_variant_predictions(RunDir(run_root), phantom, settings, n_workers, progress=False)
    finally:  # the worker process is reused by later joblib calls
        if before is None:
            os.environ.pop(BUDGET_ENV, None)
        else:
            os.environ[BUDGET_ENV] = before


def _size_variant_predictions(run: Any, phantom: str, settings: dict[str, Any], n_workers: int,
                              progress: bool) -> pd.DataFrame:
    """Generate, preprocess, train on the run's split and predict one variant phantom of :data:`SIZE_PHANTOMS`."""
    from brainsex.io import read_table, write_table
    from brainsex.preprocess import preprocess_cohort, recorded_registration
    from brainsex.run import PreprocessDir, RunDir
    from brainsex.stages import predict_split, train_model, usable
    from brainsex.synthetic import make_cohort

    gen = json.loads(run.phantom.generation.read_text())["args"]
    work = RunDir(run.validity.size_variant(phantom))
    kwargs = {"n": gen["n"], "voxel_size": gen["voxel_size"], "seed": int(gen["seed"]),
              "sex_regions": {tuple(r) if isinstance(r, list) else r: int(sign) for r, sign in gen["sex_regions"]},
              "region_effect": float(gen["region_effect"]), "contrast_effect": float(gen.get("contrast_effect", 0.0)),
              "tiv_effect": bool(gen.get("tiv_effect", True)), "reference_source": gen.get("reference_source", "offline")}
    kwargs.update(SIZE_PHANTOMS[phantom])
    participants = make_cohort(work.phantom.root, n_workers=n_workers, progress=progress, **kwargs)
    # the same people: same IDs, sex, age and site as the run's phantom (only what the variant changes differs)
    own = read_table(run.phantom.participants, dtype={"participant_id": str})
    cols = ["participant_id", "sex", "age", "dataset", "vendor", "field"]
    mine = read_table(work.phantom.participants, dtype={"participant_id": str})[cols].astype(str)
    mine = mine.reset_index(drop=True)
    theirs = own[cols].astype(str).reset_index(drop=True)
    if not mine.equals(theirs):
        raise BrainsexError(f"{work.phantom.root}: the {phantom} phantom does not have the run's participants "
                            "(another generator version?); it cannot share the run's split")
    # ... and the same draws: pose, scanner, age effect and head (the head's scale follows its TIV)
    drawn = [c for c in read_table(run.phantom.poses).columns if c != "scale"]
    if not read_table(work.phantom.poses)[drawn].equals(read_table(run.phantom.poses)[drawn]):
        raise BrainsexError(f"{work.phantom.poses}: the {phantom} phantom's subjects do not have the run's poses and "
                            "scanner draws; it is not the same phantom with one factor changed")
    split = read_table(run.train.split, dtype={"participant_id": str})[["participant_id", "split"]]
    participants = participants.assign(participant_id=participants["participant_id"].astype(str))
    chosen = participants.merge(split, on="participant_id", how="inner")
    fit = chosen[chosen["split"] != "test"].drop(columns="split")
    test = chosen[chosen["split"] == "test"].drop(columns="split")
    voxel_size = float(gen["voxel_size"])
    pre_fit = _preprocess_like_run(fit, run, work.preprocess, n_workers, progress)
    registration = recorded_registration(read_table(run.preprocess.table), run.preprocess.root)
    pre_test = preprocess_cohort(test, PreprocessDir(run.validity.size_variant_test(phantom)), voxel_size=voxel_size,
                                 n_workers=n_workers, method="mask", etiv=True, progress=progress,
                                 registration=registration)
    pre = usable(pd.concat([pre_fit, pre_test], ignore_index=True))
    table = split.merge(pre, on="participant_id", how="inner")  # in the run's order
    write_table(table[["participant_id", "split"]], work.train.split)
    result = train_model(table, settings, work.train, resume="auto", progress=progress)
    pred = predict_split(result.model, table, split="test", device=settings.get("device", "auto"))
    write_table(pred, work.evaluate.predictions)
    return pred


def _preprocess_like_run(participants: pd.DataFrame, run: Any, out: Any, n_workers: int,
                         progress: bool) -> pd.DataFrame:
    """Each variant scan through its subject's recorded preprocessing in ``run``; rows with ``image_pp``.

    One content-keyed cache entry per subject (the variant's image and mask, the run's transform and
    marker), so a regenerated variant or a re-preprocessed run is never served an old image.
    """
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    from brainsex.run import PreprocessDir

    folder = PreprocessDir(out)
    rows = participants.to_dict("records")
    jobs = (delayed(_variant_scan)(str(run.root), str(r["participant_id"]), str(r["image"]), str(r["mask"]),
                                   str(folder.root)) for r in rows)
    paths = Parallel(n_jobs=max(int(n_workers), 1))(
        tqdm(jobs, total=len(rows), desc="variant scans", disable=not progress))
    return participants.assign(image_pp=[str(p) for p in paths], status="ok", reason="")


def _variant_scan(run_root: str, pid: str, image: str, mask: str, out: str) -> Path:
    import nibabel as nib

    from brainsex.io import atomic_path
    from brainsex.reliance import preprocess_like
    from brainsex.run import RunDir

    run = RunDir(run_root)
    own = run.preprocess.subject_outputs(pid)
    inputs = {"image": Path(image), "mask": Path(mask), "transform": own["rigid_transform"], "marker": own["marker"]}
    name = Path(own["image_pp"]).name

    def compute(tmp: Path) -> None:
        data = preprocess_like(nib.load(image), nib.load(mask), run, pid)
        with atomic_path(tmp / name) as t:
            nib.save(nib.Nifti1Image(data, nib.load(own["image_pp"]).affine), t)

    files = FileCache(kind="variant", version=SIZE_VERSION).get_or_compute(Path(out) / f"{pid}_", inputs, {},
                                                                            compute, names=[name])
    return files[name]


# --------------------------------------------------------------------------------------------------
# the study: effect types x grids x z-score variants (too heavy for the demo book)
# --------------------------------------------------------------------------------------------------
def _study_config(effect: str, region_effect: float, contrast_effect: float) -> dict[str, float]:
    if effect == "volume":
        return {"region_effect": float(region_effect), "contrast_effect": 0.0}
    if effect == "contrast":
        return {"region_effect": 0.0, "contrast_effect": float(contrast_effect)}
    raise BrainsexError(f"effect {effect!r}: expected 'volume' or 'contrast'")


def study_widths(params: dict[str, Any]) -> dict[str, list[int]]:
    """The model widths a study trains: ``{name: channels}``.

    Parameters
    ----------
    params
        Resolved study parameters with ``widths`` (names: ``"study"`` for the study's own ``channels``,
        or a book profile -- ``demo``, ``paper`` -- whose ``channels`` are taken) and ``channels``.
        Without ``widths`` the study's own width is the only one.

    Returns
    -------
    dict
        Channels per width name, in the order given.
    """
    from brainsex.profiles import load_profiles

    names = list(params.get("widths") or ["study"])
    if not names:
        raise BrainsexError("widths: give at least one model width")
    books = load_profiles()
    out: dict[str, list[int]] = {}
    for name in names:
        if name == "study":
            out[name] = [int(c) for c in params["channels"]]
        elif name in books and "channels" in (books[name].get("params") or {}):
            out[name] = [int(c) for c in books[name]["params"]["channels"]]
        else:
            raise BrainsexError(f"widths: {name!r} is neither 'study' nor a book profile with channels "
                                f"({', '.join(sorted(books))})")
    return out


def study(
    out_dir: str | os.PathLike = "benchmarks/validity",
    work_dir: str | os.PathLike | None = None,
    profile: str = "study",
    progress: bool = True,
    **params: Any,
) -> pd.DataFrame:
    """Sweep phantoms (effect type x grid) and z-score variants; write the study table.

    For each voxel size and effect type a phantom is made (:func:`brainsex.synthetic.make_cohort`:
    ``volume`` plants ``region_effect`` volume changes, ``contrast`` plants ``contrast_effect``
    intensity changes in the same ten regions and no volume change), preprocessed with the cohort's
    true brain masks (skull stripping is not what is studied here, and it is the slowest step), split,
    and for each z-score variant (``brain``: the paper's per-scan z-score; ``reference``: the same
    scans re-standardised on deep white matter far from the planted regions, :func:`reference_zscore`)
    an SFCN of each width in ``widths`` is trained and :func:`compare_methods` run on its correctly
    classified test scans. Split,
    training, prediction and accuracy are the book's stages (:mod:`brainsex.stages`: the same split,
    leakage check, checkpoint rule ``select`` and :func:`brainsex.evaluate.metrics`). With ``tbm`` the
    positive control (:func:`tbm_region_test`) runs once per phantom (it does not depend on the
    z-score), with registered warps (on ``tbm_subjects`` subjects, or everyone) and with the phantom's
    true deformations (:func:`phantom_log_jacobians`); the truth-map ceiling (:func:`truth_map_ranking`)
    is reported too.

    Everything intermediate goes to ``work_dir`` (default ``<out_dir>/work``, not meant to be kept);
    the result is :attr:`brainsex.run.ValidityDir.study_table` in ``out_dir`` (one row per
    configuration x width x method x scoring x metric, with accuracy, scan counts and the chance level)
    and :attr:`~brainsex.run.ValidityDir.study_info` (the arguments, the channels of each width, the
    date, the command, the total time and the seconds of each stage). Re-running reuses phantoms,
    preprocessing, warps and trainings that match.

    Parameters
    ----------
    out_dir
        Folder of the result.
    work_dir
        Folder of the intermediate files (default ``<out_dir>/work``).
    profile
        The study profile in ``profiles.yaml`` (``kind: study``) whose parameters are the defaults:
        ``voxel_sizes``, ``effects`` (``volume``/``contrast``), ``zscores`` (``brain``/``reference``),
        ``n_subjects``, ``region_effect``, ``contrast_effect``, the training settings (``epochs``,
        ``channels``, ``batch_size``, ``lr``, ``select``, ``device``, ``seed``), ``widths`` (model
        widths to train: ``"study"`` is ``channels``, any book profile's name -- ``demo``, ``paper`` --
        takes that profile's ``channels``), ``methods``, ``scorings``, ``max_scans``, ``warp``,
        ``tbm``, ``tbm_subjects`` (registered-warp sample size; null for everyone), ``n_perm`` and
        ``n_workers``.
    progress
        Show progress bars.
    **params
        Values that replace the profile's (an unknown name is an error).

    Returns
    -------
    pandas.DataFrame
        The study table.
    """
    from brainsex.profiles import resolve_profile

    clock = _StageClock()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    p = resolve_profile(profile, params, kind="study")
    out = ValidityDir(out_dir)
    work = Path(work_dir) if work_dir is not None else out / "work"
    widths = study_widths(p)
    args = json.loads(json.dumps({k: v for k, v in p.items() if k != "n_workers"}, default=list))
    args["width_channels"] = {name: list(ch) for name, ch in widths.items()}
    for z in p["zscores"]:
        if z not in ("brain", "reference"):
            raise BrainsexError(f"zscores: {z!r} is not 'brain' or 'reference'")

    rows: list[pd.DataFrame] = []
    for vs in p["voxel_sizes"]:
        grid = _study_grid(vs)
        for effect in p["effects"]:
            rows += _study_phantom(effect, grid, p, widths, work / f"{effect}_{vs:g}mm", clock, progress)
    result = _study_table(rows)
    _write_study(out, result, args, started, clock)
    return result


#: Columns of the study table, in order.
_STUDY_COLUMNS = ["effect", "voxel_size", "zscore", "width", "method", "scoring", "metric", "observed", "chance",
                  "p_value", "accuracy", "n_scans", "n_recovered"]


class _StageClock:
    """Seconds of each stage of :func:`study` (``with clock.stage(name, config): ...``), from its creation."""

    def __init__(self) -> None:
        self.start = time.time()
        self.records: list[dict[str, Any]] = []

    @contextmanager
    def stage(self, stage: str, config: str) -> Iterator[None]:
        t0 = time.time()
        yield
        self.records.append({"config": config, "stage": stage, "seconds": round(time.time() - t0, 1)})


@dataclass(frozen=True)
class _StudyGrid:
    """One voxel size's references: template, atlas image and label table, region neighbours."""

    voxel_size: float
    template: Any
    atlas: Any
    labels: pd.DataFrame
    neighbours: dict[int, set[int]]


def _study_grid(vs: float) -> _StudyGrid:
    """The offline template and atlas at ``vs`` mm and the atlas's region neighbours."""
    from brainsex.templates import load_atlas, load_template

    template = load_template(vs, source="offline")
    atlas, labels = load_atlas(vs, source="offline")
    lab = np.rint(np.asarray(atlas.dataobj)).astype(int)
    return _StudyGrid(vs, template, atlas, labels, region_neighbours(lab))


def _with_ids(df: pd.DataFrame, **ids: Any) -> pd.DataFrame:
    """``df`` with the identifying columns ``ids`` put first, in their order."""
    for key, val in reversed(list(ids.items())):
        df.insert(0, key, val)
    return df


def _study_phantom(effect: str, grid: _StudyGrid, p: dict[str, Any], widths: dict[str, list[int]], base: Path,
                   clock: _StageClock, progress: bool) -> list[pd.DataFrame]:
    """The study rows of one phantom (effect type x grid), its work in ``base``.

    The truth-map ceiling, the positive control (with ``tbm``), then each z-score variant x model width.
    """
    import nibabel as nib

    from brainsex.preprocess import preprocess_cohort
    from brainsex.stages import split_subjects
    from brainsex.synthetic import make_cohort

    vs, tag = grid.voxel_size, base.name
    n_perm, seed, n_workers = int(p["n_perm"]), int(p["seed"]), int(p["n_workers"])
    phantom = PhantomDir(base / "phantom")
    with clock.stage("phantom", tag):
        participants = make_cohort(phantom.root, n=p["n_subjects"], voxel_size=vs, seed=seed, n_workers=n_workers,
                                   progress=progress, **_study_config(effect, p["region_effect"], p["contrast_effect"]))
    truth = planted_truth(phantom)
    prep = PreprocessDir(base / "preprocess")
    with clock.stage("preprocess", tag):
        pre = preprocess_cohort(participants, prep.root, voxel_size=vs, n_workers=n_workers,
                                method="mask", progress=progress)
    split = split_subjects(pre, seed=seed)
    pre = pre[pre["status"] == "ok"].reset_index(drop=True)
    ids = {"effect": effect, "voxel_size": vs}
    ceiling = truth_map_ranking(nib.load(phantom.truth_map(effect)), grid.atlas, grid.labels)
    rep = ranking_report(ceiling, truth, neighbours=grid.neighbours, n_perm=n_perm, seed=seed)
    rows = [_with_ids(report_long(rep), **ids, zscore="-", width="-", method="truth_map", scoring="abs_effect",
                      accuracy=np.nan, n_scans=np.nan)]
    if p["tbm"]:  # the positive control, registered warps on everyone and the perfect warps beside them
        with clock.stage("morphometry", tag):
            tbm_n = p.get("tbm_subjects")
            control = positive_control(pre, phantom.root, grid.template, grid.atlas, grid.labels, truth, prep.warps,
                                       warps=("tbm",), max_subjects=None if tbm_n is None else int(tbm_n),
                                       n_jobs=n_workers, n_perm=n_perm, neighbours=grid.neighbours, seed=seed,
                                       progress=progress)
        rows += _control_rows(control, ids)
    for z in p["zscores"]:
        table = _zscore_variant(split, z, grid, truth, base)
        for width, channels in widths.items():
            # the study's own width keeps its historical folder name, so earlier work is reused
            folder = base / (f"train_{z}" if width == "study" else f"train_{z}_{width}")
            rows.append(_model_rows(table, channels, folder, grid, truth, prep.warps, p, clock, progress,
                                    config=f"{tag}_{z}", ids={**ids, "zscore": z, "width": width}))
    return rows


def _control_rows(control: PositiveControl, ids: dict[str, Any]) -> list[pd.DataFrame]:
    """The positive control's rows: registered warps (``tbm``) and perfect warps on everyone."""
    rows = []
    for method, name in (("tbm", WARP_NAMES["tbm"]), ("tbm_perfect_warps", PERFECT_ALL)):
        long = report_long(control.reports[name])
        long["n_recovered"] = int(control.recoveries[name]["recovered"].sum())
        rows.append(_with_ids(long, **ids, zscore="-", width="-", method=method, scoring="abs_t", accuracy=np.nan,
                              n_scans=control.tables[name].attrs["n_subjects"]))
    return rows


def _zscore_variant(split: pd.DataFrame, zscore: str, grid: _StudyGrid, truth: pd.DataFrame,
                    base: Path) -> pd.DataFrame:
    """The split table with ``image_pp`` standardised as ``zscore`` says (``reference``: on deep white matter)."""
    table = split.copy()
    if zscore == "reference":
        ref = _reference_mask(grid.voxel_size, truth["label"].tolist(), grid.atlas)
        table["image_pp"] = cached_reference_zscores(table, ref, base / "zscore_reference")
    return table


def _model_rows(table: pd.DataFrame, channels: Sequence[int], folder: Path, grid: _StudyGrid, truth: pd.DataFrame,
                cache: Path, p: dict[str, Any], clock: _StageClock, progress: bool, *, config: str,
                ids: dict[str, Any]) -> pd.DataFrame:
    """Train one width on ``table`` (the book's stages), then :func:`compare_methods` on its test scans."""
    from brainsex.stages import evaluate_predictions, predict_split, train_model

    width = ids["width"]
    with clock.stage(f"train_{width}", config):
        res = train_model(table, {**p, "channels": list(channels)}, TrainDir(folder), resume="auto", progress=progress)
        pred = predict_split(res.model, table, split="test", device=p["device"])
        acc = float(evaluate_predictions(pred).loc["accuracy", "value"])
    test = pred.merge(table[["participant_id", "image_pp"]], on="participant_id", how="left")
    # the rigidly registered image is the moving image of the warps whatever the z-score:
    # warps are cached per subject, so both variants share them
    with clock.stage(f"explain_{width}", config):
        cmp_ = compare_methods(res.model, test, grid.template, grid.atlas, grid.labels, truth, methods=p["methods"],
                               scorings=p["scorings"], max_scans=p["max_scans"], warp=p["warp"], cache_dir=cache,
                               neighbours=grid.neighbours, n_perm=int(p["n_perm"]), seed=int(p["seed"]),
                               n_jobs=int(p["n_workers"]), explain=ExplainSettings(device=p["device"]),
                               progress=progress).table
    return _with_ids(cmp_.drop(columns=["top_k"]), **ids, accuracy=acc)


def _study_table(rows: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The rows as one table with the study's columns (missing ones empty)."""
    result = pd.concat(rows, ignore_index=True)
    for c in _STUDY_COLUMNS:
        if c not in result.columns:
            result[c] = np.nan
    return result[_STUDY_COLUMNS]


def _write_study(out: ValidityDir, result: pd.DataFrame, args: dict[str, Any], started: str, clock: _StageClock) -> None:
    """Write the study table and its info (arguments, dates, command, total and per-stage seconds)."""
    from brainsex.io import write_json_atomic, write_table

    write_table(result, out.study_table)
    command = ("python -m brainsex.validity study " + " ".join(sys.argv[2:])) if sys.argv[1:2] == ["study"] else ""
    write_json_atomic(out.study_info, {"args": args, "date": started,
                                       "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                       "command": command, "seconds": round(time.time() - clock.start, 1),
                                       "stages": clock.records})


def _parser() -> argparse.ArgumentParser:
    """The ``study`` command line; its options and their defaults are the study profile's parameters."""
    from brainsex.profiles import resolve_profile

    p = argparse.ArgumentParser(prog="python -m brainsex.validity", description=(
        "Validity study: do saliency rankings recover the phantom's planted regions? Sweeps effect type, grid "
        "and z-score variant and writes <out>/validity_study.tsv."))
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("study", help="run the sweep (minutes to hours, depending on the sizes)")
    s.add_argument("--out", default="benchmarks/validity", help="output folder (default: benchmarks/validity)")
    s.add_argument("--work", default=None, help="folder for phantoms, preprocessing and models (default: <out>/work)")
    s.add_argument("--profile", default="study", help="study profile in profiles.yaml (default: study)")
    s.add_argument("--no-progress", action="store_true")
    choices = {"effects": ["volume", "contrast"], "zscores": ["brain", "reference"], "methods": list(DL_METHODS),
               "scorings": list(SCORINGS), "warp": ["syn", "none"]}
    from brainsex.profiles import load_profiles

    choices["widths"] = ["study", *sorted(load_profiles())]
    for key, default in resolve_profile("study", kind="study").items():
        flag = "--" + key.replace("_", "-")
        if isinstance(default, bool):
            s.add_argument(f"--no-{key.replace('_', '-')}" if default else flag, dest=key, default=None,
                           action="store_const", const=not default, help=f"(profile: {key} = {default})")
        elif isinstance(default, list):
            kind = type(default[0]) if default else str
            s.add_argument(flag, dest=key, nargs="+", type=kind, default=None, choices=choices.get(key),
                           help=f"(profile: {' '.join(map(str, default))})")
        else:
            s.add_argument(flag, dest=key, type=int if default is None else type(default), default=None,
                           choices=choices.get(key), help=f"(profile: {default})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m brainsex.validity study [options]`` (see ``--help``).

    Parameters
    ----------
    argv
        Command-line arguments (default: ``sys.argv[1:]``).
    """
    args = vars(_parser().parse_args(argv))
    fixed = {k: args.pop(k) for k in ("cmd", "out", "work", "profile", "no_progress")}
    overrides = {k: v for k, v in args.items() if v is not None}
    try:
        import torch

        from brainsex.profiles import resolve_profile

        n_workers = overrides.get("n_workers", resolve_profile(fixed["profile"], kind="study")["n_workers"])
        torch.set_num_threads(max(1, int(n_workers)))
        res = study(out_dir=fixed["out"], work_dir=fixed["work"], profile=fixed["profile"],
                    progress=not fixed["no_progress"], **overrides)
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
