"""The content-keyed cache: new inputs or settings never get an old result; a crash leaves no valid entry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainsex import BrainsexError
from brainsex.cache import MARKER, FileCache, cache_key, fingerprint
from brainsex.io import sha256_file

AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])


def test_fingerprint_is_by_content():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert fingerprint(a) == fingerprint(a.copy())
    assert fingerprint(a) != fingerprint(a.astype(np.float64))  # dtype is content
    assert fingerprint(a) != fingerprint(a.reshape(4, 3, 2))  # and so is the shape
    b = a.copy()
    b[1, 2, 3] += 1e-3
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint({"x": 1, "y": [1.0, "a"]}) == fingerprint({"y": [1.0, "a"], "x": 1})
    assert fingerprint({"x": 1}) != fingerprint({"x": 1.0}) != fingerprint({"x": "1"})
    with pytest.raises(BrainsexError, match="cannot fingerprint"):
        fingerprint(object())


def test_files_hash_by_content_not_name_and_images_survive_a_save(tmp_path):
    f1, f2 = tmp_path / "one.txt", tmp_path / "two.txt"
    f1.write_text("hello")
    f2.write_text("hello")
    assert fingerprint(f1) == fingerprint(f2)
    f2.write_text("hellO")
    assert fingerprint(f1) != fingerprint(f2)
    assert fingerprint(str(f1)) != fingerprint(f1)  # a str is a value, never read as a path
    with pytest.raises(BrainsexError, match="missing file"):
        fingerprint(tmp_path / "absent.nii.gz")
    data = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    img = nib.Nifti1Image(data, AFFINE)
    nib.save(img, tmp_path / "img.nii.gz")
    assert fingerprint(nib.load(tmp_path / "img.nii.gz")) == fingerprint(img)
    assert fingerprint(nib.Nifti1Image(data, np.diag([4.0, 4.0, 5.0, 1.0]))) != fingerprint(img)  # the affine counts


def _writer(calls: list, text: str):
    def compute(folder: Path) -> None:
        calls.append(text)
        (folder / "out.txt").write_text(text)
    return compute


def test_changed_input_content_or_settings_recompute(tmp_path):
    cache = FileCache("demo", "v1")
    src = tmp_path / "input.txt"
    src.write_text("a")
    calls: list = []
    stem = tmp_path / "entries" / "sub-01_"
    first = cache.get_or_compute(stem, {"src": src}, {"k": 1}, _writer(calls, "first"), names=("out.txt",))
    again = cache.get_or_compute(stem, {"src": src}, {"k": 1}, _writer(calls, "second"), names=("out.txt",))
    assert calls == ["first"] and again == first and first["out.txt"].read_text() == "first"
    # another parameter value: a new entry, and the old one is removed (no stale result stays around)
    other = cache.get_or_compute(stem, {"src": src}, {"k": 2}, _writer(calls, "k2"), names=("out.txt",))
    assert calls == ["first", "k2"] and other["out.txt"].read_text() == "k2"
    assert not first["out.txt"].exists()
    # the same path with other content: recomputed
    src.write_text("b")
    changed = cache.get_or_compute(stem, {"src": src}, {"k": 2}, _writer(calls, "b"), names=("out.txt",))
    assert calls == ["first", "k2", "b"] and changed["out.txt"].read_text() == "b"
    # another code version: recomputed
    newer = FileCache("demo", "v2").get_or_compute(stem, {"src": src}, {"k": 2}, _writer(calls, "v2"))
    assert calls[-1] == "v2" and newer["out.txt"].read_text() == "v2"
    assert cache_key({"src": src}, {"k": 2}, "v1") != cache_key({"src": src}, {"k": 2}, "v2")
    # another stem (another subject) never shares an entry
    cache.get_or_compute(tmp_path / "entries" / "sub-02_", {"src": src}, {"k": 2}, _writer(calls, "s2"))
    assert calls[-1] == "s2"
    # recompute=True ignores a valid entry
    cache.get_or_compute(stem, {"src": src}, {"k": 2}, _writer(calls, "forced"), recompute=True)
    assert calls[-1] == "forced"


def test_a_crash_mid_write_leaves_no_valid_entry(tmp_path):
    cache = FileCache("demo", "v1")
    stem = tmp_path / "sub-01_"
    inputs, params = {"x": np.ones(3)}, {"k": 1}

    def crash(folder: Path) -> None:
        (folder / "out.txt").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        cache.get_or_compute(stem, inputs, params, crash)
    key = cache.key(inputs, params)
    assert cache.load(stem, key) is None
    assert list(tmp_path.iterdir()) == []  # nothing left, not even the temporary folder
    # a process killed hard leaves its temporary folder (no marker) and maybe a marker-less entry folder
    stray = tmp_path / f".{cache.entry_dir(stem, key).name}.abc.tmp"
    stray.mkdir()
    (stray / "out.txt").write_text("half")
    half = cache.entry_dir(stem, key)
    half.mkdir()
    (half / "out.txt").write_text("half")
    assert cache.load(stem, key) is None  # no marker: not an entry
    calls: list = []
    out = cache.get_or_compute(stem, inputs, params, _writer(calls, "whole"), names=("out.txt",))
    assert calls == ["whole"] and out["out.txt"].read_text() == "whole" and not stray.exists()
    # a truncated file or a marker for another key does not verify
    out["out.txt"].write_text("who")
    assert cache.load(stem, key) is None
    marker = out["out.txt"].parent / MARKER
    content = json.loads(marker.read_text())
    out["out.txt"].write_text("whole")
    assert cache.load(stem, key) is not None
    marker.write_text(json.dumps({**content, "key": "0" * 64}))
    assert cache.load(stem, key) is None
    # an entry that lacks a file the caller needs is recomputed
    with pytest.raises(BrainsexError, match="did not write"):
        cache.get_or_compute(stem, inputs, {"k": 3}, _writer(calls, "x"), names=("other.txt",))


# ---------------------------------------------------------------------------- the registrations themselves
@pytest.fixture(scope="module")
def pair():
    from brainsex.templates import load_template

    template = load_template(8.0, source="offline")
    t = template.get_fdata().astype(np.float32)
    a = nib.Nifti1Image(np.roll(t, 1, axis=0), template.affine)
    b = nib.Nifti1Image(np.roll(t, -1, axis=1), template.affine)
    return template, a, b


def test_warps_follow_settings_and_images(pair, tmp_path):
    """The stale-warp bug: other settings or another subject's image under one prefix returned the first warp."""
    from brainsex.registration import nonlinear_transform, tbm_transform

    template, a, b = pair
    prefix = tmp_path / "warps" / "sub-01_"
    first = nonlinear_transform(a, template, prefix, reg_iterations=(10, 0))
    digest = sha256_file(first[0])
    assert nonlinear_transform(a, template, prefix, reg_iterations=(10, 0)) == first  # cached
    other = nonlinear_transform(a, template, prefix, type_of_transform="SyNCC", reg_iterations=(2,))
    other_digest = sha256_file(other[0])
    assert other[0] != first[0] and other_digest != digest
    another_image = nonlinear_transform(b, template, prefix, reg_iterations=(10, 0))
    assert sha256_file(another_image[0]) not in (digest, other_digest)
    tbm = tbm_transform(a, template, prefix, reg_iterations=(2, 1))
    tbm_digest = sha256_file(tbm[0])
    assert tbm[0].parent.name.startswith("sub-01_tbm-")
    tbm_b = tbm_transform(b, template, prefix, reg_iterations=(2, 1))
    assert sha256_file(tbm_b[0]) != tbm_digest
    assert list(prefix.parent.glob("sub-01_syn-*")) == [another_image[0].parent]  # one entry per subject and kind
    shutil.rmtree(prefix.parent)
