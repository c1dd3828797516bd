"""Region scores (paper section 2.5), atlas resampling, ranking metrics and the TBM positive control."""

from __future__ import annotations

import warnings
from functools import partial

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainsex import BrainsexError
from brainsex.atlas import (
    _hits_curve,
    average_precision,
    log_jacobian_region_means,
    permutation_null,
    precision_at_k,
    region_group_test,
    region_neighbours,
    region_scores,
    resample_atlas_to,
)

LABELS = pd.DataFrame({"label": [1, 2, 3], "name": ["Left A", "B", "Right C"], "region": ["A", "B", "C"],
                       "hemisphere": ["left", "midline", "right"]})


def slab_atlas() -> np.ndarray:
    """6x6x6 atlas: three slabs along x of 72 voxels each."""
    atlas = np.zeros((6, 6, 6), dtype=np.int32)
    atlas[0:2], atlas[2:4], atlas[4:6] = 1, 2, 3
    return atlas


def test_region_scores_hand_computed():
    atlas = np.zeros((6, 6, 6), dtype=np.int32)
    atlas[0:2], atlas[2:4], atlas[4:6] = 1, 2, 3
    m = np.zeros((6, 6, 6))
    m[0:2] = 0.05  # region 1: nothing salient, mean 0.05
    m[2:4, :3] = 0.5  # region 2: 36 of 72 salient, mean 0.25
    m[4:6] = 0.9
    m[4:6, 0, :] = 0.1  # region 3: 12 voxels exactly at the threshold (not salient) ...
    m[4, 1, :] = 0.1  # ... + 6 = 18 of 72 -> 54 salient; mean (54*0.9 + 18*0.1)/72 = 0.7
    out = region_scores(m, atlas, LABELS, threshold=0.1)
    assert list(out["label"]) == [3, 2, 1]
    assert list(out["rank"]) == [1, 2, 3]
    r = out.set_index("label")
    assert (r["n_voxels"] == 72).all()
    np.testing.assert_allclose(r.loc[[1, 2, 3], "saliency_score"], [0.0, 0.5, 0.75])
    np.testing.assert_allclose(r.loc[[1, 2, 3], "mean_saliency"], [0.05, 0.25, 0.7])
    norm = np.array([0.0, 0.2 / 0.65, 1.0])
    np.testing.assert_allclose(r.loc[[1, 2, 3], "mean_saliency_norm"], norm)
    np.testing.assert_allclose(r.loc[[1, 2, 3], "weighted_score"], [0.0, 0.5 * 0.2 / 0.65, 0.75])
    assert list(r.loc[[1, 3], "hemisphere"]) == ["left", "right"] and r.loc[2, "name"] == "B"
    # the threshold is a parameter: at 0.6 only region 3's 0.9 voxels count
    out6 = region_scores(m, atlas, LABELS, threshold=0.6).set_index("label")
    np.testing.assert_allclose(out6.loc[[1, 2, 3], "saliency_score"], [0, 0, 0.75])


def test_region_scores_resamples_a_coarser_atlas():
    coarse = np.zeros((3, 3, 3), dtype=np.int32)
    coarse[0], coarse[1], coarse[2] = 1, 2, 3
    # 2 mm voxels whose centres sit between pairs of 1 mm voxels: coarse voxel i covers fine 2i, 2i+1
    coarse_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    coarse_aff[:3, 3] = 0.5
    atlas_img = nib.Nifti1Image(coarse, coarse_aff)
    # the 1 mm map grid: voxels 1..4 of the 6 mm field of view (nilearn's nearest neighbour gives 0 to
    # target voxels whose centres lie beyond the outermost atlas voxel centres)
    m = np.random.default_rng(0).uniform(size=(4, 4, 4))
    map_aff = np.eye(4)
    map_aff[:3, 3] = 1.0
    map_img = nib.Nifti1Image(m.astype(np.float32), map_aff)
    res = resample_atlas_to(atlas_img, map_img)
    expected = np.kron(coarse, np.ones((2, 2, 2), dtype=np.int32))[1:5, 1:5, 1:5]
    assert list(expected[:, 0, 0]) == [1, 2, 2, 3]
    np.testing.assert_array_equal(np.asarray(res.dataobj), expected)
    assert res.shape == (4, 4, 4) and np.asarray(res.dataobj).dtype == np.int32
    from_images = region_scores(map_img, atlas_img, LABELS)
    from_arrays = region_scores(m.astype(np.float32), expected, LABELS)
    pd.testing.assert_frame_equal(from_images, from_arrays)


