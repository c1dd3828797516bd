"""Tests of brainsex.validity on tiny synthetic volumes and toy models (whole file: a few seconds)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from brainsex import BrainsexError
from brainsex import validity as v
from brainsex.run import RunDir

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


def test_planted_truth_reads_the_run_layout(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.truth is None and not run.has_truth  # nothing generated yet: a real cohort looks the same
    with pytest.raises(BrainsexError, match="no ground truth"):
        v.planted_truth(run)
    gt = run.phantom.truth_dir
    gt.mkdir(parents=True)
    pd.DataFrame({"label": [3, 1], "name": ["R3", "R1"], "sign": [1, -1], "effect": [0.1, -0.1]}).to_csv(
        run.phantom.regions, sep="\t", index=False)
    run.phantom.generation.write_text("{}")
    assert run.has_truth
    for src in (run, run.phantom, run.phantom.root, run.phantom.regions):
        t = v.planted_truth(src)
        assert t["label"].tolist() == [3, 1] and t["contrast"].tolist() == [0.0, 0.0]
    # a run directory given as a plain path is not searched: only the phantom's root or the file
    with pytest.raises(BrainsexError, match="no planted-region table"):
        v.planted_truth(run.root)
    with pytest.raises(BrainsexError, match="no planted-region table"):
        v.planted_truth(tmp_path / "nowhere")
    run.phantom.regions.write_text("name\tsign\nR1\t1\n")
    with pytest.raises(BrainsexError, match="label"):
        v.planted_truth(run.phantom.regions)


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
    res = v.compare_methods(model, table, template, atlas, _labels(), truth=[3], warp="none", max_scans=4, n_perm=100,
                            k=1, explain=v.ExplainSettings(smoothgrad_samples=2, ig_steps=4, batch_size=2))
    out, rankings = res.table, res.rankings
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
                            warp="none", max_scans=4, n_perm=100, k=1).table
    p1 = out[out["metric"] == "precision_at_1"]
    assert (p1["observed"] == 0.0).all() and (p1["p_value"] == 1.0).all()
    with pytest.raises(BrainsexError, match="unknown"):
        v.compare_methods(model, table, template, atlas, _labels(), truth=[3], methods=("gradcam",), warp="none")
    with pytest.raises(BrainsexError, match="cache_dir"):
        v.method_rankings(model, table, template, atlas, _labels(), warp="syn")
    with pytest.raises(BrainsexError, match="explain"):
        v.method_rankings(model, table, template, atlas, _labels(), warp="none", explain={"ig_steps": 4})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"threshold": 1.5}, "threshold"), ({"batch_size": 0}, "batch_size"), ({"batch_size": "big"}, "batch_size"),
     ({"smoothgrad_samples": 2.5}, "smoothgrad_samples"), ({"smoothgrad_noise": -0.1}, "smoothgrad_noise"),
     ({"ig_steps": True}, "ig_steps")],
)
def test_explain_settings_are_checked(kwargs, match):
    with pytest.raises(BrainsexError, match=match):
        v.ExplainSettings(**kwargs)
    ok = v.ExplainSettings(batch_size=4, ig_steps=np.int64(3))
    assert ok.batch_size == 4 and ok.threshold == 0.1 and ok.device is None


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


@pytest.fixture(scope="module")
def phantom8(tmp_path_factory):
    """An 8-subject phantom at 8 mm with a strong planted effect, read (never written) by the tests below."""
    from brainsex.synthetic import make_cohort

    root = tmp_path_factory.mktemp("phantom8") / "ph"
    return root, make_cohort(root, n=8, voxel_size=8.0, seed=0, progress=False, region_effect=0.3)


def test_phantom_log_jacobians_rebuild_the_planted_effect(phantom8, tmp_path):
    from brainsex.templates import load_atlas

    ph, part = phantom8
    atlas, labels = load_atlas(8.0, source="offline")
    true = v.phantom_log_jacobians(ph, atlas, labels)
    assert list(true.index) == part["participant_id"].tolist() and true.shape[1] == len(labels)
    truth = v.planted_truth(ph)
    male = (part.set_index("participant_id").loc[true.index, "sex"] == "M").to_numpy()
    on_grid = [lab for lab in truth["label"] if true[lab].notna().all()]
    assert len(on_grid) >= 6
    for lab in on_grid:  # the planted sign: + larger in males
        sign = int(truth.set_index("label").loc[lab, "sign"])
        assert sign * (true.loc[male, lab].mean() - true.loc[~male, lab].mean()) > 0.05
    some = v.phantom_log_jacobians(ph, atlas, labels, participants=["sub-0002"])
    np.testing.assert_allclose(some.loc["sub-0002"], true.loc["sub-0002"])
    table = part.assign(etiv_ml=part["tiv_ml"])
    res = v.region_test_table(true, table, atlas, labels, load_template_8())
    assert res["rank"].tolist() == list(range(1, len(res) + 1)) and res.attrs["n_subjects"] == 8
    with pytest.raises(BrainsexError, match="not in the phantom"):
        v.phantom_log_jacobians(ph, atlas, labels, participants=["sub-9999"])
    with pytest.raises(BrainsexError, match="generation.json"):
        v.phantom_log_jacobians(tmp_path, atlas, labels)


def load_template_8():
    from brainsex.templates import load_template

    return load_template(8.0, source="offline")


def test_study_cli_options_are_the_study_profile():
    from brainsex.profiles import resolve_profile

    defaults = resolve_profile("study", kind="study")
    args = vars(v._parser().parse_args(["study", "--voxel-sizes", "8", "--effects", "contrast", "--no-tbm"]))
    assert args["voxel_sizes"] == [8.0] and args["effects"] == ["contrast"] and args["tbm"] is False
    # every profile parameter is an option; what is not given stays None so that the profile decides
    assert set(defaults) <= set(args) and args["zscores"] is None and args["select"] is None
    with pytest.raises(SystemExit):
        v._parser().parse_args(["study", "--effects", "shape"])
    with pytest.raises(BrainsexError, match="unknown parameter 'epohcs'"):
        v.study(epohcs=3)
    with pytest.raises(BrainsexError, match="effect"):
        v._study_config("shape", 0.1, 0.1)


def test_study_widths_come_from_the_book_profiles():
    from brainsex.profiles import load_profiles

    books = load_profiles()
    w = v.study_widths({"widths": ["study", "demo", "paper"], "channels": [4, 8, 8, 8, 8, 4]})
    assert list(w) == ["study", "demo", "paper"] and w["study"] == [4, 8, 8, 8, 8, 4]
    assert w["demo"] == books["demo"]["params"]["channels"]
    assert w["paper"] == [32, 64, 128, 256, 256, 64] == books["paper"]["params"]["channels"]  # the paper's SFCN
    assert v.study_widths({"channels": [2, 2, 2, 2, 2, 2]}) == {"study": [2, 2, 2, 2, 2, 2]}
    with pytest.raises(BrainsexError, match="widths: 'huge'"):
        v.study_widths({"widths": ["huge"], "channels": [4] * 6})
    args = vars(v._parser().parse_args(["study", "--widths", "demo", "paper", "--tbm-subjects", "8"]))
    assert args["widths"] == ["demo", "paper"] and args["tbm_subjects"] == 8
    with pytest.raises(SystemExit):
        v._parser().parse_args(["study", "--widths", "huge"])


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


def test_positive_control_perfect_and_registered_on_the_same_sample(phantom8, tmp_path):
    from brainsex.templates import load_atlas

    ph, part = phantom8
    atlas, labels = load_atlas(8.0, source="offline")
    template = load_template_8()
    truth = v.planted_truth(ph)
    table = part.assign(etiv_ml=part["tiv_ml"], image_pp=part["image"], status="ok")
    only_true = v.positive_control(table, ph, template, atlas, labels, truth, tmp_path / "w",
                                   warps=(), n_perm=20)
    assert list(only_true.tables) == [v.PERFECT_ALL] and np.isnan(only_true.ratio)
    assert only_true.tables[v.PERFECT_ALL].attrs["n_subjects"] == 8
    # the planted sign shows in the perfect-warp coefficients
    signs = truth.set_index("label").loc[only_true.coef.index, "sign"]
    assert (np.sign(only_true.coef[v.PERFECT_ALL]) == signs).mean() >= 0.8
    pc = v.positive_control(table, ph, template, atlas, labels, truth, tmp_path / "w", warps=("tbm",),
                            max_subjects=4, n_perm=20)
    assert list(pc.tables) == [v.PERFECT_ALL, v.WARP_NAMES["tbm"], v.PERFECT_SAMPLE]
    assert pc.tables[v.PERFECT_SAMPLE].attrs["n_subjects"] == 4 == pc.tables[v.WARP_NAMES["tbm"]].attrs["n_subjects"]
    summary = pc.summary(k=10)
    assert summary["morphometry with"].tolist() == list(pc.tables) and (summary["P@10 chance"] > 0).all()
    # agreement and ratio, recomputed from the public pieces on the registered sample
    sample = pc.tables[v.WARP_NAMES["tbm"]].attrs["sample"]
    rows = table.set_index("participant_id", drop=False).loc[sample].reset_index(drop=True)
    est = v.tbm_region_means(rows, template, atlas, labels, tmp_path / "w", warps="tbm")
    true = v.phantom_log_jacobians(ph, atlas, labels, participants=sample)
    r = [np.corrcoef(est[c], true.loc[est.index, c])[0, 1] for c in est.columns
         if c in true.columns and est[c].notna().all() and est[c].std() > 0]
    assert len(r) > 10 and pc.agreement == pytest.approx(np.median(r))
    assert pc.agreement > 0.1  # registered warps follow each subject's anatomy (0.37 here; chance ~0)
    ratio = (pc.coef[v.WARP_NAMES["tbm"]] / pc.coef[v.PERFECT_SAMPLE]).median()
    assert pc.ratio == pytest.approx(ratio)
    with pytest.raises(BrainsexError, match="warps must be"):
        v.positive_control(table, ph, template, atlas, labels, truth, tmp_path / "w", warps=("bogus",))
    with pytest.raises(BrainsexError, match="no subject"):
        v.positive_control(table.assign(status="failed"), ph, template, atlas, labels, truth,
                           tmp_path / "w")


def _control(n_all: int, n_reg: int | None, n_sample: int | None, ratio: float) -> v.PositiveControl:
    def rec(n):
        return pd.DataFrame({"recovered": [True] * n + [False] * (10 - n)})

    tables = {v.PERFECT_ALL: pd.DataFrame()}
    tables[v.PERFECT_ALL].attrs["n_subjects"] = 100
    recoveries = {v.PERFECT_ALL: rec(n_all)}
    if n_reg is not None:
        reg = pd.DataFrame()
        reg.attrs["n_subjects"] = 16
        tables[v.WARP_NAMES["tbm"]] = reg
        tables[v.PERFECT_SAMPLE] = pd.DataFrame()
        recoveries[v.WARP_NAMES["tbm"]] = rec(n_reg)
        recoveries[v.PERFECT_SAMPLE] = rec(n_sample)
    return v.PositiveControl(tables=tables, reports={}, recoveries=recoveries, coef=pd.DataFrame(),
                             agreement=0.5, ratio=ratio)


def test_control_verdict_thresholds():
    ok = v.control_verdict(_control(9, 2, 7, ratio=0.3))
    assert ok.passes and ok.n_recovered == 9 and ok.loses_difference
    assert (ok.registered, ok.n_registered_subjects, ok.registered_recovered, ok.sample_recovered) == (
        v.WARP_NAMES["tbm"], 16, 2, 7)
    at = v.control_verdict(_control(v.CONTROL_MIN_RECOVERED, 6, 7, ratio=v.CONTROL_MAX_RATIO))
    assert at.passes and not at.loses_difference  # the bounds: >= recovered passes, ratio must be below
    short = v.control_verdict(_control(7, None, None, ratio=float("nan")))
    assert not short.passes and short.registered is None and short.n_registered_subjects == 0
    assert not short.loses_difference and short.registered_recovered is None
    assert not v.control_verdict(_control(9, 2, 7, ratio=0.3), min_recovered=10).passes


def test_format_p_and_comparison_table():
    assert [v.format_p(p) for p in (0.04321, 0.001, 0.0004, float("nan"))] == ["0.043", "0.001", "< 0.001", "n/a"]
    rows = []
    for method, base in (("truth map", 0.9), ("saliency", 0.1)):
        for metric, val in (("precision_at_10", base), ("average_precision", base / 2),
                            ("precision_at_10_tolerant", base + 0.05), ("average_precision_tolerant", base)):
            rows.append({"method": method, "scoring": "s", "metric": metric, "observed": val, "chance": 0.123,
                         "p_value": 0.0001 if method == "truth map" else 0.5})
    t = v.comparison_table(pd.DataFrame(rows), k=10)
    assert t["method"].tolist() == ["truth map", "saliency"]  # the summary's order, not sorted
    assert t["P@10"].tolist() == [0.9, 0.1] and t["AP"].tolist() == [0.45, 0.05]
    assert t["P@10 tolerant"].tolist() == [0.95, 0.15] and (t["P@10 chance"] == 0.12).all()
    assert t["P@10 p"].tolist() == ["< 0.001", "0.500"]


def test_study_precision_table_notes_weak_models():
    study = pd.DataFrame({
        "effect": ["volume"] * 3 + ["contrast"] * 2, "voxel_size": 8.0,
        "zscore": ["-", "brain", "brain", "brain", "brain"],
        "method": ["truth_map", "saliency", "saliency", "saliency", "saliency"], "scoring": "s",
        "metric": ["precision_at_10", "precision_at_10", "average_precision", "precision_at_10", "average_precision"],
        "observed": [0.912, 0.1, 0.2, 0.3, 0.3], "chance": 0.1234, "p_value": [0.0001, 0.5, 0.5, 0.2, 0.2],
        "accuracy": [np.nan, 0.9, 0.9, 0.55, 0.55], "n_scans": 12})
    t = v.study_precision_table(study, k=10)
    assert len(t) == 3 and t["observed"].tolist() == [0.91, 0.1, 0.3] and t["p_value"].tolist()[0] == "< 0.001"
    assert t["note"].tolist() == ["", "", "model near chance: its maps explain little"]
    assert t.attrs["n_weak"] == 1
    assert v.study_precision_table(study, min_accuracy=0.5).attrs["n_weak"] == 0
    assert t["width"].tolist() == ["-", "study", "study"]  # a table from before the widths
    # two widths on one grid: each trained model counts once
    wide = pd.concat([study.assign(width=np.where(study["zscore"] == "-", "-", "demo")),
                      study[study["zscore"] != "-"].assign(width="paper", accuracy=0.95)], ignore_index=True)
    tw = v.study_precision_table(wide, k=10)
    assert len(tw) == 5 and tw["width"].tolist() == ["-", "demo", "demo", "paper", "paper"]
    assert tw.attrs["n_weak"] == 1


@pytest.mark.slow
def test_study_at_smoke_size(tmp_path):
    """The whole sweep on a tiny phantom: every configuration and method gives rows, accuracy from evaluate."""
    res = v.study(out_dir=tmp_path, voxel_sizes=[8.0], effects=["volume"], zscores=["brain"], n_subjects=24,
                  epochs=1, methods=["saliency"], scorings=["weighted_score"], max_scans=4, warp="none", tbm=False,
                  n_perm=20, n_workers=1, progress=False)
    from brainsex.run import ValidityDir

    out = ValidityDir(tmp_path)
    on_disk = pd.read_csv(out.study_table, sep="\t")
    assert len(on_disk) == len(res) and set(res["method"]) == {"truth_map", "saliency"}
    assert set(res["metric"]) == {"precision_at_10", "average_precision", "precision_at_10_tolerant",
                                  "average_precision_tolerant"}
    truth_rows = res[res["method"] == "truth_map"]
    assert (truth_rows.loc[truth_rows["metric"] == "precision_at_10", "observed"] >= 0.5).all()
    dl = res[res["method"] == "saliency"]
    assert dl["accuracy"].between(0, 1).all() and dl["accuracy"].nunique() == 1
    # the accuracy is that of the kept checkpoint on the test subset, recomputed from the run's pieces
    from brainsex.run import PreprocessDir, TrainDir
    from brainsex.stages import evaluate_predictions, predict_split, split_subjects

    base = tmp_path / "work" / "volume_8mm"
    split = split_subjects(pd.read_csv(PreprocessDir(base / "preprocess").table, sep="\t"), seed=0)
    pred = predict_split(TrainDir(base / "train_brain").best, split, device="cpu")
    assert dl["accuracy"].iloc[0] == pytest.approx(evaluate_predictions(pred).loc["accuracy", "value"])
    info = __import__("json").loads(out.study_info.read_text())
    assert info["args"]["select"] == "val_loss" and info["args"]["epochs"] == 1
    assert set(res["width"]) == {"-", "study"} and info["args"]["width_channels"] == {"study": [4, 8, 8, 8, 8, 4]}
    assert info["date"][:2] == "20" and info["date"] <= info["finished"]
    assert {s["stage"] for s in info["stages"]} == {"phantom", "preprocess", "train_study", "explain_study"}


# --------------------------------------------------------------------------------------------------
# is it just head size? size-only and region-only phantoms
# --------------------------------------------------------------------------------------------------
def _tiny_run(root, n=24):
    """A tiny phantom run: phantom, preprocessing, split, one epoch of training, test predictions.

    24 subjects (12 per sex) are the fewest whose 80/10/10 split stays stratified by sex (strata of at least
    10), so the test set holds both sexes and balanced accuracy is defined.
    """
    from brainsex.io import write_table
    from brainsex.preprocess import preprocess_cohort
    from brainsex.run import RunDir
    from brainsex.stages import predict_split, split_subjects, train_model
    from brainsex.synthetic import make_cohort

    run = RunDir(root)
    params = {"channels": [4, 8, 8, 8, 8, 4], "epochs": 1, "batch_size": 8, "lr": 0.01, "select": "last",
              "device": "cpu", "seed": 0}
    participants = make_cohort(run.phantom.root, n=n, voxel_size=8.0, seed=0, progress=False)
    pre = preprocess_cohort(participants, run.preprocess, voxel_size=8.0, n_workers=1, progress=False)
    split = split_subjects(pre, seed=0, out=run.train)
    res = train_model(split, params, run.train, resume="auto", progress=False)
    write_table(predict_split(res.model, split, split="test", device="cpu"), run.evaluate.predictions)
    return run, params


@pytest.mark.slow
def test_size_experiments_on_a_tiny_run(tmp_path, monkeypatch):
    """Size-only and region-only phantoms: same people and draws, the run's split, a table with every row; cached."""
    import brainsex.stages
    from brainsex.io import read_table
    from brainsex.run import ValidityDir

    run, params = _tiny_run(tmp_path / "run")
    # two workers: the two variants side by side in worker processes, one torch thread each (size_variant_plan)
    table = v.size_experiments(run.root, params, rtiv=(1000.0, 2000.0), n_bootstrap=20, n_workers=2,
                               progress=False)
    on_disk = pd.read_csv(run.validity.size_experiments, sep="\t")
    assert list(on_disk.columns) == ["phantom", "subset", "metric", "value", "ci_low", "ci_high", "n"]
    assert len(on_disk) == len(table) == 12  # 3 phantoms x 2 subsets x 2 metrics
    assert set(zip(table["phantom"], table["subset"], table["metric"], strict=True)) == {
        (p, s, m) for p in ("default", "size_only", "regions_only") for s in ("all", "inside_rtiv")
        for m in ("accuracy", "balanced_accuracy")}
    assert table["value"].between(0, 1).all() and (table["ci_low"] <= table["ci_high"]).all()
    n_test = int((read_table(run.train.split)["split"] == "test").sum())
    assert (table.loc[table["subset"] == "all", "n"] == n_test).all()
    assert (table.loc[table["subset"] == "inside_rtiv", "n"] <= n_test).all()
    # the default row is the run's own predictions
    from brainsex.stages import evaluate_predictions

    own = evaluate_predictions(read_table(run.evaluate.predictions))
    default_acc = table.query("phantom == 'default' and subset == 'all' and metric == 'accuracy'")["value"].item()
    assert default_acc == pytest.approx(own.loc["accuracy", "value"])
    # another output folder (chapter 07 on a matched phantom writes into the real run's validity/): the
    # variants resume from the run, the table lands in that folder
    elsewhere = ValidityDir(tmp_path / "real_run" / "validity")
    moved = v.size_experiments(run.root, params, out=elsewhere.root, rtiv=(1000.0, 2000.0), n_bootstrap=20,
                               progress=False)
    pd.testing.assert_frame_equal(moved, table)
    assert elsewhere.size_experiments.is_file() and not elsewhere.size_variant("size_only").exists()

    # each variant: the run's participants, split and draws; only what it changes differs
    size_only = RunDir(run.validity.size_variant("size_only"))
    regions_only = RunDir(run.validity.size_variant("regions_only"))
    for variant in (size_only, regions_only):
        assert read_table(variant.train.split)["participant_id"].tolist() == \
            read_table(run.train.split)["participant_id"].tolist()
        assert read_table(variant.train.split)["split"].tolist() == read_table(run.train.split)["split"].tolist()
        poses = read_table(variant.phantom.poses).drop(columns="scale")
        assert poses.equals(read_table(run.phantom.poses).drop(columns="scale"))
    tiv = read_table(run.phantom.participants)["tiv_ml"]
    assert read_table(size_only.phantom.participants)["tiv_ml"].equals(tiv)
    assert not read_table(regions_only.phantom.participants)["tiv_ml"].equals(tiv)
    assert json.loads(size_only.phantom.generation.read_text())["args"]["region_effect"] == 0.0
    assert json.loads(regions_only.phantom.generation.read_text())["args"]["tiv_effect"] is False
    for variant in (size_only, regions_only):  # each trained on one thread, within half the memory
        assert read_table(variant.evaluate.predictions)["participant_id"].astype(str).tolist() == \
            read_table(run.evaluate.predictions)["participant_id"].astype(str).tolist()
    # a re-run reuses the cached table: no training, the same numbers
    def no_training(*a, **k):
        raise AssertionError("the cached table should have been reused")

    monkeypatch.setattr(brainsex.stages, "train_model", no_training)
    run.validity.size_experiments.unlink()
    again = v.size_experiments(run.root, params, rtiv=(1000.0, 2000.0), n_bootstrap=20, progress=False)
    pd.testing.assert_frame_equal(again, table)
    assert run.validity.size_experiments.is_file()
    # another setting is another entry (and would train)
    with pytest.raises(AssertionError, match="cached table"):
        v.size_experiments(run.root, {**params, "lr": 0.02}, rtiv=(1000.0, 2000.0), n_bootstrap=20, progress=False)


