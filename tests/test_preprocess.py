"""Tests for brainsex.preprocess: brain extraction, rigid registration, z-score, TIV, resumable batches.

Fixtures are built here from the offline MNI152 template (nilearn's, via brainsex.templates): a crude
head (dark CSF and skull, bright scalp) around the template brain, placed in a scanner grid with a
known rigid pose, noise and a scanner-like gain. Grids are 4-8 mm so that the file runs in well under
a minute; the real-head test (pycortex's S1) is marked slow and skipped when it cannot be downloaded.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from brainsex import preprocess as pp
from brainsex import templates
from brainsex.io import sha256_file

# ITK reads its thread count once per process, at first use: set it now (collection time) so that the
# registrations of this file run with one thread and repeat bit for bit.
pp.set_threads(1, seed=1)

SCANNER_FOV = (224.0, 256.0, 224.0)
SCANNER_CENTRE = np.array([0.0, -18.0, 10.0])
POSE_CENTRE = np.array([0.0, -18.0, 18.0])


# ------------------------------------------------------------------------------------------ fixtures
def rigid(rx: float, ry: float, rz: float, t: tuple[float, float, float], scale: float = 1.0) -> np.ndarray:
    """Template -> scanner world matrix: rotate (degrees, Rz Ry Rx) and scale about POSE_CENTRE, shift."""
    ax, ay, az = np.deg2rad([rx, ry, rz])
    r_x = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    r_y = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    r_z = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    lin = r_z @ r_y @ r_x * scale
    out = np.eye(4)
    out[:3, :3] = lin
    out[:3, 3] = POSE_CENTRE + np.asarray(t) - lin @ POSE_CENTRE
    return out


@pytest.fixture(scope="module")
def head_2mm() -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """Template brain with CSF (0-2.5 mm), skull (2.5-7 mm) and scalp (7-12 mm) shells, 2 mm grid."""
    t = templates.load_template(2.0, source="offline")
    m = templates.load_brain_mask(2.0, source="offline")
    brain = np.asarray(t.dataobj, np.float32)
    inside = np.asarray(m.dataobj) > 0
    dist = ndimage.distance_transform_edt(~inside, sampling=2.0)
    head = np.where(inside, brain, 0.0)
    head = head + 0.12 * ((dist > 0) & (dist <= 2.5)) + 0.03 * ((dist > 2.5) & (dist <= 7)) + 0.9 * (
        (dist > 7) & (dist <= 12))
    head = ndimage.gaussian_filter(head.astype(np.float32), 0.6)
    return nib.Nifti1Image(head, t.affine), nib.Nifti1Image(inside.astype(np.float32), t.affine)


def place(img: nib.Nifti1Image, pose: np.ndarray, voxel: float, order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``img`` (template space) in a scanner grid of ``voxel`` mm where the head sits at ``pose``."""
    shape = tuple(int(np.ceil(f / voxel)) for f in SCANNER_FOV)
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = SCANNER_CENTRE - (np.asarray(shape) - 1) / 2 * voxel
    data = np.asarray(img.dataobj, np.float32)
    if order and voxel > 2.0:
        data = ndimage.gaussian_filter(data, np.sqrt(voxel**2 - 4.0) / (2.355 * 2.0))
    vox = np.linalg.inv(img.affine) @ np.linalg.inv(pose) @ affine
    return ndimage.affine_transform(data, vox, output_shape=shape, order=order, mode="constant"), affine


def make_subject(head: tuple[nib.Nifti1Image, nib.Nifti1Image], pose: np.ndarray, voxel: float = 4.0,
                 seed: int = 0) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """A noisy scanner image (int16, gain 1000) of the head at ``pose`` and its true brain mask."""
    data, affine = place(head[0], pose, voxel)
    rng = np.random.default_rng(seed)
    data = np.clip(data * 1000 + rng.normal(0, 15, data.shape), 0, None)
    mask, _ = place(head[1], pose, voxel)
    return nib.Nifti1Image(np.rint(data).astype(np.int16), affine), nib.Nifti1Image((mask >= 0.5).astype(np.uint8), affine)


@pytest.fixture(scope="module")
def ref4() -> pp.Reference:
    return pp.Reference.load(4.0, source="offline")


@pytest.fixture(scope="module")
def ref8() -> pp.Reference:
    return pp.Reference.load(8.0, source="offline")


POSE = rigid(8.0, -6.0, 5.0, (6.0, -4.0, 5.0))


