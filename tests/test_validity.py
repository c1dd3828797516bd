"""Tests of brainsex.validity on tiny synthetic volumes and toy models (whole file: a few seconds)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from brainsex import BrainsexError
from brainsex import validity as v

torch.set_num_threads(1)

VS = 4.0
AFFINE = np.diag([VS, VS, VS, 1.0])
AFFINE[:3, 3] = (-40.0, -48.0, -40.0)


# ------------------------------------------------------------------------------------------ fixtures
def _atlas(shape=(12, 12, 12)) -> np.ndarray:
    """Four cubic regions of 27 voxels, one of 8 (label 5), label 6 absent from the grid."""
    lab = np.zeros(shape, np.int16)
    lab[1:4, 1:4, 1:4] = 1
    lab[1:4, 1:4, 4:7] = 2  # touches region 1
    lab[7:10, 7:10, 7:10] = 3
    lab[7:10, 1:4, 7:10] = 4
    lab[5:7, 5:7, 1:3] = 5
    return lab


def _labels() -> pd.DataFrame:
    return pd.DataFrame({"label": [1, 2, 3, 4, 5, 6], "name": [f"R{i}" for i in range(1, 7)]})


def test_planted_truth_finds_the_table_in_a_run_dir(tmp_path):
    gt = tmp_path / "run" / "cohort" / "phantom" / "ground_truth"
    gt.mkdir(parents=True)
    pd.DataFrame({"label": [3, 1], "name": ["R3", "R1"], "sign": [1, -1], "effect": [0.1, -0.1]}).to_csv(
        gt / "regions.tsv", sep="\t", index=False)
    for src in (tmp_path / "run", tmp_path / "run" / "cohort" / "phantom", gt / "regions.tsv"):
        t = v.planted_truth(src)
        assert t["label"].tolist() == [3, 1] and t["contrast"].tolist() == [0.0, 0.0]
    with pytest.raises(BrainsexError, match="no planted-region table"):
        v.planted_truth(tmp_path / "nowhere")
    (gt / "regions.tsv").write_text("name\tsign\nR1\t1\n")
    with pytest.raises(BrainsexError, match="label"):
        v.planted_truth(gt / "regions.tsv")


def test_truth_map_ranking_hand_computed():
    lab = _atlas()
    effect = np.zeros(lab.shape, np.float32)
    effect[lab == 3] = np.e - 1  # log(1 + e) = 1
    effect[lab == 1] = -0.5  # log 0.5
    effect[lab == 2] = 0.1
    r = v.truth_map_ranking(effect, lab, _labels())
    assert r["label"].tolist()[:4] == [3, 1, 2, 4]
    assert r.loc[0, "mean_effect"] == pytest.approx(1.0, rel=1e-5)
    assert r.loc[1, "mean_effect"] == pytest.approx(np.log(0.5), rel=1e-5)
    assert r["label"].iloc[-1] == 6 and r["n_voxels"].iloc[-1] == 0 and np.isnan(r["mean_effect"].iloc[-1])
    assert r["rank"].tolist() == list(range(1, 7))
    raw = v.truth_map_ranking(effect, lab, _labels(), log=False)
    assert raw.loc[raw["label"] == 1, "mean_effect"].item() == pytest.approx(-0.5)
    with pytest.raises(BrainsexError, match="not in the label table"):
        v.truth_map_ranking(effect, lab, _labels().iloc[1:])


# ------------------------------------------------------------------------------------------ metrics
def test_ranking_report_perfect_random_and_chance():
    ranking = list(range(1, 41))
    truth = [1, 2, 3, 4]
    rep = v.ranking_report(ranking, truth, n_perm=300, seed=0, k=4)
    assert len(rep) == 1
    r = rep.iloc[0]
    assert r["precision_at_k"] == 1.0 and r["average_precision"] == 1.0 and r["hits_at_k"] == 4
    assert r["precision_at_k_p"] == pytest.approx(1 / 301)
    # chance of precision@k without tolerance is |truth| / n
    assert r["precision_at_k_chance"] == pytest.approx(4 / 40, abs=0.03)
    assert "precision_at_k_tolerant" not in rep.columns
    worst = v.ranking_report(ranking[::-1], truth, n_perm=300, seed=0, k=4).iloc[0]
    assert worst["precision_at_k"] == 0.0 and worst["precision_at_k_p"] == 1.0
    assert worst["average_precision"] < worst["average_precision_chance"]


def test_ranking_report_tolerant_and_regions_off_the_grid():
    # 2 touches planted 1: tolerant precision counts it, strict does not
    table = pd.DataFrame({"label": [6, 2, 3, 4, 1, 5], "n_voxels": [0, 27, 27, 27, 27, 8]})
    from brainsex.atlas import region_neighbours

    nb = region_neighbours(_atlas())
    assert 2 in nb[1]
    truth = pd.DataFrame({"label": [1, 6], "sign": [1, -1]})
    r = v.ranking_report(table, truth, neighbours=nb, n_perm=200, seed=1, k=1).iloc[0]
    assert r["n_ranked"] == 5 and r["n_planted"] == 2 and r["n_planted_ranked"] == 1  # label 6 dropped
    assert r["precision_at_k"] == 0.0 and r["precision_at_k_tolerant"] == 1.0
    assert r["average_precision_tolerant"] >= r["average_precision"]
    long = v.report_long(v.ranking_report(table, truth, neighbours=nb, n_perm=50, k=1).assign(method="x"),
                         id_cols=("method",))
    assert long["metric"].tolist() == ["precision_at_1", "average_precision", "precision_at_1_tolerant",
                                       "average_precision_tolerant"]
    assert (long["method"] == "x").all() and long[["observed", "chance", "p_value"]].notna().all().all()
    with pytest.raises(BrainsexError, match="k=9"):
        v.ranking_report(table, truth, k=9)
    with pytest.raises(BrainsexError, match="empty"):
        v.ranking_report(table, [], k=1)
    with pytest.raises(BrainsexError, match="more than once"):
        v.ranking_report([1, 1, 2], [1], k=1)


def test_planted_recovery_uses_sign_and_significance():
    ranking = pd.DataFrame({"label": [3, 1, 2, 6], "coef_male": [0.2, -0.1, 0.05, np.nan], "q": [0.001, 0.01, 0.5, np.nan],
                            "significant": [True, True, False, False], "n_voxels": [27, 27, 27, 0]})
    truth = pd.DataFrame({"label": [3, 1, 2, 6], "name": ["a", "b", "c", "d"], "sign": [1, 1, 1, -1]})
    rec = v.planted_recovery(ranking, truth, k=2).set_index("label")
    assert rec.loc[3, "recovered"] and not rec.loc[1, "recovered"]  # significant but the wrong sign
    assert not rec.loc[1, "sign_agrees"] and not rec.loc[2, "recovered"]
    assert not rec.loc[6, "on_grid"] and np.isnan(rec.loc[6, "rank"]) and not rec.loc[6, "recovered"]
    assert rec["in_top_k"].tolist() == [True, True, False, False]


def test_select_scans_keeps_correct_balanced_and_deterministic():
    n = 40
    t = pd.DataFrame({"participant_id": [f"s{i}" for i in range(n)], "sex": ["M"] * 30 + ["F"] * 10,
                      "y_true": [1] * 30 + [0] * 10, "y_pred": [1] * 28 + [0] * 2 + [0] * 9 + [1]})
    s = v.select_scans(t, max_scans=12, seed=3)
    assert len(s) == 12 and (s["y_true"] == s["y_pred"]).all()
    assert (s["sex"] == "F").sum() == 6 and (s["sex"] == "M").sum() == 6
    assert s["participant_id"].tolist() == v.select_scans(t, max_scans=12, seed=3)["participant_id"].tolist()
    s2 = v.select_scans(t, max_scans=30, seed=0)  # only 9 correct females: the males fill the rest
    assert len(s2) == 30 and (s2["sex"] == "F").sum() == 9
    assert len(v.select_scans(t, max_scans=None)) == 37
    with pytest.raises(BrainsexError, match="no correctly classified"):
        v.select_scans(t.assign(y_pred=1 - t["y_true"]))


# ------------------------------------------------------------------------------- methods on a toy model
class RegionModel(torch.nn.Module):
    """A 'classifier' whose male logit is the summed intensity inside one region (plus a bias)."""

    def __init__(self, weight: np.ndarray):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(1))
        self.register_buffer("w", torch.from_numpy(weight.astype(np.float32))[None, None])

    def forward(self, x):
        return (x * self.w).sum(dim=(1, 2, 3, 4)) + self.bias


@pytest.fixture
def toy_scans(tmp_path):
    lab = _atlas()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        img = rng.normal(size=lab.shape).astype(np.float32)
        img[lab == 3] += 2.0 if i % 2 == 0 else -2.0
        path = tmp_path / f"s{i}.nii.gz"
        nib.save(nib.Nifti1Image(img, AFFINE), path)
        rows.append({"participant_id": f"s{i}", "sex": "M" if i % 2 == 0 else "F", "image_pp": str(path),
                     "y_true": int(i % 2 == 0), "y_pred": int(i % 2 == 0)})
    template = nib.Nifti1Image(np.ones(lab.shape, np.float32), AFFINE)
    return pd.DataFrame(rows), template, nib.Nifti1Image(lab, AFFINE), lab


def test_compare_methods_finds_the_region_the_model_uses(toy_scans):
    table, template, atlas, lab = toy_scans
    model = RegionModel((lab == 3).astype(np.float32))
    out, rankings = v.compare_methods(model, table, template, atlas, _labels(), truth=[3], warp="none",
                                      max_scans=4, n_perm=100, k=1, smoothgrad_samples=2, ig_steps=4,
                                      batch_size=2, return_rankings=True)
    methods = set(out["method"])
    assert methods == set(v.DL_METHODS)
    assert set(out.loc[out["method"] == "occlusion", "scoring"]) == set(v.OCCLUSION_SCORINGS)
    assert set(out.loc[out["method"] == "saliency", "scoring"]) == set(v.SCORINGS)
    p1 = out[out["metric"] == "precision_at_1"]
    assert len(p1) == 10 and (p1["observed"] == 1.0).all()
    assert (p1["chance"] < 0.5).all() and (out["n_scans"] == 4).all()
    assert p1["top_k"].str.startswith("R3*").all()
    for (_m, _s), r in rankings.items():
        assert int(r.iloc[0]["label"]) == 3


def test_compare_methods_reports_failure_honestly(toy_scans):
    table, template, atlas, lab = toy_scans
    model = RegionModel((lab == 4).astype(np.float32))  # uses region 4, truth says 3
    out = v.compare_methods(model, table, template, atlas, _labels(), truth=[3], methods=("saliency", "occlusion"),
                            warp="none", max_scans=4, n_perm=100, k=1)
    p1 = out[out["metric"] == "precision_at_1"]
    assert (p1["observed"] == 0.0).all() and (p1["p_value"] == 1.0).all()
    with pytest.raises(BrainsexError, match="unknown"):
        v.compare_methods(model, table, template, atlas, _labels(), truth=[3], methods=("gradcam",), warp="none")
    with pytest.raises(BrainsexError, match="cache_dir"):
        v.method_rankings(model, table, template, atlas, _labels(), warp="syn")


def test_reference_zscore_uses_only_the_reference_statistics():
    rng = np.random.default_rng(1)
    raw = rng.normal(100, 20, size=(8, 8, 8))
    brain = np.zeros(raw.shape, bool)
    brain[1:7, 1:7, 1:7] = True
    z = np.where(brain, (raw - raw[brain].mean()) / raw[brain].std(), 0.0)  # the per-scan z-score
    ref = np.zeros(raw.shape, bool)
    ref[2:4, 2:5, 2:5] = True
    out = np.asarray(v.reference_zscore(nib.Nifti1Image(z.astype(np.float32), AFFINE), ref, brain).dataobj)
    want = np.where(brain, (raw - raw[ref].mean()) / raw[ref].std(), 0.0)
    np.testing.assert_allclose(out, want, atol=1e-4)
    # a local change outside the reference does not move any other voxel (it does with the brain z-score)
    raw2 = raw.copy()
    raw2[5:7, 5:7, 5:7] += 80
    z2 = np.where(brain, (raw2 - raw2[brain].mean()) / raw2[brain].std(), 0.0)
    out2 = np.asarray(v.reference_zscore(nib.Nifti1Image(z2.astype(np.float32), AFFINE), ref, brain).dataobj)
    far = brain.copy()
    far[5:7, 5:7, 5:7] = False
    np.testing.assert_allclose(out2[far], out[far], atol=1e-4)
    assert np.abs(z2[far] - z[far]).max() > 0.1
    with pytest.raises(BrainsexError, match="reference voxels"):
        v.reference_zscore(nib.Nifti1Image(z.astype(np.float32), AFFINE), np.zeros(raw.shape, bool), brain)


# ------------------------------------------------------------------------------- TBM with real ANTs SyN
def _scaled(template: np.ndarray, region: np.ndarray, volume_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """The template with ``region`` scaled about its centroid (smooth displacement, as in the phantom),
    a little noise, z-scored inside the brain and 0 outside (like ``image_pp``)."""
    idx = np.indices(template.shape).astype(np.float64)
    c = np.array(np.nonzero(region)).mean(axis=1)
    w = np.exp(-ndimage.distance_transform_edt(~region) ** 2 / 2.0)
    a = 1 - 1 / volume_ratio ** (1 / 3)
    out = ndimage.map_coordinates(template, [idx[i] - w * a * (idx[i] - c[i]) for i in range(3)], order=1,
                                  mode="nearest")
    out = out + rng.normal(0, 0.01, out.shape)
    brain = template > 0
    return np.where(brain, (out - out[brain].mean()) / out[brain].std(), 0.0)


@pytest.fixture(scope="module")
def tbm_cohort(tmp_path_factory):
    """Four subjects made from the 8 mm template: the right lateral ventricle 40 % larger in the males,
    40 % smaller in the females (warps are computed once, in the first test, and cached)."""
    from brainsex.templates import load_atlas, load_template

    root = tmp_path_factory.mktemp("tbm")
    template = load_template(8.0, source="offline")
    atlas, labels = load_atlas(8.0, source="offline")
    lab = np.asarray(atlas.dataobj)
    target = int(labels.loc[labels["name"] == "Right Lateral Ventricle", "label"].iloc[0])
    t = template.get_fdata().astype(np.float64)
    rng = np.random.default_rng(0)
    rows = []
    for i, sex in enumerate("MFMF"):
        img = _scaled(t, lab == target, 1.4 if sex == "M" else 1 / 1.4, rng)
        path = root / f"sub-{i}.nii.gz"
        nib.save(nib.Nifti1Image(img.astype(np.float32), template.affine), path)
        rows.append({"participant_id": f"sub-{i}", "sex": sex, "image_pp": str(path), "status": "ok",
                     "etiv_ml": 1500.0 + 10 * i})
    rows.append({**rows[0], "participant_id": "sub-failed", "status": "failed"})
    return pd.DataFrame(rows), template, atlas, labels, target, root


def test_registration_image_keeps_the_brain_above_the_background():
    z = np.zeros((6, 6, 6), np.float32)
    z[1:5, 1:5, 1:5] = np.random.default_rng(0).normal(size=(4, 4, 4))
    r = np.asarray(v.registration_image(nib.Nifti1Image(z, AFFINE)).dataobj)
    inside = z != 0
    assert (r[~inside] == 0).all() and r[inside].min() == pytest.approx(0.1)
    np.testing.assert_allclose(r[inside] - z[inside], 0.1 - z[inside].min(), rtol=1e-5)
    again = np.asarray(v.registration_image(nib.Nifti1Image(r, AFFINE)).dataobj)
    np.testing.assert_allclose(again, r)  # idempotent
    with pytest.raises(BrainsexError, match="all zero"):
        v.registration_image(nib.Nifti1Image(np.zeros((3, 3, 3), np.float32), AFFINE))


def test_log_jacobian_is_larger_where_the_subject_is_larger(tbm_cohort):
    table, template, atlas, labels, target, root = tbm_cohort
    lab = np.asarray(atlas.dataobj)
    maps = [v.log_jacobian_map(p, template, root / "warps" / f"{pid}_")
            for pid, p in zip(table["participant_id"][:4], table["image_pp"][:4], strict=True)]
    assert maps[0].shape == lab.shape and len(list((root / "warps").glob("sub-0_tbm-*/warp.nii.gz"))) == 1
    assert not list((root / "warps").glob("sub-0_syn-*"))  # the saliency chapter's warp is another entry
    region = [m[lab == target].mean() for m in maps]
    assert region[0] > 0.05 and region[2] > 0.05  # the larger ventricles
    assert min(region[0], region[2]) > max(region[1], region[3]) + 0.05


def test_tbm_region_test_finds_the_changed_region(tbm_cohort):
    table, template, atlas, labels, target, root = tbm_cohort
    res = v.tbm_region_test(table, template, atlas, labels, root / "warps", tiv_col=None, progress=False)
    assert res.attrs["n_subjects"] == 4 and res.attrs["n_excluded"] == 1
    row = res.set_index("label").loc[target]
    assert row["coef_male"] > 0.1 and row["t"] > 2
    assert res["rank"].tolist() == list(range(1, len(res) + 1))
    assert (res["n_voxels"] > 0).sum() == int((labels["n_voxels"] > 0).sum())
    assert (res.loc[res["n_voxels"] == 0].index >= (res["n_voxels"] > 0).sum()).all()  # absent regions last
    sub = v.tbm_region_test(table, template, atlas, labels, root / "warps", tiv_col=None, progress=False,
                            max_subjects=2)
    assert sub.attrs["n_subjects"] == 2
    with pytest.raises(BrainsexError, match="warps="):
        v.log_jacobian_map(table.loc[0, "image_pp"], template, root / "warps" / "sub-0_", warps="fnirt")
    with pytest.raises(BrainsexError, match="both sexes"):
        v.tbm_region_test(table[table["sex"] == "M"], template, atlas, labels, root / "warps", progress=False)
    with pytest.raises(BrainsexError, match="lacks column"):
        v.tbm_region_test(table.drop(columns="etiv_ml"), template, atlas, labels, root / "warps", progress=False)


def test_phantom_log_jacobians_rebuild_the_planted_effect(tmp_path):
    from brainsex.synthetic import make_cohort
    from brainsex.templates import load_atlas

    part = make_cohort(tmp_path / "ph", n=8, voxel_size=8.0, seed=0, progress=False, region_effect=0.3)
    atlas, labels = load_atlas(8.0, source="offline")
    true = v.phantom_log_jacobians(tmp_path / "ph", atlas, labels)
    assert list(true.index) == part["participant_id"].tolist() and true.shape[1] == len(labels)
    truth = v.planted_truth(tmp_path / "ph")
    male = (part.set_index("participant_id").loc[true.index, "sex"] == "M").to_numpy()
    on_grid = [lab for lab in truth["label"] if true[lab].notna().all()]
    assert len(on_grid) >= 6
    for lab in on_grid:  # the planted sign: + larger in males
        sign = int(truth.set_index("label").loc[lab, "sign"])
        assert sign * (true.loc[male, lab].mean() - true.loc[~male, lab].mean()) > 0.05
    some = v.phantom_log_jacobians(tmp_path / "ph", atlas, labels, participants=["sub-0002"])
    np.testing.assert_allclose(some.loc["sub-0002"], true.loc["sub-0002"])
    table = part.assign(etiv_ml=part["tiv_ml"])
    res = v.region_test_table(true, table, atlas, labels, load_template_8())
    assert res["rank"].tolist() == list(range(1, len(res) + 1)) and res.attrs["n_subjects"] == 8
    with pytest.raises(BrainsexError, match="not in the phantom"):
        v.phantom_log_jacobians(tmp_path / "ph", atlas, labels, participants=["sub-9999"])
    with pytest.raises(BrainsexError, match="generation.json"):
        v.phantom_log_jacobians(tmp_path, atlas, labels)


def load_template_8():
    from brainsex.templates import load_template

    return load_template(8.0, source="offline")


def test_study_cli_parses_defaults():
    args = v._parser().parse_args(["study", "--voxel-sizes", "8", "--effects", "contrast"])
    assert args.voxel_sizes == [8.0] and args.effects == ["contrast"] and args.zscores == ["brain", "reference"]
    with pytest.raises(BrainsexError, match="effect"):
        v._study_config("shape", 0.1, 0.1)


def test_tbm_transform_recovers_a_shift_in_its_affine_stage(tmp_path):
    """The separate affine stage of tbm_transform finds a known 8 mm shift; the files apply in order."""
    import ants

    from brainsex.registration import to_ants, transform_matrix
    from brainsex.templates import load_template

    template = load_template(8.0, source="offline")
    t = template.get_fdata().astype(np.float32)
    moved = nib.Nifti1Image(np.roll(t, 1, axis=0), template.affine)  # the subject sits one voxel (8 mm) along i
    files = v.tbm_transform(moved, template, tmp_path / "s_")
    assert [f.name for f in files] == ["warp.nii.gz", "affine.mat"] and files[0].parent.name.startswith("s_tbm-")
    m = transform_matrix(files[1])
    shift = np.linalg.norm(m[:3, 3])
    assert 5.0 < shift < 11.0 and np.allclose(m[:3, :3], np.eye(3), atol=0.1)
    back = ants.apply_transforms(to_ants(template), to_ants(moved), [str(f) for f in files]).numpy()
    brain = t > 0
    assert np.corrcoef(back[brain], t[brain])[0, 1] > 0.95
    assert v.tbm_transform(moved, template, tmp_path / "s_") == files  # cached


def test_positive_control_perfect_and_registered_on_the_same_sample(tmp_path):
    from brainsex.synthetic import make_cohort
    from brainsex.templates import load_atlas

    part = make_cohort(tmp_path / "ph", n=8, voxel_size=8.0, seed=0, progress=False, region_effect=0.3)
    atlas, labels = load_atlas(8.0, source="offline")
    template = load_template_8()
    truth = v.planted_truth(tmp_path / "ph")
    images = [str(tmp_path / "ph" / i / "anat" / f"{i}_T1w.nii.gz") for i in part["participant_id"]]
    table = part.assign(etiv_ml=part["tiv_ml"], image_pp=images, status="ok")
    only_true = v.positive_control(table, tmp_path / "ph", template, atlas, labels, truth, tmp_path / "w",
                                   warps=(), n_perm=20)
    assert list(only_true.tables) == [v.PERFECT_ALL] and np.isnan(only_true.ratio)
    assert only_true.tables[v.PERFECT_ALL].attrs["n_subjects"] == 8
    # the planted sign shows in the perfect-warp coefficients
    signs = truth.set_index("label").loc[only_true.coef.index, "sign"]
    assert (np.sign(only_true.coef[v.PERFECT_ALL]) == signs).mean() >= 0.8
    pc = v.positive_control(table, tmp_path / "ph", template, atlas, labels, truth, tmp_path / "w", warps=("tbm",),
                            max_subjects=4, n_perm=20)
    assert list(pc.tables) == [v.PERFECT_ALL, v.WARP_NAMES["tbm"], v.PERFECT_SAMPLE]
    assert pc.tables[v.PERFECT_SAMPLE].attrs["n_subjects"] == 4 == pc.tables[v.WARP_NAMES["tbm"]].attrs["n_subjects"]
    summary = pc.summary(k=10)
    assert summary["morphometry with"].tolist() == list(pc.tables) and (summary["P@10 chance"] > 0).all()
    assert np.isfinite(pc.ratio) and -1.0 <= pc.agreement <= 1.0
    with pytest.raises(BrainsexError, match="warps must be"):
        v.positive_control(table, tmp_path / "ph", template, atlas, labels, truth, tmp_path / "w", warps=("bogus",))
    with pytest.raises(BrainsexError, match="no subject"):
        v.positive_control(table.assign(status="failed"), tmp_path / "ph", template, atlas, labels, truth,
                           tmp_path / "w")