def test_size_variant_plan_shares_the_cpu():
    import torch

    threads = torch.get_num_threads()
    assert v.size_variant_plan(2, 1, "cpu") == (1, 1, 0)  # one worker: in turn, torch's threads untouched
    assert v.size_variant_plan(2, 2, "cpu") == (2, 1, max(1, threads // 2))
    assert v.size_variant_plan(2, 8, "cpu") == (2, 4, max(1, threads // 2))
    assert v.size_variant_plan(1, 4, "cpu") == (1, 4, 0)
    assert v.size_variant_plan(0, 2, "cpu") == (1, 2, 0)
    with pytest.raises(BrainsexError, match="n_workers"):
        v.size_variant_plan(2, 0, "cpu")


def test_size_experiments_names_what_is_missing(tmp_path):
    with pytest.raises(BrainsexError, match="generation record"):
        v.size_experiments(tmp_path, {})
    with pytest.raises(BrainsexError, match="unknown"):
        v.size_experiments(tmp_path, {}, phantoms=["shape_only"])


def test_size_metrics_subsets_and_chance():
    pred = pd.DataFrame({"y_true": [0, 0, 0, 1, 1, 1], "prob_male": [0.1, 0.2, 0.9, 0.8, 0.7, 0.4],
                         "etiv_ml": [1300.0, 1450.0, 1500.0, 1550.0, 1600.0, 1800.0],
                         "sex": ["F", "F", "F", "M", "M", "M"]})
    t = v.size_metrics(pred, (1400.0, 1650.0), "default", n_bootstrap=0)
    assert list(t.columns) == list(v.SIZE_COLUMNS)
    acc = t.set_index(["subset", "metric"])["value"]
    assert acc[("all", "accuracy")] == pytest.approx(4 / 6)
    assert acc[("inside_rtiv", "accuracy")] == pytest.approx(3 / 4)  # 1450 ok, 1500 wrong, 1550 ok, 1600 ok
    assert t.set_index(["subset", "metric"])["n"][("inside_rtiv", "accuracy")] == 4


def test_size_summary_texts_and_chance():
    t = pd.DataFrame({"phantom": ["size_only", "size_only", "regions_only"], "subset": ["all", "inside_rtiv", "all"],
                      "metric": "balanced_accuracy", "value": [0.86, 0.55, 0.7], "ci_low": [0.8, 0.4, 0.52],
                      "ci_high": [0.92, 0.7, 0.85], "n": [32, 12, 32]})
    s = v.size_summary(t)
    assert s["size_only_all"] == "86 % (95 % CI 80–92 %, n = 32)"
    assert s["size_only_all_vs_chance"] == "above chance"
    assert s["size_only_inside_rtiv_vs_chance"] == "not distinguishable from chance"
    assert v.size_summary(t, chance=0.6)["regions_only_all_vs_chance"] == "not distinguishable from chance"
    assert "regions_only_inside_rtiv" not in s


def test_study_width_table_puts_grids_and_widths_side_by_side():
    def rows(width, zscore, method, observed, accuracy, vs=2.0):
        return {"effect": "volume", "voxel_size": vs, "zscore": zscore, "width": width, "method": method,
                "scoring": "s", "metric": "precision_at_10", "observed": observed, "chance": 0.09,
                "p_value": 0.5, "accuracy": accuracy, "n_scans": 8}

    study = pd.DataFrame([rows("-", "-", "truth_map", 0.9, np.nan), rows("-", "-", "tbm", 0.5, np.nan),
                          rows("demo", "brain", "saliency", 0.1, 0.81), rows("paper", "brain", "saliency", 0.3, 0.9),
                          rows("paper", "reference", "saliency", 0.7, 0.9),
                          rows("-", "-", "truth_map", 0.8, np.nan, vs=4.0), rows("demo", "brain", "saliency", 0.2, 0.72, vs=4.0)])
    t = v.study_width_table(study, k=10).set_index(["method"])
    assert list(t.columns) == ["effect", "scoring", "2 mm · demo", "2 mm · paper", "4 mm · demo", "4 mm · paper"]
    assert t.loc["saliency", "2 mm · demo"] == "0.10 (chance 0.09)" and t.loc["saliency", "2 mm · paper"] == "0.30 (chance 0.09)"
    assert t.loc["truth_map", "2 mm · paper"] == "0.90 (chance 0.09)" and t.loc["tbm", "4 mm · demo"] == ""
    assert t.loc["model accuracy", "2 mm · paper"] == "0.90" and t.loc["model accuracy", "4 mm · paper"] == ""
    assert "0.70" not in " ".join(t.astype(str).to_numpy().ravel())  # the reference z-score is another view


def test_size_rtiv_is_the_runs_or_the_overlap_of_its_test_tivs(tmp_path):
    from brainsex.io import write_json_atomic, write_table
    from brainsex.tiv import kde_overlap_range

    run = RunDir(tmp_path)
    rng = np.random.default_rng(0)
    f, m = rng.normal(1400, 100, 40), rng.normal(1600, 100, 40)
    pred = pd.DataFrame({"sex": ["F"] * 40 + ["M"] * 40, "etiv_ml": np.r_[f, m]})
    write_table(pred.assign(status="ok"), run.preprocess.table)
    assert v._rtiv_of(run, pred) == pytest.approx(kde_overlap_range(f, m))  # a matched phantom run: no rtiv.json
    write_json_atomic(run.tiv.rtiv, {"low": 1380.0, "high": 1620.0})
    assert v._rtiv_of(run, pred) == (1380.0, 1620.0)  # chapter 04's