def test_resampling_errors():
    atlas_img = nib.Nifti1Image(slab_atlas(), np.eye(4))
    far = np.eye(4)
    far[:3, 3] = 500.0
    with pytest.raises(BrainsexError, match="do not overlap"):
        resample_atlas_to(atlas_img, nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), far))
    singular = np.diag([1.0, 1.0, 0.0, 1.0])
    with pytest.raises(BrainsexError, match="not invertible"):
        resample_atlas_to(nib.spatialimages.SpatialImage(slab_atlas(), singular),
                          nib.Nifti1Image(np.zeros((4, 4, 4)), np.eye(4)))
    with pytest.raises(BrainsexError, match="nibabel image"):
        resample_atlas_to(slab_atlas(), atlas_img)
    with pytest.raises(BrainsexError, match="different grids"):
        region_scores(np.zeros((4, 4, 4)), slab_atlas(), LABELS)


def test_region_scores_bad_labels_and_degenerate_maps():
    atlas = slab_atlas()
    atlas[0, 0, 0] = 9
    with pytest.raises(BrainsexError, match=r"\[9\].*not in the label table"):
        region_scores(np.zeros(atlas.shape), atlas, LABELS)
    # a table label with no voxel on this grid: zero scores, last, no NaN score
    table = pd.concat([LABELS, pd.DataFrame({"label": [7], "name": ["tiny"]})], ignore_index=True)
    m = np.zeros((6, 6, 6))
    m[2:4] = 0.8
    out = region_scores(m, slab_atlas(), table)
    assert out["label"].iloc[-1] == 7 and out["n_voxels"].iloc[-1] == 0
    assert out["weighted_score"].notna().all() and out["saliency_score"].notna().all()
    assert out["label"].iloc[0] == 2
    # all-zero map: min-max across regions undefined -> documented result with a warning, never NaN
    with pytest.warns(UserWarning, match="same mean saliency"):
        zero = region_scores(np.zeros((6, 6, 6)), slab_atlas(), LABELS)
    assert (zero["mean_saliency_norm"] == 1.0).all() and (zero["weighted_score"] == 0).all()
    assert list(zero["label"]) == [1, 2, 3]  # ties broken by label id, deterministic
    with pytest.warns(UserWarning, match="not in \\[0, 1\\]"):
        region_scores(np.full((6, 6, 6), 3.0) + slab_atlas(), slab_atlas(), LABELS)
    with pytest.raises(BrainsexError, match="NaN"):
        region_scores(np.full((6, 6, 6), np.nan), slab_atlas(), LABELS)
    with pytest.raises(BrainsexError, match="missing column"):
        region_scores(m, slab_atlas(), LABELS[["label"]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        region_scores(m, slab_atlas(), LABELS)  # a normal map warns about nothing


def test_region_neighbours():
    nb = region_neighbours(slab_atlas())
    assert nb == {1: {2}, 2: {1, 3}, 3: {2}}
    diag = np.zeros((3, 3, 3), dtype=int)
    diag[0, 0, 0], diag[1, 1, 1], diag[2, 2, 2] = 1, 2, 5
    assert region_neighbours(diag)[1] == {2}
    assert region_neighbours(diag, connectivity=1) == {1: set(), 2: set(), 5: set()}
    apart = np.zeros((5, 1, 1), dtype=int)
    apart[0], apart[2], apart[4] = 1, 2, 3  # one background voxel between: more than 1 voxel away
    assert region_neighbours(apart) == {1: set(), 2: set(), 3: set()}


def test_ranking_metrics_hand_checked():
    ranking = list(range(1, 11))
    truth = {2, 5, 11}  # 11 is never ranked
    assert precision_at_k(ranking, truth, k=1) == 0.0
    assert precision_at_k(ranking, truth, k=3) == pytest.approx(1 / 3)
    assert precision_at_k(ranking, truth, k=5) == pytest.approx(2 / 5)
    assert average_precision(ranking, truth) == pytest.approx((1 / 2 + 2 / 5) / 3)
    from sklearn.metrics import average_precision_score

    truth2 = {2, 5}
    y = [r in truth2 for r in ranking]
    assert average_precision(ranking, truth2) == pytest.approx(average_precision_score(y, -np.arange(10)))
    # a region_scores table works as a ranking
    table = pd.DataFrame({"label": ranking})
    assert precision_at_k(table, truth, k=5) == pytest.approx(2 / 5)
    with pytest.raises(BrainsexError, match="k=11"):
        precision_at_k(ranking, truth, k=11)
    with pytest.raises(BrainsexError, match="empty"):
        precision_at_k(ranking, set(), k=3)
    with pytest.raises(BrainsexError, match="more than once"):
        average_precision([1, 1, 2], {1})


def test_tolerant_metrics_count_each_planted_region_once():
    nb = {2: {3, 4}, 3: {2}, 4: {2}}
    # neighbours 3 and 4 of planted region 2 ranked first: one hit, not two
    assert precision_at_k([3, 4, 1, 7], {2, 7}, k=2, neighbours=nb) == pytest.approx(0.5)
    assert precision_at_k([3, 4, 1, 7], {2, 7}, k=2) == 0.0
    assert average_precision([3, 4, 1, 7], {2, 7}, neighbours=nb) == pytest.approx((1 / 1 + 2 / 4) / 2)
    # a region next to two planted ones is matched to whichever leaves the most hits (augmenting path)
    nb2 = {10: {1, 2}, 1: {10, 11}, 2: {10}, 11: {1}}
    assert precision_at_k([10, 11], {1, 2}, k=2, neighbours=nb2) == 1.0


def test_hits_curve_equals_scipy_maximum_matching():
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching

    rng = np.random.default_rng(0)
    for _ in range(20):
        ranking = list(rng.permutation(30))
        truth = set(rng.choice(30, 5, replace=False).tolist())
        nb: dict = {}
        for a, b in rng.integers(0, 30, size=(25, 2)):
            if a != b:
                nb.setdefault(int(a), set()).add(int(b))
                nb.setdefault(int(b), set()).add(int(a))
        curve = _hits_curve(ranking, truth, nb)
        tl = sorted(truth)
        for k in (1, 5, 10, 30):
            adj = np.array([[r == t or r in nb.get(t, ()) for t in tl] for r in ranking[:k]], dtype=float)
            size = (maximum_bipartite_matching(csr_matrix(adj), perm_type="column") >= 0).sum()
            assert curve[k - 1] == size


def test_permutation_null_chance_level():
    from scipy.stats import hypergeom

    ranking = list(range(20))
    truth = {0, 1, 2, 3}
    res = permutation_null(partial(precision_at_k, k=10), ranking, truth, n_perm=2000, seed=0)
    assert res["observed"] == pytest.approx(0.4)
    assert res["chance"] == pytest.approx(10 * len(truth) / 20 / 10, abs=0.01)  # k·|truth|/n / k
    assert res["p_value"] == pytest.approx(hypergeom.sf(3, 20, 4, 10), abs=0.012)
    again = permutation_null(partial(precision_at_k, k=10), ranking, truth, n_perm=2000, seed=0)
    assert again == res
    worst = permutation_null(average_precision, list(range(19, -1, -1)), truth, n_perm=200)
    assert worst["p_value"] > 0.9 and worst["chance"] > worst["observed"]


def test_log_jacobian_region_means_and_group_test():
    atlas = slab_atlas()
    rng = np.random.default_rng(0)
    n = 60
    sex = np.array(["M", "F"] * (n // 2))
    male = (sex == "M").astype(float)
    tiv = 1400 + 150 * male + rng.normal(0, 60, n)
    maps = rng.normal(0, 0.02, size=(n, 6, 6, 6))
    maps[:, 0:2] += 0.05 * male[:, None, None, None]  # region 1: larger in males beyond TIV
    maps[:, 2:4] += 0.001 * (tiv - 1400)[:, None, None, None]  # region 2: scales with TIV only
    values = log_jacobian_region_means(maps, atlas, LABELS, index=[f"sub-{i}" for i in range(n)])
    assert values.shape == (n, 3) and list(values.columns) == [1, 2, 3]
    np.testing.assert_allclose(values.loc["sub-3", 2], maps[3, 2:4].mean())
    res = region_group_test(values, sex, tiv, labels=LABELS)
    assert res["label"].iloc[0] == 1 and res["significant"].iloc[0]
    r = res.set_index("label")
    assert r.loc[1, "coef_male"] == pytest.approx(0.05, abs=0.01)
    assert not r.loc[2, "significant"]  # the TIV covariate absorbs region 2
    assert (res["q"] >= res["p"] - 1e-12).all() and list(res.columns[:2]) == ["label", "coef_male"]
    assert r.loc[1, "name"] == "Left A"
    sm = pytest.importorskip("statsmodels.api")
    X = sm.add_constant(np.column_stack([male, (tiv - tiv.mean()) / tiv.std()]))
    fit = sm.OLS(values[3].to_numpy(), X).fit()
    assert r.loc[3, "t"] == pytest.approx(fit.tvalues[1]) and r.loc[3, "p"] == pytest.approx(fit.pvalues[1])
    no_tiv = region_group_test(values, male, None).set_index("label")
    assert no_tiv.loc[2, "p"] < 1e-6  # without the covariate region 2 looks sex-different
    with pytest.raises(BrainsexError, match="sex"):
        region_group_test(values, ["M", "X"] * (n // 2), tiv)
    with pytest.raises(BrainsexError, match="rank deficient"):
        region_group_test(values, ["M"] * n, tiv)
    with pytest.raises(BrainsexError, match="shape"):
        log_jacobian_region_means(maps[:, :5], atlas)


@pytest.mark.parametrize("with_tiv", [True, False])
def test_region_group_test_matches_per_region_ols_with_and_without_missing_values(with_tiv):
    """The complete regions fitted together give each region's own OLS; a region with gaps uses its complete cases."""
    sm = pytest.importorskip("statsmodels.api")
    rng = np.random.default_rng(7)
    n, m = 40, 12
    male = np.tile([1.0, 0.0], n // 2)
    tiv = 1400 + 150 * male + rng.normal(0, 60, n)
    values = rng.normal(size=(n, m)) + 0.4 * male[:, None] + 0.002 * (tiv - 1400)[:, None]
    values[rng.random((n, m)) < 0.1] = np.nan
    values[:, :6] = rng.normal(size=(n, 6)) + 0.4 * male[:, None]  # four complete regions, two degenerate ones
    n_params = 3 if with_tiv else 2
    values[n_params:, 4] = np.nan  # as many values as parameters: no residual degree of freedom
    values[male == 0, 5] = np.nan  # only males left: the sex effect is not estimable
    res = region_group_test(pd.DataFrame(values, columns=range(1, m + 1)), male, tiv if with_tiv else None)
    r = res.set_index("label")
    assert r.loc[5, ["coef_male", "se", "t", "p", "q"]].isna().all() and r.loc[5, "n"] == n_params
    assert r.loc[6, ["coef_male", "t", "p"]].isna().all() and r.loc[6, "n"] == n // 2
    assert not r.loc[5, "significant"] and list(res["label"].iloc[-2:]) == [5, 6]  # untested regions last
    covars = [male] + ([(tiv - tiv.mean()) / tiv.std()] if with_tiv else [])
    X = sm.add_constant(np.column_stack(covars))
    for j in [0, 1, 2, 3, *range(6, m)]:
        ok = np.isfinite(values[:, j])
        assert ok.all() == (j < 4)
        fit = sm.OLS(values[ok, j], X[ok]).fit()
        got = r.loc[j + 1]
        assert got["n"] == ok.sum()
        np.testing.assert_allclose([got["coef_male"], got["se"], got["t"], got["p"]],
                                   [fit.params[1], fit.bse[1], fit.tvalues[1], fit.pvalues[1]], rtol=1e-10)
