"""Tests of brainsex.train on tiny synthetic volumes (a blob that is larger in 'males').

Covers learning, outputs in the run directory, determinism, exact kill-and-resume, the batched rotation
augmentation (against torch.rot90 and MONAI's per-scan Rotate), the DistributedDataParallel path (2 CPU
processes, gloo), the CLI entry, and each bad input.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from brainsex import BrainsexError
from brainsex.model import SFCN
from brainsex.stages import main_train
from brainsex.train import (
    HISTORY_COLUMNS,
    TrainConfig,
    load_model,
    predict,
    random_rotation_angles,
    rotate_batch,
    train,
)

torch.set_num_threads(1)
SHAPE = (16, 16, 16)
CH = (4, 8, 8, 8, 8, 4)
TIMING = ["seconds", "samples_per_s"]


def write_volume(path: Path, vol: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(vol.astype(np.float32), np.eye(4)), path)
    return str(path)


def make_table(root: Path, n: int = 40, n_val: int = 8, shape=SHAPE, seed: int = 0) -> pd.DataFrame:
    """z-scored noisy volumes with a ball of radius ~0.36*size (male) or ~0.24*size (female)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    grid = np.stack(np.meshgrid(*[np.arange(s) - (s - 1) / 2 for s in shape], indexing="ij"))
    rows = []
    for i in range(n):
        male = i % 2
        radius = (0.36 if male else 0.24) * min(shape) + rng.normal(0, 0.2)
        centre = rng.normal(0, 0.7, size=3)
        dist = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
        vol = (dist < radius) + rng.normal(0, 0.3, size=shape)
        vol = (vol - vol.mean()) / vol.std()
        rows.append({"participant_id": f"sub-{i:03d}", "sex": "M" if male else "F",
                     "image_pp": write_volume(root / f"sub-{i:03d}.nii.gz", vol),
                     "split": "val" if i < n_val else "train", "status": "ok"})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> pd.DataFrame:
    return make_table(tmp_path_factory.mktemp("vols"))


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 3, "batch_size": 8, "device": "cpu", "seed": 0, **kw})


def assert_same_run(a_dir: Path, b_dir: Path) -> None:
    ha = pd.read_csv(a_dir / "history.tsv", sep="\t").drop(columns=TIMING)
    hb = pd.read_csv(b_dir / "history.tsv", sep="\t").drop(columns=TIMING)
    pd.testing.assert_frame_equal(ha, hb, check_exact=True)
    for name in ("last.pt", "best.pt"):
        sa = torch.load(a_dir / name, weights_only=True)["model_state"]
        sb = torch.load(b_dir / name, weights_only=True)["model_state"]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (name, k)
    oa = torch.load(a_dir / "last.pt", weights_only=True)["optimizer_state"]["state"]
    ob = torch.load(b_dir / "last.pt", weights_only=True)["optimizer_state"]["state"]
    for k in oa:
        assert torch.equal(oa[k]["exp_avg"], ob[k]["exp_avg"])


