"""Memory planning (brainsex.memory), gradient accumulation in training, and a dead kernel's message.

Batch normalisation and micro-batches: with accumulation the *gradient* of a model without batch
statistics equals the full batch's (tested below); with batch normalisation each micro-batch is
normalised with its own mean and variance and the running statistics are updated once per micro-batch,
so the gradients differ (also tested, as the documented difference).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from brainsex import BrainsexError
from brainsex.memory import (
    BUDGET_ENV,
    LIMIT_ENV,
    USABLE_FRACTION,
    RssWatch,
    choose_batch_size,
    choose_micro_batch,
    fixed_bytes,
    memory_budget,
    parse_bytes,
    plan_training,
    sfcn_sample_bytes,
    split_sizes,
)
from brainsex.model import PAPER_CHANNELS, PAPER_IN_SHAPE, SFCN
from brainsex.train import TrainConfig, predict, train

sys.path.insert(0, str(Path(__file__).parent))
if str(Path(__file__).parents[1]) not in sys.path:  # benchmarks/ is a folder at the repository root
    sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import write_notebook  # noqa: E402
from test_train import CH, make_table  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return make_table(tmp_path_factory.mktemp("vols"), n=24, n_val=6)


# ------------------------------------------------------------------------------------------ estimates
def test_parse_bytes():
    assert parse_bytes("16G") == 16 * 2**30
    assert parse_bytes("800M") == 800 * 2**20
    assert parse_bytes(1234) == 1234
    for bad in ("lots", "-1G", "5 parsecs", 0):
        with pytest.raises(BrainsexError):
            parse_bytes(bad)


def test_estimate_scales_with_grid_precision_and_mode():
    full = sfcn_sample_bytes(PAPER_CHANNELS, PAPER_IN_SHAPE, "train")
    # the first block's conv + batch-norm outputs alone: 2 x 32 channels x 193*229*193 voxels x 4 bytes
    assert full > 2 * 32 * 193 * 229 * 193 * 4
    assert sfcn_sample_bytes(PAPER_CHANNELS, PAPER_IN_SHAPE, "train", dtype_bytes=2) < 0.6 * full
    assert sfcn_sample_bytes(PAPER_CHANNELS, PAPER_IN_SHAPE, "eval") < 0.5 * full
    assert sfcn_sample_bytes(PAPER_CHANNELS, PAPER_IN_SHAPE, "grad") > full  # plus the input's gradient
    assert sfcn_sample_bytes(PAPER_CHANNELS, (97, 115, 97), "train") < full / 6  # ~8x fewer voxels
    with pytest.raises(BrainsexError):
        sfcn_sample_bytes(PAPER_CHANNELS, PAPER_IN_SHAPE, "predict")


def test_forced_small_budget_picks_the_expected_micro_batch():
    per = sfcn_sample_bytes(PAPER_CHANNELS, PAPER_IN_SHAPE, "train")
    plan = plan_training(16, PAPER_CHANNELS, PAPER_IN_SHAPE, budget_bytes=int(3.5 * per) + 2**30)
    assert plan.micro_batch == 3 and plan.source == "auto"
    assert plan.accumulation_steps == 6  # 16 = 3 + 3 + 3 + 3 + 2 + 2
    assert plan.batch_size == 16 and plan.checkpoint_blocks == 0
    assert plan.eval_batch >= plan.micro_batch
    # a budget for the whole batch: one pass, as on the demo grid
    assert plan_training(16, PAPER_CHANNELS, PAPER_IN_SHAPE, budget_bytes=20 * per).micro_batch == 16
    assert plan_training(16, (8, 16, 32, 32, 32, 16), (49, 58, 49), budget_bytes=2**30).micro_batch == 16
    # the override wins; bf16 halves the activations, so more fit
    assert plan_training(16, PAPER_CHANNELS, PAPER_IN_SHAPE, micro_batch=5, budget_bytes=1).micro_batch == 5
    bf16 = plan_training(16, PAPER_CHANNELS, PAPER_IN_SHAPE, amp_dtype=torch.bfloat16, budget_bytes=int(3.5 * per) + 2**30)
    assert bf16.micro_batch > 3
    with pytest.raises(BrainsexError):
        plan_training(16, PAPER_CHANNELS, PAPER_IN_SHAPE, micro_batch=0)


def test_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv(BUDGET_ENV, "10G")
    assert memory_budget("cpu") == int(0.8 * 10 * 2**30)
    monkeypatch.delenv(BUDGET_ENV)
    assert 0 < memory_budget("cpu") < 2**50


def test_choose_micro_batch_and_split_sizes():
    assert choose_micro_batch(16, 100, 1000, fixed_bytes=300) == 7
    assert choose_micro_batch(16, 100, 10**6) == 16
    assert choose_micro_batch(16, 100, 50) == 1  # does not fit: one at a time, with a warning
    assert split_sizes(16, 16) == [16]
    assert split_sizes(16, 6) == [6, 5, 5]
    assert split_sizes(5, 1) == [1] * 5
    assert split_sizes(3, 2, min_size=2) == [3]  # never a part of one scan where batch norm needs two
    assert split_sizes(0, 4) == []
    assert sum(split_sizes(17, 4)) == 17


def test_choose_batch_size_for_inference_and_gradients():
    model = SFCN(PAPER_CHANNELS, PAPER_IN_SHAPE)
    per_eval = sfcn_sample_bytes(PAPER_CHANNELS, PAPER_IN_SHAPE, "eval")
    per_grad = sfcn_sample_bytes(PAPER_CHANNELS, PAPER_IN_SHAPE, "grad")
    budget = int(4.5 * per_grad)
    assert choose_batch_size(model, "auto", "grad", device="cpu", cap=8, budget_bytes=budget) == 4
    expected = min(16, (budget - fixed_bytes(PAPER_CHANNELS, PAPER_IN_SHAPE, 1)) // per_eval)
    assert choose_batch_size(model, "auto", "eval", device="cpu", cap=16, budget_bytes=budget) == expected
    assert 4 < expected < 16
    assert choose_batch_size(model, 3, "eval") == 3  # the override
    assert choose_batch_size(nn.Linear(2, 1), "auto", cap=8) == 8  # not an SFCN: the cap
    with pytest.raises(BrainsexError):
        choose_batch_size(model, "many")


# --------------------------------------------------------------------------------- gradient accumulation
class _NoNorm(nn.Identity):
    """Stands in for BatchNorm3d: no batch statistics."""

    def __init__(self, num_features: int) -> None:
        super().__init__()


def _first_step_grads(table, tmp_path, monkeypatch, micro_batch, name):
    """Gradients the optimiser sees at its first step."""
    seen: list[dict[str, torch.Tensor]] = []
    adam = torch.optim.Adam

    class Recording(adam):
        def step(self, closure=None):
            if not seen:
                seen.append({str(i): p.grad.detach().clone() for i, p in enumerate(self.param_groups[0]["params"])})
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", Recording)
    cfg = TrainConfig(epochs=1, batch_size=8, device="cpu", seed=0, rotate_prob=0.0, micro_batch=micro_batch)
    result = train(table, cfg, out_dir=tmp_path / name, channels=CH, dropout=0.0, progress=False)
    return seen[0], result


def test_accumulated_micro_batches_equal_full_batch_without_batch_norm(table, tmp_path, monkeypatch):
    monkeypatch.setattr(nn, "BatchNorm3d", _NoNorm)
    full, res_full = _first_step_grads(table, tmp_path, monkeypatch, 8, "full")
    micro, res_micro = _first_step_grads(table, tmp_path, monkeypatch, 3, "micro")
    assert res_full.memory.micro_batch == 8 and res_micro.memory.micro_batch == 3
    assert res_micro.memory.accumulation_steps == 3  # 8 = 3 + 3 + 2
    for k in full:
        torch.testing.assert_close(micro[k], full[k], rtol=1e-5, atol=1e-7)


def test_batch_norm_sees_micro_batches(table, tmp_path, monkeypatch):
    """The documented difference: with batch norm, statistics per micro-batch change the gradient."""
    full, _ = _first_step_grads(table, tmp_path, monkeypatch, 8, "full_bn")
    micro, _ = _first_step_grads(table, tmp_path, monkeypatch, 2, "micro_bn")
    diff = max(float((micro[k] - full[k]).abs().max() / (full[k].abs().max() + 1e-12)) for k in full)
    assert diff > 1e-3


def test_training_with_a_forced_small_budget(table, tmp_path, monkeypatch):
    per = sfcn_sample_bytes(CH, (16, 16, 16), "train")
    fixed = plan_training(8, CH, (16, 16, 16), budget_bytes=10**12)
    assert fixed.micro_batch == 8

    budget = fixed_bytes(CH, (16, 16, 16), 8) + int(4.5 * per)
    monkeypatch.setenv(BUDGET_ENV, str(int(budget / USABLE_FRACTION) + 1))
    res = train(table, TrainConfig(epochs=1, batch_size=8, device="cpu", seed=0), out_dir=tmp_path / "small",
                channels=CH, progress=False)
    assert res.memory.micro_batch == 4 and res.memory.accumulation_steps == 2
    ckpt = torch.load(res.last_checkpoint, weights_only=True)
    assert ckpt["memory"]["micro_batch"] == 4
    probs = predict(res.model, table, device="cpu", progress=False)
    assert np.isfinite(probs["prob_male"]).all()


def test_checkpointing_gives_the_same_gradients_and_statistics():
    torch.manual_seed(0)
    a = SFCN(CH, (24, 24, 24))
    b = SFCN(CH, (24, 24, 24))
    b.load_state_dict(a.state_dict())
    b.checkpoint_blocks = 2
    x = torch.randn(3, 1, 24, 24, 24)
    a.train(), b.train()
    torch.manual_seed(1)  # the same dropout mask for both
    a(x).sum().backward()
    torch.manual_seed(1)
    b(x).sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-6, msg=name)
    for (name, ba), bb in zip(a.named_buffers(), b.buffers(), strict=True):
        torch.testing.assert_close(bb, ba, msg=name)  # running statistics updated once, not twice


# ------------------------------------------------------------------------------------------ dead kernel
def test_rss_watch_sees_a_child_process():
    import subprocess

    code = "import numpy as np, time; a = np.ones(200 * 2**20 // 8); time.sleep(1.0)"
    with RssWatch(interval=0.05) as watch:
        subprocess.run([sys.executable, "-c", code], check=True)
    assert watch.peak_bytes > 200 * 2**20
    assert watch.min_available_bytes is not None


@pytest.mark.slow
def test_dead_kernel_names_cell_and_memory_and_keeps_good_build(mini_book, tmp_path, capsys, monkeypatch):
    from brainsex.book import NotebookFailed, build, plan_build, run_notebooks
    from brainsex.cli import main

    run_dir, out = tmp_path / "run", tmp_path / "out"
    build(mini_book, "smoke", run_dir=run_dir, out=out)
    index = out / "html" / "index.html"
    before = index.read_text()

    # the kernel fills 400 MB, then is killed as the out-of-memory killer would (SIGKILL, no Python error)
    write_notebook(mini_book / "notebooks" / "b.py",
                   "import os, signal, time\nimport numpy as np\n\nx = 1",
                   params='run_dir = "."\nseed = 0\n')
    text = (mini_book / "notebooks" / "b.py").read_text()
    text += ("\n# %%\nhog = np.ones(400 * 2**20 // 8)\ntime.sleep(1.5)\n"
             "os.kill(os.getpid(), signal.SIGKILL)\n")
    (mini_book / "notebooks" / "b.py").write_text(text)
    monkeypatch.setenv(LIMIT_ENV, "520M")  # pretend the machine has 520 MB
    with pytest.raises(NotebookFailed) as info:
        run_notebooks(plan_build(mini_book, "smoke", run_dir=run_dir))
    msg = str(info.value)
    assert re.search(r"notebook 'b' failed in cell \d+: the kernel died", msg), msg
    assert "os.kill(os.getpid(), signal.SIGKILL)" in msg  # the running cell's source
    assert "near the machine's memory limit" in msg and "-p micro_batch" in msg and "-p voxel_size" in msg
    assert "peak resident memory of the kernel" in msg
    assert (run_dir / "notebooks" / "b.failed.ipynb").is_file()

    # on a machine with plenty of memory the same death is not blamed on memory
    monkeypatch.delenv(LIMIT_ENV)
    with pytest.raises(NotebookFailed) as info:
        run_notebooks(plan_build(mini_book, "smoke", run_dir=run_dir))
    assert "probably not memory" in str(info.value)

    rc = main(["build", "--root", str(mini_book), "--profile", "smoke", "--run-dir", str(run_dir),
               "--out", str(out)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "notebook 'b' failed" in err and "the kernel died" in err and "DeadKernelError" not in err
    assert index.read_text() == before  # the previous good build stays


def test_paper_build_report_is_written(tmp_path):
    """The benchmark's tables from a recorded build (the build itself is run by hand, see benchmarks/README)."""
    from benchmarks.paper_build import write

    result = {"date": "2026-12-03", "command": "brainsex.cli build --profile paper", "run_dir": "x", "exit_code": 0,
              "wall_s": 1200.0, "peak_rss_gb": 12.5, "min_available_gb": 8.0, "memory_limit_gb": 23.5, "error": [],
              "chapters": [{"chapter": "02_training", "seconds": 300.0, "kernel_peak_gb": 11.0}],
              "train_seconds_per_scan": 12.0,
              "memory_plan": {"batch_size": 16, "micro_batch": 3, "sample_bytes": 5 * 2**30, "budget_bytes": 18 * 2**30},
              "eval": {"seconds_per_scan": 5.0, "batch": 6, "peak_rss_gb": 6.0, "estimate_gb_per_scan": 2.1},
              "saliency": {"seconds_per_scan": 9.0, "batch": 2, "peak_rss_gb": 9.0, "estimate_gb_per_scan": 5.3}}
    write(result, tmp_path)
    md = (tmp_path / "paper_build_2026-12-03.md").read_text()
    assert "| training: batch / micro-batch / accumulation steps | 16 / 3 / 6 |" in md
    assert "02_training" in md and "12.5" in md