@pytest.fixture(scope="module")
def subject4(head_2mm):
    return make_subject(head_2mm, POSE, 4.0, seed=1)


# ---------------------------------------------------------------------------------------------- input
def test_load_t1_reorients_to_ras_without_moving_anything(subject4, tmp_path):
    img, _ = subject4
    data = np.asarray(img.dataobj)
    # LIA, as FreeSurfer writes (and as pycortex's S1 is stored)
    lia = nib.as_closest_canonical(img)  # RAS first, then flip/permute to LIA
    ornt = nib.orientations.ornt_transform(nib.io_orientation(lia.affine), nib.orientations.axcodes2ornt("LIA"))
    lia = lia.as_reoriented(ornt)
    assert nib.aff2axcodes(lia.affine) == ("L", "I", "A")
    path = tmp_path / "lia.nii.gz"
    nib.save(lia, path)
    out = pp.load_t1(path)
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    np.testing.assert_allclose(out.affine, img.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out.dataobj), data.astype(np.float32))


def _write(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


@pytest.fixture
def bad_files(subject4, tmp_path) -> dict[str, Path]:
    img, _ = subject4
    data = np.asarray(img.dataobj).astype(np.float32)
    files = {}
    good = _write(tmp_path / "good.nii.gz", data, img.affine)
    raw = good.read_bytes()
    files["corrupt"] = tmp_path / "corrupt.nii.gz"
    files["corrupt"].write_bytes(raw[: len(raw) // 3])
    files["four_d"] = _write(tmp_path / "four_d.nii.gz", np.stack([data, data], -1), img.affine)
    nan = data.copy()
    nan[10:12, 10:12, 10:12] = np.nan
    files["nan"] = _write(tmp_path / "nan.nii.gz", nan, img.affine)
    files["constant"] = _write(tmp_path / "constant.nii.gz", np.full_like(data, 7.0), img.affine)
    tiny = img.affine.copy()
    tiny[:3, :3] *= 0.01  # 0.04 mm voxels: a header in the wrong unit
    files["voxel_size"] = _write(tmp_path / "voxel_size.nii.gz", data, tiny)
    files["missing"] = tmp_path / "missing.nii.gz"
    return files


@pytest.mark.parametrize(
    "kind, message",
    [
        ("corrupt", "corrupt or truncated|cannot read"),
        ("four_d", "expected a 3-D image"),
        ("nan", "NaN or infinite"),
        ("constant", "constant intensity"),
        ("voxel_size", "voxel sizes .* outside the plausible range"),
        ("missing", "not found"),
    ],
)
def test_load_t1_rejects_bad_input_with_clear_message(bad_files, kind, message):
    with pytest.raises(pp.PreprocessError, match=message) as info:
        pp.load_t1(bad_files[kind])
    assert bad_files[kind].name in str(info.value)


def test_load_t1_accepts_a_single_volume_4d_image(subject4):
    img, _ = subject4
    one = nib.Nifti1Image(np.asarray(img.dataobj)[..., None], img.affine)
    assert pp.load_t1(one).shape == img.shape


# ------------------------------------------------------------------------------------ brain extraction
def test_deepbet_extraction_matches_the_true_brain_at_4mm(subject4):
    img, truth = subject4
    brain, mask = pp.skull_strip(pp.load_t1(img), method="deepbet")
    assert pp.dice(mask, truth) > 0.9
    assert mask.shape == img.shape and np.asarray(mask.dataobj).dtype == np.uint8
    data = np.asarray(brain.dataobj)
    assert np.all(data[np.asarray(mask.dataobj) == 0] == 0)


def test_deepbet_at_8mm_works_through_a_finer_grid(head_2mm):
    img, truth = make_subject(head_2mm, POSE, 8.0, seed=2)
    _, mask = pp.skull_strip(pp.load_t1(img), method="deepbet", max_voxel_mm=4.0)
    assert mask.shape == img.shape
    assert pp.dice(mask, truth) > 0.8


def test_template_method_finds_the_brain_without_a_network(subject4, ref4):
    img, truth = subject4
    _, mask = pp.skull_strip(pp.load_t1(img), method="template", reference=ref4)
    assert pp.dice(mask, truth) > 0.85


def test_mask_method_uses_the_given_mask_and_rejects_an_empty_one(subject4, tmp_path):
    img, truth = subject4
    brain, mask = pp.skull_strip(pp.load_t1(img), method="mask", mask=truth)
    assert pp.dice(mask, truth) == 1.0
    empty = _write(tmp_path / "empty_mask.nii.gz", np.zeros(img.shape, np.uint8), img.affine)
    with pytest.raises(pp.PreprocessError, match="empty"):
        pp.skull_strip(pp.load_t1(img), method="mask", mask=empty)
    with pytest.raises(pp.PreprocessError, match="needs a mask"):
        pp.skull_strip(pp.load_t1(img), method="mask")


# ---------------------------------------------------------------------------------------- registration
def test_rigid_registration_undoes_a_known_pose(subject4, ref4):
    img, truth = subject4
    brain, mask = pp.skull_strip(pp.load_t1(img), method="mask", mask=truth)
    res = pp.rigid_register(brain, ref4.template, mask=mask, template_mask=ref4.mask)
    rot, trans = pp.rigid_error(res.matrix, POSE)
    assert rot < 0.5 and trans < 1.0
    assert res.image.shape == ref4.shape
    np.testing.assert_allclose(res.image.affine, ref4.affine)
    assert res.similarity > 0.85
    # rigid: the brain keeps its volume
    assert pp.mask_volume_ml(res.mask) == pytest.approx(pp.mask_volume_ml(mask), rel=0.05)
    assert np.linalg.det(res.matrix[:3, :3]) == pytest.approx(1.0, abs=1e-6)


def test_rigid_registration_onto_a_coarser_target_grid(subject4, ref4):
    img, truth = subject4
    brain, mask = pp.skull_strip(pp.load_t1(img), method="mask", mask=truth)
    res = pp.rigid_register(brain, ref4.template, voxel_size=8.0, mask=mask, template_mask=ref4.mask)
    assert res.image.shape == templates.target_grid(8.0)[0]
    rot, trans = pp.rigid_error(res.matrix, POSE)
    assert rot < 1.0 and trans < 1.5


def test_a_head_upside_down_gives_a_low_similarity(head_2mm, ref4):
    img, truth = make_subject(head_2mm, rigid(180.0, 0.0, 0.0, (0.0, 0.0, 0.0)), 4.0)
    brain, mask = pp.skull_strip(pp.load_t1(img), method="mask", mask=truth)
    res = pp.rigid_register(brain, ref4.template, mask=mask, template_mask=ref4.mask)
    assert res.similarity < 0.4


def test_similarity_is_one_for_identical_images(ref4):
    assert pp.similarity(ref4.template, ref4.template, ref4.mask) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------- z-score
def test_zscore_brain_and_volume_modes(subject4):
    img, truth = subject4
    x = pp.load_t1(img)
    z = np.asarray(pp.zscore(x, truth, mode="brain").dataobj, np.float64)
    inside = np.asarray(truth.dataobj).astype(bool)
    assert z[inside].mean() == pytest.approx(0.0, abs=1e-5)
    assert z[inside].std() == pytest.approx(1.0, abs=1e-5)
    assert np.all(z[~inside] == 0)
    v = np.asarray(pp.zscore(x, mode="volume").dataobj, np.float64)
    assert v.mean() == pytest.approx(0.0, abs=1e-5) and v.std() == pytest.approx(1.0, abs=1e-5)
    flat = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4))
    with pytest.raises(pp.PreprocessError, match="standard deviation"):
        pp.zscore(flat, mode="volume")


# ------------------------------------------------------------------------------------------------ TIV
def test_mask_volume_in_ml():
    data = np.zeros((20, 20, 20), np.uint8)
    data[:10, :10, :10] = 1
    assert pp.mask_volume_ml(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))) == pytest.approx(8.0)


