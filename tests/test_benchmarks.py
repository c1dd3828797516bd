"""The benchmarks (issue 8): they run, write their tables, and their arithmetic is right.

No timing assertions: the targets are columns of the output, not tests.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder at the repository root, not part of the package
    sys.path.insert(0, str(ROOT))

from benchmarks import suite  # noqa: E402
from benchmarks._common import PeakMemory, markdown_table, summarise  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------------------- fast
def test_plans_by_mode():
    quick = suite.make_plan("quick", cores=2)
    assert {c.voxel for c in (*quick.preprocess, *quick.pipeline, *quick.train, *quick.saliency)} == {8.0}
    assert quick.repeats == 2 and quick.train[0].threads == (1, 2)
    assert quick.train[0].layouts == ("contiguous", "channels_last_3d")
    default = suite.make_plan("default", cores=2)
    assert [c.voxel for c in default.preprocess] == [4.0, 1.0]
    assert {(c.model, c.voxel) for c in default.train} == {("demo", 4.0), ("paper", 4.0)}
    assert default.train[0].channels == (8, 16, 32, 32, 32, 16)
    assert default.preprocess[0].workers == (1, 2)
    full = suite.make_plan("full", repeats=5, cores=2)
    assert ("paper", 1.0) in {(c.model, c.voxel) for c in full.train}
    assert 1.0 in {c.voxel for c in full.pipeline}
    assert full.repeats == 5
    with pytest.raises(ValueError, match="mode"):
        suite.make_plan("fast")
    with pytest.raises(ValueError, match="repeats"):
        suite.make_plan("quick", repeats=-1)


def test_book_rows_reads_build_timings(tmp_path):
    from brainsex.book import toc_notebooks

    chapters = [p.stem for p in toc_notebooks(ROOT)]
    stamps = tmp_path / ".build"
    stamps.mkdir()
    for i, stem in enumerate(chapters):
        (stamps / f"{stem}.json").write_text(json.dumps({"hash": "x", "seconds": 10.0 + i, "params": {}}))
    rows = suite.book_rows(tmp_path, ROOT)
    assert [r["case"] for r in rows] == [*chapters, "total"]
    assert rows[0]["value"] == 10.0
    total = rows[-1]
    assert total["value"] == pytest.approx(sum(10.0 + i for i in range(len(chapters))))
    assert total["pass"] is True  # well under 600 s
    # one chapter missing: "not run", total not judged
    (stamps / f"{chapters[-1]}.json").unlink()
    rows = suite.book_rows(tmp_path, ROOT)
    assert rows[-2]["note"] == "not run" and rows[-1]["pass"] is None
    assert "incomplete" in rows[-1]["note"]
    # nothing at all
    rows = suite.book_rows(tmp_path / "nowhere", ROOT)
    assert rows[-1]["case"] == "total" and "not run" in rows[-1]["note"]
    assert math.isnan(rows[-1]["value"])


def test_book_total_over_target_fails(tmp_path):
    from brainsex.book import toc_notebooks

    (tmp_path / ".build").mkdir()
    for stem in (p.stem for p in toc_notebooks(ROOT)):
        (tmp_path / ".build" / f"{stem}.json").write_text(json.dumps({"seconds": 500.0}))
    assert suite.book_rows(tmp_path, ROOT)[-1]["pass"] is False


def test_derived_rows_use_the_fastest_training_variant():
    loader = suite.row("pipeline", suite.BOOK_LOADER, variant="epochs after the first",
                       grid_mm=4.0, shape="49x58x49", value=60.0, threads=2)
    steps = [suite.row("train", "demo model", variant=v, grid_mm=4.0, value=val, batch=16, channels="[8]", threads=2)
             for v, val in (("naive", 10.0), ("fast", 30.0))]
    other_grid = suite.row("train", "demo model", variant="x", grid_mm=8.0, value=1000.0)
    (d,) = suite.derived_rows([loader, *steps, other_grid])
    assert d["variant"] == "fast" and d["value"] == pytest.approx(2.0) and d["pass"] is False
    # the loader measured with the fastest step's thread count is the one compared
    one = suite.row("pipeline", suite.BOOK_LOADER, variant="epochs after the first, 1 thread", grid_mm=4.0,
                    shape="49x58x49", value=99.0, threads=1)
    fast1 = suite.row("train", "demo model", variant="fast1", grid_mm=4.0, value=33.0, threads=1)
    (d,) = suite.derived_rows([loader, one, *steps, fast1])
    assert d["variant"] == "fast1" and d["value"] == pytest.approx(3.0) and d["pass"] is True


def test_row_rejects_unknown_columns():
    with pytest.raises(KeyError):
        suite.row("train", "x", speed=1)


def test_summarise_and_markdown():
    s = summarise([3.0, 1.0, 2.0, float("nan")])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    assert math.isnan(summarise([])["median"])
    md = markdown_table([{"a": 1.23456, "pass": True}, {"a": float("nan"), "pass": False}], ["a", "pass"])
    lines = md.splitlines()
    assert lines[0] == "| a | pass |" and "1.23" in lines[2] and "pass" in lines[2] and "FAIL" in lines[3]


def test_peak_memory_sees_an_allocation():
    with PeakMemory(interval=0.001) as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB
        x += 1
    assert mem.peak_rss_mb >= mem.start_rss_mb > 0
    assert mem.peak_rss_mb - mem.start_rss_mb > 30
    assert math.isnan(mem.peak_cuda_mb)


def test_volume_bank_without_preprocessed_subjects(tmp_path):
    import nibabel as nib
    import numpy as np

    paths = suite.volume_bank(tmp_path, 8.0, 3)
    assert len(paths) == 3 and all(p.is_file() for p in paths)
    data = np.asarray(nib.load(paths[0]).dataobj)
    assert data.shape == (25, 29, 25) and np.isfinite(data).all()
    brain = data[data != 0]
    assert abs(brain.mean()) < 1e-3 and brain.std() == pytest.approx(1.0, abs=1e-3)  # z-scored in the mask
    assert suite.volume_bank(tmp_path, 8.0, 2) == paths[:2]  # reused


def test_paper_code_dataset_decodes_every_access(tmp_path):
    import nibabel as nib
    import numpy as np

    paths = suite.volume_bank(tmp_path, 8.0, 2)
    ds = suite.PaperCodeDataset(paths, np.array([0.0, 1.0]))
    item = ds[1]
    assert item["image"].shape == (1, 25, 29, 25) and item["image"].dtype == torch.float32
    assert float(item["y"]) == 1.0
    nib.save(nib.Nifti1Image(np.zeros((25, 29, 25), np.float32), None), paths[1])
    assert float(ds[1]["image"].abs().max()) == 0.0  # re-read from disk, not cached
    aug = suite.PaperCodeDataset(paths, np.array([0.0, 1.0]), rotate=True, rotate_prob=1.0)
    a, b = aug[0]["image"], aug[0]["image"]
    assert torch.equal(a, b) and not torch.equal(a, ds[0]["image"])  # rotated, seeded per (epoch, item)
    aug.set_epoch(1)
    assert not torch.equal(aug[0]["image"], a)


def test_pipeline_rotation_is_the_training_loops(tmp_path, monkeypatch):
    """The pipeline section rotates with brainsex.train.rotate_batch, once per batch for the book's loader
    and once per scan for the paper-code design; its rows name both designs and judge the 20x target."""
    import brainsex.train as T

    calls = []
    real = T.rotate_batch

    def recording(x, angles, **kw):
        calls.append(x.shape[0])
        return real(x, angles, **kw)

    monkeypatch.setattr(T, "rotate_batch", recording)
    plan = suite.Plan("quick", 1, 1, (), (suite.PipelineCase(8.0, 4, 2, 2),), (), ())
    rows = suite.run_pipeline(plan, tmp_path)
    # book loader: 2 epochs x 2 batches of 2 scans; paper design: 2 epochs x 4 scans, one at a time
    assert sorted(calls) == [1] * 8 + [2] * 4
    cases = {r["case"] for r in rows}
    assert cases == {suite.BOOK_LOADER, suite.BOOK_DELIVERY, suite.PAPER_LOADER, suite.PAPER_DELIVERY}
    judged = [r for r in rows if r["target"]]
    assert {r["case"] for r in judged} == {suite.BOOK_LOADER, suite.BOOK_DELIVERY}
    assert all(r["ratio"] > 0 and r["pass"] in (True, False) for r in judged)


def test_book_only_run_writes_tables_in_process(tmp_path):
    out = tmp_path / "out"
    assert suite.main(["--quick", "--sections", "book", "--out", str(out), "--book-run-dir", str(tmp_path)]) == 0
    rows = _read_csv(out / "results.csv")
    assert tuple(rows[0].keys()) == suite.COLUMNS and {r["section"] for r in rows} == {"book"}
    assert "not run" in rows[-1]["note"]
    text = (out / "results.md").read_text()
    assert "## Machine" in text and "## 1. `make book`" in text
    assert suite.main(["--sections", "nonsense", "--out", str(out)]) == 2


def test_a_failing_section_is_reported_and_the_next_one_runs(tmp_path, monkeypatch):
    import argparse

    def boom(plan, workdir):
        raise RuntimeError("planted failure")

    monkeypatch.setitem(suite.RUNNERS, "pipeline", boom)
    monkeypatch.setitem(suite.RUNNERS, "train", lambda plan, workdir: [suite.row("train", "ok", value=1.0)])
    result = tmp_path / "r.json"
    args = argparse.Namespace(_mode="quick", repeats=None, _child="pipeline,train", workdir=str(tmp_path),
                              _result=str(result))
    assert suite._child_main(args) == 0
    got = json.loads(result.read_text())
    assert got["pipeline"] == {"error": "RuntimeError: planted failure"}
    assert got["train"]["rows"][0]["case"] == "ok" and got["train"]["maxrss_mb"] > 0
    md = suite.results_markdown([], {"date": "d"}, "cmd", suite.make_plan("quick"), 1.0,
                                {"pipeline": got["pipeline"]["error"]})
    assert "Sections that failed" in md and "planted failure" in md


def test_section_groups():
    assert suite.section_groups("quick", suite.SECTIONS) == [["preprocess", "pipeline", "train", "saliency"]]
    assert suite.section_groups("default", ["train", "book", "preprocess"]) == [["preprocess"], ["train"]]
    assert suite.section_groups("full", ["book"]) == []


def test_gpu_floors_arithmetic():
    from benchmarks import gpu
    from brainsex.model import count_macs

    cfg = gpu.tiny_config()
    fl = gpu.floors(cfg, rate_flops=1e12, bandwidth=1e11)
    macs = count_macs(cfg.channels, cfg.shape)
    assert fl["macs"] == macs
    assert fl["train_compute_s"] == pytest.approx(macs * 6 / 1e12)
    assert fl["train_memory_s"] == pytest.approx(5 * fl["activation_bytes"] / 1e11)
    assert fl["train_s"] == max(fl["train_compute_s"], fl["train_memory_s"])
    assert fl["epoch_s"] == pytest.approx(1688 * fl["train_s"] + 211 * fl["infer_s"])
    # activations: input + every leaf module's output, counted by hand for the first block
    n_in = 32**3
    first_block = 4 * 32**3 * 2 + 4 * 16**3 * 2  # conv, batchnorm (full grid), maxpool, relu (half grid)
    assert gpu.activation_elements(cfg.channels, cfg.shape) > n_in + first_block
    assert fl["activation_bytes"] == 2 * gpu.activation_elements(cfg.channels, cfg.shape)


# ------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_quick_benchmark_writes_tables(tmp_path):
    out = tmp_path / "results"
    book = tmp_path / "run"
    (book / ".build").mkdir(parents=True)
    (book / ".build" / "00_overview.json").write_text(json.dumps({"hash": "h", "seconds": 12.5, "params": {}}))
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "--book-run-dir",
                           str(book)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md, csv_path = out / "results.md", out / "results.csv"
    assert md.is_file() and csv_path.is_file() and (out / "machine.json").is_file()
    rows = _read_csv(csv_path)
    assert tuple(rows[0].keys()) == suite.COLUMNS
    sections = {r["section"] for r in rows}
    assert sections == {"book", "preprocess", "pipeline", "train", "saliency", "memory"}
    by = {(r["section"], r["case"], r["variant"]): r for r in rows}
    assert float(by[("book", "00_overview", "")]["value"]) == 12.5
    assert by[("book", "00_cohort", "")]["note"] == "not run"
    # every measured speed is a positive number
    for r in rows:
        if r["unit"] in ("samples/s", "s/subject"):
            assert float(r["value"]) > 0, r
    train = [r for r in rows if r["section"] == "train"]
    assert {r["case"] for r in train} == {"demo model", "paper model"}
    assert any("channels_last_3d" in r["variant"] for r in train)
    assert any("contiguous, 1 thread" in r["variant"] for r in train)
    assert all(r["grid_mm"] == "8.0" for r in train)
    sal = {r["variant"] for r in rows if r["section"] == "saliency"}
    assert sal == {"one by one", "batch 4"}
    targets = [r for r in rows if r["target"]]
    assert any("paper-code design" in r["target"] for r in targets)
    assert any("training step" in r["target"] for r in targets)
    assert all(r["pass"] in ("True", "False") for r in targets if r["section"] == "pipeline")
    assert any(r["peak_rss_mb"] and float(r["peak_rss_mb"]) > 0 for r in rows)
    text = md.read_text()
    for needle in ("## Machine", "| cpu |", "torch_version", "monai_version", "antspyx_version",
                   "numpy_version", "## Targets", "## 3. Input pipeline", "## 6. Peak memory"):
        assert needle in text
    machine = json.loads((out / "machine.json").read_text())
    assert machine["cores"] >= 1 and machine["mode"] == "quick"


@pytest.mark.slow
def test_gpu_script_tiny_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--device", "cpu",
                           "--out", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stem = f"gpu-{datetime.date.today().isoformat()}-tiny"
    md, csv_path = tmp_path / f"{stem}.md", tmp_path / f"{stem}.csv"
    assert md.is_file() and csv_path.is_file()
    rows = _read_csv(csv_path)
    from benchmarks.gpu import COLUMNS, VARIANTS

    assert tuple(rows[0].keys()) == COLUMNS
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["variant"] for r in train] == [v.name for v in VARIANTS]
    for r in train:
        assert float(r["value"]) > 0 and 0 < float(r["floor_fraction"]) and float(r["epoch_s"]) > 0, r
        assert r["pass"] in ("True", "False")
    aug = [r for r in rows if r["kind"] == "augmentation"]
    assert len(aug) == 2 and all(float(r["value"]) > 0 for r in aug)
    assert [r["kind"] for r in rows].count("pipeline") == 1
    text = md.read_text()
    for needle in ("tiny CPU check", "## Floors", "matmul rate", "copy bandwidth", "fraction of floor",
                   "torch.compile"):
        assert needle in text


def test_gpu_script_refuses_the_paper_profile_on_a_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--tiny" in proc.stderr
    assert not list(tmp_path.iterdir())


def _fake_repo(tmp_path: Path, fail_phase: str | None = None) -> Path:
    """A git repository whose Makefile has the README's targets, each trivial (one may fail)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    lines = []
    for phase in ("install", "browser", "test", "book"):
        body = "false" if phase == fail_phase else f"echo {phase}"
        lines.append(f"{phase}:\n\t{body}\n")
    (repo / "Makefile").write_text("\n".join(lines))
    build = repo / "runs" / "demo" / ".build"
    build.mkdir(parents=True)
    (build / "00_cohort.json").write_text(json.dumps({"seconds": 12.5}))
    (repo / ".gitignore").write_text("")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A", "-f"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "x"], cwd=repo, check=True, env=env)
    return repo


