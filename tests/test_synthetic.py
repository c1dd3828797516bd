"""The synthetic phantom: demographics, TIV calibration, ground truth, determinism, re-use."""

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from scipy.optimize import brentq
from scipy.stats import gaussian_kde

from brainsex import BrainsexError, synthetic, templates
from brainsex.run import PhantomDir

VS = 8.0
N = 16


def kde_overlap_range(tiv: np.ndarray, sex: np.ndarray, threshold: float = 0.2) -> tuple[float, float]:
    """Paper section 2.6: per sex, the TIV interval where the KDE exceeds 20 % of its maximum; intersect."""
    grid = np.linspace(tiv.min() - 300, tiv.max() + 300, 6000)
    lows, highs = [], []
    for s in ("F", "M"):
        dens = gaussian_kde(tiv[sex == s])(grid)
        keep = grid[dens >= threshold * dens.max()]
        lows.append(keep.min())
        highs.append(keep.max())
    return max(lows), min(highs)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    df = synthetic.make_cohort(out, n=N, voxel_size=VS, seed=3, progress=False)
    return out, df


# ------------------------------------------------------------------------------ demographics
def test_tiv_model_is_the_documented_calibration():
    z = np.sqrt(2 * np.log(5))
    n_f, n_m = (synthetic.PAPER_STRATA.groupby("sex")["count"].sum()[s] for s in ("F", "M"))
    k_f, k_m = np.sqrt(1 + n_f**-0.4), np.sqrt(1 + n_m**-0.4)

    def gap(c):
        return 1666 / (0.9 * (1 + z * c * k_f)) - 1378 / (1 - z * c * k_m)

    c = brentq(gap, 1e-4, 0.3)
    mu_m = 1378 / (1 - z * c * k_m)
    assert synthetic.TIV_MODEL["M"] == pytest.approx((mu_m, c * mu_m), abs=0.2)
    assert synthetic.TIV_MODEL["F"] == pytest.approx((0.9 * mu_m, 0.9 * c * mu_m), abs=0.2)


def test_paper_cohort_reproduces_strata_and_the_kde_overlap_range():
    df = synthetic.paper_demographics(seed=0)
    assert len(df) == 2110 and df["participant_id"].is_unique
    got = synthetic.strata_counts(df).set_index(["dataset", "vendor", "field", "sex"])["count"]
    want = synthetic.PAPER_STRATA.set_index(["dataset", "vendor", "field", "sex"])["count"]
    pd.testing.assert_series_equal(got.sort_index(), want.sort_index(), check_names=False)
    lo, hi = kde_overlap_range(df["tiv_ml"].to_numpy(), df["sex"].to_numpy())
    assert abs(lo - 1378) <= 40 and abs(hi - 1666) <= 40, (lo, hi)
    f, m = (df.loc[df["sex"] == s, "tiv_ml"].mean() for s in ("F", "M"))
    assert 0.87 < f / m < 0.93


@pytest.mark.parametrize("seed", [1, 2])
def test_kde_overlap_range_holds_for_other_seeds(seed):
    df = synthetic.paper_demographics(seed=seed)
    lo, hi = kde_overlap_range(df["tiv_ml"].to_numpy(), df["sex"].to_numpy())
    assert abs(lo - 1378) <= 40 and abs(hi - 1666) <= 40, (lo, hi)


@pytest.mark.parametrize("seed", [0, 5])
def test_ages_follow_the_paper(seed):
    df = synthetic.paper_demographics(seed=seed)
    for a in synthetic.PAPER_AGES.itertuples():
        ages = df.loc[(df["dataset"] == a.dataset) & (df["sex"] == a.sex), "age"]
        assert ages.min() >= a.min and ages.max() <= a.max
        assert ages.mean() == pytest.approx(a.mean, abs=0.3)  # Latin hypercube sampling: close for any seed
        assert ages.std() == pytest.approx(a.sd, abs=0.3)


def test_tiv_effect_false_makes_sexes_equal_in_size():
    df = synthetic.paper_demographics(seed=0, tiv_effect=False)
    f, m = (df.loc[df["sex"] == s, "tiv_ml"] for s in ("F", "M"))
    assert abs(f.mean() - m.mean()) < 20
    assert abs(f.std() - m.std()) < 15


def test_allocate_strata_largest_remainder():
    assert synthetic.allocate_strata([5, 3, 2], 10).tolist() == [5, 3, 2]
    assert synthetic.allocate_strata([5, 3, 2], 5).tolist() == [3, 1, 1]  # 2.5, 1.5, 1.0 -> tie to the first
    assert synthetic.allocate_strata(synthetic.PAPER_STRATA["count"], 480).sum() == 480