def test_etiv_recovers_an_isotropic_scaling(head_2mm, ref4):
    scale = 0.9
    img, truth = make_subject(head_2mm, rigid(4.0, 3.0, -5.0, (3.0, 2.0, -4.0), scale=scale), 4.0, seed=3)
    brain, mask = pp.skull_strip(pp.load_t1(img), method="mask", mask=truth)
    etiv = pp.etiv_affine(brain, ref4.template, ref4.tiv_ml, template_mask=ref4.mask)
    assert etiv / ref4.tiv_ml == pytest.approx(scale**3, rel=0.04)
    assert pp.mask_volume_ml(mask) / pp.mask_volume_ml(ref4.mask) == pytest.approx(scale**3, rel=0.05)


def test_etiv_rejects_a_bad_template_volume(subject4, ref4):
    with pytest.raises(pp.BrainsexError, match="template_tiv_ml"):
        pp.etiv_affine(pp.load_t1(subject4[0]), ref4.template, float("nan"))
    with pytest.raises(pp.BrainsexError, match="template_tiv_ml"):
        pp.etiv_from_matrix(np.eye(4), 0.0)
    with pytest.raises(pp.PreprocessError, match="degenerate"):
        pp.etiv_from_matrix(np.diag([1.0, 1.0, -1.0, 1.0]), 1500.0)


