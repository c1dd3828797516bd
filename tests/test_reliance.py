"""The model's measured reliance: counterfactual scans through the recorded preprocessing and a model."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from brainsex import BrainsexError, reliance, synthetic
from brainsex.io import write_table
from brainsex.model import SFCN
from brainsex.preprocess import Reference, preprocess_cohort
from brainsex.run import RunDir

VS = 8.0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A phantom run with 4 subjects preprocessed at 8 mm and all of them in the test split."""
    run = RunDir(tmp_path_factory.mktemp("reliance_run"))
    parts = synthetic.make_cohort(run.phantom.root, n=4, voxel_size=VS, seed=5, progress=False)
    write_table(parts, run.cohort.participants)
    pre = preprocess_cohort(parts, run.preprocess.root, voxel_size=VS, n_workers=1, progress=False,
                            reference=Reference.load(VS, source="offline"), etiv=False)
    assert (pre["status"] == "ok").all()
    write_table(pre, run.preprocess.table)
    run.evaluate.root.mkdir(parents=True)
    write_table(pre[["participant_id", "sex"]].assign(split="test"), run.evaluate.predictions)
    return run, pre


class BrainVolume(nn.Module):
    """A 'model' whose male logit is the preprocessed brain's volume in litres minus 1.5 (known, monotone)."""

    def __init__(self, voxel_ml: float) -> None:
        super().__init__()
        self.voxel_ml = voxel_ml

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x != 0).flatten(1).sum(1).float() * self.voxel_ml / 1000.0 - 1.5


