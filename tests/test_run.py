"""The run layout: every file name of a run in one place, and nowhere else."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from brainsex import BrainsexError
from brainsex.run import BUNDLE_PATTERNS, PhantomDir, PreprocessDir, RunDir, TrainDir

ROOT = Path(__file__).resolve().parents[1]


def test_layout_paths():
    run = RunDir("runs/demo")
    assert run.preprocess.table == Path("runs/demo/preprocess/preprocessed.tsv")
    assert run.train.best == Path("runs/demo/train/best.pt") == TrainDir("runs/demo/train").best
    assert run.phantom.image("sub-0001") == Path("runs/demo/cohort/phantom/sub-0001/anat/sub-0001_T1w.nii.gz")
    assert run.phantom.mask("sub-0001").name == "sub-0001_desc-brain_mask.nii.gz"
    assert run.phantom.truth_map("contrast") == run.phantom.contrast_map
    with pytest.raises(BrainsexError, match="volume"):
        run.phantom.truth_map("shape")
    assert run.saliency.mean_map("low · F") == run.saliency.root / "mean_low_F.nii.gz"
    assert run.stamp("02_training") == Path("runs/demo/.build/02_training.json")
    assert run.validity.tbm_regions("morphometry warps (registered)", 16).name == "tbm_regions_morphometry_16.tsv"
    assert PreprocessDir("p").subject_outputs("sub-1")["image_pp"].parent == Path("p/sub-1")
    # a stage folder is accepted wherever a path is
    assert Path(run.train) == Path("runs/demo/train") and RunDir(run) == run


def test_file_keys_resolve_and_bad_keys_are_named():
    run = RunDir("r")
    assert run.file("tiv.rtiv") == run.tiv.rtiv and run.file("evaluate.subgroup_metrics").suffix == ".tsv"
    for bad in ("tiv.nope", "train", "_root", "phantom.image"):
        with pytest.raises(BrainsexError, match="run file key"):
            run.file(bad)


def test_truth_is_optional(tmp_path):
    run = RunDir(tmp_path)
    assert run.truth is None and not run.has_truth  # a real cohort: no phantom, no truth
    run.phantom.root.mkdir(parents=True)
    assert run.truth is None  # a folder is not a phantom; its marker is
    run.phantom.generation.write_text("{}")
    assert run.truth == PhantomDir(tmp_path / "cohort" / "phantom") and run.has_truth


def test_bundle_patterns_are_the_aggregate_files():
    assert "train/history.tsv" in BUNDLE_PATTERNS and "saliency/mean_*.nii.gz" in BUNDLE_PATTERNS
    assert not any(p.startswith(("cohort", "preprocess")) or "predictions" in p for p in BUNDLE_PATTERNS)


def _run_file_names() -> set[str]:
    """Every file name (and name pattern) the layout defines, read from run.py's string literals."""
    tree = ast.parse((ROOT / "src" / "brainsex" / "run.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if re.fullmatch(r"[\w.-]+\.(tsv|json|pt|nii\.gz|log|ipynb|mat)", node.value):
                names.add(node.value)
        elif isinstance(node, ast.JoinedStr):  # f"{pid}_T1w.nii.gz": keep the constant tail
            tail = node.values[-1]
            if isinstance(tail, ast.Constant) and re.fullmatch(r"[\w-]+\.(tsv|json|pt|nii\.gz|mat)", str(tail.value)):
                names.add(str(tail.value))
    return names


def _code_strings(path: Path) -> list[str]:
    """String literals of a module's code (docstrings left out)."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            out.append(node.value)
    return out


def test_run_file_names_live_in_run_py_only():
    names = _run_file_names()
    assert {"preprocessed.tsv", "split.tsv", "best.pt", "regions.tsv", "_T1w.nii.gz", "build.log"} <= names
    # notebooks: not even in prose
    for nb in sorted((ROOT / "notebooks").glob("*.py")):
        text = nb.read_text()
        assert not [n for n in names if n in text], nb.name
    # the package's code (docstrings may name files): no literal outside run.py
    for mod in sorted((ROOT / "src" / "brainsex").glob("*.py")):
        if mod.name == "run.py":
            continue
        hits = [n for s in _code_strings(mod) for n in names if s.endswith(n) and s not in ("participants.tsv",)]
        # participants.tsv is also the BIDS name of an external cohort's table (manifest default)
        # the non-linear warp cache (preprocess/validity) is being replaced by a content-keyed cache
        hits = [h for h in hits if h not in ("warp.nii.gz", "affine.mat")]
        assert not hits, (mod.name, hits)