def test_one_affine_registration_gives_the_pose_and_etiv(head_2mm, ref4, tmp_path):
    """affine_register: the rigid part recovers the pose of a scaled head, the affine its eTIV."""
    scale = 0.9
    pose = rigid(4.0, 3.0, -5.0, (3.0, 2.0, -4.0), scale=scale)
    img, truth = make_subject(head_2mm, pose, 4.0, seed=3)
    brain, mask = pp.skull_strip(pp.load_t1(img), method="mask", mask=truth)
    res = pp.affine_register(brain, ref4.template, mask=mask, template_mask=ref4.mask,
                             transform_path=tmp_path / "rigid.mat", affine_path=tmp_path / "affine.mat")
    # rigid: no scaling, and the file holds the same matrix as the result
    assert np.linalg.det(res.matrix[:3, :3]) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(pp.transform_matrix(tmp_path / "rigid.mat"), res.matrix, atol=1e-4)
    np.testing.assert_allclose(pp.transform_matrix(tmp_path / "affine.mat"), res.info["affine_matrix"], atol=1e-4)
    rot, trans = pp.rigid_error(res.matrix, rigid(4.0, 3.0, -5.0, (3.0, 2.0, -4.0)))
    assert rot < 1.0 and trans < 1.5
    assert pp.etiv_from_matrix(res.info["affine_matrix"], ref4.tiv_ml) / ref4.tiv_ml == pytest.approx(scale**3,
                                                                                                       rel=0.04)
    # a brain 10 % smaller than the template: neither rigid placement matches it well, both about as well
    rig = pp.rigid_register(brain, ref4.template, mask=mask, template_mask=ref4.mask)
    assert res.image.shape == ref4.shape and res.similarity == pytest.approx(rig.similarity, abs=0.05)
    assert pp.mask_volume_ml(res.mask) == pytest.approx(pp.mask_volume_ml(mask), rel=0.05)
    # the counterfactual path (apply_rigid with the written transform) repeats the placement bit for bit
    _, again = pp.apply_rigid(brain, res.transform, (ref4.shape, ref4.affine), mask=mask, reference=ref4)
    np.testing.assert_array_equal(np.asarray(again.dataobj), np.asarray(res.mask.dataobj))


def test_registration_setting_is_checked_and_keyed(small_cohort, ref8, tmp_path):
    with pytest.raises(pp.BrainsexError, match="registration must be"):
        pp.PreprocessConfig(registration="similarity")  # type: ignore[arg-type]
    default = pp.PreprocessConfig().marker_params("mask", None, None, ref8)
    assert "registration" not in default  # markers written before the setting existed stay valid
    assert pp.PreprocessConfig(registration="affine").marker_params("mask", None, None, ref8)["registration"] == "affine"
    row = small_cohort.iloc[0].to_dict()
    two = pp.preprocess_subject(row, tmp_path / "two", 8.0, reference=ref8)
    one = pp.preprocess_subject(row, tmp_path / "one", 8.0, reference=ref8, registration="affine")
    assert two["status"] == one["status"] == "ok"
    assert Path(one["affine_transform"]).is_file() and Path(one["rigid_transform"]).is_file()
    assert one["affine_det"] == pytest.approx(one["etiv_ml"] / ref8.tiv_ml)
    assert one["etiv_ml"] == pytest.approx(two["etiv_ml"], rel=0.03)
    rot, trans = pp.rigid_error(pp.transform_matrix(one["rigid_transform"]), pp.transform_matrix(two["rigid_transform"]))
    assert rot < 1.5 and trans < 1.5


