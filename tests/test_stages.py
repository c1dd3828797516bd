"""The shared split -> train -> predict -> evaluate stages (chapter 02/03, the CLI and the validity study)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from brainsex import BrainsexError
from brainsex.evaluate import metrics
from brainsex.run import RunDir
from brainsex.split import stratified_split
from brainsex.stages import (
    evaluate_predictions,
    main_train,
    predict_split,
    split_subjects,
    train_model,
    train_run,
)
from tests.test_train import make_table

torch.set_num_threads(1)
CH = [2, 2, 2, 2, 2, 2]


@pytest.fixture(scope="module")
def pre(tmp_path_factory) -> pd.DataFrame:
    t = make_table(tmp_path_factory.mktemp("vols"), n=40).drop(columns="split")
    t["vendor"] = np.where(np.arange(len(t)) % 3 == 0, "GE", "Siemens")
    t["field"], t["age"], t["dataset"] = 3.0, 60.0, "toy"
    t.loc[3, "status"] = "failed"
    return t


def test_split_is_the_papers_stratified_split_of_the_usable_rows(pre, tmp_path):
    split = split_subjects(pre, seed=1, out=RunDir(tmp_path).train)
    assert "sub-003" not in set(split["participant_id"]) and len(split) == len(pre) - 1
    want = stratified_split(pre[pre["status"] == "ok"].reset_index(drop=True), by=("sex", "vendor", "field"),
                            fractions=(0.8, 0.1, 0.1), seed=1)
    pd.testing.assert_frame_equal(split, want)
    on_disk = pd.read_csv(RunDir(tmp_path).train.split, sep="\t")
    assert on_disk.columns.tolist() == ["participant_id", "split", "stratum"] and len(on_disk) == len(split)
    assert not split_subjects(pre, seed=2)["split"].equals(split["split"])  # the seed decides
    with pytest.raises(BrainsexError, match="status 'ok'"):
        split_subjects(pre.assign(status="failed"))


def test_train_model_takes_the_profiles_selection_rule_and_checks_leakage(pre, tmp_path):
    split = split_subjects(pre, seed=0)
    params = {"epochs": 2, "batch_size": 8, "lr": 0.01, "device": "cpu", "seed": 0, "channels": CH, "select": "last"}
    res = train_model(split, params, tmp_path / "last", progress=False)
    assert res.best_epoch == 2  # select: last keeps the final epoch whatever the validation loss
    res_v = train_model(split, {**params, "select": "val_loss"}, tmp_path / "val", progress=False)
    assert res_v.best_epoch == int(res_v.history.loc[res_v.history["val_loss"].idxmin(), "epoch"])
    leaked = pd.concat([split, split.iloc[[0]].assign(split="test" if split["split"].iloc[0] != "test" else "train")])
    with pytest.raises(BrainsexError, match="leakage"):
        train_model(leaked, params, tmp_path / "leak", progress=False)

    pred = predict_split(res.model, split, split="test", device="cpu")
    assert pred["participant_id"].tolist() == split.loc[split["split"] == "test", "participant_id"].tolist()
    assert set(pred["split"]) == {"test"} and pred["prob_male"].between(0, 1).all()
    # from the checkpoint on disk: the same probabilities
    again = predict_split(res.best_checkpoint, split, split="test", device="cpu")
    np.testing.assert_allclose(again["prob_male"], pred["prob_male"], rtol=1e-5)
    m = evaluate_predictions(pred)
    acc = float((pred["y_true"] == (pred["prob_male"] >= 0.5)).mean())
    assert m.loc["accuracy", "value"] == pytest.approx(acc)
    boot = evaluate_predictions(pred, n_bootstrap=20, seed=0)
    ref = metrics(pred["y_true"], pred["prob_male"], n_bootstrap=20, seed=0).set_index("metric")
    pd.testing.assert_frame_equal(boot, ref)
    with pytest.raises(BrainsexError, match="split"):
        predict_split(res.model, pre)


def test_cli_and_stages_give_the_same_split_and_model(pre, tmp_path):
    """``brainsex train`` and the chapter's stage calls: same split, same checkpoint rule, same weights."""
    runs = [RunDir(tmp_path / "cli"), RunDir(tmp_path / "stages")]
    for run in runs:
        run.preprocess.root.mkdir(parents=True)
        pre.to_csv(run.preprocess.table, sep="\t", index=False)
    argv = ["--profile", "smoke", "--run-dir", str(runs[0].root), "-p", "epochs", "1", "-p", "channels",
            "[2, 2, 2, 2, 2, 2]", "--no-progress"]
    assert main_train(argv) == 0
    from brainsex.profiles import resolve_profile

    params = resolve_profile("smoke", {"epochs": 1, "channels": CH})
    res = train_run(runs[1], params, progress=False)
    a, b = (pd.read_csv(r.train.split, sep="\t") for r in runs)
    pd.testing.assert_frame_equal(a, b)
    ha, hb = (pd.read_csv(r.train.history, sep="\t").drop(columns=["seconds", "samples_per_s"]) for r in runs)
    pd.testing.assert_frame_equal(ha, hb)
    wa = torch.load(runs[0].train.best, weights_only=True)["model_state"]
    wb = torch.load(res.best_checkpoint, weights_only=True)["model_state"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
