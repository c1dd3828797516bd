"""The paper-shaped synthetic phantom: T1-weighted heads with planted, known sex differences.

:func:`make_cohort` writes a BIDS-like tree that stands in for the paper's four cohorts (section 2.1,
Table 1) so that the whole book runs with no data agreement, and so that every method can be checked
against a known truth::

    out_dir/
      dataset_description.json
      participants.tsv                     participant_id, sex, age, dataset, vendor, field, tiv_ml
      sub-0001/anat/sub-0001_T1w.nii.gz    scanner space, scanner-like int16 intensities
      ground_truth/
        regions.tsv                        planted regions: atlas label, sign, signed effect
        sex_effect_map.nii.gz              male/female local volume ratio - 1, template space
        sex_contrast_map.nii.gz            (only with contrast_effect != 0)
        poses.tsv                          true rigid pose, global scale and scanner settings
        masks/sub-0001_desc-brain_mask.nii.gz   true brain mask in scanner space
      generation.json                      the arguments; a tree is reused only if they match

How one subject is made (all in template space first, then placed in the scanner):

1. **Demographics** (:func:`paper_demographics`): the paper's counts by dataset x vendor x field x sex
   and its ages (mean +- sd, range; truncated normals matched to them). TIV is drawn from a normal
   distribution per sex (see :data:`TIV_MODEL`). Ages and TIV use Latin hypercube sampling, so
   Table 1 and the KDE-overlap range come out close to the paper's for every seed.
2. **Anatomy**: the template's grey matter, white matter and CSF maps are warped by (a) the planted
   sex effect -- each planted atlas region is expanded or shrunk about its centroid by a smooth local
   displacement so that its volume changes by ``+-region_effect / 2`` (males one way, females the
   other; male/female volume ratio ``(1 + e/2) / (1 - e/2)``, about ``1 + e``), applied before any
   scaling, so it does not depend on head size; (b) age: ventricles enlarge (volume
   ``exp(0.018 (age - 25))`` with individual spread) and grey matter thins (0.25 % of its volume per
   year after 20, moved to CSF); (c) an individual smooth random deformation (about 2.5 mm) with its
   affine part removed, so that the pose and the TIV scaling are the subject's whole rigid placement
   and size (the three small displacement fields are added; :func:`subject_displacement`); (d) a global scaling that sets the intracranial volume to the
   sampled TIV (``tiv_effect=False``: both sexes share one TIV distribution; ``region_effect=0``: size
   is the only sex difference). ``contrast_effect`` adds an intensity difference in the same regions.
3. **Acquisition**: a skull and scalp shell (individual thickness) around the intracranial volume, a
   random rigid pose (rotations up to 10 degrees about each axis, translations up to 10 mm; recorded
   in ``ground_truth/poses.tsv``, see :func:`pose_matrix`), vendor- and field-dependent tissue
   contrast and gain, a smooth multiplicative bias field (stronger at 3 T), and Rician noise (1.5 T
   noisier). Images are written on a 224 x 256 x 224 mm scanner grid at ``voxel_size`` directly: the
   demo profile uses 4 mm, the smoke profile 8 mm, the paper profile 1 mm.

Every subject draws from named random streams, one per purpose (:data:`STREAMS`: pose, scanner,
age effect, head, warp, bias, thickness, noise), each a ``numpy.random.SeedSequence`` keyed by the seed,
the subject's index and the purpose (:func:`subject_rng`), so a tree is the same for a given seed
whatever ``n_workers`` is, and a draw never depends on how many numbers another purpose took. The
ground truth is *read*: :func:`subject_params` gives a subject's scalar draws (written to
``ground_truth/poses.tsv``) and :func:`phantom_truth` / :meth:`PhantomTruth.draws` a subject's
deformation (individual warp, planted sex field, age effect) from the phantom's folder.

Because every draw is named, a subject can be rendered again with exactly one factor switched and all
else identical (:func:`render_counterfactual`, the generator's own code path): the planted regions, all
or one at a time (:meth:`PhantomTruth.region_fields`), the head size (:func:`counterfactual_tiv`), or the
age-related changes. :mod:`brainsex.reliance` puts such scans through a trained model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage, optimize, special, stats

from brainsex import BrainsexError, templates
from brainsex._docs import fill_doc
from brainsex.io import atomic_path, write_json_atomic, write_table
from brainsex.run import PhantomDir

__all__ = [
    "PAPER_STRATA",
    "PAPER_AGES",
    "TIV_MODEL",
    "make_cohort",
    "paper_demographics",
    "allocate_strata",
    "tiv_distribution",
    "pose_matrix",
    "strata_counts",
    "subject_displacement",
    "GENERATOR_VERSION",
    "STREAMS",
    "subject_rng",
    "subject_params",
    "jacobian_determinant",
    "SubjectDraws",
    "PhantomTruth",
    "phantom_truth",
    "render_counterfactual",
    "counterfactual_tiv",
]

GENERATOR_VERSION = "phantom-3"  # phantom-3: named random streams per purpose

#: Purposes of a subject's random streams (:func:`subject_rng`); append new ones at the end.
STREAMS = ("pose", "scanner", "age", "head", "warp", "bias", "thickness", "noise")

# ------------------------------------------------------------------------------------ demographics
_STRATA_ROWS = [
    # dataset, vendor, field, females, males   (paper's Table 1, as given in the issue)
    ("ADNI", "GE", 1.5, 51, 53), ("ADNI", "GE", 3.0, 1, 1), ("ADNI", "Philips", 1.5, 6, 11),
    ("ADNI", "Philips", 3.0, 25, 20), ("ADNI", "Siemens", 1.5, 48, 41), ("ADNI", "Siemens", 3.0, 55, 55),
    ("CC-359", "GE", 1.5, 30, 30), ("CC-359", "GE", 3.0, 30, 30), ("CC-359", "Philips", 1.5, 33, 26),
    ("CC-359", "Philips", 3.0, 30, 30), ("CC-359", "Siemens", 1.5, 30, 30), ("CC-359", "Siemens", 3.0, 30, 30),
    ("Cam-CAN", "Siemens", 3.0, 330, 323),
    ("OASIS-3", "Siemens", 1.5, 33, 19), ("OASIS-3", "Siemens", 3.0, 383, 296),
]
#: Subjects per dataset x vendor x field x sex in the paper (2,110 in all).
PAPER_STRATA = pd.DataFrame(
    [(d, v, f, s, c) for d, v, f, nf, nm in _STRATA_ROWS for s, c in (("F", nf), ("M", nm))],
    columns=["dataset", "vendor", "field", "sex", "count"],
)
#: Ages per dataset and sex in the paper: mean, sd, min, max (years).
PAPER_AGES = pd.DataFrame(
    [
        ("ADNI", "F", 74.7, 5.7, 56, 90), ("ADNI", "M", 75.8, 6.0, 60, 88),
        ("CC-359", "F", 55.5, 7.0, 36, 80), ("CC-359", "M", 51.4, 8.1, 29, 71),
        ("Cam-CAN", "F", 53.8, 18.8, 18, 88), ("Cam-CAN", "M", 54.8, 18.4, 18, 87),
        ("OASIS-3", "F", 67.7, 9.2, 43, 95), ("OASIS-3", "M", 69.8, 8.6, 42, 89),
    ],
    columns=["dataset", "sex", "mean", "sd", "min", "max"],
)

# TIV model, calibrated once (not tuned): normal TIV per sex, females 10 % smaller on average, the same
# coefficient of variation in both sexes, and the parameters solved so that the KDE-overlap range at
# 20 % of each sex's maximum density (section 2.6) is the paper's R_tiv = [1,378, 1,666] ml. For a
# normal density the 20 % level sits at mean +- z sd with z = sqrt(2 ln 5) = 1.794; scipy's
# gaussian_kde (Scott's rule, bandwidth factor n^(-1/5)) widens the sd by sqrt(1 + n^(-2/5)) (1.030
# for the paper's 1,115 females, 1.031 for its 995 males). Solving
#     mu_M - z * 1.031 * c * mu_M = 1378,   0.9 mu_M + z * 1.030 * c * 0.9 mu_M = 1666
# gives c = 0.0792, mu_M = 1614.7 ml, mu_F = 1453.2 ml (tests/test_synthetic.py re-derives this).
#: TIV distribution (mean, sd) in ml per sex; ``"pooled"`` is used for both sexes with tiv_effect=False.
TIV_MODEL: dict[str, tuple[float, float]] = {
    "F": (1453.2, 115.2),
    "M": (1614.7, 128.0),
    "pooled": (1534.0, 121.6),
}
_TIV_LIMITS = (900.0, 2300.0)


def tiv_distribution(tiv_effect: bool = True) -> pd.DataFrame:
    """Mean and sd of the phantom's TIV (ml) for each sex (see :data:`TIV_MODEL`).

    Parameters
    ----------
    tiv_effect : bool, default=True
        False gives both sexes the pooled distribution (``TIV_MODEL["pooled"]``).

    Returns
    -------
    pandas.DataFrame
        One row per sex (F, M): ``sex``, ``mean_ml``, ``sd_ml``.
    """
    rows = [(s, *(TIV_MODEL[s] if tiv_effect else TIV_MODEL["pooled"])) for s in ("F", "M")]
    return pd.DataFrame(rows, columns=["sex", "mean_ml", "sd_ml"])


def allocate_strata(counts: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    """Share ``n`` subjects over strata in proportion to ``counts`` (largest-remainder rounding).

    Ties in the remainders go to the earlier stratum. The result sums to ``n``; with ``n`` equal to
    ``sum(counts)`` it is ``counts`` itself.

    Parameters
    ----------
    counts : sequence of int or numpy.ndarray
        Size of each stratum (e.g. the paper's counts); their sum must be positive.
    n : int
        Subjects to share out (>= 0).

    Returns
    -------
    numpy.ndarray
        Integer subjects per stratum, in the order of ``counts``.

    Raises
    ------
    BrainsexError
        For a negative ``n`` or counts that sum to zero or less.
    """
    counts = np.asarray(counts, dtype=float)
    if n < 0 or counts.sum() <= 0:
        raise BrainsexError(f"cannot share n={n} subjects over strata with counts {counts.tolist()}")
    quota = counts * n / counts.sum()
    out = np.floor(quota + 1e-9).astype(int)
    left = n - out.sum()
    order = np.argsort(-(quota - out), kind="stable")
    out[order[:left]] += 1
    return out


@functools.cache
def _truncnorm_params(mean: float, sd: float, lo: float, hi: float) -> tuple[float, float]:
    """Loc and scale of a normal truncated to [lo, hi] whose own mean and sd are ``mean`` and ``sd``."""

    def moments(p: np.ndarray) -> np.ndarray:
        loc, log_scale = p
        scale = math.exp(log_scale)
        m, v = stats.truncnorm.stats((lo - loc) / scale, (hi - loc) / scale, loc=loc, scale=scale, moments="mv")
        return np.array([float(m) - mean, math.sqrt(float(v)) - sd])

    fit = optimize.least_squares(moments, x0=[mean, math.log(sd)], method="lm")
    return round(float(fit.x[0]), 6), round(math.exp(float(fit.x[1])), 6)


def _strata_for(n: int | None) -> pd.DataFrame:
    strata = PAPER_STRATA.copy()
    total = int(strata["count"].sum())
    n = total if n is None else int(n)
    if n < 1:
        raise BrainsexError(f"n must be a positive number of subjects, got {n}")
    strata["n"] = allocate_strata(strata["count"].to_numpy(), n)
    # at least one female and one male per dataset whenever n allows it (n >= 2 per dataset), taken
    # from the largest stratum; keeps every dataset x sex cell of Table 1 populated in small cohorts
    if n >= 2 * strata["dataset"].nunique() and n < total:
        for (_dataset, _sex), grp in strata.groupby(["dataset", "sex"], sort=False):
            if strata.loc[grp.index, "n"].sum() == 0:
                strata.loc[grp["count"].idxmax(), "n"] += 1
                donor = strata["n"].idxmax()
                strata.loc[donor, "n"] -= 1
    return strata


def paper_demographics(n: int | None = None, seed: int = 0, tiv_effect: bool = True) -> pd.DataFrame:
    """The phantom's participants table (no images): the paper's strata, ages and a sampled TIV.

    Parameters
    ----------
    n : int or None, default=None
        Number of subjects; None gives the paper's 2,110. Smaller (or larger) cohorts keep the
        strata's proportions by largest-remainder rounding over the 30 dataset x vendor x field x sex
        cells; when ``n >= 8`` every dataset keeps at least one female and one male (one subject is
        moved from the largest cell for each empty dataset x sex pair).
    seed : int, default=0
        Random seed (ages, TIV, the order of participant IDs). Ages (per dataset and sex) and TIV (per
        sex) are drawn by Latin hypercube sampling from their distributions, so that Table 1's means
        and sds and the KDE-overlap range come out close to the paper's for every seed.
    tiv_effect : bool, default=True
        False draws both sexes' TIV from one pooled distribution.

    Returns
    -------
    pandas.DataFrame
        participant_id (``sub-0001``...), sex (F/M), age (years, 0.1), dataset, vendor, field (1.5/3.0),
        tiv_ml, sorted by participant_id.
    """
    strata = _strata_for(n)
    rng = np.random.default_rng(np.random.SeedSequence(int(seed)).spawn(1)[0])
    df = strata.loc[strata.index.repeat(strata["n"]), ["sex", "dataset", "vendor", "field"]].reset_index(drop=True)
    df["field"] = df["field"].astype(float)

    def stratified_uniform(k: int) -> np.ndarray:
        # one draw in each of k equal-probability bins, in random order (Latin hypercube sampling): the
        # sample's mean and spread stay close to the distribution's, whatever the seed
        return (rng.permutation(k) + rng.random(k)) / k

    df["age"] = np.nan
    ages = PAPER_AGES.set_index(["dataset", "sex"])
    for (dataset, sex), idx in df.groupby(["dataset", "sex"], sort=True).groups.items():
        a = ages.loc[(dataset, sex)]
        loc, scale = _truncnorm_params(float(a["mean"]), float(a["sd"]), float(a["min"]), float(a["max"]))
        lo, hi = (float(a["min"]) - loc) / scale, (float(a["max"]) - loc) / scale
        df.loc[idx, "age"] = np.round(stats.truncnorm.ppf(stratified_uniform(len(idx)), lo, hi, loc=loc, scale=scale), 1)
    df["tiv_ml"] = np.nan
    for sex, idx in df.groupby("sex", sort=True).groups.items():
        mu, sd = TIV_MODEL[str(sex)] if tiv_effect else TIV_MODEL["pooled"]
        tiv = stats.norm.ppf(stratified_uniform(len(idx)), loc=mu, scale=sd)
        df.loc[idx, "tiv_ml"] = np.round(np.clip(tiv, *_TIV_LIMITS), 1)
    df = df[["sex", "age", "dataset", "vendor", "field", "tiv_ml"]]
    order = rng.permutation(len(df))
    width = max(4, len(str(len(df))))
    df = df.iloc[order].reset_index(drop=True)
    df.insert(0, "participant_id", [f"sub-{i + 1:0{width}d}" for i in range(len(df))])
    return df


def strata_counts(participants: pd.DataFrame) -> pd.DataFrame:
    """Subjects per dataset x vendor x field x sex (the layout of :data:`PAPER_STRATA`).

    Parameters
    ----------
    participants : pandas.DataFrame
        A participants table with ``dataset``, ``vendor``, ``field`` and ``sex`` columns
        (e.g. :func:`paper_demographics`).

    Returns
    -------
    pandas.DataFrame
        ``dataset``, ``vendor``, ``field``, ``sex`` and ``count``, one row per non-empty cell.
    """
    return (participants.groupby(["dataset", "vendor", "field", "sex"]).size().rename("count").reset_index())


# ----------------------------------------------------------------------------------- acquisition
# Tissue intensities relative to white matter, WM level in scanner units, noise (fraction of WM) and
# bias-field strength (sd of the log gain) by vendor and field. Plausible, not measured, values: GE
# IR-SPGR, Philips TFE and Siemens MPRAGE differ in grey/white contrast, CSF level and scaling.
_SCANNER = {
    # (vendor, field): gm, csf, wm_level, noise, bias
    ("GE", 1.5): (0.72, 0.24, 1100.0, 0.045, 0.06),
    ("GE", 3.0): (0.68, 0.20, 1500.0, 0.025, 0.12),
    ("Philips", 1.5): (0.78, 0.32, 2200.0, 0.045, 0.06),
    ("Philips", 3.0): (0.75, 0.28, 3000.0, 0.025, 0.12),
    ("Siemens", 1.5): (0.74, 0.22, 450.0, 0.045, 0.06),
    ("Siemens", 3.0): (0.70, 0.18, 650.0, 0.025, 0.12),
}
_SKULL, _DIPLOE, _SCALP = 0.08, 0.45, 0.95  # relative to white matter
_SCANNER_FOV_MM = (224.0, 256.0, 224.0)
_SCANNER_CENTRE = np.array([0.0, -18.0, 10.0])
_POSE_CENTRE = np.array([0.0, -18.0, 18.0])  # centre of the template grid: rotations and scaling act here
_MAX_ROT_DEG, _MAX_SHIFT_MM = 10.0, 10.0
_WARP_SPACING_MM, _WARP_SD_MM = 12.0, 2.5


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    ax, ay, az = np.deg2rad([rx, ry, rz])
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


def pose_matrix(pose: Mapping[str, Any] | pd.Series, include_scale: bool = False) -> np.ndarray:
    """The 4 x 4 world-to-world matrix that placed a subject in the scanner.

    Maps template-space coordinates (mm, RAS) of the subject's anatomy to scanner coordinates:
    ``y = c + R (s (x - c)) + t`` with ``R = Rz Ry Rx`` (degrees about the world axes),
    ``c = (center_x, center_y, center_z)`` and ``s = scale`` (only with ``include_scale=True``).
    Rigid registration of the image back to the template should recover the inverse of the rigid part.

    Parameters
    ----------
    pose : mapping or pandas.Series
        A row of ``ground_truth/poses.tsv`` (rot_x_deg, rot_y_deg, rot_z_deg, trans_x_mm, trans_y_mm,
        trans_z_mm, center_x, center_y, center_z, scale).
    include_scale : bool, default=False
        Include the global (TIV) scaling.
    """
    rot = _rotation(float(pose["rot_x_deg"]), float(pose["rot_y_deg"]), float(pose["rot_z_deg"]))
    c = np.array([float(pose["center_x"]), float(pose["center_y"]), float(pose["center_z"])])
    t = np.array([float(pose["trans_x_mm"]), float(pose["trans_y_mm"]), float(pose["trans_z_mm"])])
    lin = rot * (float(pose["scale"]) if include_scale else 1.0)
    out = np.eye(4)
    out[:3, :3] = lin
    out[:3, 3] = c + t - lin @ c
    return out


def _scanner_grid(voxel_size: float) -> tuple[tuple[int, int, int], np.ndarray]:
    shape = tuple(int(math.ceil(f / voxel_size - 1e-9)) for f in _SCANNER_FOV_MM)
    affine = np.eye(4)
    affine[:3, :3] *= voxel_size
    affine[:3, 3] = _SCANNER_CENTRE - (np.asarray(shape) - 1) / 2.0 * voxel_size
    return shape, affine  # type: ignore[return-value]


# ------------------------------------------------------------------------------ planted regions
def _normalise_regions(sex_regions: Any) -> list[tuple[Any, int]]:
    """[(region spec, sign)] from None / a sequence / a mapping {region: sign}."""
    if sex_regions is None:
        items: list[Any] = list(templates.PAPER_TOP10)
        return [(r, 1 if i % 2 == 0 else -1) for i, r in enumerate(items)]
    if isinstance(sex_regions, Mapping):
        out = []
        for r, s in sex_regions.items():
            if s not in (1, -1, 1.0, -1.0):
                raise BrainsexError(f"sex_regions: the sign of {r!r} must be +1 or -1, got {s!r}")
            out.append((r, int(s)))
        return out
    if isinstance(sex_regions, str) or not isinstance(sex_regions, Sequence):
        raise BrainsexError(
            "sex_regions must be None, a list of regions (('Pallidum', 'right'), 'Right Pallidum' or a label "
            f"number) or a mapping region -> +1/-1; got {sex_regions!r}"
        )
    return [(r, 1 if i % 2 == 0 else -1) for i, r in enumerate(sex_regions)]


def _region_weights(
    atlas: np.ndarray, groups: list[list[int]], tau_mm: float, grid_vs: float
) -> tuple[np.ndarray, np.ndarray]:
    """Smooth weights of label groups on the grid at ``grid_vs``, and the groups' centroids (mm).

    ``w_r = 1`` inside region r and ``exp(-d^2 / (2 tau^2))`` at distance ``d`` (mm) outside it,
    computed on the 1 mm atlas (in a box around the region) and sampled at the coarse grid.
    """
    shape, affine = templates.target_grid(grid_vs)
    weights = np.zeros((len(groups), *shape), np.float32)
    centroids = np.zeros((len(groups), 3))
    objects = ndimage.find_objects(atlas.astype(np.int32))
    pad = int(math.ceil(3.5 * tau_mm)) + 2
    coarse_in_1mm = np.linalg.inv(templates.GRID_AFFINE) @ affine
    axes = [coarse_in_1mm[i, i] * np.arange(shape[i]) + coarse_in_1mm[i, 3] for i in range(3)]
    for g, labs in enumerate(groups):
        boxes = [objects[lab - 1] for lab in labs if lab - 1 < len(objects) and objects[lab - 1] is not None]
        if not boxes:
            continue
        lo = np.maximum(np.min([[sl.start for sl in b] for b in boxes], 0) - pad, 0)
        hi = np.minimum(np.max([[sl.stop for sl in b] for b in boxes], 0) + pad, templates.GRID_SHAPE)
        box = np.isin(atlas[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], labs)
        centroid_vox = np.argwhere(box).mean(0) + lo
        centroids[g] = templates.GRID_AFFINE[:3, :3] @ centroid_vox + templates.GRID_AFFINE[:3, 3]
        dist = ndimage.distance_transform_edt(~box)
        w_box = np.exp(-(dist**2) / (2 * tau_mm**2)).astype(np.float32)
        # coarse grid points inside the box, as box voxel coordinates
        sel = [np.flatnonzero((ax >= lo[i]) & (ax <= hi[i] - 1)) for i, ax in enumerate(axes)]
        if any(len(x) == 0 for x in sel):
            continue
        grid = np.meshgrid(*[axes[i][sel[i]] - lo[i] for i in range(3)], indexing="ij")
        vals = ndimage.map_coordinates(w_box, np.stack([x.ravel() for x in grid]), order=1)
        weights[g][np.ix_(*sel)] = vals.reshape([len(x) for x in sel])
    return weights, centroids


def _scaling_field(weights: np.ndarray, centroids: np.ndarray, scales: Sequence[float], grid_vs: float) -> np.ndarray:
    """Backward displacement ``D(y) = -sum_r w_r(y) (1 - 1/k_r) (y - c_r)`` on the grid (3, *shape).

    Sampling the template at ``y + D(y)`` makes region r ``k_r^3`` times larger (``k = inf`` gives the
    unit field ``-w (y - c)``).
    """
    shape, affine = templates.target_grid(grid_vs)
    world = [affine[i, i] * np.arange(shape[i]) + affine[i, 3] for i in range(3)]
    disp = np.zeros((3, *shape), np.float32)
    for w, c, k in zip(weights, centroids, scales, strict=True):
        a = np.float32(1.0 - 1.0 / k)
        if a == 0:
            continue
        for i in range(3):
            rel = (world[i] - c[i]).astype(np.float32).reshape([-1 if j == i else 1 for j in range(3)])
            disp[i] -= a * w * rel
    return disp


def jacobian_determinant(disp: np.ndarray, voxel_size: float) -> np.ndarray:
    """det(I + grad D) of a backward displacement field (3, *grid) on a regular grid (float32).

    Parameters
    ----------
    disp : numpy.ndarray of shape (3, X, Y, Z)
        Displacement in mm.
    voxel_size : float
        Grid spacing in mm.
    """
    g = [[np.gradient(disp[i], voxel_size, axis=k).astype(np.float32) for k in range(3)] for i in range(3)]
    for i in range(3):
        g[i][i] += 1.0
    (a, b, c), (d, e, f), (h, k, m) = g
    return a * (e * m - f * k) - b * (d * m - f * h) + c * (d * k - e * h)


def _planted_weights(atlas1: np.ndarray, ids: Sequence[int], voxel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """Smooth weights (R, *grid) and centroids (R, 3) of the planted regions (one atlas label each)."""
    return _region_weights(atlas1, [[int(i)] for i in ids], max(3.0, float(voxel_size)), float(voxel_size))


def _planted_parts(weights: np.ndarray, centroids: np.ndarray, signs: Sequence[int], region_effect: float,
                   sex: str, grid_vs: float) -> list[np.ndarray]:
    """Each planted region's own displacement field (3, *grid) for one sex.

    Made by :func:`_scaling_field` one region at a time, with the scales :func:`_context` uses, so that
    adding them in order gives ``ctx["disp_M"]`` / ``ctx["disp_F"]`` exactly.
    """
    e, d = float(region_effect), (1 if sex == "M" else -1)
    return [_scaling_field(weights[r:r + 1], centroids[r:r + 1], [(1 + d * s * e / 2) ** (1 / 3)], grid_vs)
            for r, s in enumerate(signs)]


# ------------------------------------------------------------------------------ context (shared)
def _context(voxel_size: float, regions: list[tuple[Any, int]], region_effect: float, contrast_effect: float,
             source: str) -> tuple[dict[str, np.ndarray], pd.DataFrame, dict[str, float]]:
    """Everything the subjects share: template maps, planted fields, region table."""
    vs = voxel_size
    shape, affine = templates.target_grid(vs)
    tissue = templates.tissue_arrays(vs)  # offline, nilearn (see templates.load_tissue_maps)
    mask1 = templates.mask_array(1.0, "offline")
    key = f"{vs:g}mm".replace(".", "p")
    mask = templates.cached_array(
        f"offline_softmask_{key}", lambda: templates.smooth_sample(mask1.astype(np.float32), vs).astype(np.float32))
    icv_template_ml = float(mask1.sum()) / 1000.0

    def signed_distance() -> np.ndarray:
        inside = mask1.astype(bool)
        return (ndimage.distance_transform_edt(~inside) - ndimage.distance_transform_edt(inside)).astype(np.float32)

    dist1 = templates.cached_array("offline_signed_distance_1mm", signed_distance)
    dist = dist1 if vs == 1.0 else templates.cached_array(
        f"offline_signed_distance_{key}", lambda: templates.smooth_sample(dist1, vs).astype(np.float32))

    atlas_img, labels = templates.load_atlas(1.0, source)
    atlas1 = np.asarray(atlas_img.dataobj)
    ids = templates.region_label_ids([r for r, _ in regions], labels) if regions else []
    signs = [s for _, s in regions]
    lab_tab = labels.set_index("label")
    rows = []
    counts = np.bincount(atlas1.ravel().astype(np.int64), minlength=int(labels["label"].max()) + 1)
    for (_spec, sign), lab in zip(regions, ids, strict=True):
        r = lab_tab.loc[lab]
        vol = float(counts[lab]) / 1000.0
        rows.append({"name": r["name"], "region": r["region"], "hemisphere": r["hemisphere"], "label": int(lab),
                     "atlas": labels.attrs.get("atlas", ""), "atlas_source": labels.attrs.get("source", ""),
                     "sign": int(sign), "effect": sign * float(region_effect),
                     "contrast": sign * float(contrast_effect) + 0.0, "template_volume_ml": round(vol, 3)})
    if len(set(ids)) != len(ids):
        raise BrainsexError(f"sex_regions lists a region twice: {[r['name'] for r in rows]}")
    if any(r["template_volume_ml"] == 0 for r in rows):
        empty = [r["name"] for r in rows if r["template_volume_ml"] == 0]
        raise BrainsexError(f"sex_regions {empty} have no voxels in the atlas ({labels.attrs.get('atlas')})")
    region_table = pd.DataFrame(rows, columns=["name", "region", "hemisphere", "label", "atlas", "atlas_source",
                                               "sign", "effect", "contrast", "template_volume_ml"])

    # template maps sampled together: grey matter, white matter, CSF, signed distance to the brain, mask
    ctx: dict[str, np.ndarray] = {"tmaps": np.stack([tissue["gm"], tissue["wm"], tissue["csf"], dist, mask]),
                                  "dist": dist[None]}
    e = float(region_effect)
    weights, centroids = _planted_weights(atlas1, ids, vs)
    if e != 0.0 and ids:
        disp_m = _scaling_field(weights, centroids, [(1 + s * e / 2) ** (1 / 3) for s in signs], vs)
        disp_f = _scaling_field(weights, centroids, [(1 - s * e / 2) ** (1 / 3) for s in signs], vs)
        effect_map = jacobian_determinant(disp_f, vs) / jacobian_determinant(disp_m, vs) - 1.0
        ctx["disp_M"], ctx["disp_F"] = disp_m, disp_f
    else:
        ctx["disp_M"] = ctx["disp_F"] = np.zeros((3, *shape), np.float32)
        effect_map = np.zeros(shape)
    ctx["effect_map"] = effect_map.astype(np.float32)
    if contrast_effect != 0.0 and ids:
        signed = np.tensordot(np.asarray(signs, np.float32), weights, axes=1)
        ctx["contrast_M"] = (1.0 + signed * contrast_effect / 2).astype(np.float32)[None]
        ctx["contrast_F"] = (1.0 - signed * contrast_effect / 2).astype(np.float32)[None]
    # ventricles: unit-effect field; the subject's field is a(age) * this (a = 1 - V^(-1/3))
    vent_names = [("Lateral Ventricle", "right"), ("Lateral Ventricle", "left"),
                  ("Inferior Lateral Ventricle", "right"), ("Inferior Lateral Ventricle", "left")]
    vent_groups = [templates.region_label_ids([v], labels) for v in vent_names]
    vent_groups.append(templates.region_label_ids([("Third Ventricle", "right"), ("Third Ventricle", "left")], labels))
    v_weights, v_centroids = _region_weights(atlas1, vent_groups, max(8.0, vs), vs)
    ctx["disp_vent"] = _scaling_field(v_weights, v_centroids, [np.inf] * len(vent_groups), vs)
    info = {"icv_template_ml": icv_template_ml, "voxel_size": vs}
    return ctx, region_table, info


def _tune_malloc() -> None:
    """Keep freed memory in the worker (glibc).

    Each subject allocates and frees the same large arrays, and returning them to the system every
    time costs page faults (about 15 % of the run).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


@functools.lru_cache(maxsize=1)  # a new run's context evicts (and unmaps) the previous one
def _load_context(folder: str) -> dict[str, np.ndarray]:
    _tune_malloc()  # only ever called in joblib workers
    return {p.stem: np.load(p, mmap_mode="r") for p in Path(folder).glob("*.npy")}


# ------------------------------------------------------------------------------------- one subject
def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return f / max(float(f.std()), 1e-12)


def subject_rng(seed: int, index: int, purpose: str) -> np.random.Generator:
    """Subject ``index``'s random stream for one ``purpose`` (:data:`STREAMS`).

    ``numpy.random.SeedSequence(seed, spawn_key=(index + 1, STREAMS.index(purpose)))``: independent of
    every other subject's and purpose's stream, and of the demographics' (spawn key ``(0,)``).

    Parameters
    ----------
    seed : int
        The cohort's seed.
    index : int
        The subject's row in ``participants.tsv`` (0-based).
    purpose : str
        One of :data:`STREAMS`.

    Returns
    -------
    numpy.random.Generator
    """
    if purpose not in STREAMS:
        raise BrainsexError(f"random stream {purpose!r}: expected one of {', '.join(STREAMS)}")
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(index) + 1, STREAMS.index(purpose))))