# ------------------------------------------------------------------------------------------ non-linear
def test_nonlinear_transform_is_cached_and_warps_maps(head_2mm, ref8, tmp_path):
    # a brain 15 % smaller than the template: rigid registration cannot match it, SyN can
    img, truth = make_subject(head_2mm, rigid(4.0, 3.0, -5.0, (3.0, 2.0, -4.0), scale=0.85), 4.0, seed=4)
    brain, mask = pp.skull_strip(pp.load_t1(img), method="mask", mask=truth)
    reg = pp.rigid_register(brain, ref8.template, mask=mask, template_mask=ref8.mask)
    prefix = tmp_path / "sub-x_syn_"
    files = pp.nonlinear_transform(reg.image, ref8.template, prefix, reg_iterations=(20, 10, 0))
    assert [f.name for f in files] == ["warp.nii.gz", "affine.mat"]
    assert files[0].parent.name.startswith("sub-x_syn_syn-")  # the cache entry <prefix>syn-<key>
    stamps = [f.stat().st_mtime_ns for f in files]
    again = pp.nonlinear_transform(reg.image, ref8.template, prefix, reg_iterations=(20, 10, 0))
    assert again == files and [f.stat().st_mtime_ns for f in again] == stamps
    warped = pp.apply_to_map(reg.image, files, ref8.template)
    assert warped.shape == ref8.shape
    assert pp.similarity(warped, ref8.template, ref8.mask) > pp.similarity(reg.image, ref8.template, ref8.mask) + 0.05


# ------------------------------------------------------------------------------------------- cohorts
def _save(img: nib.Nifti1Image, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return str(path)


@pytest.fixture(scope="module")
def small_cohort(head_2mm, tmp_path_factory) -> pd.DataFrame:
    """Three subjects at 4 mm with different poses; two with masks (as CC-359), one without (deepbet)."""
    root = tmp_path_factory.mktemp("cohort")
    rows = []
    poses = [rigid(5, -3, 4, (4, -2, 3)), rigid(-6, 4, -2, (-5, 3, 6), 0.95), rigid(3, 7, -6, (2, 6, -3), 1.05)]
    for i, pose in enumerate(poses, start=1):
        img, mask = make_subject(head_2mm, pose, 4.0, seed=10 + i)
        pid = f"sub-{i:02d}"
        rows.append({"participant_id": pid, "sex": "FM"[i % 2], "age": 50.0 + i, "image": _save(img, root / f"{pid}.nii.gz"),
                     "mask": "" if i == 2 else _save(mask, root / f"{pid}_mask.nii.gz"), "cohort": "fixture"})
    return pd.DataFrame(rows)


def _hashes(out: Path) -> dict[str, str]:
    """SHA-256 of every per-subject output (images, masks, transforms), markers aside."""
    return {str(p.relative_to(out)): sha256_file(p) for p in sorted(out.rglob("sub-*/*"))
            if p.is_file() and not p.name.endswith("_preprocess.json")}


def _markers(out: Path) -> dict[str, dict]:
    """Marker contents without the timings (which differ when a subject is redone)."""
    found = {}
    for p in sorted(out.rglob("sub-*/*_preprocess.json")):
        content = json.loads(p.read_text())
        content["qc"] = {k: v for k, v in content["qc"].items() if not k.startswith("t_")}
        found[p.name] = content
    return found


def test_cohort_is_resumable_and_gives_identical_outputs(small_cohort, ref8, tmp_path):
    out = tmp_path / "preprocess"
    first = pp.preprocess_cohort(small_cohort, out, voxel_size=8.0, n_workers=1, reference=ref8, progress=False)
    assert list(first["status"]) == ["ok", "ok", "ok"], first["reason"].tolist()
    for col in ["participant_id", "sex", "age", "image", "mask", *pp.PREPROCESSED_COLUMNS]:
        assert col in first.columns
    qc = pd.read_csv(out / "qc.tsv", sep="\t")
    assert list(qc.columns) == pp.QC_COLUMNS
    assert set(qc["method"]) == {"mask", "deepbet"}
    for row in first.itertuples():
        img = nib.load(row.image_pp)
        assert img.shape == ref8.shape
        z = np.asarray(img.dataobj)
        m = np.asarray(nib.load(row.mask_pp).dataobj).astype(bool)
        assert abs(z[m].mean()) < 1e-4 and abs(z[m].std() - 1) < 1e-3
    before, markers = _hashes(out), _markers(out)
    assert len(before) == 3 * 5 and len(markers) == 3
    stamp = (out / "sub-01" / "sub-01_preprocess.json").stat().st_mtime_ns

    # a killed run: sub-02 lost its marker, sub-03 has a stray temp file and a half-written image
    (out / "sub-02" / "sub-02_preprocess.json").unlink()
    stray = out / "sub-03" / ".sub-03_space-template_desc-preproc_T1w.abc123.tmp.nii.gz"
    stray.write_bytes(b"half")
    image3 = out / "sub-03" / "sub-03_space-template_desc-preproc_T1w.nii.gz"
    image3.write_bytes(image3.read_bytes()[:100])

    again = pp.preprocess_cohort(small_cohort, out, voxel_size=8.0, n_workers=2, reference=ref8, progress=False)
    assert not stray.exists()
    assert (out / "sub-01" / "sub-01_preprocess.json").stat().st_mtime_ns == stamp  # not redone
    assert _hashes(out) == before  # redone in worker processes, bit for bit the same
    assert _markers(out) == markers
    pd.testing.assert_frame_equal(first, again)
    assert pd.read_csv(out / "preprocessed.tsv", sep="\t")["status"].tolist() == ["ok", "ok", "ok"]


def test_moved_run_folder_and_inputs_keep_their_preprocessing(small_cohort, ref8, tmp_path):
    """Markers key inputs by content: a copied run folder with copied images is reused, not redone."""
    first_dir = tmp_path / "a" / "preprocess"
    first = pp.preprocess_cohort(small_cohort, first_dir, voxel_size=8.0, n_workers=1, reference=ref8,
                                 progress=False)
    moved = tmp_path / "b"
    shutil.copytree(tmp_path / "a", moved)
    images = tmp_path / "images"
    images.mkdir()
    cohort = small_cohort.copy()
    for col in ("image", "mask"):
        cohort[col] = [shutil.copy2(v, images / Path(v).name) if v else "" for v in cohort[col]]
    stamps = {p.name: p.stat().st_mtime_ns for p in (moved / "preprocess").rglob("*_preprocess.json")}
    again = pp.preprocess_cohort(cohort, moved / "preprocess", voxel_size=8.0, n_workers=1, reference=ref8,
                                 progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (moved / "preprocess").rglob("*_preprocess.json")} == stamps
    assert list(again["status"]) == list(first["status"])
    assert all(str(moved) in v for v in again["image_pp"])  # the outputs named where they now lie
    # other content under the same name is redone
    changed = cohort.copy()
    img = nib.load(changed.loc[0, "image"])
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 1.5, img.affine), changed.loc[0, "image"])
    pp.preprocess_cohort(changed, moved / "preprocess", voxel_size=8.0, n_workers=1, reference=ref8, progress=False)
    redone = {p.name for p in (moved / "preprocess").rglob("*_preprocess.json") if p.stat().st_mtime_ns != stamps[p.name]}
    assert redone == {"sub-01_preprocess.json"}


