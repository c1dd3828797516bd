"""Counterfactual scans of the phantom: one factor switched, every random draw kept."""

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from brainsex import BrainsexError, synthetic, templates
from brainsex.run import PhantomDir

VS = 8.0


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("cf_phantom")
    synthetic.make_cohort(out, n=4, voxel_size=VS, seed=3, progress=False, contrast_effect=0.05)
    return out, synthetic.PhantomTruth(out)


def _data(img: nib.Nifti1Image) -> np.ndarray:
    return np.asarray(img.dataobj)


def test_switching_nothing_gives_the_generated_files(phantom):
    root, truth = phantom
    tree = PhantomDir(root)
    for pid in truth.participants["participant_id"]:
        img, mask = synthetic.render_counterfactual(truth, pid)
        disk, disk_mask = nib.load(tree.image(pid)), nib.load(tree.mask(pid))
        assert img.get_data_dtype() == disk.get_data_dtype() and np.array_equal(img.affine, disk.affine)
        assert np.array_equal(_data(img), _data(disk))  # bit for bit
        assert np.array_equal(_data(mask), _data(disk_mask))
    # the path form and a zero age shift give the same
    pid = truth.participants["participant_id"].iloc[0]
    img, _ = synthetic.render_counterfactual(root, pid, regions=[], age_shift_years=0.0)
    assert np.array_equal(_data(img), _data(nib.load(tree.image(pid))))


def test_region_fields_add_up_to_the_planted_field(phantom):
    _, truth = phantom
    for sex in ("F", "M"):
        parts = truth.region_fields(sex)
        assert list(parts) == [int(v) for v in truth.regions["label"]]
        total = np.zeros_like(truth.context["disp_" + sex])
        for field in parts.values():
            total += field
        assert np.array_equal(total, truth.context["disp_" + sex])
    # every region switched is the other sex's planted field (volume and contrast)
    disp, contrast = truth.planted_fields("M", list(truth.regions["label"]))
    np.testing.assert_allclose(disp, truth.context["disp_F"], atol=1e-5)
    np.testing.assert_allclose(contrast, truth.context["contrast_F"], atol=1e-6)


def test_one_region_changes_only_voxels_near_it(phantom):
    root, truth = phantom
    pid = truth.participants["participant_id"].iloc[0]
    row = truth.participants.iloc[0]
    lab = int(truth.regions["label"].iloc[0])
    base = _data(nib.load(PhantomDir(root).image(pid))).astype(np.int32)
    one = _data(synthetic.render_counterfactual(truth, pid, regions=lab)[0]).astype(np.int32)
    every = _data(synthetic.render_counterfactual(truth, pid, regions="all")[0]).astype(np.int32)
    changed = np.argwhere(one != base)
    assert len(changed) > 0
    assert len(changed) < (every != base).sum()
    # where the region's planted field (volume or contrast) differs between the sexes, on the template grid
    own, other = truth.region_fields(row["sex"])[lab], truth.region_fields("M" if row["sex"] == "F" else "F")[lab]
    disp_support = np.abs(own - other).max(0) > 0
    _, c_one = truth.planted_fields(row["sex"], [lab])
    _, c_base = truth.planted_fields(row["sex"])
    support = disp_support | (np.abs(c_one - c_base)[0] > 1e-6)
    assert support.any() and support.mean() < 0.2
    dist_mm = ndimage.distance_transform_edt(~support) * VS
    # changed scanner voxels -> template voxels (undo the pose and the scaling; before the non-linear part)
    tshape, taffine = templates.target_grid(VS)
    pose = truth.poses.loc[pid]
    to_t = np.linalg.inv(taffine) @ np.linalg.inv(synthetic.pose_matrix(pose, include_scale=True)) @ \
        nib.load(PhantomDir(root).image(pid)).affine
    tv = (to_t[:3, :3] @ changed.T + to_t[:3, 3:4]).T
    near = ndimage.map_coordinates(dist_mm, tv.T, order=1, mode="nearest")
    # within two voxels (trilinear sampling of the field and of the maps) plus the individual warp
    warp = np.abs(truth.draws(pid).warp).max()
    assert near.max() <= 2 * VS * np.sqrt(3) + warp


def test_size_switch_moves_the_brain_volume_towards_the_other_sex(phantom):
    root, truth = phantom
    seen = set()
    for _, row in truth.participants.iterrows():
        pid, sex = row["participant_id"], row["sex"]
        _, mask = synthetic.render_counterfactual(truth, pid, size="other")
        before = _data(nib.load(PhantomDir(root).mask(pid))).sum()
        new_tiv = synthetic.counterfactual_tiv(truth, sex, row["tiv_ml"])
        # male TIV is larger on average in the phantom's model: females grow, males shrink
        assert (new_tiv > row["tiv_ml"]) == (sex == "F")
        assert (_data(mask).sum() > before) == (sex == "F")
        seen.add(sex)
    assert seen == {"F", "M"}


def test_age_shift_uses_the_same_draws(phantom):
    root, truth = phantom
    row = truth.participants.iloc[1]
    seed, pid = int(truth.args["seed"]), row["participant_id"]
    older = synthetic.subject_params({**row.to_dict(), "age": row["age"] + 10}, seed, 1)
    same = synthetic.subject_params(row.to_dict(), seed, 1)
    assert older["ventricle_factor"] > same["ventricle_factor"]
    assert {k: v for k, v in older.items() if k not in ("ventricle_factor", "gm_loss")} == \
        {k: v for k, v in same.items() if k not in ("ventricle_factor", "gm_loss")}
    img, mask = synthetic.render_counterfactual(truth, pid, age_shift_years=10)
    base = _data(nib.load(PhantomDir(root).image(pid)))
    assert (_data(img) != base).any()


@pytest.mark.parametrize("kwargs, match", [
    ({"regions": [9999]}, r"not a planted region.*Left Entorhinal"),
    ({"regions": "Hippocampus"}, r"planted regions \(atlas label \(name\)\)"),
    ({"size": "larger"}, "size must be None"),
    ({"age_shift_years": float("nan")}, "age_shift_years"),
    ({"age_shift_years": "ten"}, "age_shift_years"),
])
def test_invalid_counterfactuals_are_refused(phantom, kwargs, match):
    _, truth = phantom
    with pytest.raises(BrainsexError, match=match):
        synthetic.render_counterfactual(truth, "sub-0001", **kwargs)


def test_unknown_participant_and_sex_are_refused(phantom):
    _, truth = phantom
    with pytest.raises(BrainsexError, match="not in the phantom"):
        synthetic.render_counterfactual(truth, "sub-9999")
    with pytest.raises(BrainsexError, match="sex must be"):
        truth.region_fields("X")