def subject_params(row: Mapping[str, Any], seed: int, index: int) -> dict[str, Any]:
    """A subject's scalar draws: pose, scanner settings, age effect, head (the rows of ``poses.tsv``).

    Parameters
    ----------
    row : mapping
        The subject's participants row (``participant_id``, ``vendor``, ``field``, ``age``).
    seed : int
        The cohort's seed.
    index : int
        The subject's row in the participants table.

    Returns
    -------
    dict
        ``rot_*_deg``, ``trans_*_mm``, ``center_*`` (pose, :func:`pose_matrix`), ``gm_ratio``,
        ``csf_ratio``, ``wm_level``, ``noise_frac``, ``bias_sd`` (scanner), ``ventricle_factor``,
        ``gm_loss`` (age effect), ``skull_mm``, ``scalp_mm`` (head).
    """
    gm_ratio, csf_ratio, wm_level, noise, bias = _SCANNER[(str(row["vendor"]), float(row["field"]))]
    pose, scanner = subject_rng(seed, index, "pose"), subject_rng(seed, index, "scanner")
    age_rng, head = subject_rng(seed, index, "age"), subject_rng(seed, index, "head")
    rot = pose.uniform(-_MAX_ROT_DEG, _MAX_ROT_DEG, 3)
    shift = pose.uniform(-_MAX_SHIFT_MM, _MAX_SHIFT_MM, 3)
    age = float(row["age"])
    return {
        "participant_id": row["participant_id"],
        "rot_x_deg": round(float(rot[0]), 4), "rot_y_deg": round(float(rot[1]), 4), "rot_z_deg": round(float(rot[2]), 4),
        "trans_x_mm": round(float(shift[0]), 4), "trans_y_mm": round(float(shift[1]), 4),
        "trans_z_mm": round(float(shift[2]), 4),
        "center_x": _POSE_CENTRE[0], "center_y": _POSE_CENTRE[1], "center_z": _POSE_CENTRE[2],
        "gm_ratio": round(gm_ratio + scanner.normal(0, 0.015), 4),
        "csf_ratio": round(max(csf_ratio + scanner.normal(0, 0.02), 0.05), 4),
        "wm_level": round(wm_level * float(np.exp(scanner.normal(0, 0.15))), 2),
        "noise_frac": round(noise * float(np.exp(scanner.normal(0, 0.2))), 5),
        "bias_sd": bias,
        "ventricle_factor": round(float(np.exp(0.018 * (age - 25) + age_rng.normal(0, 0.2))), 4),
        "gm_loss": round(float(np.clip(0.0025 * max(age - 20, 0) * np.exp(age_rng.normal(0, 0.2)), 0, 0.4)), 4),
        "skull_mm": round(float(head.uniform(4.0, 7.0)), 3),
        "scalp_mm": round(float(head.uniform(4.0, 8.0)), 3),
    }