def test_cohort_names_an_unknown_setting(small_cohort, ref8, tmp_path):
    with pytest.raises(pp.BrainsexError, match="unknown preprocessing setting.*'reg_voxel'"):
        pp.preprocess_cohort(small_cohort, tmp_path, voxel_size=8.0, n_workers=1, reference=ref8, progress=False,
                             reg_voxel=4.0)
    assert not (tmp_path / "qc.tsv").exists()


def test_subject_nonlinear_on_request_and_invalidated_with_its_outputs(small_cohort, ref8, tmp_path):
    row = small_cohort.iloc[0].to_dict()
    qc = pp.preprocess_subject(row, tmp_path, 8.0, reference=ref8, nonlinear=True)
    assert qc["status"] == "ok" and qc["t_nonlinear_s"] is not None
    prefix = pp.nonlinear_prefix(tmp_path, row["participant_id"])
    warps = list(prefix.parent.glob(prefix.name + "syn-*/warp.nii.gz"))
    assert len(warps) == 1
    warp = warps[0]
    stamp = warp.stat().st_mtime_ns
    files = pp.nonlinear_transform(nib.load(qc["image_pp"]), ref8.template, prefix)  # from the cache
    assert files[0] == warp and warp.stat().st_mtime_ns == stamp
    assert pp.apply_to_map(nib.load(qc["image_pp"]), files, ref8.template).shape == ref8.shape
    assert pp.preprocess_subject(row, tmp_path, 8.0, reference=ref8, nonlinear=True)["t_total_s"] == qc["t_total_s"]
    # other parameters: the subject is redone, and its new image gets a new warp (the cache key is the
    # image's content), which replaces the old one
    qc2 = pp.preprocess_subject(row, tmp_path, 8.0, reference=ref8, nonlinear=True, zscore_mode="volume")
    assert qc2["status"] == "ok"
    new = pp.nonlinear_transform(nib.load(qc2["image_pp"]), ref8.template, prefix)
    assert new[0] != warp and not warp.exists()


