"""Atlas region scores of a saliency map, and how well a region ranking recovers a known truth.

Paper section 2.5: the average saliency map is scored against the CerebrA atlas (Manera et al., 2020).
For each labelled region the *saliency score* is the proportion of salient voxels (saliency > 0.1),
the region's mean saliency is min-max normalised across regions, and the *weighted saliency score*
is their product (Stanley et al., 2022); regions are ranked by it (Table S1, Figure 7).

The validity chapter asks whether such a ranking finds what is really there. On the phantom the
planted regions are known, so this module also offers ranking metrics against a planted set
(precision@k, average precision, both optionally tolerant to neighbouring regions) with a
permutation null for their chance level, and a classical positive control: tensor-based morphometry
(per-region log-Jacobian means tested between the sexes with TIV as a covariate).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from brainsex import BrainsexError
from brainsex.io import as_array, is_image

__all__ = [
    "resample_atlas_to",
    "region_scores",
    "region_neighbours",
    "precision_at_k",
    "average_precision",
    "permutation_null",
    "log_jacobian_region_means",
    "region_group_test",
    "labels_on",
    "label_ids",
    "region_means",
]


# --------------------------------------------------------------------------------------------------
# grids
# --------------------------------------------------------------------------------------------------
def _world_bbox(shape: Sequence[int], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World-space bounding box (min, max corners) of a grid's field of view (voxel edges)."""
    lo = np.array([-0.5, -0.5, -0.5])
    hi = np.asarray(shape[:3], dtype=float) - 0.5
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    world = corners @ affine.T
    return world[:, :3].min(axis=0), world[:, :3].max(axis=0)