def _edge(v: np.ndarray) -> np.ndarray:
    """Smooth step (logistic, 0.7 mm) used for the skull and scalp boundaries."""
    return special.expit(v * np.float32(1 / 0.7))


_CORNERS = np.array([(dx, dy, dz) for dx in (0, 1) for dy in (0, 1) for dz in (0, 1)])


def _trilinear_plan(v: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Corner indices and weights for trilinear sampling at voxel coordinates ``v`` (3, N).

    Coordinates outside the grid are clamped to its edge (``mode="nearest"``); the third output marks
    the points that lie inside the grid. One plan serves any number of fields on the same grid.
    """
    size = np.asarray(shape, np.float32)[:, None]
    v = v.astype(np.float32)
    inside = ((v > -0.5) & (v < size - 0.5)).all(axis=0)
    np.clip(v, 0.0, size - 1.0001, out=v)
    i0 = v.astype(np.intp)
    f = v - i0
    st = (shape[1] * shape[2], shape[2], 1)
    base = i0[0] * st[0] + i0[1] * st[1] + i0[2]
    idx = base[None, :] + (_CORNERS @ np.asarray(st))[:, None]
    wx, wy, wz = (np.stack([1.0 - f[i], f[i]]) for i in range(3))
    w = (wx[:, None, None] * wy[None, :, None] * wz[None, None, :]).reshape(8, -1)
    return idx, w, inside


def _gather(field: np.ndarray, plan: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Sample a channel-first field ((F,) + grid) with a :func:`_trilinear_plan`; returns (F, N) float32."""
    idx, w, _ = plan
    flat = field.reshape(field.shape[0], -1)
    out = np.empty((flat.shape[0], idx.shape[1]), np.float32)
    for ch in range(flat.shape[0]):
        f = np.asarray(flat[ch])
        acc = f.take(idx[0]) * w[0]
        for k in range(1, 8):
            acc += f.take(idx[k]) * w[k]
        out[ch] = acc
    return out


def _interp_matrix(n_out: int, n_in: int, step: float, offset: float) -> np.ndarray:
    """(n_out, n_in) linear-interpolation weights: output i reads input position ``offset + i * step``."""
    pos = np.clip(offset + step * np.arange(n_out), 0, n_in - 1.0001)
    i0 = pos.astype(int)
    f = pos - i0
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), i0] = 1 - f
    m[np.arange(n_out), i0 + 1] += f
    return m