def test_bad_subjects_fail_alone_with_their_reason(small_cohort, bad_files, head_2mm, ref8, tmp_path):
    good = small_cohort.iloc[[0]].to_dict("records")[0]
    rows = [good]
    for kind in ("corrupt", "four_d", "nan", "constant", "voxel_size"):
        rows.append({**good, "participant_id": f"sub-{kind.replace('_', '')}", "image": str(bad_files[kind]), "mask": ""})
    # non-RAS input is reoriented, not rejected
    img = nib.load(good["image"])
    ornt = nib.orientations.ornt_transform(nib.io_orientation(img.affine), nib.orientations.axcodes2ornt("LIA"))
    rows.append({**good, "participant_id": "sub-lia", "image": _save(img.as_reoriented(ornt), tmp_path / "lia.nii.gz"),
                 "mask": _save(nib.load(good["mask"]).as_reoriented(ornt), tmp_path / "lia_mask.nii.gz")})
    # a mask that is empty
    rows.append({**good, "participant_id": "sub-emptymask",
                 "mask": _save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), tmp_path / "empty.nii.gz")})
    # a registration that diverges: the head upside down
    flip, flip_mask = make_subject(head_2mm, rigid(180.0, 0.0, 0.0, (0.0, 0.0, 0.0)), 4.0)
    rows.append({**good, "participant_id": "sub-flipped", "image": _save(flip, tmp_path / "flip.nii.gz"),
                 "mask": _save(flip_mask, tmp_path / "flip_mask.nii.gz")})
    table = pd.DataFrame(rows)
    out = tmp_path / "preprocess"
    # the phantom's own floor (its heads score 0.55-0.75, this one 0.32); real cohorts use the cohort-relative
    # check of brainsex.qc instead (tests/test_qc.py)
    res = pp.preprocess_cohort(table, out, voxel_size=8.0, n_workers=1, reference=ref8, progress=False, etiv=False,
                               similarity_threshold=0.4)
    got = res.set_index("participant_id")
    assert got.loc["sub-01", "status"] == "ok" and got.loc["sub-lia", "status"] == "ok"
    assert got.loc["sub-lia", "similarity"] == pytest.approx(got.loc["sub-01", "similarity"], abs=0.02)
    expected = {
        "sub-corrupt": "corrupt or truncated|cannot read",
        "sub-fourd": "expected a 3-D image",
        "sub-nan": "NaN",
        "sub-constant": "constant intensity",
        "sub-voxelsize": "voxel sizes",
        "sub-emptymask": "empty",
        "sub-flipped": "registration diverged",
    }
    for pid, pattern in expected.items():
        assert got.loc[pid, "status"] == "failed"
        assert pd.Series([got.loc[pid, "reason"]]).str.contains(pattern).all(), (pid, got.loc[pid, "reason"])
        assert pd.isna(got.loc[pid, "image_pp"]) or got.loc[pid, "image_pp"] == ""
        assert not list((out / pid).glob("*.nii.gz"))  # nothing half-done left to read
    qc = pd.read_csv(out / "qc.tsv", sep="\t")
    assert len(qc) == len(table) and qc["reason"].fillna("").str.len().gt(0).sum() == len(expected)


@pytest.mark.slow
def test_phantom_integration_pose_and_tiv(tmp_path):
    """The package's own phantom (brainsex.synthetic), with its true masks, at 8 mm (about 12 s)."""
    synthetic = pytest.importorskip("brainsex.synthetic")
    root = tmp_path / "phantom"
    parts = synthetic.make_cohort(root, n=8, voxel_size=8.0, seed=3, progress=False)
    parts["image"] = [str(root / p / "anat" / f"{p}_T1w.nii.gz") for p in parts["participant_id"]]
    parts["mask"] = [str(root / "ground_truth" / "masks" / f"{p}_desc-brain_mask.nii.gz") for p in parts["participant_id"]]
    ref = pp.Reference.load(8.0, source="offline")
    res = pp.preprocess_cohort(parts, tmp_path / "pp", voxel_size=8.0, n_workers=1, reference=ref, progress=False)
    assert (res["status"] == "ok").all(), res["reason"].tolist()
    poses = pd.read_csv(root / "ground_truth" / "poses.tsv", sep="\t").set_index("participant_id")
    qc = pd.read_csv(tmp_path / "pp" / "qc.tsv", sep="\t")
    err = np.array([pp.rigid_error(pp.transform_matrix(r.rigid_transform), synthetic.pose_matrix(poses.loc[r.participant_id]))
                    for r in qc.itertuples()])
    # issue 4's target (the phantom's individual warp is affine-free, so poses.tsv is the whole pose). The
    # translation bound is 0.2 voxel: over seeds 0-3 the median was 1.25-1.48 mm with phantom-2's draws and
    # 1.13-1.51 mm with phantom-3's named streams (same distributions; rotation 0.88-1.54 and 0.94-1.14 deg)
    assert np.median(err[:, 0]) <= 1.0 and np.median(err[:, 1]) <= 1.6
    # 8 subjects on 8 mm voxels: a loose bound (0.97 at 4 mm on 16 subjects, see the closing note)
    assert np.corrcoef(res["etiv_ml"], res["tiv_ml"])[0, 1] > 0.8


