"""Unit tests of the build driver on a tiny book (real papermill and jupyter-book runs)."""

from __future__ import annotations

import json

import pytest

from brainsex.book import BuildError, NotebookFailed, build, plan_build, run_notebooks, toc_notebooks
from brainsex.cli import main
from tests.conftest import write_notebook


def test_toc_order_and_declared_parameters(mini_book):
    nbs = toc_notebooks(mini_book)
    assert [p.stem for p in nbs] == ["a", "b"]
    plan = plan_build(mini_book, "smoke")
    assert plan.declared["a"] == {"profile": "x", "run_dir": ".", "epochs": 1}
    assert plan.declared["b"] == {"run_dir": ".", "seed": 0}


def test_missing_notebook_in_toc(mini_book, capsys):
    (mini_book / "notebooks" / "b.py").unlink()
    with pytest.raises(BuildError, match=r"_toc.yml: lists 'notebooks/b' but notebooks/b.py does not exist"):
        toc_notebooks(mini_book)
    assert main(["build", "--root", str(mini_book), "--profile", "smoke"]) == 2
    assert "notebooks/b.py does not exist" in capsys.readouterr().err


def test_bad_profile_and_parameter_exit_2(mini_book, capsys):
    assert main(["build", "--root", str(mini_book), "--profile", "nope"]) == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err
    assert main(["build", "--root", str(mini_book), "--profile", "smoke", "-p", "epocs", "3"]) == 2
    assert "unknown parameter 'epocs'" in capsys.readouterr().err


def test_malformed_manifest_exit_2(mini_book, capsys):
    (mini_book / "data_manifest.yaml").write_text("cohorts:\n  - name: x\n    kind: nifti\n    root: .\n")
    assert main(["build", "--root", str(mini_book), "--profile", "smoke"]) == 2
    err = capsys.readouterr().err
    assert "data_manifest.yaml" in err and "kind" in err and "shareable" in err


def test_parameters_injected_and_skip_if_unchanged(mini_book, tmp_path):
    run_dir = tmp_path / "run"
    plan = plan_build(mini_book, "smoke", {"epochs": 7}, run_dir=run_dir)
    first = run_notebooks(plan)
    assert [r.status for r in first] == ["ran", "ran"]
    assert (run_dir / "a.txt").read_text() == "7"  # run_dir and the override reached the notebook
    stamp = json.loads((run_dir / ".build" / "a.json").read_text())
    assert stamp["params"]["epochs"] == 7 and stamp["params"]["profile"] == "smoke"
    # the paired .ipynb was written from the .py source
    assert (mini_book / "notebooks" / "a.ipynb").is_file()

    again = run_notebooks(plan_build(mini_book, "smoke", {"epochs": 7}, run_dir=run_dir))
    assert [r.status for r in again] == ["skipped", "skipped"]

    # a changed parameter re-runs the chapter that declares it and every later chapter
    changed = run_notebooks(plan_build(mini_book, "smoke", {"epochs": 8}, run_dir=run_dir))
    assert [r.status for r in changed] == ["ran", "ran"]
    assert (run_dir / "a.txt").read_text() == "8"

    forced = run_notebooks(plan_build(mini_book, "smoke", {"epochs": 8}, run_dir=run_dir), force=True)
    assert [r.status for r in forced] == ["ran", "ran"]


def test_failure_names_notebook_and_cell_and_keeps_good_build(mini_book, tmp_path, capsys):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    build(mini_book, "smoke", run_dir=run_dir, out=out)
    index = out / "html" / "index.html"
    assert index.is_file()
    before = index.read_text()

    write_notebook(mini_book / "notebooks" / "b.py", "x = 1\nraise ValueError('planted failure')",
                   params='run_dir = "."\nseed = 0\n')
    with pytest.raises(NotebookFailed) as info:
        run_notebooks(plan_build(mini_book, "smoke", run_dir=run_dir))
    msg = str(info.value)
    assert "notebook 'b' failed in cell" in msg and "ValueError: planted failure" in msg
    assert "raise ValueError('planted failure')" in msg  # the failing cell's source is shown
    assert (run_dir / "notebooks" / "b.failed.ipynb").is_file()

    rc = main(["build", "--root", str(mini_book), "--profile", "smoke", "--run-dir", str(run_dir),
               "--out", str(out)])
    assert rc == 1
    assert "notebook 'b' failed" in capsys.readouterr().err
    assert index.read_text() == before  # the previous good HTML is untouched


def test_chapter_timings_reads_the_stamps_in_book_order(tmp_path):
    from brainsex.book import chapter_timings

    stamps = tmp_path / ".build"
    stamps.mkdir()
    (stamps / "b.json").write_text(json.dumps({"hash": "x", "seconds": 90.0}))
    (stamps / "a.json").write_text(json.dumps({"hash": "y", "seconds": 30.04}))
    t = chapter_timings(tmp_path, ["b", "missing", "a"])
    assert t["chapter"].tolist() == ["b", "a"]
    assert t["seconds"].tolist() == [90.0, 30.0] and t["minutes"].tolist() == [1.5, 0.5]
    assert chapter_timings(tmp_path)["chapter"].tolist() == ["a", "b"]
    assert chapter_timings(tmp_path / "nothing").empty
    (stamps / "c.json").write_text("{not json")
    with pytest.raises(BuildError, match="c.json"):
        chapter_timings(tmp_path)