def _upsample(coarse: np.ndarray, out_shape: Sequence[int], step: Sequence[float], offset: Sequence[float]) -> np.ndarray:
    """Separable linear interpolation of a small grid onto a larger one (see :func:`_interp_matrix`)."""
    mi, mj, mk = (_interp_matrix(n, c, st, of) for n, c, st, of in zip(out_shape, coarse.shape, step, offset, strict=True))
    out = np.tensordot(mi, coarse.astype(np.float32), axes=(1, 0))  # (I, b, c)
    out = np.tensordot(out, mj, axes=(1, 1))  # (I, c, J)
    out = np.tensordot(out, mk, axes=(1, 1))  # (I, J, K)
    return np.ascontiguousarray(out)


@functools.lru_cache(maxsize=2)
def _voxel_coords(shape: tuple[int, int, int]) -> np.ndarray:
    """(3, N) float32 voxel coordinates of a grid, C order (kept for grids up to 4 M voxels)."""
    return np.indices(shape, dtype=np.float32).reshape(3, -1)


def _affine_part(field: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Weighted least-squares affine part of a displacement field (3, *grid).

    Fits ``field[i](x) ~ c_i0 + sum_k c_ik x_k`` minimising ``sum_x weight(x) |field(x) - c x|^2``, with
    ``x`` the grid's voxel indices centred on the weight's centre of mass. The coordinates are
    separable, so every moment comes from marginal sums of the weight and of ``weight * field[i]``.

    Returns
    -------
    coef : numpy.ndarray of shape (3, 4)
        Rows ``[t_i, A_i0, A_i1, A_i2]`` (field units; per voxel for ``A``).
    axes : list of 3 numpy.ndarray
        The centred voxel coordinates along each axis.
    """
    w = np.asarray(weight, dtype=np.float64)
    total = float(w.sum())
    if not total > 0:
        raise BrainsexError("cannot fit the affine part of a displacement field over an empty weight")

    def margin(arr: np.ndarray, k: int) -> np.ndarray:
        return arr.sum(axis=tuple(j for j in range(3) if j != k))

    margins = [margin(w, k) for k in range(3)]
    axes = [np.arange(n, dtype=np.float64) for n in w.shape]
    axes = [a - float(m @ a) / total for a, m in zip(axes, margins, strict=True)]
    gram = np.zeros((4, 4))
    gram[0, 0] = total
    for k in range(3):
        gram[0, k + 1] = gram[k + 1, 0] = margins[k] @ axes[k]
        gram[k + 1, k + 1] = margins[k] @ axes[k] ** 2
    for a, b in ((0, 1), (0, 2), (1, 2)):
        pair = w.sum(axis=3 - a - b)  # (n_a, n_b)
        gram[a + 1, b + 1] = gram[b + 1, a + 1] = axes[a] @ pair @ axes[b]
    rhs = np.zeros((4, 3))
    for i in range(3):
        v = w * np.asarray(field[i], dtype=np.float64)
        rhs[0, i] = v.sum()
        for k in range(3):
            rhs[k + 1, i] = margin(v, k) @ axes[k]
    return np.linalg.solve(gram, rhs).T, axes


def _subtract_affine(field: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``field`` (3, *grid) minus its weighted least-squares affine part (:func:`_affine_part`), float32."""
    coef, axes = _affine_part(field, weight)
    out = np.array(field, dtype=np.float32, copy=True)
    for i in range(3):
        out[i] -= np.float32(coef[i, 0])
        out[i] -= (coef[i, 1] * axes[0]).astype(np.float32)[:, None, None]
        out[i] -= (coef[i, 2] * axes[1]).astype(np.float32)[None, :, None]
        out[i] -= (coef[i, 3] * axes[2]).astype(np.float32)[None, None, :]
    return out


def subject_displacement(ctx: Mapping[str, np.ndarray], row: Mapping[str, Any], params: Mapping[str, Any],
                         rng: np.random.Generator, voxel_size: float,
                         planted: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A subject's non-linear deformation of the template (step 2 of the module docstring), in mm.

    The backward displacement ``D`` on the template grid (the subject's anatomy at template point
    ``y`` is the template's at ``y + D(y)``, before the global scaling and the pose) is the sum of

    * the individual random warp: smooth noise on a 12 mm control grid (sd ``_WARP_SD_MM`` per
      component), linearly interpolated onto the grid, **minus its affine part** (translation and
      linear map, least squares weighted by the template's brain mask). The warp is thus purely
      non-linear: the subject's whole rigid placement is the pose in ``ground_truth/poses.tsv`` and
      its whole size change the TIV scaling;
    * the planted sex effect of the subject's sex (``ctx["disp_M"]`` / ``ctx["disp_F"]``);
    * the age-dependent ventricle enlargement ``a * ctx["disp_vent"]`` with
      ``a = 1 - ventricle_factor^(-1/3)``.

    The three are small and smooth, so they are added rather than composed (the difference is second
    order: about 0.1 mm for the planted effect). Used by the generator and by
    :meth:`PhantomTruth.draws` (read by :func:`brainsex.morphometry.phantom_log_jacobians`), so that
    both see the same deformation.

    Parameters
    ----------
    ctx : mapping
        The shared context (template maps and planted fields) of :func:`make_cohort`.
    row : mapping
        The subject's participants row (``sex``).
    params : mapping
        The subject's scalar draws (``ventricle_factor``), from :func:`subject_params`.
    rng : numpy.random.Generator
        The subject's ``"warp"`` stream (:func:`subject_rng`).
    voxel_size : float
        Template grid voxel size (mm).
    planted : numpy.ndarray of shape (3, *grid), optional
        The planted sex field to use instead of the subject's sex's (a counterfactual,
        :func:`render_counterfactual`).

    Returns
    -------
    total : numpy.ndarray, float32, shape (3, *grid)
        ``D`` in mm.
    warp : numpy.ndarray, float32, shape (3, *grid)
        Its individual (affine-free) random part, in mm.
    """
    vs = float(voxel_size)
    tshape, _ = templates.target_grid(vs)
    # control point i sits at t_origin + (i - 1) * spacing
    wshape = tuple(int(math.ceil(n * vs / _WARP_SPACING_MM)) + 3 for n in tshape)
    warp = np.stack([_upsample(_smooth_noise(rng, wshape, 1.5) * _WARP_SD_MM, tshape, [vs / _WARP_SPACING_MM] * 3,
                               [1.0] * 3) for _ in range(3)])
    warp = _subtract_affine(warp, ctx["tmaps"][4])
    vent_a = np.float32(1.0 - float(params["ventricle_factor"]) ** (-1.0 / 3.0))
    sex_field = ctx["disp_" + str(row["sex"])] if planted is None else planted
    total = warp + np.asarray(sex_field, np.float32) + vent_a * np.asarray(ctx["disp_vent"], np.float32)
    return total.astype(np.float32, copy=False), warp


def _make_subject(ctx: Mapping[str, np.ndarray], row: Mapping[str, Any], draw: tuple[int, int],
                  info: Mapping[str, Any], paths: tuple[str, str], chunk: int = 1 << 20) -> None:
    """Render one subject (:func:`_render_subject`) and write its image and true brain mask."""
    image, brain, saffine = _render_subject(ctx, row, subject_params(row, *draw), draw, info, chunk=chunk)
    _save(image, saffine, paths[0])
    _save(brain, saffine, paths[1])


def _render_subject(ctx: Mapping[str, np.ndarray], row: Mapping[str, Any], p: Mapping[str, Any],
                    draw: tuple[int, int], info: Mapping[str, Any], planted: np.ndarray | None = None,
                    contrast: np.ndarray | None = None,
                    chunk: int = 1 << 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One subject's scanner-space T1 (int16) and true brain mask (uint8), and the scanner affine.

    The generator's single code path (:func:`_make_subject`) and the counterfactual renderer's
    (:func:`render_counterfactual`): ``row`` gives the sex and TIV, ``p`` the scalar draws
    (:func:`subject_params`), ``draw`` = (seed, index) the random streams; ``planted`` / ``contrast``
    replace the subject's sex's planted fields.
    """
    vs = float(info["voxel_size"])
    seed, index = draw
    tshape, taffine = templates.target_grid(vs)
    sshape, saffine = _scanner_grid(vs)
    lin, off = _scanner_to_template_voxels(row, p, info, saffine, taffine)

    # non-linear part (template grid, mm): individual warp + planted sex effect + ventricles
    disp, warp = subject_displacement(ctx, row, p, subject_rng(seed, index, "warp"), vs, planted=planted)
    bias = _bias_field(subject_rng(seed, index, "bias"), sshape, vs, p["bias_sd"])
    # skull/scalp thickness varies smoothly with the direction from the head's centre
    thick_dir = subject_rng(seed, index, "thickness").standard_normal(3).astype(np.float32)
    thick_dir /= np.float32(math.sqrt(3.0))

    field = np.empty((4, *tshape), np.float32)  # U (3 channels, voxels) and the signed distance (mm)
    field[:3] = disp / np.float32(vs)
    field[3] = ctx["dist"][0]
    if contrast is None:
        contrast = ctx.get("contrast_" + str(row["sex"]))
    # farthest a point can be from the brain (before the non-linear part) and still show skull or scalp
    reach = 0.5 + 1.15 * float(p["skull_mm"]) + 1.2 * float(p["scalp_mm"]) + 2 * vs + float(np.abs(warp).max()) + 2.0
    centre_v = ((_POSE_CENTRE[:, None] - taffine[:3, 3:4]) / vs).astype(np.float32)
    candidates = _head_voxels(ctx["dist"], lin, off, tshape, sshape, reach + vs * math.sqrt(3))

    n_vox = int(np.prod(sshape))
    t1 = np.zeros(n_vox, np.float32)
    brain = np.zeros(n_vox, np.uint8)
    coords = _voxel_coords(tuple(sshape)) if n_vox <= 4_000_000 else None
    for start in range(0, len(candidates), chunk):
        flat_idx = candidates[start:start + chunk]
        ijk = coords[:, flat_idx] if coords is not None else np.stack(np.unravel_index(flat_idx, sshape)).astype(np.float32)
        xv = lin @ ijk + off
        u = _gather(field, _trilinear_plan(xv, tshape))
        near = u[3] < reach
        if not near.any():
            continue
        flat_idx = flat_idx[near]
        t1[flat_idx], brain[flat_idx] = _tissue_signal(ctx["tmaps"], contrast, xv[:, near] + u[:3, near], tshape, p,
                                                       centre_v, thick_dir)
    image = _rician_noise(t1.reshape(sshape) * bias.astype(np.float32), p, subject_rng(seed, index, "noise"))
    return image, brain.reshape(sshape), saffine


def _scanner_to_template_voxels(row: Mapping[str, Any], p: Mapping[str, Any], info: Mapping[str, Any],
                                saffine: np.ndarray, taffine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(lin, off)``: scanner voxel -> template voxel before the non-linear part (undo pose, then scaling)."""
    vs = float(info["voxel_size"])
    t_origin = taffine[:3, 3:4]
    scale = (float(row["tiv_ml"]) / float(info["icv_template_ml"])) ** (1.0 / 3.0)
    to_template = np.linalg.inv(pose_matrix({**p, "scale": scale}, include_scale=True)) @ saffine
    to_tvox = np.diag([1 / vs, 1 / vs, 1 / vs, 1.0]) @ np.vstack([to_template[:3], [0, 0, 0, 1]])
    to_tvox[:3, 3] -= t_origin[:, 0] / vs
    return to_tvox[:3, :3].astype(np.float32), to_tvox[:3, 3:4].astype(np.float32)


def _bias_field(rng: np.random.Generator, sshape: tuple[int, int, int], vs: float, bias_sd: float) -> np.ndarray:
    """Multiplicative bias field in scanner space (fixed to the coil, not to the head)."""
    bshape = tuple(max(int(math.ceil(n * vs / 40.0)), 2) + 2 for n in sshape)
    bias_coarse = _smooth_noise(rng, bshape, 1.0)
    step = [(b_ - 1) / max(s_ - 1, 1) for s_, b_ in zip(sshape, bshape, strict=True)]
    return np.exp(np.float32(bias_sd) * _upsample(bias_coarse, sshape, step, [0.0] * 3))


def _head_voxels(dist: np.ndarray, lin: np.ndarray, off: np.ndarray, tshape: tuple[int, ...],
                 sshape: tuple[int, int, int], margin: float) -> np.ndarray:
    """Flat indices of the scanner voxels that may show the head (signed distance below ``margin``).

    Air is skipped: a pass over every other voxel finds the head (with a margin), the rest stays 0.
    """
    sub = np.stack(np.meshgrid(*[np.arange(0, n, 2) for n in sshape], indexing="ij")).reshape(3, -1)
    d_sub = _gather(dist, _trilinear_plan(lin @ sub.astype(np.float32) + off, tshape))[0]
    near_sub = (d_sub < margin).reshape([len(range(0, n, 2)) for n in sshape])
    near_grid = near_sub.repeat(2, 0).repeat(2, 1).repeat(2, 2)[: sshape[0], : sshape[1], : sshape[2]]
    return np.flatnonzero(near_grid)


def _tissue_signal(tmaps: np.ndarray, contrast: np.ndarray | None, tv: np.ndarray, tshape: tuple[int, ...],
                   p: Mapping[str, Any], centre_v: np.ndarray, thick_dir: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free T1 signal and brain flag at template-voxel points ``tv`` (after the non-linear part).

    Tissue maps with the age-related grey-matter loss and the planted contrast, inside skull (with its
    diploe) and scalp whose thickness varies with the direction ``thick_dir`` from the head's centre.
    """
    g_ratio, c_ratio, wm_level = float(p["gm_ratio"]), float(p["csf_ratio"]), float(p["wm_level"])
    gm_loss = float(p["gm_loss"])
    skull_mm, scalp_mm = float(p["skull_mm"]), float(p["scalp_mm"])
    plan = _trilinear_plan(tv, tshape)
    gm, wm, csf, d, m = _gather(tmaps, plan)
    m = m * plan[2]  # no brain outside the template's field of view
    csf += gm * gm_loss
    gm *= 1.0 - gm_loss
    rel = tv - centre_v
    mod = (thick_dir @ rel) / np.maximum(np.sqrt((rel * rel).sum(0)), 1e-3)
    skull_t = skull_mm * (1 + 0.15 * mod)
    outer = 0.5 + skull_t
    skull = _edge(d - 0.5) * (1 - _edge(d - outer))
    diploe = _edge(d - (0.5 + 0.3 * skull_t)) * (1 - _edge(d - (0.5 + 0.7 * skull_t)))
    scalp = _edge(d - outer) * (1 - _edge(d - (outer + scalp_mm * (1 + 0.2 * mod))))
    tissue = wm + g_ratio * gm + c_ratio * csf
    if contrast is not None:
        tissue *= _gather(contrast, plan)[0]
    shell = _SKULL * skull + (_DIPLOE - _SKULL) * diploe + _SCALP * scalp
    return (tissue * (1 - skull - scalp).clip(0, 1) + shell) * wm_level, m >= 0.5


def _rician_noise(t1: np.ndarray, p: Mapping[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise (``noise_frac`` of the WM level), as int16."""
    wm_level = float(p["wm_level"])
    sigma = np.float32(float(p["noise_frac"]) * wm_level)
    real = t1 + sigma * rng.standard_normal(t1.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(t1.shape, dtype=np.float32)
    img = np.sqrt(real * real + imag * imag)
    return np.clip(np.rint(img), 0, 32767).astype(np.int16)


def _scanner_image(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    return img


def _save(data: np.ndarray, affine: np.ndarray, path: str) -> None:
    img = _scanner_image(data, affine)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def _subject_task(ctx_folder: str, info: dict[str, Any], row: dict[str, Any], draw: tuple[int, int],
                  paths: tuple[str, str]) -> str:
    _make_subject(_load_context(ctx_folder), row, draw, info, paths)
    return str(row["participant_id"])


# ----------------------------------------------------------------------------------------- driver
def _valid_image(path: Path, shape: tuple[int, ...]) -> bool:
    try:
        return path.is_file() and tuple(nib.load(path).shape) == tuple(shape)
    except Exception:  # any unreadable file is simply regenerated
        return False


@fill_doc
def make_cohort(
    out_dir: str | os.PathLike,
    spec: str = "paper",
    n: int | None = None,
    voxel_size: float = 1.0,
    sex_regions: Sequence[Any] | Mapping[Any, int] | None = None,
    region_effect: float = 0.10,
    tiv_effect: bool = True,
    seed: int = 0,
    n_workers: int = 1,
    progress: bool = True,
    contrast_effect: float = 0.0,
    reference_source: str = "offline",
) -> pd.DataFrame:
    """Write the synthetic phantom cohort (see the module docstring for what is in it).

    Parameters
    ----------
    out_dir : path
        Root of the BIDS-like tree (created; a tree made with other arguments is replaced).
    spec : {"paper"}, default="paper"
        Demographic design: the paper's Table 1 strata and ages (:data:`PAPER_STRATA`).
    n : int or None, default=None
        Number of subjects (None: 2,110); strata are kept by :func:`paper_demographics`.
    voxel_size : float, default=1.0
        Voxel size of the written images in mm. The images are generated at this size directly; the
        demo profile uses 4 mm (480 subjects in about a minute on 2 cores), the smoke profile 8 mm.
    sex_regions : sequence, mapping or None, default=None
        Atlas regions that differ between sexes. None: the paper's ten top CerebrA regions
        (:data:`brainsex.templates.PAPER_TOP10`) with alternating signs (+, -, +, ...; + means larger
        in males). A sequence takes the same alternating signs; a mapping gives each region its sign.
    region_effect : float, default=0.10
        Planted local volume difference: each region is scaled by ``1 +- sign * region_effect / 2``
        in volume (male / female), independently of head size. 0 leaves size as the only difference.
    tiv_effect : bool, default=True
        False draws both sexes' TIV from one distribution (no size difference).
    seed : int, default=0
        Random seed; the tree is identical for a seed whatever ``n_workers`` is.
    n_workers : int, default=1
        Parallel workers (joblib; -1 for all cores).
    progress : bool, default=True
        %(progress)s
    contrast_effect : float, default=0.0
        Planted intensity difference inside the planted regions (fraction, male/female
        ``1 +- sign * contrast_effect / 2``), in addition to the volume effect.
    reference_source : {"offline", "auto", "templateflow"}, default="offline"
        Where the atlas that locates the planted regions comes from (:func:`brainsex.templates.load_atlas`;
        the tissue maps and brain mask are always the offline ones); offline by default so that a seed
        gives the same phantom on every machine.

    Returns
    -------
    pandas.DataFrame
        The participants table (as in ``participants.tsv``) with two more columns: ``image`` and
        ``mask``, the paths of each subject's image and true brain mask (the tree's layout is
        :class:`brainsex.run.PhantomDir`).
    """
    vs = _check_cohort_args(spec, voxel_size, region_effect, contrast_effect, seed)
    regions = _normalise_regions(sex_regions)
    tree = PhantomDir(out_dir)
    args = {
        "generator": GENERATOR_VERSION, "spec": spec, "n": None if n is None else int(n), "voxel_size": vs,
        "sex_regions": [[list(r) if isinstance(r, tuple | list) else r, s] for r, s in regions],
        "region_effect": float(region_effect), "tiv_effect": bool(tiv_effect), "seed": int(seed),
        "contrast_effect": float(contrast_effect), "reference_source": reference_source,
    }
    previous = _previous_generation(tree)
    same = previous.get("args") == json.loads(json.dumps(args))

    participants = paper_demographics(n=n, seed=seed, tiv_effect=tiv_effect)
    sshape, _ = _scanner_grid(vs)
    img_paths = [tree.image(pid) for pid in participants["participant_id"]]
    mask_paths = [tree.mask(pid) for pid in participants["participant_id"]]
    gt_files = [tree.participants, tree.regions, tree.poses, tree.effect_map]
    if same and previous.get("complete") and all(p.is_file() for p in gt_files):
        if not _subjects_to_render(img_paths, mask_paths, sshape, reuse=True):
            return _with_paths(pd.read_csv(tree.participants, sep="\t"), img_paths, mask_paths)
    elif previous and not same:
        _remove_subjects(tree)

    tree.root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(tree.generation, {"args": args, "complete": False})
    ctx, region_table, info = _context(vs, regions, float(region_effect), float(contrast_effect), reference_source)
    records = participants.to_dict("records")
    todo = _subjects_to_render(img_paths, mask_paths, sshape, reuse=same)
    jobs = [(records[i], (int(seed), i), (str(img_paths[i]), str(mask_paths[i]))) for i in todo]
    _render_subjects(ctx, info, jobs, tree.root, n_workers, desc=f"phantom ({vs:g} mm)", progress=progress)

    # ground truth and tables (cheap; rewritten every time)
    _write_ground_truth(tree, ctx, region_table, info, records, int(seed), vs)
    _write_dataset_files(tree, participants, args, info, tiv_effect, reference_source)
    return _with_paths(participants, img_paths, mask_paths)


def _check_cohort_args(spec: str, voxel_size: float, region_effect: float, contrast_effect: float,
                       seed: int) -> float:
    """Check :func:`make_cohort`'s scalar arguments; return the voxel size (mm)."""
    if spec != "paper":
        raise BrainsexError(f"spec must be 'paper' (the paper's Table 1 design), got {spec!r}")
    vs = templates.check_voxel_size(voxel_size)
    for name, val, lo, hi in (("region_effect", region_effect, 0.0, 1.0), ("contrast_effect", contrast_effect, 0.0, 1.0)):
        if not (isinstance(val, int | float) and lo <= float(val) < hi):
            raise BrainsexError(f"{name} must be a fraction in [{lo}, {hi}), got {val!r}")
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise BrainsexError(f"seed must be a non-negative integer, got {seed!r}")
    return vs


def _previous_generation(tree: PhantomDir) -> dict[str, Any]:
    """The tree's ``generation.json`` (arguments and completeness), or ``{}`` when missing or unreadable."""
    if not tree.generation.is_file():
        return {}
    try:
        return json.loads(tree.generation.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _remove_subjects(tree: PhantomDir) -> None:
    """Remove a tree made with other arguments: its subjects (only folders this generator wrote) and truth."""
    for d in tree.root.glob("sub-*"):
        if d.is_dir():
            shutil.rmtree(d)
    shutil.rmtree(tree.truth_dir, ignore_errors=True)


def _subjects_to_render(images: Sequence[Path], masks: Sequence[Path], shape: tuple[int, ...],
                        reuse: bool) -> list[int]:
    """Indices of the subjects to (re)write: all, or with ``reuse`` those whose image or mask is not valid."""
    return [i for i, (a, b) in enumerate(zip(images, masks, strict=True))
            if not (reuse and _valid_image(a, shape) and _valid_image(b, shape))]


def _render_subjects(ctx: dict[str, np.ndarray], info: dict[str, Any],
                     jobs: Sequence[tuple[dict[str, Any], tuple[int, int], tuple[str, str]]], root: Path,
                     n_workers: int, desc: str, progress: bool) -> None:
    """Write each job's ``(row, (seed, index), (image, mask))`` subject, serially or with joblib workers."""
    from joblib import Parallel, delayed
    from threadpoolctl import threadpool_limits
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc=desc, unit="subject", disable=not progress)
    if n_workers == 1 or len(jobs) <= 1:
        with threadpool_limits(1):  # tiny matrix products: threads only get in each other's way
            for row, ss, paths in jobs:
                _make_subject(ctx, row, ss, info, paths)
                bar.update()
    else:
        # workers read the shared arrays from memory-mapped files (written once, removed at the end)
        ctx_dir = Path(tempfile.mkdtemp(prefix=".context-", dir=root))
        try:
            for key, arr in ctx.items():
                if key != "effect_map":
                    np.save(ctx_dir / f"{key}.npy", np.ascontiguousarray(arr))
            tasks = (delayed(_subject_task)(str(ctx_dir), info, row, ss, paths) for row, ss, paths in jobs)
            for _ in Parallel(n_jobs=n_workers, return_as="generator_unordered")(tasks):
                bar.update()
        finally:
            shutil.rmtree(ctx_dir, ignore_errors=True)
    bar.close()


#: Columns of ``poses.tsv``, in order.
_POSE_COLUMNS = ["participant_id", "rot_x_deg", "rot_y_deg", "rot_z_deg", "trans_x_mm", "trans_y_mm", "trans_z_mm",
                 "center_x", "center_y", "center_z", "scale", "gm_ratio", "csf_ratio", "wm_level", "noise_frac",
                 "bias_sd", "ventricle_factor", "gm_loss", "skull_mm", "scalp_mm"]


def _write_ground_truth(tree: PhantomDir, ctx: dict[str, np.ndarray], region_table: pd.DataFrame,
                        info: dict[str, Any], records: Sequence[dict[str, Any]], seed: int, vs: float) -> None:
    """Write the truth folder: ``poses.tsv``, ``regions.tsv``, the effect map and (if planted) the contrast map."""
    poses = []
    for i, row in enumerate(records):
        p = subject_params(row, seed, i)
        p["scale"] = round((float(row["tiv_ml"]) / info["icv_template_ml"]) ** (1 / 3), 6)
        poses.append(p)
    write_table(pd.DataFrame(poses)[_POSE_COLUMNS], tree.poses)
    write_table(region_table, tree.regions)
    _, taffine = templates.target_grid(vs)
    effect = nib.Nifti1Image(ctx["effect_map"].astype(np.float32), taffine)
    effect.header.set_sform(taffine, code=4)
    effect.header.set_qform(taffine, code=4)
    with atomic_path(tree.effect_map) as tmp:
        nib.save(effect, tmp)
    if "contrast_M" in ctx:
        cmap = nib.Nifti1Image((ctx["contrast_M"][0] / ctx["contrast_F"][0] - 1).astype(np.float32), taffine)
        with atomic_path(tree.contrast_map) as tmp:
            nib.save(cmap, tmp)


def _write_dataset_files(tree: PhantomDir, participants: pd.DataFrame, args: dict[str, Any], info: dict[str, Any],
                         tiv_effect: bool, reference_source: str) -> None:
    """Write ``dataset_description.json``, ``participants.tsv`` and, last, the complete ``generation.json``."""
    write_json_atomic(tree.description, {
        "Name": "brainsex synthetic phantom (paper-shaped, planted sex differences)",
        "BIDSVersion": "1.9.0", "DatasetType": "raw", "License": "CC0",
        "GeneratedBy": [{"Name": "brainsex.synthetic", "Version": GENERATOR_VERSION}],
    })
    write_table(participants, tree.participants)
    digest = hashlib.sha256(participants.to_csv(index=False).encode()).hexdigest()[:16]
    write_json_atomic(tree.generation, {"args": args, "complete": True, "participants_sha256_16": digest,
                                        "icv_template_ml": info["icv_template_ml"],
                                        "tiv_model": tiv_distribution(tiv_effect).to_dict("records"),
                                        "references": templates.reference_info(reference_source).to_dict("records")})


def _with_paths(participants: pd.DataFrame, images: Sequence[Path], masks: Sequence[Path]) -> pd.DataFrame:
    """The participants table with the ``image`` and ``mask`` paths :func:`make_cohort` wrote."""
    return participants.assign(image=[str(p) for p in images], mask=[str(p) for p in masks])


# ------------------------------------------------------------------------------------ ground truth
@dataclass(frozen=True)
class SubjectDraws:
    """One subject's ground truth, as the generator drew it (:meth:`PhantomTruth.draws`).

    Attributes
    ----------
    participant_id : str
        The subject.
    index : int
        Its row in ``participants.tsv``.
    params : dict
        Scalar draws (:func:`subject_params`): pose, scanner settings, age effect, head.
    displacement : numpy.ndarray, float32, shape (3, *grid)
        The whole non-linear deformation ``D`` of the template (mm): ``warp + planted + ventricles``.
    warp : numpy.ndarray
        Its individual, affine-free random part.
    planted : numpy.ndarray
        The planted sex effect of the subject's sex.
    ventricles : numpy.ndarray
        The age-dependent ventricle enlargement.
    voxel_size : float
        Template grid spacing (mm).
    """

    participant_id: str
    index: int
    params: dict[str, Any]
    displacement: np.ndarray
    warp: np.ndarray
    planted: np.ndarray
    ventricles: np.ndarray
    voxel_size: float

    def log_jacobian(self) -> np.ndarray:
        """The subject's log local volume relative to the template, before head-size scaling (float64).

        ``D`` is a backward field (subject point ``y`` shows the template at ``y + D(y)``), so the local
        volume is ``1 / det(I + grad D)``.
        """
        return -np.log(np.abs(jacobian_determinant(self.displacement, self.voxel_size)).astype(np.float64))


class PhantomTruth:
    """The ground truth of a phantom folder written by :func:`make_cohort`, read back.

    Parameters
    ----------
    phantom_dir : path
        The phantom's root (``generation.json``, ``participants.tsv``, ``ground_truth/poses.tsv``).

    Attributes
    ----------
    participants, poses, regions : pandas.DataFrame
        ``participants.tsv``, ``ground_truth/poses.tsv`` (by participant) and the planted regions.
    tiv_model : pandas.DataFrame
        TIV mean and sd (ml) per sex, as generated.
    icv_template_ml : float
        The template's intracranial volume the TIV scaling is relative to.
    """

    def __init__(self, phantom_dir: str | os.PathLike) -> None:
        root = Path(phantom_dir)
        folder = PhantomDir(root)
        gen = folder.generation
        if not gen.is_file():
            raise BrainsexError(f"{gen}: not found; the ground truth exists only for a synthetic phantom")
        content = json.loads(gen.read_text())
        args = content.get("args", {})
        if args.get("generator") != GENERATOR_VERSION:
            raise BrainsexError(f"{gen}: made by generator {args.get('generator')!r}, this code is "
                                f"{GENERATOR_VERSION!r}; the deformations cannot be rebuilt")
        if not content.get("complete"):
            raise BrainsexError(f"{gen}: the phantom was not completed; regenerate it")
        self.root, self.args = root, args
        self.voxel_size = float(args["voxel_size"])
        self.participants = pd.read_csv(folder.participants, sep="\t", dtype={"participant_id": str})
        poses = pd.read_csv(folder.poses, sep="\t", dtype={"participant_id": str})
        self.poses = poses.set_index("participant_id")
        self.regions = pd.read_csv(folder.regions, sep="\t") if folder.regions.is_file() else pd.DataFrame(
            columns=["name", "label", "sign"])
        self.icv_template_ml = float(content.get("icv_template_ml", float("nan")))
        self.tiv_model = pd.DataFrame(content.get("tiv_model") or tiv_distribution(bool(args.get("tiv_effect", True)))
                                      .to_dict("records")).set_index("sex")
        self._ctx: dict[str, np.ndarray] | None = None
        self._parts: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def context(self) -> dict[str, np.ndarray]:
        """The shared fields of the generation (planted sex fields, ventricle field, template maps)."""
        if self._ctx is None:
            a = self.args
            regions = [(tuple(r) if isinstance(r, list) else r, int(sg)) for r, sg in a["sex_regions"]]
            self._ctx, _, _ = _context(self.voxel_size, regions, float(a["region_effect"]),
                                       float(a.get("contrast_effect", 0.0)), a.get("reference_source", "offline"))
        return self._ctx

    def _planted_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """The planted regions' weights and centroids, as :func:`_context` makes them (cached)."""
        if self._parts is None:
            atlas_img, _ = templates.load_atlas(1.0, self.args.get("reference_source", "offline"))
            ids = [int(v) for v in self.regions["label"]]
            self._parts = _planted_weights(np.asarray(atlas_img.dataobj), ids, self.voxel_size)
        return self._parts

    def region_fields(self, sex: str) -> dict[int, np.ndarray]:
        """Each planted region's own displacement field (3, *grid, mm) for one sex, by atlas label.

        Built by the code that builds the context's ``disp_M`` / ``disp_F``, one region at a time:
        added in the order of ``ground_truth/regions.tsv`` they give the sex's whole planted field.

        Parameters
        ----------
        sex : {"F", "M"}
            The sex whose planted effect is wanted.

        Returns
        -------
        dict of int to numpy.ndarray
            ``{atlas label: float32 field}``, in the order of ``ground_truth/regions.tsv`` (zero fields
            when the phantom plants no volume effect).
        """
        if sex not in ("F", "M"):
            raise BrainsexError(f"sex must be 'F' or 'M', got {sex!r}")
        labels = [int(v) for v in self.regions["label"]]
        e = float(self.args["region_effect"])
        if e == 0.0 or not labels:
            shape, _ = templates.target_grid(self.voxel_size)
            return {lab: np.zeros((3, *shape), np.float32) for lab in labels}
        weights, centroids = self._planted_weights()
        parts = _planted_parts(weights, centroids, [int(v) for v in self.regions["sign"]], e, sex, self.voxel_size)
        return dict(zip(labels, parts, strict=True))

    def planted_fields(self, sex: str, switched: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray | None]:
        """Planted displacement (and contrast) fields of a ``sex`` subject with some regions switched.

        Parameters
        ----------
        sex : {"F", "M"}
            The subject's sex.
        switched : sequence of int, default=()
            Atlas labels of planted regions that take the other sex's effect; empty gives the
            context's own fields (the same arrays the generator used).

        Returns
        -------
        displacement : numpy.ndarray of shape (3, *grid)
            Planted backward displacement (mm).
        contrast : numpy.ndarray of shape (1, *grid) or None
            Planted intensity factor (None when the phantom has no contrast effect).
        """
        ctx = self.context
        if not switched:
            return np.asarray(ctx["disp_" + sex], np.float32), ctx.get("contrast_" + sex)
        other = "M" if sex == "F" else "F"
        own, theirs = self.region_fields(sex), self.region_fields(other)
        disp = np.array(ctx["disp_" + sex], np.float32, copy=True)
        for lab in switched:
            disp -= own[int(lab)]
            disp += theirs[int(lab)]
        contrast = None
        c = float(self.args.get("contrast_effect", 0.0))
        if "contrast_" + sex in ctx:
            weights, _ = self._planted_weights()
            labels = [int(v) for v in self.regions["label"]]
            direction = np.array([(1 if sex == "M" else -1) * (-1 if lab in {int(x) for x in switched} else 1) * int(sg)
                                  for lab, sg in zip(labels, self.regions["sign"], strict=True)], np.float32)
            contrast = (1.0 + np.tensordot(direction, weights, axes=1) * c / 2).astype(np.float32)[None]
        return disp, contrast

    def draws(self, participant_id: str) -> SubjectDraws:
        """Subject ``participant_id``'s draws: its recorded scalars and its deformation by part.

        Parameters
        ----------
        participant_id : str
            A row of the phantom's ``participants.tsv``.

        Returns
        -------
        SubjectDraws
        """
        ids = self.participants["participant_id"].astype(str).tolist()
        if str(participant_id) not in ids:
            raise BrainsexError(f"participant {participant_id!r} is not in the phantom at {self.root}")
        index = ids.index(str(participant_id))
        row = self.participants.iloc[index].to_dict()
        params = {"participant_id": str(participant_id), **self.poses.loc[str(participant_id)].to_dict()}
        ctx, vs = self.context, self.voxel_size
        total, warp = subject_displacement(ctx, row, params, subject_rng(int(self.args["seed"]), index, "warp"), vs)
        planted = np.asarray(ctx["disp_" + str(row["sex"])], np.float32)
        return SubjectDraws(participant_id=str(participant_id), index=index, params=params, displacement=total,
                            warp=warp, planted=planted, ventricles=total - warp - planted, voxel_size=vs)


def _counterfactual_args(truth: PhantomTruth, participant_id: str, regions: Any, size: str | None,
                         age_shift_years: float) -> tuple[int, tuple[int, ...], bool, float]:
    """Check the arguments of :func:`render_counterfactual`; (index, switched labels, size, age shift)."""
    ids = truth.participants["participant_id"].astype(str).tolist()
    if str(participant_id) not in ids:
        raise BrainsexError(f"participant {participant_id!r} is not in the phantom at {truth.root}")
    planted = [(int(lab), str(name)) for lab, name in zip(truth.regions["label"], truth.regions["name"], strict=True)]
    valid = ", ".join(f"{lab} ({name})" for lab, name in planted) or "none (this phantom plants no region)"
    if regions is None:
        chosen: list[Any] = []
    elif isinstance(regions, str) and regions == "all":
        chosen = [lab for lab, _ in planted]
    else:
        chosen = [regions] if isinstance(regions, str | int | np.integer) else list(regions)
    by_name = {name: lab for lab, name in planted}
    switched = []
    for r in chosen:
        lab = by_name.get(r) if isinstance(r, str) else (int(r) if isinstance(r, int | np.integer) else None)
        if lab is None or lab not in {x for x, _ in planted}:
            raise BrainsexError(f"regions: {r!r} is not a planted region of {truth.root}; planted regions "
                                f"(atlas label (name)) are: {valid}, or 'all'")
        if lab not in switched:
            switched.append(lab)
    if size not in (None, "other"):
        raise BrainsexError(f"size must be None (keep the head size) or 'other' (the other sex's), got {size!r}")
    try:
        shift = float(age_shift_years)
    except (TypeError, ValueError):
        shift = float("nan")
    if not math.isfinite(shift) or abs(shift) > 50:
        raise BrainsexError(f"age_shift_years must be a number of years within +-50, got {age_shift_years!r}")
    return ids.index(str(participant_id)), tuple(switched), size == "other", shift


def counterfactual_tiv(truth: PhantomTruth, sex: str, tiv_ml: float) -> float:
    """A subject's TIV moved to the other sex's distribution, keeping its place in its own (ml).

    The phantom draws TIV from a normal distribution per sex (``generation.json``'s ``tiv_model``,
    :data:`TIV_MODEL`); the subject's z-score in its sex's distribution is kept in the other sex's
    (``mu_o + sd_o (tiv - mu_s) / sd_s``), so over a group the mean moves to the other sex's mean;
    the result is clipped to the range the generator draws TIV in and rounded to 0.1 ml.
    With ``tiv_effect=False`` both sexes share one distribution and the TIV does not change.

    Parameters
    ----------
    truth : PhantomTruth
        The phantom.
    sex : {"F", "M"}
        The subject's sex.
    tiv_ml : float
        Its TIV (ml).

    Returns
    -------
    float
        The counterfactual TIV (ml).
    """
    model = truth.tiv_model
    other = "M" if sex == "F" else "F"
    mu_s, sd_s = float(model.loc[sex, "mean_ml"]), float(model.loc[sex, "sd_ml"])
    mu_o, sd_o = float(model.loc[other, "mean_ml"]), float(model.loc[other, "sd_ml"])
    return round(float(np.clip(mu_o + sd_o * (float(tiv_ml) - mu_s) / sd_s, *_TIV_LIMITS)), 1)


def render_counterfactual(
    phantom: str | os.PathLike | PhantomTruth,
    participant_id: str,
    *,
    regions: None | str | int | Sequence[int | str] = None,
    size: str | None = None,
    age_shift_years: float = 0.0,
) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """Re-render a phantom subject with some factors switched and every random draw kept.

    The generator's own code path renders the subject (same pose, individual warp, scanner settings,
    bias field, skull and noise draws, :func:`subject_rng`); only the named factors change:

    * ``regions``: planted regions that take the **other sex's** planted effect (volume and, when the
      phantom has one, contrast), each region's field built as in :meth:`PhantomTruth.region_fields`;
    * ``size="other"``: the TIV moved to the other sex's distribution (:func:`counterfactual_tiv`);
    * ``age_shift_years``: the age-related changes (ventricle enlargement, grey-matter loss,
      :func:`subject_params`) recomputed at ``age + shift`` with the same ``"age"`` draws.

    With nothing switched the result is, bit for bit, the image and mask the generator wrote.

    Parameters
    ----------
    phantom : path or PhantomTruth
        The phantom's root (or its :class:`PhantomTruth`, to reuse its cached fields).
    participant_id : str
        The subject (a row of the phantom's ``participants.tsv``).
    regions : None, "all", int, str or sequence, default=None
        Planted regions to switch: atlas labels or names of ``ground_truth/regions.tsv``; "all" for
        every planted region.
    size : {None, "other"}, default=None
        "other" gives the subject the other sex's head size.
    age_shift_years : float, default=0.0
        Years added to the age for the age-related changes.

    Returns
    -------
    image : nibabel.Nifti1Image
        Scanner-space T1 (int16), as ``sub-*_T1w.nii.gz``.
    mask : nibabel.Nifti1Image
        Its true brain mask (uint8).
    """
    truth = phantom if isinstance(phantom, PhantomTruth) else PhantomTruth(phantom)
    index, switched, other_size, shift = _counterfactual_args(truth, participant_id, regions, size, age_shift_years)
    row = truth.participants.iloc[index].to_dict()
    sex = str(row["sex"])
    seed = int(truth.args["seed"])
    if other_size:
        row["tiv_ml"] = counterfactual_tiv(truth, sex, float(row["tiv_ml"]))
    p = subject_params({**row, "age": float(row["age"]) + shift}, seed, index)
    planted, contrast = truth.planted_fields(sex, switched)
    info = {"voxel_size": truth.voxel_size, "icv_template_ml": truth.icv_template_ml}
    image, brain, saffine = _render_subject(truth.context, row, p, (seed, index), info, planted=planted,
                                            contrast=contrast)
    return _scanner_image(image, saffine), _scanner_image(brain, saffine)


def phantom_truth(phantom_dir: str | os.PathLike) -> PhantomTruth:
    """The ground truth of the phantom at ``phantom_dir`` (:class:`PhantomTruth`).

    Parameters
    ----------
    phantom_dir : path
        The phantom's root.
    """
    return PhantomTruth(phantom_dir)