# ------------------------------------------------------------------------------------------ real head
def _pycortex_s1(cache: Path) -> Path:
    """Download pycortex's sdist with pip (once) and extract subject S1's T1 head."""
    target = cache / "S1_raw.nii.gz"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # --no-binary pycortex (not :all:, which would also build numpy from source to read the metadata)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "pycortex", "pycortex==1.4.0",
           "-d", str(cache), "--quiet", "--retries", "1", "--timeout", "20"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot download the pycortex sdist with pip ({exc})")
    sdists = sorted(cache.glob("pycortex-*.tar.gz"))
    if proc.returncode != 0 or not sdists:
        pytest.skip(f"cannot download the pycortex sdist with pip (offline?): {proc.stderr.strip()[-300:]}")
    with tarfile.open(sdists[-1]) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("filestore/db/S1/anatomicals/raw.nii.gz")), None)
        if member is None:
            pytest.skip(f"{sdists[-1].name} does not contain filestore/db/S1/anatomicals/raw.nii.gz")
        with tar.extractfile(member) as src, open(target.with_suffix(".part"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    with gzip.open(target.with_suffix(".part")) as fh:  # a complete gzip stream, or skip
        fh.read(352)
    os.replace(target.with_suffix(".part"), target)
    for sdist in sdists:  # 70 MB; only the 4 MB head is kept
        sdist.unlink()
    return target


@pytest.mark.slow
def test_real_head_pycortex(tmp_path):
    """A real 1 mm T1 head with skull (pycortex's S1, stored LIA) through the whole pipeline."""
    cache = Path(os.environ.get("BRAINSEX_CACHE") or Path.home() / ".cache" / "brainsex") / "pycortex"
    image = _pycortex_s1(cache)
    ref = pp.Reference.load(1.0, source="offline")
    row = {"participant_id": "S1", "image": str(image), "mask": ""}
    qc = pp.preprocess_subject(row, tmp_path, 1.0, reference=ref)
    assert qc["status"] == "ok", qc["reason"]
    assert 1100 <= qc["mask_ml"] <= 2000
    assert 1100 <= qc["etiv_ml"] <= 2000
    assert qc["similarity"] > 0.55
    out = nib.load(qc["image_pp"])
    assert out.shape == (193, 229, 193)


def test_recorded_registration_reads_the_markers(tmp_path):
    """Chapter 07's variant scans follow the run's registration, read back from its subjects' markers."""
    from brainsex import BrainsexError
    from brainsex.preprocess import recorded_registration
    from brainsex.run import PreprocessDir

    folder = PreprocessDir(tmp_path / "preprocess")

    def mark(pid, params):
        marker = folder.subject_outputs(pid)["marker"]
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"params": params}))

    # IDs as cohorts give them, with or without BIDS's prefix (the folders always have it)
    table = pd.DataFrame({"participant_id": ["sub-1", "2", "sub-3"], "status": ["ok", "ok", "failed"]})
    with pytest.raises(BrainsexError, match="no readable subject marker"):
        recorded_registration(table, folder.root)
    mark("sub-1", {"voxel_size": 8.0})  # the default is not written into the marker
    mark("sub-2", {"voxel_size": 8.0})
    mark("sub-3", {"voxel_size": 8.0, "registration": "affine"})  # failed: not read
    assert recorded_registration(table, folder.root) == "rigid+affine"
    mark("sub-2", {"voxel_size": 8.0, "registration": "affine"})
    with pytest.raises(BrainsexError, match="different registrations"):
        recorded_registration(table, folder.root)
    mark("sub-1", {"voxel_size": 8.0, "registration": "affine"})
    assert recorded_registration(table, folder.root) == "affine"