@pytest.mark.parametrize("n", [8, 30, 480])
def test_subsamples_keep_every_dataset_and_sex(n):
    df = synthetic.paper_demographics(n=n, seed=0)
    assert len(df) == n
    cells = df.groupby(["dataset", "sex"]).size()
    assert len(cells) == 8 and (cells >= 1).all()
    if n == 480:  # proportions kept within rounding (one subject per dataset x sex cell)
        share = df.groupby("dataset").size() / n
        paper = synthetic.PAPER_STRATA.groupby("dataset")["count"].sum() / 2110
        assert (abs(share - paper) < 0.01).all()


# ------------------------------------------------------------------------------ images
def test_tree_layout_and_tables(cohort):
    out, df = cohort
    assert list(df.columns) == ["participant_id", "sex", "age", "dataset", "vendor", "field", "tiv_ml", "image", "mask"]
    on_disk = pd.read_csv(out / "participants.tsv", sep="\t")
    pd.testing.assert_frame_equal(on_disk, df.drop(columns=["image", "mask"]))
    # the paths it returns are the files it wrote, laid out as brainsex.run.PhantomDir says
    tree = PhantomDir(out)
    assert df["image"].tolist() == [str(tree.image(p)) for p in df["participant_id"]]
    assert df["mask"].tolist() == [str(tree.mask(p)) for p in df["participant_id"]]
    assert all(Path(p).is_file() for p in [*df["image"], *df["mask"]])
    assert tree.has_truth and tree.regions.is_file() and tree.effect_map.is_file()
    assert set(df["sex"]) == {"F", "M"}
    for pid in df["participant_id"]:
        img = nib.load(out / pid / "anat" / f"{pid}_T1w.nii.gz")
        assert img.ndim == 3 and img.get_data_dtype() == np.int16
        data = np.asarray(img.dataobj)
        assert data.min() >= 0 and np.percentile(data, 99.5) > 200  # scanner units, not z-scores
        assert (out / "ground_truth" / "masks" / f"{pid}_desc-brain_mask.nii.gz").is_file()
    regions = pd.read_csv(out / "ground_truth" / "regions.tsv", sep="\t")
    _, labels = templates.load_atlas(1.0, source="offline")
    assert regions["label"].tolist() == templates.paper_top10_labels(labels)["label"].tolist()
    assert set(regions["sign"]) == {1, -1}
    np.testing.assert_allclose(regions["effect"], regions["sign"] * 0.10)
    emap = nib.load(out / "ground_truth" / "sex_effect_map.nii.gz")
    shape, affine = templates.target_grid(VS)
    assert emap.shape == shape and np.allclose(emap.affine, affine)
    poses = pd.read_csv(out / "ground_truth" / "poses.tsv", sep="\t")
    assert poses["participant_id"].tolist() == df["participant_id"].tolist()
    assert poses[["rot_x_deg", "rot_y_deg", "rot_z_deg"]].abs().max().max() <= 10
    meta = json.loads((out / "generation.json").read_text())
    assert meta["complete"] and meta["args"]["voxel_size"] == VS


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_recorded_pose_undoes_the_placement(cohort):
    out, df = cohort
    poses = pd.read_csv(out / "ground_truth" / "poses.tsv", sep="\t").set_index("participant_id")
    tmask = np.asarray(templates.load_brain_mask(VS, source="offline").dataobj) > 0
    tshape, taffine = templates.target_grid(VS)
    for pid in df["participant_id"][:6]:
        m = nib.load(out / "ground_truth" / "masks" / f"{pid}_desc-brain_mask.nii.gz")
        right = pose_back(m, synthetic.pose_matrix(poses.loc[pid], include_scale=True), tshape, taffine)
        wrong = pose_back(m, np.eye(4), tshape, taffine)
        assert _dice(right, tmask) > 0.85
        assert _dice(right, tmask) > _dice(wrong, tmask) + 0.02


def pose_back(img, matrix, tshape, taffine):
    """Resample a scanner-space mask onto the template grid through ``matrix`` (template -> scanner)."""
    vox = np.linalg.inv(img.affine) @ matrix @ taffine
    return ndimage.affine_transform(np.asarray(img.dataobj, float), vox, output_shape=tshape, order=1) > 0.5


def test_brain_volume_follows_the_sampled_tiv(cohort):
    out, df = cohort
    vols = []
    for pid in df["participant_id"]:
        m = nib.load(out / "ground_truth" / "masks" / f"{pid}_desc-brain_mask.nii.gz")
        vols.append(np.asarray(m.dataobj).sum() * VS**3 / 1000)
    vols = np.asarray(vols)
    assert np.corrcoef(vols, df["tiv_ml"])[0, 1] > 0.9
    assert np.median(np.abs(vols / df["tiv_ml"] - 1)) < 0.06