def _check_affine(img: Any, name: str) -> np.ndarray:
    aff = np.asarray(img.affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.isfinite(aff).all():
        raise BrainsexError(f"{name}: affine is not a finite 4x4 matrix")
    if abs(np.linalg.det(aff[:3, :3])) < 1e-9:
        raise BrainsexError(f"{name}: affine is not invertible (zero voxel size?); it relates no voxel to space")
    return aff


def resample_atlas_to(atlas_img: Any, target_img: Any) -> Any:
    """Resample a label atlas onto a target image's grid with nearest-neighbour interpolation.

    ``nilearn.image.resample_to_img(..., interpolation="nearest")``. The two images must be related by
    their affines: both invertible and with overlapping fields of view in world space, and at least
    one atlas label must land inside the target grid. Otherwise :class:`~brainsex.BrainsexError`.
    As in nilearn (scipy ``map_coordinates``, order 0), target voxels whose centres lie beyond the
    outermost atlas voxel centres (the outer half voxel of the atlas field of view) get 0; atlases have a
    background margin, so this loses no region.

    Parameters
    ----------
    atlas_img : nibabel image
        The label atlas (integer labels, 0 background).
    target_img : nibabel image
        The image whose grid (shape and affine) the atlas is resampled onto.

    Returns
    -------
    nibabel.Nifti1Image
        int32 label image on the target's grid (0 outside the atlas).
    """
    import nibabel as nib

    for obj, name in ((atlas_img, "atlas_img"), (target_img, "target_img")):
        if not is_image(obj):
            raise BrainsexError(f"{name}: expected a nibabel image with an affine (got {type(obj).__name__}); "
                                "arrays without an affine cannot be resampled")
    a_aff, t_aff = _check_affine(atlas_img, "atlas_img"), _check_affine(target_img, "target_img")
    a_shape, t_shape = atlas_img.shape[:3], target_img.shape[:3]
    if a_shape == t_shape and np.allclose(a_aff, t_aff, atol=1e-5):
        data = np.rint(np.asarray(atlas_img.dataobj)).astype(np.int32)
        return nib.Nifti1Image(data, t_aff)
    a_lo, a_hi = _world_bbox(a_shape, a_aff)
    t_lo, t_hi = _world_bbox(t_shape, t_aff)
    if np.any(a_hi <= t_lo) or np.any(t_hi <= a_lo):
        raise BrainsexError(
            f"atlas_img and target_img do not overlap in world space (atlas spans {np.round(a_lo, 1)} to "
            f"{np.round(a_hi, 1)} mm, target {np.round(t_lo, 1)} to {np.round(t_hi, 1)} mm): their affines "
            "do not relate the two grids; are they in the same space?")
    atlas_img = nib.Nifti1Image(np.rint(np.asarray(atlas_img.dataobj)).astype(np.int32), a_aff)
    target3d = target_img if len(target_img.shape) == 3 else nib.Nifti1Image(np.zeros(t_shape, np.int8), t_aff)
    # imported here, not above: a grid that already matches needs no nilearn (about 1 s of import)
    from nilearn.image import resample_to_img

    out = resample_to_img(atlas_img, target3d, interpolation="nearest", force_resample=True, copy_header=True)
    data = np.rint(np.asarray(out.dataobj)).astype(np.int32)
    if (np.asarray(atlas_img.dataobj) != 0).any() and not (data != 0).any():
        raise BrainsexError("atlas_img: no atlas label falls inside the target grid after resampling")
    return nib.Nifti1Image(data, np.asarray(out.affine))


def _map_and_atlas(saliency: Any, atlas: Any) -> tuple[np.ndarray, np.ndarray]:
    """Bring a map and an atlas to arrays on the same grid (resampling the atlas if both are images)."""
    if is_image(saliency) and is_image(atlas):
        atlas = resample_atlas_to(atlas, saliency)
    sal = as_array(saliency, "saliency")
    lab = as_array(atlas, "atlas")
    if sal.ndim == 4 and sal.shape[-1] == 1:
        sal = sal[..., 0]
    if sal.shape != lab.shape:
        raise BrainsexError(
            f"saliency {sal.shape} and atlas {lab.shape} are arrays on different grids; pass nibabel images "
            "so that the atlas can be resampled to the map, or resample it first (resample_atlas_to)")
    if not np.isfinite(sal).all():
        raise BrainsexError("saliency: contains NaN or infinite values")
    if not np.allclose(lab, np.rint(lab)):
        raise BrainsexError("atlas: labels must be integers (was it resampled with a non-nearest interpolation?)")
    return sal.astype(np.float64), np.rint(lab).astype(np.int64)


def _label_table(labels: Any) -> pd.DataFrame:
    if not isinstance(labels, pd.DataFrame):
        raise BrainsexError("labels: expected a DataFrame with columns label, name (region, hemisphere optional)")
    missing = {"label", "name"} - set(labels.columns)
    if missing:
        raise BrainsexError(f"labels: missing column(s) {sorted(missing)}")
    table = labels.reset_index(drop=True).copy()
    table["label"] = table["label"].astype(int)
    dup = table["label"][table["label"].duplicated()]
    if len(dup):
        raise BrainsexError(f"labels: label id(s) {sorted(set(dup))} listed more than once")
    return table


# --------------------------------------------------------------------------------------------------
# region scores (paper section 2.5)
# --------------------------------------------------------------------------------------------------
def region_scores(
    saliency: Any,
    atlas: Any,
    labels: pd.DataFrame,
    threshold: float = 0.1,
    background: int = 0,
) -> pd.DataFrame:
    """Saliency score, mean saliency and weighted saliency score of every atlas region (section 2.5).

    For region r with voxels V_r:

    - ``saliency_score`` = |{v in V_r : s(v) > threshold}| / |V_r| (the proportion of salient voxels);
    - ``mean_saliency`` = mean of s over V_r;
    - ``mean_saliency_norm`` = (mean_r - min_r' mean_r') / (max_r' mean_r' - min_r' mean_r'), the
      min-max of the region means across regions;
    - ``weighted_score`` = saliency_score x mean_saliency_norm.

    The paper's threshold 0.1 refers to a map min-max normalised to [0, 1].

    Parameters
    ----------
    saliency
        The (average) map: a nibabel image or an array.
    atlas
        Label atlas: a nibabel image (resampled to the map's grid with nearest neighbour when both are
        images) or an integer array of the map's shape.
    labels
        Label table: ``label``, ``name`` and optionally ``region``, ``hemisphere`` (copied to the output).
    threshold
        A voxel is salient when its value is strictly greater than this.
    background
        The atlas value that is not a region.

    Returns
    -------
    pandas.DataFrame
        One row per label of the table (background excluded): the label-table columns, ``n_voxels``,
        ``saliency_score``, ``mean_saliency``, ``mean_saliency_norm``, ``weighted_score``, ``rank``;
        sorted by ``weighted_score`` descending (ties: higher mean saliency, then lower label id).

    Notes
    -----
    Documented edge cases, none of which produces a NaN score:

    - a non-background atlas label that is not in the label table raises
      :class:`~brainsex.BrainsexError` (the table must describe every region);
    - a table label with no voxel on the map's grid (a small region lost on a coarse grid) gets
      ``n_voxels`` 0, ``mean_saliency`` NaN (undefined) and scores 0, and ranks last;
    - when every present region has the same mean saliency (e.g. an all-zero map) min-max is undefined:
      ``mean_saliency_norm`` is 1 for all of them (no region more important than another), so
      ``weighted_score`` equals ``saliency_score``; a ``UserWarning`` says so.
    """
    from scipy import ndimage

    sal, lab = _map_and_atlas(saliency, atlas)
    table = _label_table(labels)
    table = table[table["label"] != background].reset_index(drop=True)
    in_atlas = set(np.unique(lab).tolist()) - {background}
    unknown = sorted(in_atlas - set(table["label"]))
    if unknown:
        raise BrainsexError(f"atlas: label id(s) {unknown[:20]}{' ...' if len(unknown) > 20 else ''} are not in "
                            "the label table; use the label table that belongs to this atlas")
    if table.empty:
        raise BrainsexError("labels: the label table lists no region")
    if sal.min() < 0 or sal.max() > 1:
        warnings.warn("region_scores: the map is not in [0, 1]; the threshold assumes a min-max normalised map",
                      UserWarning, stacklevel=2)

    ids = table["label"].to_numpy()
    n_vox = np.asarray(ndimage.sum_labels(np.ones_like(sal), lab, index=ids), dtype=np.int64)
    n_sal = np.asarray(ndimage.sum_labels((sal > threshold).astype(np.float64), lab, index=ids))
    sums = np.asarray(ndimage.sum_labels(sal, lab, index=ids))
    present = n_vox > 0
    safe = np.where(present, n_vox, 1)
    score = np.where(present, n_sal / safe, 0.0)
    mean = np.where(present, sums / safe, np.nan)
    norm = np.zeros(len(ids))
    if present.any():
        lo, hi = np.min(mean[present]), np.max(mean[present])
        if hi > lo:
            norm[present] = (mean[present] - lo) / (hi - lo)
        else:
            norm[present] = 1.0
            warnings.warn("region_scores: every region has the same mean saliency; min-max across regions is "
                          "undefined, mean_saliency_norm set to 1 (weighted_score = saliency_score)",
                          UserWarning, stacklevel=2)
    out = table.copy()
    out["n_voxels"] = n_vox
    out["saliency_score"] = score
    out["mean_saliency"] = mean
    out["mean_saliency_norm"] = norm
    out["weighted_score"] = score * norm
    out["_present"] = present
    out["_mean_key"] = np.where(present, mean, -np.inf)
    out = out.sort_values(["_present", "weighted_score", "_mean_key", "label"],
                          ascending=[False, False, False, True], kind="mergesort")
    out = out.drop(columns=["_present", "_mean_key"]).reset_index(drop=True)
    out["rank"] = np.arange(1, len(out) + 1)
    return out


# --------------------------------------------------------------------------------------------------
# ranking metrics against a planted truth
# --------------------------------------------------------------------------------------------------
def region_neighbours(atlas_data: Any, background: int = 0, connectivity: int = 3) -> dict[int, set[int]]:
    """Regions within one voxel of each region: ``{label: {neighbouring labels}}``.

    Each region's mask is dilated by one voxel (``scipy.ndimage.binary_dilation`` with
    ``generate_binary_structure(3, connectivity)``; 3 = the 26-neighbourhood) and the other labels it
    touches are its neighbours. The relation is symmetric.

    Parameters
    ----------
    atlas_data : array or nibabel image
        3D integer label array.
    background : int, default=0
        Label ignored (neither a region nor a neighbour).
    connectivity : {1, 2, 3}, default=3
        Neighbourhood of the one-voxel dilation (3: 26 neighbours, 1: 6).

    Returns
    -------
    dict
        ``{label: set of neighbouring labels}`` for every non-background label.
    """
    from scipy import ndimage

    lab = np.rint(as_array(atlas_data, "atlas_data")).astype(np.int64)
    if lab.ndim != 3:
        raise BrainsexError(f"atlas_data: expected a 3D label array, got shape {lab.shape}")
    if connectivity not in (1, 2, 3):
        raise BrainsexError(f"connectivity={connectivity}: expected 1, 2 or 3")
    structure = ndimage.generate_binary_structure(3, connectivity)
    ids = [int(v) for v in np.unique(lab) if v != background]
    out: dict[int, set[int]] = {i: set() for i in ids}
    padded = np.pad(lab, 1, constant_values=background)
    # dense relabelling so find_objects gives one bounding box per region
    dense = np.searchsorted(np.array(ids), padded)
    dense = np.where(padded == background, 0, dense + 1)
    boxes = ndimage.find_objects(dense)
    for k, box in enumerate(boxes):
        if box is None:
            continue
        lab_id = ids[k]
        grown = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        sub = padded[grown]
        dil = ndimage.binary_dilation(sub == lab_id, structure=structure)
        touched = set(np.unique(sub[dil]).tolist()) - {lab_id, background}
        out[lab_id] |= touched
        for t in touched:
            out.setdefault(t, set()).add(lab_id)
    return out


def _ranking_ids(ranking: Any) -> list:
    if isinstance(ranking, pd.DataFrame):
        if "label" not in ranking.columns:
            raise BrainsexError("ranking: a DataFrame ranking needs a 'label' column (as from region_scores)")
        ranking = ranking["label"].tolist()
    items = list(ranking)
    if len(set(items)) != len(items):
        raise BrainsexError("ranking: lists a region more than once")
    if not items:
        raise BrainsexError("ranking: empty")
    return items


def _hits_curve(ranking: list, truth: set, neighbours: dict | None) -> np.ndarray:
    """m[k-1] = number of planted regions found in the top k (k = 1..n).

    Without ``neighbours``: the count of planted regions in the top k. With them, a ranked region
    finds a planted region if it is that region or one of its neighbours, and each planted region can
    be found once: m(k) is the size of a maximum bipartite matching between the top k and the truth,
    so a cluster of neighbours around one planted region does not count as many hits. The matching is
    grown one ranked region at a time with an augmenting path (Kuhn's algorithm): a maximum matching
    of the top k plus one augmenting path from region k+1, if any, is a maximum matching of the top k+1.
    """
    if neighbours is None:
        return np.cumsum([r in truth for r in ranking]).astype(float)
    owner: dict = {}  # planted region -> index of the ranked region matched to it
    edges = [[t for t in truth if r == t or r in neighbours.get(t, ()) or t in neighbours.get(r, ())]
             for r in ranking]

    def augment(i: int, seen: set) -> bool:
        for t in edges[i]:
            if t in seen:
                continue
            seen.add(t)
            if t not in owner or augment(owner[t], seen):
                owner[t] = i
                return True
        return False

    m = np.zeros(len(ranking))
    size = 0
    for i in range(len(ranking)):
        if edges[i] and augment(i, set()):
            size += 1
        m[i] = size
    return m


def _check_truth(truth: Iterable) -> set:
    t = set(truth)
    if not t:
        raise BrainsexError("truth: the planted set is empty")
    return t


def precision_at_k(ranking: Any, truth: Iterable, k: int = 10, neighbours: dict | None = None) -> float:
    """Precision at k: the fraction of the top ``k`` ranked regions that find a planted region.

    Parameters
    ----------
    ranking
        Region ids best first, or a :func:`region_scores` table (its ``label`` column, in order).
    truth
        The planted region ids.
    k
        Cut-off; must not exceed the length of the ranking.
    neighbours
        Optional ``{label: neighbour labels}`` (:func:`region_neighbours`) for the *tolerant* version:
        a neighbour of a planted region counts as a hit, each planted region at most once (see
        ``_hits_curve``). Without it, precision@k = |top k ∩ truth| / k.

    Returns
    -------
    float
        Precision at ``k``, in [0, 1].

    Notes
    -----
    Without tolerance the expected value for a random ranking of n regions is |truth|/n (k·|truth|/n
    hits expected in the top k); :func:`permutation_null` gives the chance level of any variant.
    """
    items = _ranking_ids(ranking)
    t = _check_truth(truth)
    if not 1 <= int(k) <= len(items):
        raise BrainsexError(f"k={k}: must be between 1 and the number of ranked regions ({len(items)})")
    m = _hits_curve(items[: int(k)], t, neighbours)
    return float(m[-1] / int(k))


def average_precision(ranking: Any, truth: Iterable, neighbours: dict | None = None) -> float:
    """Average precision of a ranking against a planted set.

    AP = (1/|truth|) · Σ_k precision@k · [the k-th region is a new hit]. Planted regions missing from
    the ranking count as never found. Without ``neighbours`` this is the usual AP (equal to
    ``sklearn.metrics.average_precision_score`` when every planted region is ranked); with them a
    neighbour of a not-yet-found planted region counts as a hit (tolerant version).

    Parameters
    ----------
    ranking : sequence or pandas.DataFrame
        Region ids best first, or a :func:`region_scores` table (its ``label`` column, in order).
    truth : iterable
        The planted region ids.
    neighbours : dict, optional
        ``{label: neighbour labels}`` (:func:`region_neighbours`) for the tolerant version.

    Returns
    -------
    float
        Average precision, in [0, 1].
    """
    items = _ranking_ids(ranking)
    t = _check_truth(truth)
    m = _hits_curve(items, t, neighbours)
    gains = np.diff(np.concatenate([[0.0], m]))
    ks = np.arange(1, len(items) + 1)
    return float(np.sum(gains * m / ks) / len(t))


def permutation_null(
    metric_fn: Callable[[list, set], float],
    ranking: Any,
    truth: Iterable,
    n_perm: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Chance level and p-value of a ranking metric under random rankings of the same regions.

    The ranking is shuffled ``n_perm`` times (``numpy.random.default_rng(seed)``) and the metric
    recomputed.

    Parameters
    ----------
    metric_fn : callable
        ``metric_fn(ranking, truth) -> float``; bind other arguments with ``functools.partial``, e.g.
        ``partial(precision_at_k, k=10, neighbours=nb)``.
    ranking : sequence or pandas.DataFrame
        Region ids best first, or a :func:`region_scores` table.
    truth : iterable
        The planted region ids.
    n_perm : int, default=1000
        Random rankings drawn (at least 1).
    seed : int, default=0
        Seed of the permutations.

    Returns
    -------
    dict
        ``observed``, ``chance`` (mean of the null), ``null_sd``, ``p_value`` (one-sided,
        ``(1 + #{null >= observed}) / (1 + n_perm)``) and ``n_perm``.
    """
    from tqdm.auto import tqdm

    items = _ranking_ids(ranking)
    t = _check_truth(truth)
    if int(n_perm) < 1:
        raise BrainsexError(f"n_perm={n_perm}: must be >= 1")
    observed = float(metric_fn(items, t))
    rng = np.random.default_rng(seed)
    null = np.empty(int(n_perm))
    for i in tqdm(range(int(n_perm)), desc="permutations", disable=n_perm < 5000, leave=False):
        perm = [items[j] for j in rng.permutation(len(items))]
        null[i] = metric_fn(perm, t)
    p = (1.0 + np.sum(null >= observed - 1e-12)) / (1.0 + n_perm)
    return {"observed": observed, "chance": float(null.mean()), "null_sd": float(null.std(ddof=1)) if n_perm > 1
            else 0.0, "p_value": float(p), "n_perm": int(n_perm)}


# --------------------------------------------------------------------------------------------------
# tensor-based morphometry (positive control)
# --------------------------------------------------------------------------------------------------
def log_jacobian_region_means(
    logjac_maps: Any,
    atlas: Any,
    labels: pd.DataFrame | Sequence[int] | None = None,
    index: Sequence | None = None,
    background: int = 0,
) -> pd.DataFrame:
    """Mean log-Jacobian determinant of each subject's warp inside each atlas region.

    Parameters
    ----------
    logjac_maps
        ``(N, X, Y, Z)`` array or sequence of N maps / images, all on the atlas grid (template space).
    atlas
        Integer label array or image on the same grid.
    labels
        Label table (``label`` column) or label ids; default every non-background label in the atlas.
    index
        Row labels (e.g. participant ids); default 0..N-1.
    background
        Label left out when ``labels`` is None.

    Returns
    -------
    pandas.DataFrame
        N rows x one column per label id (NaN for a label with no voxel).
    """
    lab = np.rint(as_array(atlas, "atlas")).astype(np.int64)
    if labels is None:
        ids = [int(v) for v in np.unique(lab) if v != background]
    elif isinstance(labels, pd.DataFrame):
        if "label" not in labels.columns:
            raise BrainsexError("labels: the label table needs a 'label' column")
        ids = [int(v) for v in labels["label"] if int(v) != background]
    else:
        ids = [int(v) for v in labels if int(v) != background]
    if not ids:
        raise BrainsexError("labels: no region to summarise")
    rows = []
    n = len(logjac_maps)
    for i in range(n):
        m = as_array(logjac_maps[i], f"logjac_maps[{i}]")
        if m.shape != lab.shape:
            raise BrainsexError(f"logjac_maps[{i}]: shape {m.shape} differs from the atlas {lab.shape}")
        if not np.isfinite(m).all():
            raise BrainsexError(f"logjac_maps[{i}]: contains NaN or infinite values")
        rows.append(region_means(m, lab, ids))
    if index is not None and len(index) != n:
        raise BrainsexError(f"index: {len(index)} entries for {n} maps")
    return pd.DataFrame(np.array(rows).reshape(n, len(ids)), columns=ids,
                        index=list(index) if index is not None else None)


def _sex_to_male(sex: Any) -> np.ndarray:
    s = pd.Series(list(sex))
    if not (pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s)):
        mapped = s.astype(str).str.upper().map({"M": 1.0, "F": 0.0, "MALE": 1.0, "FEMALE": 0.0})
    else:
        mapped = s.astype(float).where(s.isin([0, 1]))
    if mapped.isna().any():
        bad = sorted(set(s[mapped.isna()].astype(str)))[:5]
        raise BrainsexError(f"sex: values {bad} are not 'M'/'F' or 1/0")
    return mapped.to_numpy()


def region_group_test(
    region_values: pd.DataFrame,
    sex: Any,
    tiv: Any = None,
    labels: pd.DataFrame | None = None,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Per-region test of males vs females with TIV as a covariate (tensor-based morphometry).

    For each column (region) an ordinary least-squares fit ``value ~ 1 + male + TIV`` (TIV
    standardised; omitted when ``tiv`` is None) gives the sex coefficient, its t statistic and two-sided
    p-value (Student t, n - p degrees of freedom); q-values are Benjamini-Hochberg FDR
    (``scipy.stats.false_discovery_control``) across regions.

    Parameters
    ----------
    region_values
        Subjects x regions (e.g. :func:`log_jacobian_region_means`), rows in the order of ``sex``.
    sex
        'M'/'F' (or 1 = male / 0 = female) per subject.
    tiv
        Total intracranial volume per subject, or None.
    labels
        Optional label table to add ``name`` / ``region`` / ``hemisphere``.
    alpha
        FDR level for the ``significant`` column.

    Returns
    -------
    pandas.DataFrame
        ``label``, ``coef_male``, ``se``, ``t``, ``p``, ``q``, ``significant``, ``n`` (+ label columns),
        sorted by |t| descending. The sign of ``coef_male`` follows the convention of the values (for a
        log-Jacobian of the template -> subject mapping, positive = larger in males).
    """
    from scipy import stats

    if not isinstance(region_values, pd.DataFrame) or region_values.shape[1] == 0:
        raise BrainsexError("region_values: expected a subjects x regions DataFrame")
    male = _sex_to_male(sex)
    n = len(region_values)
    if len(male) != n:
        raise BrainsexError(f"sex: {len(male)} values for {n} subjects")
    cols = [np.ones(n), male]
    if tiv is not None:
        t_arr = np.asarray(list(tiv), dtype=float)
        if len(t_arr) != n:
            raise BrainsexError(f"tiv: {len(t_arr)} values for {n} subjects")
        if not np.isfinite(t_arr).all():
            raise BrainsexError("tiv: contains missing values")
        sd = t_arr.std()
        cols.append((t_arr - t_arr.mean()) / (sd if sd > 0 else 1.0))
    X = np.column_stack(cols)
    if np.linalg.matrix_rank(X) < X.shape[1]:
        raise BrainsexError("region_group_test: the design (intercept, sex, TIV) is rank deficient "
                            "(only one sex? constant TIV?)")
    Y = region_values.to_numpy(dtype=float)
    coef, se, dof = _sex_coefficients(X, Y)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, coef / se, np.where(coef != 0, np.inf * np.sign(coef), 0.0))
    t[np.isnan(coef)] = np.nan
    p = np.where(np.isnan(t), np.nan, 2 * stats.t.sf(np.abs(t), np.where(np.isnan(dof), 1.0, dof)))
    out = pd.DataFrame({"label": list(region_values.columns), "coef_male": coef, "se": se, "t": t, "p": p,
                        "n": np.isfinite(Y).sum(axis=0).astype(int)})
    valid = out["p"].notna()
    out["q"] = np.nan
    if valid.any():
        out.loc[valid, "q"] = stats.false_discovery_control(out.loc[valid, "p"].to_numpy(), method="bh")
    out["significant"] = out["q"] < alpha
    if labels is not None:
        if "label" not in labels.columns:
            raise BrainsexError("labels: the label table needs a 'label' column")
        table = labels.drop_duplicates("label").copy()
        try:
            out["label"] = out["label"].astype(int)
            table["label"] = table["label"].astype(int)
        except (TypeError, ValueError):
            pass
        out = out.merge(table, on="label", how="left")
    out["_abs_t"] = out["t"].abs().fillna(-1.0)
    out = out.sort_values(["_abs_t", "label"], ascending=[False, True], kind="mergesort").drop(columns="_abs_t")
    return out.reset_index(drop=True)


def _sex_coefficients(X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OLS of each column of ``Y`` on the design ``X``: the coefficient of ``X[:, 1]``, its SE, the dof.

    Complete columns are fitted together (one ``lstsq`` with a matrix of responses); a column with
    missing values is fitted on its complete cases. NaN where fewer than one residual degree of
    freedom is left or the complete cases make ``X`` rank deficient.
    """
    n, k = X.shape
    m = Y.shape[1]
    coef, se, dof = np.full(m, np.nan), np.full(m, np.nan), np.full(m, np.nan)
    complete = np.isfinite(Y).all(axis=0)
    if complete.any() and n - k >= 1:
        beta, *_ = np.linalg.lstsq(X, Y[:, complete], rcond=None)
        resid = Y[:, complete] - X @ beta
        s2 = np.einsum("ij,ij->j", resid, resid) / (n - k)
        coef[complete] = beta[1]
        se[complete] = np.sqrt(s2 * np.linalg.inv(X.T @ X)[1, 1])
        dof[complete] = n - k
    for j in np.flatnonzero(~complete):
        ok = np.isfinite(Y[:, j])
        Xo, yo = X[ok], Y[ok, j]
        d = len(yo) - k
        if d < 1 or np.linalg.matrix_rank(Xo) < k:
            continue
        beta, *_ = np.linalg.lstsq(Xo, yo, rcond=None)
        resid = yo - Xo @ beta
        coef[j] = beta[1]
        se[j] = np.sqrt(float(resid @ resid) / d * np.linalg.inv(Xo.T @ Xo)[1, 1])
        dof[j] = d
    return coef, se, dof


# --------------------------------------------------------------------------------------------------
# labels on a grid
# --------------------------------------------------------------------------------------------------
def labels_on(atlas: Any, reference: Any) -> np.ndarray:
    """Integer label array on ``reference``'s grid.

    Parameters
    ----------
    atlas : nibabel image or array
        Label image (resampled nearest-neighbour with :func:`resample_atlas_to` when both are images)
        or an array already on the reference grid.
    reference : nibabel image or array
        Defines the grid (its shape is checked).

    Returns
    -------
    numpy.ndarray
        int64 labels.
    """
    if is_image(atlas) and is_image(reference):
        atlas = resample_atlas_to(atlas, reference)
    lab = as_array(atlas, "atlas")
    shape = tuple(reference.shape[:3]) if hasattr(reference, "shape") else None
    if shape is not None and lab.shape != shape:
        raise BrainsexError(f"atlas: shape {lab.shape} differs from the template grid {shape}; pass nibabel images "
                            "so that the atlas can be resampled")
    if not np.allclose(lab, np.rint(lab)):
        raise BrainsexError("atlas: labels must be integers")
    return np.rint(lab).astype(np.int64)


def label_ids(labels: pd.DataFrame | Sequence[int] | None, lab: np.ndarray) -> list[int]:
    """The non-zero label ids to analyse: the label table's (checked against ``lab``) or ``lab``'s own.

    Parameters
    ----------
    labels : pandas.DataFrame, sequence of int or None
        Label table (``label`` column) or ids; None: every non-zero id present in ``lab``.
    lab : numpy.ndarray
        Label array (:func:`labels_on`).
    """
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


def region_means(values: np.ndarray, lab: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """Mean of ``values`` in each region ``ids`` of the label array ``lab`` (``scipy.ndimage.mean``).

    Parameters
    ----------
    values : numpy.ndarray
        A map on the label grid (averaged in float64).
    lab : numpy.ndarray
        Integer labels, same shape.
    ids : sequence of int
        The regions, in the order of the result.

    Returns
    -------
    numpy.ndarray
        float64, NaN for a region with no voxel.
    """
    from scipy import ndimage

    with np.errstate(invalid="ignore", divide="ignore"):  # an empty region: 0 / 0 = NaN
        return np.asarray(ndimage.mean(np.asarray(values, dtype=np.float64), lab, index=list(ids)), dtype=np.float64)