def test_unresolved_glue_finds_prose_keys_that_no_cell_glued():
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

    from brainsex.book import glue_references, unresolved_glue

    def glued(name):
        return new_output("display_data", data={"application/papermill.record/text/plain": "1"},
                          metadata={"scrapbook": {"name": name, "mime_prefix": "application/papermill.record/"}})

    nb = new_notebook(cells=[
        new_code_cell("glue('n', 1)", outputs=[glued("n"), glued("acc")]),
        new_markdown_cell("We have {glue:text}`n` scans, {glue:text}`acc:.1f` % right and {glue}`missing`.\n\n"
                          "```{glue:figure} fig_key\n```"),
    ])
    assert glue_references(nb) == {"n", "acc", "missing", "fig_key"}
    assert unresolved_glue(nb) == {"missing", "fig_key"}
    nb.cells[0].outputs += [glued("missing"), glued("fig_key")]
    assert unresolved_glue(nbformat.from_dict(nb)) == set()


def test_chapter_hash_covers_data_files_roots_and_library_versions(mini_book, tmp_path, monkeypatch):
    """Editing a data file a chapter names, moving a cohort's data or upgrading a library changes its hash."""
    from brainsex import book

    (mini_book / "data").mkdir()
    table = mini_book / "data" / "study.tsv"
    table.write_text("a\tb\n1\t2\n")
    write_notebook(mini_book / "notebooks" / "b.py", "print(open('data/study.tsv').read(), seed)",
                   params='run_dir = "."\nseed = 0\n')
    plan = plan_build(mini_book, "smoke", run_dir=tmp_path / "run")
    src = mini_book / "notebooks" / "b.py"
    params = book._chapter_params(plan, "b")
    assert book.chapter_data_files(plan, src, params) == [table.resolve()]
    before = book.inputs_digest(plan, src, params)
    assert book.inputs_digest(plan, src, params) == before  # deterministic
    table.write_text("a\tb\n1\t3\n")
    edited = book.inputs_digest(plan, src, params)
    assert edited != before
    # the resolved root of an enabled cohort (here: a manifest root read from the environment)
    manifest = (mini_book / "data_manifest.yaml").read_text()
    assert "${BRAINSEX_DATA:-~/brainsex-data}/CC-359\n    enabled: false" in manifest
    (mini_book / "data_manifest.yaml").write_text(
        manifest.replace("${BRAINSEX_DATA:-~/brainsex-data}/CC-359\n    enabled: false", "${BRAINSEX_DATA:-~/brainsex-data}/CC-359\n    enabled: true"))
    monkeypatch.setenv("BRAINSEX_DATA", str(tmp_path / "one"))
    one = book.inputs_digest(plan, src, params)
    assert book.data_roots(plan)["CC-359"] == str((tmp_path / "one" / "CC-359").resolve())
    monkeypatch.setenv("BRAINSEX_DATA", str(tmp_path / "two"))
    assert book.inputs_digest(plan, src, params) != one
    # the libraries that compute results
    assert set(book.library_versions()) == set(book.RESULT_LIBRARIES)
    now = book.inputs_digest(plan, src, params)
    real = book.library_versions()
    monkeypatch.setattr(book, "library_versions", lambda: {**real, "torch": "0.0.1"})
    assert book.inputs_digest(plan, src, params) != now


def test_edited_data_file_reruns_its_chapter(mini_book, tmp_path):
    (mini_book / "data").mkdir()
    table = mini_book / "data" / "study.tsv"
    table.write_text("x\n1\n")
    write_notebook(mini_book / "notebooks" / "b.py", "print(open('data/study.tsv').read(), seed)",
                   params='run_dir = "."\nseed = 0\n')
    run_dir = tmp_path / "run"
    assert [r.status for r in run_notebooks(plan_build(mini_book, "smoke", run_dir=run_dir))] == ["ran", "ran"]
    assert [r.status for r in run_notebooks(plan_build(mini_book, "smoke", run_dir=run_dir))] == ["skipped", "skipped"]
    table.write_text("x\n2\n")
    assert [r.status for r in run_notebooks(plan_build(mini_book, "smoke", run_dir=run_dir))] == ["skipped", "ran"]


def test_a_chapter_can_end_early_with_a_note(mini_book, tmp_path):
    """ChapterEnds is not a failure: the cells so far stay, the reason is a note, later cells are dropped."""
    import nbformat

    write_notebook(mini_book / "notebooks" / "b.py",
                   "from brainsex.book import ChapterEnds\nprint('before', seed)\n"
                   "raise ChapterEnds('nothing to check on this run')\n\n# %%\nprint('never')",
                   params='run_dir = "."\nseed = 0\n')
    run_dir = tmp_path / "run"
    results = run_notebooks(plan_build(mini_book, "smoke", run_dir=run_dir))
    assert [r.status for r in results] == ["ran", "ended early"]
    nb = nbformat.read(run_dir / "notebooks" / "b.ipynb", as_version=4)
    text = json.dumps(nb)
    assert "nothing to check on this run" in text and "before 0" in text
    assert "never" not in text and "Traceback" not in text and '"error"' not in text
    assert not (run_dir / "notebooks" / "b.failed.ipynb").exists()
    # a second build skips it like any finished chapter
    again = run_notebooks(plan_build(mini_book, "smoke", run_dir=run_dir))
    assert [r.status for r in again] == ["skipped", "skipped"]