def test_field_strength_sets_the_noise(cohort):
    out, df = cohort
    poses = pd.read_csv(out / "ground_truth" / "poses.tsv", sep="\t").set_index("participant_id")
    rel = {}
    for pid, field in zip(df["participant_id"], df["field"], strict=True):
        data = np.asarray(nib.load(out / pid / "anat" / f"{pid}_T1w.nii.gz").dataobj, float)
        corner = data[:3, :3, -3:]  # air: Rician background, its spread grows with the noise level
        rel.setdefault(field, []).append(corner.std() / poses.loc[pid, "wm_level"])
    assert np.mean(rel[1.5]) > 1.3 * np.mean(rel[3.0])


def test_planted_effect_sits_in_the_planted_regions():
    regions = synthetic._normalise_regions(None)
    ctx, table, _ = synthetic._context(4.0, regions, 0.10, 0.0, "offline")
    atlas, _ = templates.load_atlas(4.0, source="offline")
    a = np.asarray(atlas.dataobj)
    emap = ctx["effect_map"]
    checked = 0
    for r in table.itertuples():
        sel = a == r.label
        if sel.sum() >= 5:
            assert np.sign(emap[sel].mean()) == r.sign
            assert 0.04 < abs(emap[sel].mean()) < 0.2
            checked += 1
    assert checked >= 8
    far = ndimage.distance_transform_edt(~np.isin(a, table["label"])) * 4.0 > 25
    assert np.abs(emap[far]).max() < 0.01
    ctx0, _, _ = synthetic._context(4.0, regions, 0.0, 0.0, "offline")
    assert np.abs(ctx0["effect_map"]).max() == 0


def test_individual_warp_is_purely_non_linear():
    """The random warp carries no translation or linear map: the pose in poses.tsv is the whole placement."""
    ctx, _, _ = synthetic._context(VS, synthetic._normalise_regions(None), 0.10, 0.0, "offline")
    weight = ctx["tmaps"][4]
    part = synthetic.paper_demographics(n=4, seed=3)
    for i, row in enumerate(part.to_dict("records")):
        p = synthetic.subject_params(row, 3, i)
        total, warp = synthetic.subject_displacement(ctx, row, p, synthetic.subject_rng(3, i, "warp"), VS)
        coef, axes = synthetic._affine_part(warp, weight)
        assert np.abs(coef).max() < 1e-4  # mm, and mm per voxel
        assert float(np.sqrt(np.average(warp[0] ** 2, weights=weight))) > 0.5  # still a real deformation
        # the fit finds a planted affine part (so the check above can fail)
        planted = np.array([[1.5, 0.02, -0.01, 0.0], [-0.7, 0.0, 0.03, 0.01], [0.4, -0.02, 0.0, -0.015]])
        grid = np.meshgrid(*axes, indexing="ij")
        moved = warp + np.stack([c[0] + c[1] * grid[0] + c[2] * grid[1] + c[3] * grid[2] for c in planted])
        np.testing.assert_allclose(synthetic._affine_part(moved, weight)[0], planted, atol=1e-4)
        # the rest of the deformation is the planted sex effect and the ventricles, unchanged
        vent_a = 1.0 - float(p["ventricle_factor"]) ** (-1.0 / 3.0)
        np.testing.assert_allclose(total - warp, ctx["disp_" + row["sex"]] + vent_a * ctx["disp_vent"], atol=1e-5)
        # same named stream, same field
        p2 = synthetic.subject_params(row, 3, i)
        again = synthetic.subject_displacement(ctx, row, p2, synthetic.subject_rng(3, i, "warp"), VS)[0]
        np.testing.assert_array_equal(again, total)


def test_contrast_effect_writes_its_map(tmp_path):
    synthetic.make_cohort(tmp_path, n=2, voxel_size=VS, seed=0, progress=False, contrast_effect=0.3,
                          sex_regions={("Lateral Orbitofrontal", "right"): -1})
    regions = pd.read_csv(tmp_path / "ground_truth" / "regions.tsv", sep="\t")
    assert regions["contrast"].tolist() == [-0.3]
    cmap = np.asarray(nib.load(tmp_path / "ground_truth" / "sex_contrast_map.nii.gz").dataobj)
    assert cmap.min() < -0.15 and cmap.max() <= 1e-6


# ------------------------------------------------------------------------------ determinism, re-use
def _arrays(out, df):
    return [np.asarray(nib.load(out / p / "anat" / f"{p}_T1w.nii.gz").dataobj) for p in df["participant_id"]]


def test_same_seed_same_tree_whatever_n_workers(tmp_path, cohort):
    out, df = cohort
    df2 = synthetic.make_cohort(tmp_path, n=N, voxel_size=VS, seed=3, progress=False, n_workers=2)
    paths = ["image", "mask"]
    pd.testing.assert_frame_equal(df.drop(columns=paths), df2.drop(columns=paths))
    for a, b in zip(_arrays(out, df), _arrays(tmp_path, df2), strict=True):
        np.testing.assert_array_equal(a, b)
    other = synthetic.paper_demographics(n=N, seed=4)
    assert not other.equals(df)