@pytest.fixture(scope="module")
def reference(table, tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run."""
    out = tmp_path_factory.mktemp("ref")
    train(table, cfg(), out_dir=out, channels=CH, progress=False)
    return out


def test_learns_and_writes_run_directory(table, tmp_path):
    res = train(table, cfg(epochs=12), out_dir=tmp_path / "train", channels=CH, progress=False)
    for name in ("best.pt", "last.pt", "history.tsv"):
        assert (tmp_path / "train" / name).is_file()
    hist = pd.read_csv(tmp_path / "train" / "history.tsv", sep="\t")
    assert tuple(hist.columns) == HISTORY_COLUMNS and hist["epoch"].tolist() == list(range(1, 13))
    assert (hist["samples_per_s"] > 0).all() and (hist["lr"] == 0.01).all()
    assert res.best_epoch == int(hist["val_loss"].idxmin()) + 1
    assert res.best_val_loss == pytest.approx(hist["val_loss"].min())
    # the blob size separates the classes: the model must have learned it
    assert res.best_val_acc >= 0.75 and hist["train_loss"].iloc[-3:].mean() < hist["train_loss"].iloc[0]
    # the validation loss is computed without augmentation: predict() on the best model reproduces it
    val = table[table["split"] == "val"]
    pred = predict(res.best_checkpoint, val, device="cpu", progress=False)
    assert pred["participant_id"].tolist() == val["participant_id"].tolist()
    y = (val["sex"] == "M").to_numpy(float)
    p = pred["prob_male"].to_numpy()
    bce = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert bce == pytest.approx(res.best_val_loss, rel=1e-4)
    assert res.model is not None and not res.model.training


def test_same_seed_same_result(table, reference, tmp_path):
    train(table, cfg(), out_dir=tmp_path, channels=CH, progress=False)
    assert_same_run(reference, tmp_path)


def test_different_seed_differs(table, reference, tmp_path):
    train(table, cfg(seed=1, epochs=1), out_dir=tmp_path, channels=CH, progress=False)
    a = pd.read_csv(reference / "history.tsv", sep="\t")
    b = pd.read_csv(tmp_path / "history.tsv", sep="\t")
    assert a["train_loss"].iloc[0] != b["train_loss"].iloc[0]


def test_resume_after_two_epochs_equals_straight_run(table, reference, tmp_path):
    first = train(table, cfg(epochs=2), out_dir=tmp_path, channels=CH, progress=False)
    assert first.epochs_run == 2
    second = train(table, cfg(epochs=3), out_dir=tmp_path, channels=CH, resume=True, progress=False)
    assert second.epochs_run == 1 and len(second.history) == 3
    assert_same_run(reference, tmp_path)


def test_kill_mid_epoch_then_resume_equals_straight_run(table, reference, tmp_path, monkeypatch):
    import brainsex.train as T

    real = T._evaluate
    calls = {"n": 0}

    def dying_evaluate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the third epoch dies after its training steps, before it is saved
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "_evaluate", dying_evaluate)
    with pytest.raises(KeyboardInterrupt):
        train(table, cfg(), out_dir=tmp_path, channels=CH, progress=False)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2
    assert not list(tmp_path.glob(".*tmp*"))  # no half-written files left behind
    monkeypatch.setattr(T, "_evaluate", real)
    train(table, cfg(), out_dir=tmp_path, channels=CH, resume=True, progress=False)
    assert_same_run(reference, tmp_path)


# ------------------------------------------------------------------------------------ augmentation
def test_rotate_batch_quarter_turns_match_rot90():
    """90 degrees about each axis of an asymmetric volume is a torch.rot90 (exact up to rounding)."""
    x = torch.randn(2, 1, 7, 7, 7, generator=torch.Generator().manual_seed(0))
    for axis, dims, k in ((0, (3, 4), -1), (1, (2, 4), 1), (2, (2, 3), -1)):
        angles = torch.zeros(2, 3)
        angles[:, axis] = math.pi / 2
        assert torch.allclose(rotate_batch(x, angles), torch.rot90(x, k, dims), atol=1e-5), axis
        assert not torch.allclose(rotate_batch(x, angles), torch.rot90(x, -k, dims), atol=1e-2)
    # non-cubic grid, turn about the last axis: rotates the first two (equal) axes, no shear
    y = torch.randn(1, 1, 6, 6, 9)
    assert torch.allclose(rotate_batch(y, torch.tensor([[0.0, 0.0, math.pi / 2]])), torch.rot90(y, -1, (2, 3)),
                          atol=1e-5)
    # a point 3 voxels from the centre along W, turned 90 degrees about the first axis, lands 3 voxels along H
    z = torch.zeros(1, 1, 5, 13, 9)
    z[0, 0, 2, 6, 7] = 1.0  # centre (2, 6, 4)
    hit = torch.nonzero(rotate_batch(z, torch.tensor([[math.pi / 2, 0.0, 0.0]]))[0, 0] > 0.5).tolist()
    assert len(hit) == 1 and hit[0][0] == 2 and hit[0][2] == 4 and abs(hit[0][1] - 6) == 3


def test_rotate_batch_equals_monai_rotate_per_scan():
    """The batched rotation is MONAI's Rotate (bilinear, border, keep_size) applied to each scan."""
    from monai.transforms import Rotate

    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.avg_pool3d(torch.randn(4, 1, 14, 18, 12, generator=g), 3, 1, 1)  # smooth-ish content
    angles = torch.tensor([[0.1, -0.2, 0.25], [0.0, 0.0, 0.0], [-0.26, 0.05, 0.0], [0.2, 0.26, -0.1]])
    got = rotate_batch(x, angles)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert torch.equal(got[1], x[1])  # not rotated: untouched
    for j in range(4):
        ref = Rotate(angle=angles[j].tolist(), keep_size=True, mode="bilinear", padding_mode="border",
                     dtype=np.float32)(x[j])
        ref = torch.as_tensor(ref.as_tensor() if hasattr(ref, "as_tensor") else ref)
        assert torch.allclose(got[j], ref, atol=1e-5), j
        if j != 1:
            assert (got[j] - x[j]).abs().max() > 0.1  # it did rotate
    # RandRotated (the former per-scan path) with the same angles agrees too, away from the border
    from monai.transforms import RandRotated

    aug = RandRotated(keys="image", range_x=0.3, range_y=0.3, range_z=0.3, prob=1.0, keep_size=True,
                      mode="bilinear", padding_mode="border", dtype=np.float32)
    aug.set_random_state(seed=3)
    out = aug({"image": x[0]})
    drawn = torch.tensor([[aug.rand_rotate.x, aug.rand_rotate.y, aug.rand_rotate.z]])
    ref = torch.as_tensor(out["image"].as_tensor())
    mine = rotate_batch(x[:1], drawn)[0]
    assert torch.allclose(mine[:, 3:-3, 3:-3, 3:-3], ref[:, 3:-3, 3:-3, 3:-3], atol=1e-5)


def test_random_rotation_angles_half_rotated_within_range_and_seeded():
    a = random_rotation_angles(400, max_deg=15, prob=0.5, generator=torch.Generator().manual_seed(0))
    assert a.shape == (400, 3) and a.dtype == torch.float64
    rotated = (a != 0).any(1)
    assert 0.42 < rotated.double().mean() < 0.58
    assert float(a.abs().max()) <= math.radians(15) and float(a.abs().max()) > math.radians(14)
    assert (a[rotated] != 0).all()  # a rotated scan turns about all three axes
    b = random_rotation_angles(400, max_deg=15, prob=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert not random_rotation_angles(50, prob=0.0).any() and (random_rotation_angles(50, prob=1.0) != 0).all()
    with pytest.raises(BrainsexError, match="prob"):
        random_rotation_angles(3, prob=1.5)
    with pytest.raises(BrainsexError, match="angles must have shape"):
        rotate_batch(torch.zeros(2, 1, 4, 4, 4), torch.zeros(3, 3))
    with pytest.raises(BrainsexError, match=r"\(B, C, D, H, W\)"):
        rotate_batch(torch.zeros(1, 4, 4, 4), torch.zeros(1, 3))


def test_training_rotates_training_batches_only(table, tmp_path, monkeypatch):
    """Each training batch is rotated once on the device, about half its scans; validation never."""
    import brainsex.train as T

    calls = []

    def recording(x, angles, **kw):
        calls.append((tuple(x.shape), angles.clone()))
        return rotate_batch(x, angles, **kw)

    monkeypatch.setattr(T, "rotate_batch", recording)
    train(table, cfg(epochs=2), out_dir=tmp_path / "a", channels=CH, progress=False)
    n_train = int((table["split"] == "train").sum())
    assert len(calls) == 2 * n_train // 8 and all(s == (8, 1, *SHAPE) for s, _ in calls)
    angles = torch.cat([a for _, a in calls])
    assert 0.3 < (angles != 0).any(1).double().mean() < 0.7 and float(angles.abs().max()) <= math.radians(15)
    first = [a for _, a in calls]
    calls.clear()
    train(table, cfg(epochs=2), out_dir=tmp_path / "b", channels=CH, progress=False)
    assert all(torch.equal(a, b) for a, (_, b) in zip(first, calls, strict=True))  # seeded
    calls.clear()
    train(table, cfg(epochs=1, rotate_prob=0.0), out_dir=tmp_path / "c", channels=CH, progress=False)
    assert calls == []


def test_checkpoint_contents_and_load_model(reference):
    last = torch.load(reference / "last.pt", weights_only=True)
    assert {"model_state", "optimizer_state", "scheduler_state", "rng", "epoch", "history", "train_config",
            "model_config"} <= set(last)
    assert {"torch", "numpy", "python"} <= set(last["rng"]) and last["epoch"] == 3
    model = load_model(reference / "best.pt")
    assert isinstance(model, SFCN) and model.channels == CH and model.in_shape == SHAPE and not model.training


def test_predict_matches_model(table, reference):
    model = load_model(reference / "best.pt")
    pred = predict(model, table.head(5), batch_size=2, progress=False)
    x = torch.stack([torch.from_numpy(np.asarray(nib.load(p).dataobj, dtype=np.float32))[None]
                     for p in table.head(5)["image_pp"]])
    np.testing.assert_allclose(pred["prob_male"], model.predict_proba(x).numpy(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- bad input
def test_load_model_refuses_other_architecture(reference, tmp_path):
    with pytest.raises(BrainsexError, match="channels"):
        load_model(reference / "best.pt", channels=(8, 16, 32, 32, 32, 16))
    with pytest.raises(BrainsexError, match="in_shape"):
        load_model(reference / "best.pt", in_shape=(49, 58, 49))
    ckpt = torch.load(reference / "best.pt", weights_only=True)
    ckpt["model_config"]["channels"] = [4, 8, 8, 8, 8, 8]  # config says one thing, weights another
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(BrainsexError, match="weights do not fit"):
        load_model(tmp_path / "bad.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(BrainsexError, match="not a brainsex SFCN checkpoint"):
        load_model(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(BrainsexError, match="not a readable"):
        load_model(tmp_path / "junk.pt")
    with pytest.raises(BrainsexError, match="not found"):
        load_model(tmp_path / "missing.pt")


def test_resume_refuses_other_settings(table, reference, tmp_path):
    import shutil

    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    with pytest.raises(BrainsexError, match="lr"):
        train(table, cfg(lr=0.001, epochs=4), out_dir=tmp_path, channels=CH, resume=True, progress=False)
    with pytest.raises(BrainsexError, match="model"):
        train(table, cfg(epochs=4), out_dir=tmp_path, channels=(4, 8, 8, 8, 8, 8), resume=True, progress=False)
    # resume="auto" trains from scratch instead (a notebook re-run with other parameters)
    res = train(table, cfg(lr=0.001, epochs=1), out_dir=tmp_path, channels=CH, resume="auto", progress=False)
    assert res.epochs_run == 1 and len(res.history) == 1
    assert torch.load(tmp_path / "last.pt", weights_only=True)["train_config"]["lr"] == 0.001
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    flipped = table.assign(split=table["split"].replace({"val": "train"}))
    flipped.loc[[8, 9], "split"] = "val"
    with pytest.raises(BrainsexError, match="subjects"):
        train(flipped, cfg(epochs=4), out_dir=tmp_path, channels=CH, resume=True, progress=False)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda t: t.assign(split="val"), "training split is empty"),
        (lambda t: t.assign(split="train"), "validation split is empty"),
        (lambda t: t.assign(sex=np.where(t["split"] == "train", "F", t["sex"])), "single class.*female"),
        (lambda t: t.assign(sex="X"), "'M' or 'F'"),
        (lambda t: t.drop(columns="image_pp"), "image_pp"),
        (lambda t: t.assign(image_pp=t["image_pp"].str.replace("sub-0", "nope-0")), "not found"),
    ],
)
def test_bad_tables(table, tmp_path, mutate, match):
    with pytest.raises(BrainsexError, match=match):
        train(mutate(table.copy()), cfg(epochs=1), out_dir=tmp_path, channels=CH, progress=False)


def test_shape_mismatch_and_nan_named(table, tmp_path):
    bad = table.copy()
    bad.loc[12, "image_pp"] = write_volume(tmp_path / "small.nii.gz", np.zeros((16, 16, 15)))
    with pytest.raises(BrainsexError, match=r"small\.nii\.gz.*\(16, 16, 15\).*\(16, 16, 16\)"):
        train(bad, cfg(epochs=1), out_dir=tmp_path / "a", channels=CH, progress=False)
    with pytest.raises(BrainsexError, match=r"sub-0\d\d\.nii\.gz.*in_shape \(20, 24, 20\)"):
        train(table, cfg(epochs=1), out_dir=tmp_path / "b", in_shape=(20, 24, 20), channels=CH, progress=False)
    vol = np.ones(SHAPE)
    vol[3, 4, 5] = np.nan
    vol[1, 1, 1] = np.inf
    bad.loc[12, "image_pp"] = write_volume(tmp_path / "nan.nii.gz", vol)
    for cache in (True, False):
        with pytest.raises(BrainsexError, match=r"nan\.nii\.gz.*2 NaN/inf"):
            train(bad, cfg(epochs=1, cache=cache), out_dir=tmp_path / "c", channels=CH, progress=False)


def test_config_validation():
    with pytest.raises(BrainsexError, match="amp"):
        TrainConfig(amp="fp8")
    with pytest.raises(BrainsexError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(BrainsexError, match="CUDA is not available|unknown device"):
        from brainsex.train import resolve_device

        resolve_device("cuda" if not torch.cuda.is_available() else "tpu")


# ---------------------------------------------------------------------------------- DDP and the CLI
DDP_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
import pandas as pd
from brainsex.train import TrainConfig, train
table = pd.read_csv(sys.argv[1], sep="\\t")
res = train(table, TrainConfig(epochs=2, batch_size=8, device="cpu", seed=0), out_dir=sys.argv[2],
            channels=(2, 4, 4, 4, 4, 2), progress=False)
print(f"rank-done world={res.world_size} best={res.best_epoch}", flush=True)
"""


def test_ddp_two_cpu_processes(table, tmp_path):
    (tmp_path / "ddp.py").write_text(textwrap.dedent(DDP_SCRIPT))
    table.to_csv(tmp_path / "table.tsv", sep="\t", index=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(tmp_path / "ddp.py"), str(tmp_path / "table.tsv"), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("rank-done world=2") == 2
    last = torch.load(tmp_path / "out" / "last.pt", weights_only=True)
    assert last["world_size"] == 2 and last["epoch"] == 2
    hist = pd.read_csv(tmp_path / "out" / "history.tsv", sep="\t")
    assert hist["epoch"].tolist() == [1, 2] and np.isfinite(hist["val_loss"]).all()
    # all 32 training scans are seen per epoch (16 per process) and all 8 validation scans are scored
    model = load_model(tmp_path / "out" / "best.pt")
    val = table[table["split"] == "val"]
    p = predict(model, val, progress=False)["prob_male"].to_numpy()
    y = (val["sex"] == "M").to_numpy(float)
    bce = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    best = torch.load(tmp_path / "out" / "best.pt", weights_only=True)
    assert bce == pytest.approx(best["val_loss"], rel=1e-4)


def test_main_train_cli(table, tmp_path, capsys):
    run = tmp_path / "run"
    pre = table.drop(columns="split").assign(vendor="Siemens", field=3.0)
    pre.loc[len(pre)] = {**pre.iloc[0].to_dict(), "participant_id": "sub-failed", "status": "failed",
                         "image_pp": ""}
    (run / "preprocess").mkdir(parents=True)
    pre.to_csv(run / "preprocess" / "preprocessed.tsv", sep="\t", index=False)
    argv = ["--profile", "smoke", "--run-dir", str(run), "-p", "epochs", "1", "-p", "channels", "[2, 2, 2, 2, 2, 2]",
            "--no-progress"]
    assert main_train(argv) == 0
    split = pd.read_csv(run / "train" / "split.tsv", sep="\t")
    assert set(split["split"]) == {"train", "val", "test"} and "sub-failed" not in set(split["participant_id"])
    assert (run / "train" / "best.pt").is_file() and "best epoch 1" in capsys.readouterr().out
    # a second call splits again (the same split: the seed and the subjects decide it) and resumes
    assert main_train([*argv, "--resume"]) == 0
    assert main_train(["--profile", "smoke", "--run-dir", str(tmp_path / "nowhere")]) == 2
    assert "preprocessed.tsv" in capsys.readouterr().err
    assert main_train(["--profile", "smoke", "--run-dir", str(run), "-p", "epochz", "1"]) == 2


def test_select_last_keeps_final_epoch(table, reference, tmp_path):
    """select="last": best.pt holds the final weights; training itself is that of the default run."""
    res = train(table, cfg(select="last"), out_dir=tmp_path, channels=CH, progress=False)
    assert res.best_epoch == 3 and res.best_val_loss == res.history["val_loss"].iloc[-1]
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    ref_last = torch.load(reference / "last.pt", weights_only=True)
    assert best["epoch"] == 3
    for k, v in last["model_state"].items():
        assert torch.equal(best["model_state"][k], v) and torch.equal(ref_last["model_state"][k], v)
    # a resume must not switch the selection rule
    with pytest.raises(BrainsexError, match="select: checkpoint 'last' vs now 'val_loss'"):
        train(table, cfg(epochs=4), out_dir=tmp_path, channels=CH, resume=True, progress=False)
    with pytest.raises(BrainsexError, match="select"):
        TrainConfig(select="val_acc")


def test_resume_refuses_checkpoint_of_other_augmentation(table, reference, tmp_path):
    """A checkpoint of the former per-scan rotation cannot continue to an uninterrupted run's result."""
    import shutil

    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    del ckpt["augmentation"]
    torch.save(ckpt, tmp_path / "last.pt")
    with pytest.raises(BrainsexError, match="another rotation augmentation"):
        train(table, cfg(epochs=4), out_dir=tmp_path, channels=CH, resume=True, progress=False)
    res = train(table, cfg(epochs=1), out_dir=tmp_path, channels=CH, resume="auto", progress=False)
    assert res.epochs_run == 1  # "auto" starts afresh


def test_resume_checkpoint_without_select_field(table, reference, tmp_path):
    """Checkpoints written before ``select`` existed resume with its default."""
    import shutil

    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    del ckpt["train_config"]["select"]
    torch.save(ckpt, tmp_path / "last.pt")
    res = train(table, cfg(epochs=4), out_dir=tmp_path, channels=CH, resume=True, progress=False)
    assert res.epochs_run == 1 and len(res.history) == 4


def test_resume_auto_starts_afresh_when_an_image_was_preprocessed_again(tmp_path):
    """A scan rewritten since the checkpoint (same subject, same name) must not be trained on by the old model."""
    data = make_table(tmp_path / "vols", n=16, n_val=4)
    out = tmp_path / "run"
    first = train(data, cfg(epochs=1), out_dir=out, channels=CH, progress=False)
    assert first.epochs_run == 1
    same = train(data, cfg(epochs=2), out_dir=out, channels=CH, resume="auto", progress=False)
    assert same.epochs_run == 1  # nothing changed: continues
    path = Path(data.loc[5, "image_pp"])
    vol = np.asarray(nib.load(path).dataobj)
    write_volume(path, -vol)  # preprocessed again, same file name
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    again = train(data, cfg(epochs=2), out_dir=out, channels=CH, resume="auto", progress=False)
    assert again.epochs_run == 2 and len(again.history) == 2  # started afresh
    with pytest.raises(BrainsexError, match="train/val subjects"):
        write_volume(path, vol)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
        train(data, cfg(epochs=3), out_dir=out, channels=CH, resume=True, progress=False)


def test_cosine_schedule_anneals_to_zero_and_resumes_only_with_its_length(table, tmp_path):
    """``scheduler="cosine"`` (the demo's): half a cosine from lr to 0 over the epochs, whatever the validation loss."""
    res = train(table, cfg(epochs=4, scheduler="cosine"), out_dir=tmp_path / "a", channels=CH, progress=False)
    lr = res.history["lr"].to_numpy()  # the rate each epoch trained at
    assert lr == pytest.approx([0.01 * 0.5 * (1 + np.cos(np.pi * e / 4)) for e in range(4)])
    # a finished cosine run is not continued into a longer one: the cosine's length is the run's
    with pytest.raises(BrainsexError, match="epochs"):
        train(table, cfg(epochs=6, scheduler="cosine"), out_dir=tmp_path / "a", channels=CH, resume=True,
              progress=False)
    with pytest.raises(BrainsexError, match="scheduler"):
        train(table, cfg(epochs=6), out_dir=tmp_path / "a", channels=CH, resume=True, progress=False)
    with pytest.raises(BrainsexError, match="scheduler must be one of plateau, cosine"):
        cfg(scheduler="step")