def test_fresh_clone_times_each_phase_and_reads_chapter_timings(tmp_path):
    from benchmarks import fresh_clone

    repo = _fake_repo(tmp_path)
    log = tmp_path / "log.txt"
    log.write_text("")
    test_rows = fresh_clone.measure("make test", tmp_path / "w", log, repo=repo)
    assert [r["phase"] for r in test_rows] == ["install", "browser", "test", "total"]
    total = test_rows[-1]
    assert total["target_s"] == fresh_clone.TARGETS["make test"] and total["pass"] is True
    assert total["seconds"] == pytest.approx(sum(r["seconds"] for r in test_rows[:-1]))
    book_rows = fresh_clone.measure("make book", tmp_path / "w", log, repo=repo)
    chapter = [r for r in book_rows if r["phase"].startswith("chapter")]
    assert [(r["phase"], r["seconds"]) for r in chapter] == [("chapter 00_cohort", 12.5)]
    assert "stretch" in book_rows[-1]["note"]
    assert "$ make install" in log.read_text()
    header = {"date": "d", "git_commit": "c", "chromium": "x", "cache": "warm", "machine": {"cpu": "x"}}
    md = fresh_clone.write(test_rows + book_rows, tmp_path / "out", header, ["--only", "test"]).read_text()
    assert "| make test | total |" in md and "pass" in md
    with (tmp_path / "out" / "fresh_clone.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == len(test_rows) + len(book_rows)


def test_fresh_clone_failing_phase_stops_and_fails(tmp_path):
    from benchmarks import fresh_clone

    repo = _fake_repo(tmp_path, fail_phase="browser")
    log = tmp_path / "log.txt"
    log.write_text("")
    rows = fresh_clone.measure("make test", tmp_path / "w", log, repo=repo)
    assert [r["phase"] for r in rows] == ["install", "browser", "total"]
    assert rows[1]["note"].startswith("exit status") and rows[-1]["pass"] is False
    with pytest.raises(ValueError, match="unknown command"):
        fresh_clone.measure("make tea", tmp_path / "w2", log, repo=repo)