def test_rerun_reuses_a_complete_tree_and_repairs_a_missing_subject(tmp_path):
    df = synthetic.make_cohort(tmp_path, n=4, voxel_size=VS, seed=0, progress=False)
    first = tmp_path / df["participant_id"][0] / "anat" / f"{df['participant_id'][0]}_T1w.nii.gz"
    second = tmp_path / df["participant_id"][1] / "anat" / f"{df['participant_id'][1]}_T1w.nii.gz"
    t_first = first.stat().st_mtime_ns
    before = np.asarray(nib.load(second).dataobj)
    second.unlink()
    synthetic.make_cohort(tmp_path, n=4, voxel_size=VS, seed=0, progress=False)
    assert first.stat().st_mtime_ns == t_first  # reused
    np.testing.assert_array_equal(np.asarray(nib.load(second).dataobj), before)  # rebuilt identically
    synthetic.make_cohort(tmp_path, n=3, voxel_size=VS, seed=0, progress=False, region_effect=0.2)
    meta = json.loads((tmp_path / "generation.json").read_text())
    assert meta["args"]["region_effect"] == 0.2 and meta["args"]["n"] == 3
    assert len([d for d in os.listdir(tmp_path) if d.startswith("sub-")]) == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"spec": "uk-biobank"}, "spec"),
        ({"region_effect": 1.5}, "region_effect"),
        ({"sex_regions": [("Unicorn Gyrus", "left")]}, "Unicorn Gyrus"),
        ({"sex_regions": [("Pallidum", "right"), "Right Pallidum"]}, "twice"),
        ({"sex_regions": {("Pallidum", "right"): 2}}, "sign"),
        ({"seed": -1}, "seed"),
        ({"voxel_size": 0.2}, "voxel_size"),
    ],
)
def test_bad_arguments_are_clear_errors(tmp_path, kwargs, match):
    with pytest.raises(BrainsexError, match=match):
        synthetic.make_cohort(tmp_path, n=2, progress=False, **{"voxel_size": VS, **kwargs})


def test_named_streams_are_independent_and_keyed():
    draws = {(i, k): synthetic.subject_rng(5, i, k).standard_normal(4) for i in (0, 1) for k in synthetic.STREAMS}
    flat = [tuple(np.round(v, 12)) for v in draws.values()]
    assert len(set(flat)) == len(flat)  # every subject x purpose has its own stream
    np.testing.assert_array_equal(synthetic.subject_rng(5, 1, "warp").standard_normal(4), draws[(1, "warp")])
    assert not np.array_equal(synthetic.subject_rng(6, 1, "warp").standard_normal(4), draws[(1, "warp")])
    with pytest.raises(BrainsexError, match="random stream"):
        synthetic.subject_rng(5, 0, "posture")
    # a purpose's draws do not depend on how many numbers another purpose took
    row = {"participant_id": "sub-x", "vendor": "Siemens", "field": 3.0, "age": 40.0}
    p = synthetic.subject_params(row, 5, 0)
    rot = synthetic.subject_rng(5, 0, "pose").uniform(-10, 10, 3)
    assert p["rot_x_deg"] == round(float(rot[0]), 4)


def test_ground_truth_is_read_by_name(tmp_path):
    """poses.tsv holds subject_params; PhantomTruth.draws gives the generator's deformation by part."""
    part = synthetic.make_cohort(tmp_path, n=3, voxel_size=VS, seed=2, progress=False)
    poses = pd.read_csv(tmp_path / "ground_truth" / "poses.tsv", sep="\t")
    for i, row in enumerate(part.to_dict("records")):
        p = synthetic.subject_params(row, 2, i)
        assert poses.loc[i, "rot_y_deg"] == p["rot_y_deg"] and poses.loc[i, "ventricle_factor"] == p["ventricle_factor"]
    truth = synthetic.phantom_truth(tmp_path)
    pid = str(part["participant_id"].iloc[1])
    d = truth.draws(pid)
    assert d.index == 1 and d.params["skull_mm"] == poses.loc[1, "skull_mm"]
    np.testing.assert_allclose(d.warp + d.planted + d.ventricles, d.displacement, atol=1e-5)
    vent_a = 1.0 - float(d.params["ventricle_factor"]) ** (-1.0 / 3.0)
    np.testing.assert_allclose(d.ventricles, vent_a * truth.context["disp_vent"], atol=1e-5)
    assert d.log_jacobian().shape == d.displacement.shape[1:]
    with pytest.raises(BrainsexError, match="not in the phantom"):
        truth.draws("sub-nobody")