class Constant(nn.Module):
    """A model that ignores its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0],), 0.7)


class Linear(nn.Module):
    """logit = sum(w * x) for a fixed weight map."""

    def __init__(self, w: np.ndarray) -> None:
        super().__init__()
        self.w = torch.from_numpy(w.astype(np.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, 0] * self.w).flatten(1).sum(1)


def test_oriented_delta_is_positive_towards_the_other_sex():
    d = reliance.oriented_delta([1.0, 1.0], [0.0, 0.0], ["F", "M"])
    assert d.tolist() == [1.0, -1.0]  # the male logit rising moves a female towards M, a male away from F
    with pytest.raises(BrainsexError, match="sex must be"):
        reliance.oriented_delta([1.0], [0.0], ["X"])


def test_summary_columns_and_a_zero_effect_has_a_zero_ci():
    per = pd.DataFrame({"participant_id": ["a", "b", "c", "a", "b", "c"], "factor": ["x"] * 3 + ["y"] * 3,
                        "region": [""] * 6, "delta_logit": [0.0, 0.0, 0.0, 1.0, 2.0, 3.0]})
    out = reliance.summarise_deltas(per, n_bootstrap=200, seed=0)
    assert out.columns.tolist() == reliance.RELIANCE_COLUMNS
    zero, moving = out.iloc[0], out.iloc[1]
    assert (zero["delta_logit"], zero["ci_low"], zero["ci_high"], zero["n_scans"]) == (0.0, 0.0, 0.0, 3)
    assert moving["delta_logit"] == 2.0 and 1.0 <= moving["ci_low"] < 2.0 < moving["ci_high"] <= 3.0
    # deterministic for a seed
    assert reliance.summarise_deltas(per, n_bootstrap=200, seed=0).equals(out)


def test_preprocess_like_reproduces_the_stored_preprocessed_image(tiny_run):
    run, pre = tiny_run
    pid = pre["participant_id"].iloc[0]
    img, mask = synthetic.render_counterfactual(run.phantom.root, pid)
    z = reliance.preprocess_like(img, mask, run, pid)
    stored = nib.load(run.preprocess.subject_outputs(pid)["image_pp"]).get_fdata(dtype=np.float32)
    assert np.array_equal(z, stored)


def test_a_model_that_ignores_the_input_relies_on_nothing(tiny_run):
    run, pre = tiny_run
    table = reliance.model_reliance(run, model=Constant(), max_scans=None, n_bootstrap=100, device="cpu",
                                    progress=False)
    assert table.columns.tolist() == reliance.RELIANCE_COLUMNS
    assert (table[["delta_logit", "ci_low", "ci_high"]].to_numpy() == 0).all()
    assert (table["n_scans"] == len(pre)).all()
    truth = synthetic.PhantomTruth(run.phantom.root)
    assert len(table) == len(reliance.counterfactuals(truth)) == len(truth.regions) + 5


def test_known_linear_models_give_the_expected_delta(tiny_run):
    run, pre = tiny_run
    pids = pre["participant_id"].tolist()
    # the brain-volume model: a larger head moves a female towards 'male' and a smaller one a male away
    per = reliance.scan_deltas(BrainVolume(VS**3), run, pids, device="cpu", progress=False)
    size = per[per["factor"] == "head size"]
    assert (size["delta_logit"] > 0).all()
    # a linear model: the delta is w . (x_cf - x) exactly, oriented by sex
    w = np.random.default_rng(0).standard_normal(nib.load(pre["image_pp"].iloc[0]).shape)
    per = reliance.scan_deltas(Linear(w), run, pids[:1], device="cpu", progress=False)
    truth = synthetic.PhantomTruth(run.phantom.root)
    lab = int(truth.regions["label"].iloc[0])
    x0 = reliance.preprocess_like(*synthetic.render_counterfactual(truth, pids[0]), run, pids[0])
    x1 = reliance.preprocess_like(*synthetic.render_counterfactual(truth, pids[0], regions=lab), run, pids[0])
    sign = 1.0 if pre["sex"].iloc[0] == "F" else -1.0
    expected = sign * float((torch.from_numpy(w.astype(np.float32)) * torch.from_numpy(x1 - x0)).sum())
    got = per[(per["factor"] == "planted region") & (per["label"] == lab)]["delta_logit"].item()
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert expected != 0


def test_smoke_with_an_sfcn_and_the_run_layout(tiny_run):
    run, pre = tiny_run
    shape = nib.load(pre["image_pp"].iloc[0]).shape
    torch.manual_seed(0)
    model = SFCN(channels=[2, 2, 2, 2, 2, 2], in_shape=shape).eval()
    a = reliance.model_reliance(run, model=model, max_scans=2, n_bootstrap=50, progress=False)
    b = reliance.model_reliance(run, model=model, max_scans=2, n_bootstrap=50, progress=False, n_jobs=2)
    pd.testing.assert_frame_equal(a, b)  # deterministic, whatever the number of workers
    assert (a["n_scans"] == 2).all() and a["delta_logit"].notna().all()
    assert run.validity.model_reliance.name == "model_reliance.tsv"


def test_a_run_without_truth_is_refused(tmp_path):
    with pytest.raises(BrainsexError, match="phantom run"):
        reliance.model_reliance(tmp_path, model=Constant())


def test_explanation_vs_reliance_scores():
    names = [f"r{i}" for i in range(6)]
    rel = pd.DataFrame({"factor": ["planted region"] * 6, "region": names,
                        "delta_logit": [0.6, -0.5, 0.4, 0.3, -0.2, 0.1]})
    same = pd.DataFrame({"name": names + ["other"], "label": range(7), "n_voxels": 1})
    reverse = pd.DataFrame({"name": ["other", *names[::-1]], "label": range(7), "n_voxels": 1})
    out = reliance.explanation_vs_reliance({("m", "s"): same, ("rev", "s"): reverse}, rel, k=2, n_perm=200)
    good, bad = out.iloc[0], out.iloc[1]
    assert good["spearman"] == pytest.approx(1.0) and good["precision_at_k"] == 1.0 and good["spearman_p"] < 0.05
    assert bad["spearman"] == pytest.approx(-1.0) and bad["precision_at_k"] == 0.0 and bad["spearman_p"] > 0.5
    assert good["precision_chance"] == pytest.approx(2 / 6) and good["n_regions"] == 6
    with pytest.raises(BrainsexError, match="one-region rows"):
        reliance.explanation_vs_reliance({("m", "s"): same}, rel.assign(factor="head size"))


def test_counterfactual_list_is_checked(tiny_run):
    run, _ = tiny_run
    truth = synthetic.PhantomTruth(run.phantom.root)
    assert json.loads(run.phantom.generation.read_text())["args"]["seed"] == 5
    with pytest.raises(BrainsexError, match="age_years"):
        reliance.counterfactuals(truth, age_years=-1)


def test_shares_from_a_table_read_back(tmp_path):
    table = pd.DataFrame({"factor": ["planted regions (all)", "planted region", "head size", "age +10 y", "age -10 y"],
                          "region": ["", "r1", "", "", ""], "delta_logit": [0.5, 0.2, 1.5, -0.1, 0.0],
                          "ci_low": 0.0, "ci_high": 1.0, "n_scans": 4})
    write_table(table, tmp_path / "r.tsv")
    back = pd.read_csv(tmp_path / "r.tsv", sep="\t")
    shares = reliance.reliance_shares(back)
    assert shares["size"] == pytest.approx(1.5 / 2.1) and shares["regions"] == pytest.approx(0.5 / 2.1)
    assert shares["age_delta"] == -0.1 and shares["sum_single_regions"] == 0.2
    assert np.isnan(shares["everything_delta"])
    with pytest.raises(BrainsexError, match="lacks the row"):
        reliance.reliance_shares(back[back["factor"] != "head size"])
