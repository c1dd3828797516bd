"""The build driver: Jupytext notebooks -> papermill (with a profile's parameters) -> Jupyter Book HTML.

Layout of a run (``runs/<profile>/``)::

    notebooks/<chapter>.ipynb   the executed chapter, as the book shows it
    .build/<chapter>.json       the content hash that lets an unchanged chapter be skipped
    build.log                   the last jupyter-book log
    ...                         each chapter's outputs (see each chapter and README)

Chapters pass results to later chapters only through files in the run directory.
The book is built in a staging folder and swapped into ``_build/html`` only when the build succeeded,
so a failed build never damages the previous good one.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
import yaml

from brainsex import BrainsexError
from brainsex.io import write_json_atomic, write_text_atomic
from brainsex.manifest import load_manifest
from brainsex.profiles import resolve_profile
from brainsex.run import BUNDLE_PATTERNS, RunDir

__all__ = [
    "BuildError",
    "NotebookFailed",
    "ChapterEnds",
    "BuildPlan",
    "toc_notebooks",
    "notebook_parameters",
    "plan_build",
    "run_notebooks",
    "build_html",
    "build",
    "paper_vs_run",
    "chapter_timings",
    "results_bundle",
    "glue_references",
    "unresolved_glue",
    "BUNDLE_PATTERNS",
]


#: Files and folders of the repository that make up the book's sources (book root = repository root).
BOOK_SOURCES = ("_config.yml", "_toc.yml", "references.bib", "book", "benchmarks/results", "benchmarks/validity")
#: Set in the environment of executed chapters so that :func:`brainsex.figures.show` emits book HTML.
BUILD_ENV = "BRAINSEX_BOOK_BUILD"


class BuildError(BrainsexError):
    """Bad input to the build (exit code 2)."""


class NotebookFailed(BrainsexError):
    """A chapter raised while it ran (exit code 1)."""


class ChapterEnds(BrainsexError):
    """Raised by a chapter to end early, on purpose, with a reason for the reader.

    The build keeps the cells run so far, shows the reason as a note in place of the raising cell's
    output, drops the cells after it and goes on with the next chapter (it is not a failure): e.g. the
    validity chapter on a real cohort with the matched phantom turned off.
    """


@dataclass
class ChapterResult:
    """What happened to one chapter in a build.

    Attributes
    ----------
    name : str
        Chapter (notebook stem), or ``"(jupyter-book html)"`` for the HTML step.
    status : {"ran", "ended early", "skipped", "failed"}
        Executed, unchanged since its last run (content hash), or raised.
    seconds : float
        Wall time.
    """

    name: str
    status: str
    seconds: float = 0.0


@dataclass
class BuildPlan:
    """Everything a build will run, checked before anything runs (:func:`plan_build`).

    Attributes
    ----------
    root : pathlib.Path
        The book root (the repository root).
    profile : str
        Profile name (``profiles.yaml``).
    params : dict
        Resolved parameters: the profile plus overrides.
    run_dir : pathlib.Path
        Run directory the chapters write into.
    notebooks : list of pathlib.Path
        Chapter sources in table-of-contents order.
    declared : dict
        Chapter stem -> the parameters its ``parameters`` cell declares, with their defaults.
    manifest : pathlib.Path or None
        Data manifest replacing ``<root>/data_manifest.yaml`` (None: that one).
    """

    root: Path
    profile: str
    params: dict[str, Any]
    run_dir: Path
    notebooks: list[Path]
    declared: dict[str, dict[str, Any]] = field(default_factory=dict)
    manifest: Path | None = None  # the data manifest the chapters read (default: <root>/data_manifest.yaml)

    @property
    def manifest_path(self) -> Path:
        """The data manifest the chapters read."""
        return self.manifest if self.manifest is not None else self.root / "data_manifest.yaml"


def _log(msg: str) -> None:
    print(msg, flush=True)


def toc_notebooks(root: str | os.PathLike) -> list[Path]:
    """Notebook chapters (``notebooks/*.py``) in the order ``_toc.yml`` lists them.

    Every ``file:`` entry under ``notebooks/`` must exist as a ``.py`` (the Jupytext source).

    Parameters
    ----------
    root : path
        The book root (holds ``_toc.yml``).

    Returns
    -------
    list of pathlib.Path
        The chapters' ``.py`` sources.
    """
    root = Path(root)
    toc_path = root / "_toc.yml"
    if not toc_path.is_file():
        raise BuildError(f"{toc_path}: table of contents not found")
    try:
        toc = yaml.safe_load(toc_path.read_text())
    except yaml.YAMLError as exc:
        raise BuildError(f"{toc_path}: not valid YAML ({exc})") from None

    files: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "file" in node and isinstance(node["file"], str):
                files.append(node["file"])
            for key in ("root",):
                if isinstance(node.get(key), str):
                    files.append(node[key])
            for value in node.values():
                if isinstance(value, list | dict):
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc)
    out = []
    for entry in files:
        stem = entry[:-6] if entry.endswith(".ipynb") else entry[:-3] if entry.endswith(".py") else entry
        if not stem.startswith("notebooks/"):
            continue
        src = root / f"{stem}.py"
        if not src.is_file():
            raise BuildError(f"{toc_path}: lists '{entry}' but {src.relative_to(root)} does not exist")
        out.append(src)
    return out


def _read_source(path: Path) -> nbformat.NotebookNode:
    import jupytext

    try:
        return jupytext.read(path)
    except Exception as exc:  # jupytext raises several types for a bad file
        raise BuildError(f"{path}: cannot be read as a Jupytext notebook ({exc})") from None


def notebook_parameters(path: str | os.PathLike) -> dict[str, Any]:
    """Parameters a notebook declares in its cell tagged ``parameters`` (papermill's inspection).

    Parameters
    ----------
    path : path
        The notebook's Jupytext ``.py`` source.

    Returns
    -------
    dict
        Name -> default value (a Python literal when it parses as one, else papermill's text).
    """
    import papermill

    nb = _read_source(Path(path))
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "nb.ipynb"
        nbformat.write(nb, p)
        info = papermill.inspect_notebook(str(p))
    out: dict[str, Any] = {}
    for k, v in info.items():
        default = v.get("default")
        try:
            out[k] = ast.literal_eval(default) if isinstance(default, str) else default
        except (ValueError, SyntaxError):
            out[k] = default  # an expression: keep its source text
    return out


def sync_pair(src: Path) -> Path:
    """Write the paired ``.ipynb`` from the ``.py`` source when their cells differ; return its path.

    Notebook-level metadata of an existing ``.ipynb`` (Colab's ``accelerator``, say) is kept.

    Parameters
    ----------
    src : pathlib.Path
        The notebook's Jupytext ``.py`` source.

    Returns
    -------
    pathlib.Path
        The paired ``.ipynb``.
    """
    import jupytext

    nb = _read_source(src)
    ipynb = src.with_suffix(".ipynb")
    if ipynb.exists():
        try:
            old = nbformat.read(ipynb, as_version=4)
        except Exception:
            old = None
        if old is not None:
            same = [(c.cell_type, c.source) for c in old.cells] == [(c.cell_type, c.source) for c in nb.cells]
            if same:
                return ipynb
            for key, value in old.metadata.items():
                nb.metadata.setdefault(key, value)
    text = jupytext.writes(nb, fmt="ipynb")
    write_text_atomic(ipynb, text)
    return ipynb


#: Distributions whose versions enter every chapter's hash: they compute the results.
RESULT_LIBRARIES = ("torch", "monai", "captum", "antspyx", "nilearn", "numpy", "scipy", "scikit-learn")
#: Suffixes of the data files a chapter may name in its source or parameters (hashed by content).
_DATA_SUFFIXES = (".tsv", ".csv", ".json", ".yaml", ".yml", ".txt", ".npy", ".npz", ".nii", ".gz", ".xls", ".xlsx",
                  ".parquet", ".pt")


def library_versions(names: Sequence[str] = RESULT_LIBRARIES) -> dict[str, str]:
    """Installed versions of the libraries that compute results (``"absent"`` when not installed).

    Parameters
    ----------
    names : sequence of str, default=RESULT_LIBRARIES
        Distribution names.
    """
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def data_roots(plan: BuildPlan) -> dict[str, str]:
    """The resolved root folder of every cohort the build can read (enabled, or named by the profile).

    Synthetic cohorts live in the run directory; the others are resolved against the manifest's folder
    with the environment as it is now. A root that cannot be resolved is recorded with the reason.

    Parameters
    ----------
    plan : BuildPlan
        The build (:func:`plan_build`).
    """
    manifest = load_manifest(plan.root / "data_manifest.yaml")
    named = plan.params.get("cohorts") or []
    named = {str(c) for c in ([named] if isinstance(named, str) else named)}
    out = {}
    for c in manifest.cohorts:
        if not (c.enabled or c.name in named):
            continue
        try:
            base = plan.run_dir if c.kind == "synthetic" else None
            out[c.name] = str(manifest.resolve_root(c, base=base).resolve())
        except BrainsexError as exc:
            out[c.name] = f"unresolved: {exc}"
    return out


def chapter_data_files(plan: BuildPlan, src: Path, params: dict[str, Any]) -> list[Path]:
    """Data files of the repository a chapter names (string literals in its source, parameter values).

    A name counts when it is a relative path to an existing file under the book root, with a data
    suffix, or to an existing folder other than the root (its files are hashed); paths inside the run
    directory are left out (the chapters before produce them, and their hashes chain).

    Parameters
    ----------
    plan : BuildPlan
        The build.
    src : pathlib.Path
        The chapter's source (``notebooks/NAME.py``).
    params : dict
        The chapter's parameters.
    """
    import re

    names = set(re.findall(r"[\"']([^\"'\n]{1,300})[\"']", src.read_text(errors="replace")))
    names |= {v for v in params.values() if isinstance(v, str)}
    for v in params.values():
        if isinstance(v, list | tuple):
            names |= {x for x in v if isinstance(x, str)}
    root, run_dir = plan.root.resolve(), plan.run_dir.resolve()
    found = set()
    for name in names:
        if "{" in name or name.strip() in ("", ".", "..") or Path(name).is_absolute():
            continue
        try:
            p = (root / name).resolve()
        except (OSError, ValueError):
            continue
        if p == root or run_dir in (p, *p.parents) or root not in p.parents or ".git" in p.parts:
            continue
        if (p.is_file() and p.name.endswith(_DATA_SUFFIXES)) or p.is_dir():
            found.add(p)
    return sorted(found)


def _hash_path(h: Any, path: Path, root: Path) -> None:
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file()
                                                 and not any(part.startswith(".") for part in f.relative_to(path).parts))
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)


def inputs_digest(plan: BuildPlan, src: Path, params: dict[str, Any]) -> str:
    """Hash of what a chapter reads besides its source, parameters, package and manifest.

    The content of the data files it names (:func:`chapter_data_files`), the resolved data roots
    (:func:`data_roots`) and the versions of the libraries that compute results
    (:func:`library_versions`): editing ``benchmarks/validity/validity_study.tsv``, pointing a cohort at
    another folder or upgrading torch re-runs the chapter.

    Parameters
    ----------
    plan : BuildPlan
        The build.
    src : pathlib.Path
        The chapter's source.
    params : dict
        The chapter's parameters.
    """
    h = hashlib.sha256()
    h.update(json.dumps({"roots": data_roots(plan), "libraries": library_versions()}, sort_keys=True).encode())
    for f in chapter_data_files(plan, src, params):
        _hash_path(h, f, plan.root.resolve())
    return h.hexdigest()


def _package_hash() -> str:
    h = hashlib.sha256()
    pkg = Path(__file__).parent
    for f in sorted(pkg.rglob("*")):
        if f.is_file() and f.suffix in (".py", ".yaml", ".tsv", ".json") and "__pycache__" not in f.parts:
            h.update(f.relative_to(pkg).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def plan_build(
    root: str | os.PathLike = ".",
    profile: str = "demo",
    overrides: dict[str, Any] | None = None,
    run_dir: str | os.PathLike | None = None,
    manifest: str | os.PathLike | None = None,
) -> BuildPlan:
    """Check every input and return what would run: notebooks, parameters, run directory.

    Parameters
    ----------
    root : path, default="."
        The book root (``_toc.yml``, ``data_manifest.yaml``, ``notebooks/``).
    profile : str, default="demo"
        Profile of ``profiles.yaml`` (:func:`brainsex.profiles.resolve_profile`).
    overrides : dict, optional
        Parameter values replacing the profile's; each must be declared by some chapter.
    run_dir : path, optional
        Run directory (relative: to ``root``); default ``<root>/runs/<profile>``.
    manifest : path, optional
        Replaces ``<root>/data_manifest.yaml`` (e.g. a copy with a cohort's flags changed).

    Returns
    -------
    BuildPlan
        The checked plan.
    """
    root = Path(root).resolve()
    manifest_path = Path(manifest).resolve() if manifest is not None else root / "data_manifest.yaml"
    load_manifest(manifest_path)  # validate early: a bad manifest stops the build here
    notebooks = toc_notebooks(root)
    declared = {nb.stem: notebook_parameters(nb) for nb in notebooks}
    known = set().union(*[set(d) for d in declared.values()]) if declared else set()
    params = resolve_profile(profile, overrides, known=known)
    rd = Path(run_dir) if run_dir else root / "runs" / profile
    if not rd.is_absolute():
        rd = root / rd
    return BuildPlan(root=root, profile=profile, params=params, run_dir=rd, notebooks=notebooks, declared=declared,
                     manifest=manifest_path if manifest is not None else None)


def _chapter_params(plan: BuildPlan, stem: str) -> dict[str, Any]:
    declared = plan.declared.get(stem, {})
    params = {k: v for k, v in plan.params.items() if k in declared}
    if "profile" in declared:
        params["profile"] = plan.profile
    if "run_dir" in declared:
        params["run_dir"] = _relative(plan.run_dir, plan.root)
    if "manifest" in declared:
        # chapters run with the book root as working folder
        params["manifest"] = _relative(plan.manifest_path, plan.root)
    return params


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when it lies inside it (no machine paths in the published book)."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _tidy_executed(path: Path) -> None:
    """Hide the notebook's default parameters cell; the injected cell shows the values used."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if "parameters" in tags and "remove-cell" not in tags:
            cell.metadata["tags"] = [*tags, "remove-cell"]
        elif "injected-parameters" in tags and "hide-input" not in tags:
            cell.metadata["tags"] = [*tags, "hide-input"]
    nbformat.write(nb, path)


def _end_early(path: Path, reason: str) -> None:
    """Keep a chapter that raised :class:`ChapterEnds`: the reason as a note, no traceback, no later cells."""
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "papermill-error-cell-tag" not in c.get("metadata", {}).get("tags", [])]
    end = next((i for i, c in enumerate(cells) if c.cell_type == "code" and any(
        o.get("output_type") == "error" and o.get("ename") == ChapterEnds.__name__ for o in c.get("outputs", []))),
        len(cells) - 1)
    cell = cells[end]
    if cell.cell_type == "code":
        note = nbformat.v4.new_output("display_data", data={"text/markdown": f"```{{note}}\n{reason}\n```"})
        cell.outputs = [o for o in cell.outputs if o.get("output_type") != "error"] + [note]
        cell.metadata["tags"] = [*cell.metadata.get("tags", []), "remove-input"]
    nb.cells = cells[: end + 1]
    nbformat.write(nb, path)


def _failure_message(stem: str, exc: Exception, nb_path: Path) -> str:
    cell = getattr(exc, "cell_index", None)
    source = getattr(exc, "source", "") or ""
    ename = getattr(exc, "ename", type(exc).__name__)
    evalue = getattr(exc, "evalue", str(exc))
    lines = [f"notebook '{stem}' failed" + (f" in cell {cell}" if cell is not None else "") + f": {ename}: {evalue}"]
    if source:
        lines.append("--- failing cell ---")
        lines.extend("    " + s for s in source.splitlines()[:25])
    if ename in ("MemoryError", "OutOfMemoryError") or "out of memory" in str(evalue).lower():
        lines.append(_memory_hint())
    lines.append(f"the executed notebook with the full traceback: {nb_path}")
    return "\n".join(lines)


def _memory_hint() -> str:
    from brainsex.memory import MEMORY_PARAMETERS

    return "to lower the memory it needs, set " + "; ".join(f"-p {k}: {v}" for k, v in MEMORY_PARAMETERS)


def _running_cell(nb_path: Path) -> tuple[int | None, str]:
    """Index and source of the last cell papermill started in a partly executed notebook.

    That is the cell that was running when the kernel died (papermill stamps ``start_time`` on each
    cell it starts).
    """
    try:
        nb = json.loads(nb_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None, ""
    found: tuple[int | None, str] = (None, "")
    for i, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") == "code" and cell.get("metadata", {}).get("papermill", {}).get("start_time"):
            src = cell.get("source", "")
            found = (i, "".join(src) if isinstance(src, list) else str(src))
    return found


def _dead_kernel_message(stem: str, nb_path: Path, peak: int, min_available: int | None) -> str:
    """Why a chapter's kernel died: the running cell, its peak memory against the machine's limit."""
    from brainsex.memory import format_bytes, memory_limit_bytes

    cell, source = _running_cell(nb_path)
    limit = memory_limit_bytes()
    lines = [f"notebook '{stem}' failed" + (f" in cell {cell}" if cell is not None else "")
             + ": the kernel died (killed by the system, no Python error)"]
    if source:
        lines.append("--- the cell that was running ---")
        lines.extend("    " + s for s in source.splitlines()[:25])
    starved = min_available is not None and min_available < 0.05 * limit
    near = peak >= 0.7 * limit or starved
    lines.append(f"peak resident memory of the kernel: {format_bytes(peak)} of {format_bytes(limit)} on this machine"
                 + (f" (available memory fell to {format_bytes(min_available)})" if min_available is not None else ""))
    if near:
        lines.append("it died near the machine's memory limit: most likely the out-of-memory killer; "
                     + _memory_hint())
    else:
        lines.append("that is far from the memory limit, so the cause is probably not memory: look for a crash "
                     "in native code (the kernel's own log) or a process that killed it")
    lines.append(f"the partly executed notebook: {nb_path}")
    return "\n".join(lines)


def run_notebooks(plan: BuildPlan, force: bool = False) -> list[ChapterResult]:
    """Execute each chapter with papermill, skipping those whose content hash did not change.

    Parameters
    ----------
    plan : BuildPlan
        From :func:`plan_build`.
    force : bool, default=False
        Run every chapter, changed or not.

    Returns
    -------
    list of ChapterResult
        One per chapter, in order.

    Raises
    ------
    NotebookFailed
        When a chapter raises or its kernel dies (the partly executed notebook is kept as
        ``<name>.failed.ipynb``).
    """
    import papermill
    from nbclient.exceptions import DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    from brainsex.memory import RssWatch

    run = RunDir(plan.run_dir)
    out_dir = run.notebooks
    stamp_dir = run.stamps
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp_dir.mkdir(parents=True, exist_ok=True)
    pkg = _package_hash()
    manifest_bytes = plan.manifest_path.read_bytes()
    upstream = ""
    results: list[ChapterResult] = []
    n = len(plan.notebooks)
    for i, src in enumerate(plan.notebooks, 1):
        stem = src.stem
        params = _chapter_params(plan, stem)
        ipynb = sync_pair(src)
        h = hashlib.sha256()
        for part in (src.read_bytes(), json.dumps(params, sort_keys=True).encode(), pkg.encode(), manifest_bytes,
                     upstream.encode(), inputs_digest(plan, src, params).encode()):
            h.update(part)
        digest = h.hexdigest()
        upstream = digest
        executed = run.executed(stem)
        stamp = run.stamp(stem)
        if not force and executed.exists() and stamp.exists():
            try:
                if json.loads(stamp.read_text()).get("hash") == digest:
                    _log(f"[{i}/{n}] {stem}: unchanged, skipped")
                    results.append(ChapterResult(stem, "skipped"))
                    continue
            except json.JSONDecodeError:
                pass
        _log(f"[{i}/{n}] {stem}: running ({', '.join(f'{k}={v}' for k, v in params.items() if k != 'run_dir')})")
        t0 = time.perf_counter()
        tmp_out = out_dir / f".{stem}.running.ipynb"
        env_before = os.environ.get(BUILD_ENV)
        os.environ[BUILD_ENV] = "1"
        watch = RssWatch()  # the kernel is a child process: its peak memory, for a kernel killed by the OS
        status = "ran"
        try:
            with watch:
                papermill.execute_notebook(
                    str(ipynb), str(tmp_out), parameters=params, kernel_name="python3", cwd=str(plan.root),
                    progress_bar=False, log_output=False, report_mode=False,
                )
        except DeadKernelError:
            failed = out_dir / f"{stem}.failed.ipynb"
            if tmp_out.exists():
                os.replace(tmp_out, failed)
            results.append(ChapterResult(stem, "failed", time.perf_counter() - t0))
            _summary(results)
            raise NotebookFailed(_dead_kernel_message(stem, failed, watch.peak_bytes,
                                                      watch.min_available_bytes)) from None
        except PapermillExecutionError as exc:
            if getattr(exc, "ename", "") == ChapterEnds.__name__ and tmp_out.exists():
                _end_early(tmp_out, str(getattr(exc, "evalue", "")))
                status = "ended early"
            else:
                failed = out_dir / f"{stem}.failed.ipynb"
                if tmp_out.exists():
                    os.replace(tmp_out, failed)
                results.append(ChapterResult(stem, "failed", time.perf_counter() - t0))
                _summary(results)
                raise NotebookFailed(_failure_message(stem, exc, failed)) from None
        finally:
            if env_before is None:
                os.environ.pop(BUILD_ENV, None)
            else:
                os.environ[BUILD_ENV] = env_before
        _tidy_executed(tmp_out)
        os.replace(tmp_out, executed)
        dt = time.perf_counter() - t0
        write_json_atomic(stamp, {"hash": digest, "seconds": round(dt, 2), "params": params,
                                  "peak_rss_bytes": int(watch.peak_bytes)})
        _log(f"[{i}/{n}] {stem}: {'done' if status == 'ran' else status} in {dt:.1f} s "
             f"(kernel peak memory {watch.peak_bytes / 2**30:.1f} GB)")
        results.append(ChapterResult(stem, status, dt))
    return results


def _summary(results: list[ChapterResult]) -> None:
    if not results:
        return
    width = max(len(r.name) for r in results)
    _log("\n" + f"{'chapter':<{width}}  status    seconds")
    for r in results:
        _log(f"{r.name:<{width}}  {r.status:<8}  {r.seconds:7.1f}")
    _log(f"{'total':<{width}}            {sum(r.seconds for r in results):7.1f}")


def _plotly_js() -> Path:
    import plotly

    js = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not js.is_file():
        raise BuildError(f"plotly.js not found in the installed plotly package ({js})")
    return js


def _copy_mathjax(dest: Path) -> None:
    """Copy MathJax 3 (``tex-chtml.js`` and its web fonts) from the sphinx-mathjax-offline package."""
    from importlib import metadata

    try:
        dist = metadata.distribution("sphinx-mathjax-offline")
    except metadata.PackageNotFoundError:
        raise BuildError("the package sphinx-mathjax-offline (local MathJax) is not installed") from None
    src = Path(str(dist.locate_file("sphinx-mathjax-offline/static/mathjax")))
    if not (src / "tex-chtml.js").is_file():
        raise BuildError(f"MathJax files not found in {src}")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "tex-chtml.js", dest / "tex-chtml.js")
    fonts = src / "output" / "chtml" / "fonts"
    if fonts.is_dir():
        shutil.copytree(fonts, dest / "output" / "chtml" / "fonts", dirs_exist_ok=True)


def _dedupe_inline_scripts(html_dir: Path) -> None:
    """Drop repeated identical inline ``<script>`` lines from every page.

    sphinx-thebe (pulled in by Jupyter Book 1.x) can emit its ``const THEBE_JS_URL = ...`` block twice,
    which is a ``SyntaxError`` in the browser console; the second copy is removed.
    """
    for page in html_dir.rglob("*.html"):
        lines = page.read_text().splitlines(keepends=True)
        seen: set[str] = set()
        out = []
        changed = False
        for line in lines:
            key = line.strip()
            if key.startswith("<script>const ") and key.endswith("</script>"):
                if key in seen:
                    changed = True
                    continue
                seen.add(key)
            out.append(line)
        if changed:
            page.write_text("".join(out))


def _policy(plan: BuildPlan) -> Any:
    from brainsex.privacy import DEFAULT_MIN_GROUP_SIZE, publication_policy

    k = plan.params.get("min_group_size", DEFAULT_MIN_GROUP_SIZE)
    return publication_policy(plan.run_dir, plan.manifest_path, k if k is not None else DEFAULT_MIN_GROUP_SIZE,
                              cohorts=plan.params.get("cohorts"))


def _publishable_copy(executed: Path, dest: Path) -> None:
    """Copy an executed chapter into the staging folder without its outputs marked local only."""
    from brainsex.privacy import strip_local_outputs

    nb = nbformat.read(executed, as_version=4)
    if strip_local_outputs(nb):
        nbformat.write(nb, dest)
    else:
        shutil.copy2(executed, dest)


def build_html(plan: BuildPlan, out: str | os.PathLike | None = None) -> Path:
    """Stage the book sources with the executed chapters, run ``jupyter-book build``, swap into place.

    Parameters
    ----------
    plan : BuildPlan
        The build whose executed chapters are published.
    out : path, optional
        Output folder (relative: to the book root); default ``<root>/_build``. The book goes to
        ``<out>/html``.

    Returns
    -------
    pathlib.Path
        The folder holding ``index.html``.
    """
    root = plan.root
    out_root = Path(out) if out else root / "_build"
    if not out_root.is_absolute():
        out_root = root / out_root
    out_root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".stage-", dir=out_root))
    try:
        for name in BOOK_SOURCES:
            src = root / name
            if src.is_dir():
                shutil.copytree(src, stage / name, ignore=shutil.ignore_patterns("*.csv", "*.json"))
            elif src.is_file():
                shutil.copy2(src, stage / name)
        (stage / "notebooks").mkdir()
        for src in plan.notebooks:
            executed = RunDir(plan.run_dir).executed(src.stem)
            if not executed.is_file():
                raise BuildError(f"{executed}: executed chapter missing; run the notebooks first")
            _publishable_copy(executed, stage / "notebooks" / executed.name)
        static = stage / "_static"
        static.mkdir(exist_ok=True)
        if (root / "_static").is_dir():
            shutil.copytree(root / "_static", static, dirs_exist_ok=True)
        shutil.copy2(_plotly_js(), static / "plotly.min.js")
        _copy_mathjax(stage / "_extra" / "_mathjax")
        policy = _policy(plan)
        results_bundle(plan.run_dir, stage / "_extra" / "results.zip", policy=policy)
        jb = Path(sys.executable).parent / "jupyter-book"
        cmd = [str(jb) if jb.exists() else "jupyter-book", "build", str(stage), "--path-output", str(stage / "_out")]
        _log("building HTML with jupyter-book ...")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=stage)
        log = proc.stdout + "\n" + proc.stderr
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(RunDir(plan.run_dir).build_log, log)
        if proc.returncode != 0:
            tail = "\n".join(log.strip().splitlines()[-30:])
            raise NotebookFailed(f"jupyter-book build failed (log: {RunDir(plan.run_dir).build_log}):\n{tail}")
        new_html = stage / "_out" / "_build" / "html"
        from brainsex.privacy import check_published

        # refuse before anything is published: every file of the new site, archives opened
        scan_s = check_published(plan.run_dir, new_html, plan.manifest_path)
        _log(f"privacy check: no protected subject ID or file name in the site ({scan_s:.1f} s)")
        _dedupe_inline_scripts(new_html)
        final = out_root / "html"
        old = out_root / f".html-old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(new_html, final)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
        _log(f"HTML built in {time.perf_counter() - t0:.1f} s: {final / 'index.html'}")
        return final
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def build(
    root: str | os.PathLike = ".",
    profile: str = "demo",
    overrides: dict[str, Any] | None = None,
    force: bool = False,
    out: str | os.PathLike | None = None,
    run_dir: str | os.PathLike | None = None,
    html: bool = True,
    manifest: str | os.PathLike | None = None,
) -> Path | None:
    """Run every chapter of the book on ``profile`` and build the HTML (the whole of ``make book``).

    Parameters
    ----------
    root, profile, overrides, run_dir, manifest
        As in :func:`plan_build`.
    force : bool, default=False
        Run every chapter, changed or not.
    out : path, optional
        HTML output folder (:func:`build_html`).
    html : bool, default=True
        Build the HTML after running the chapters.

    Returns
    -------
    pathlib.Path or None
        The folder holding ``index.html`` (None without ``html``).
    """
    t0 = time.perf_counter()
    plan = plan_build(root, profile, overrides, run_dir=run_dir, manifest=manifest)
    _log(f"profile '{profile}', run directory {plan.run_dir}, {len(plan.notebooks)} chapters")
    results = run_notebooks(plan, force=force)
    final = None
    if html:
        t1 = time.perf_counter()
        final = build_html(plan, out)
        results.append(ChapterResult("(jupyter-book html)", "ran", time.perf_counter() - t1))
    _summary(results)
    _log(f"total {time.perf_counter() - t0:.1f} s")
    return final


def paper_vs_run(run_dir: str | os.PathLike) -> Any:
    """The paper's reported figures beside this run's, one row per quantity.

    The paper's values and the recipe for reading each one from the run directory are in the package
    file ``data/paper_reported.yaml``; a quantity whose file is not in the run is shown as missing.

    Parameters
    ----------
    run_dir : path
        The run directory.

    Returns
    -------
    pandas.DataFrame
        One row per quantity: ``quantity``, ``paper``, ``this run`` (None when missing) and
        ``paper reports it in``.
    """
    from importlib import resources

    import pandas as pd

    items = yaml.safe_load(resources.files("brainsex").joinpath("data/paper_reported.yaml").read_text())
    run_dir = Path(run_dir)
    rows = []
    for item in items:
        spec = item["run"]
        path = RunDir(run_dir).file(spec["file"])
        value = None
        if path.is_file():
            if path.suffix == ".json":
                value = json.loads(path.read_text()).get(spec["key"])
            elif spec.get("count") == "rows":
                value = len(pd.read_csv(path, sep="\t"))
            else:
                t = pd.read_csv(path, sep="\t")
                hit = t[(t["group"].astype(str) == spec["group"]) & (t["metric"] == spec["metric"])]
                if len(hit) and pd.notna(hit["value"].iloc[0]):
                    value = float(hit["value"].iloc[0]) * spec.get("scale", 1)
        rows.append({"quantity": item["quantity"], "paper": item["paper"],
                     "this run": None if value is None else round(float(value), 2), "paper reports it in": item["where"]})
    return pd.DataFrame(rows)


def chapter_timings(run_dir: str | os.PathLike, chapters: Sequence[str] | None = None) -> Any:
    """Wall time of each executed chapter of a run, from the build driver's stamps.

    :func:`run_notebooks` writes ``<run_dir>/.build/<chapter>.json`` after each chapter it executes
    (a skipped chapter keeps the stamp of its last execution, so the table always shows what the
    chapter costs, not what the last build spent on it).

    Parameters
    ----------
    run_dir
        The run directory.
    chapters
        Chapter stems, in book order (default: every stamp, sorted by name).

    Returns
    -------
    pandas.DataFrame
        Columns ``chapter``, ``seconds``, ``minutes``; chapters without a stamp are left out.
    """
    import pandas as pd

    run = RunDir(run_dir)
    names = list(chapters) if chapters is not None else sorted(p.stem for p in run.stamps.glob(run.stamp("*").name))
    rows = []
    for name in names:
        path = run.stamp(name)
        if not path.is_file():
            continue
        try:
            seconds = float(json.loads(path.read_text())["seconds"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise BuildError(f"{path}: not a build stamp ({exc})") from None
        rows.append({"chapter": name, "seconds": round(seconds, 1), "minutes": round(seconds / 60.0, 2)})
    return pd.DataFrame(rows, columns=["chapter", "seconds", "minutes"])


def results_bundle(run_dir: str | os.PathLike, dest: str | os.PathLike, policy: Any = None) -> Path:
    """Zip a run's aggregate results (:data:`BUNDLE_PATTERNS`: tables, average maps, timings) to ``dest``.

    Only aggregate files are included, never per-subject tables or images. For a run on a restricted
    cohort (``policy`` from :func:`brainsex.privacy.publication_policy` with ``shareable`` False), every
    table row over fewer than ``policy.k`` subjects is suppressed and every average map over fewer
    than ``k`` subjects — or of unknown size (not listed in ``saliency/maps.tsv``) — is left out;
    ``SUPPRESSED.txt`` in the bundle lists what was withheld and why.

    Parameters
    ----------
    run_dir
        The run directory.
    dest
        The zip file to write.
    policy
        What may be published (default: everything in :data:`BUNDLE_PATTERNS`).
    """
    import zipfile

    run_dir, dest = Path(run_dir), Path(dest)
    files = sorted({f for pattern in BUNDLE_PATTERNS for f in run_dir.glob(pattern) if f.is_file()})
    from brainsex.io import atomic_path

    restricted = policy is not None and not policy.shareable
    withheld: list[str] = []
    if restricted:
        files, withheld = _restricted_files(run_dir, files, policy.k)
    with atomic_path(dest) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            name = f.relative_to(run_dir).as_posix()
            if restricted and f.suffix == ".tsv":
                import pandas as pd

                from brainsex.privacy import suppress_table

                zf.writestr(name, suppress_table(pd.read_csv(f, sep="\t"), policy.k).to_csv(sep="\t", index=False))
            else:
                zf.write(f, name)
        if withheld:
            zf.writestr("SUPPRESSED.txt", "\n".join(withheld) + "\n")
    return dest


def _restricted_files(run_dir: Path, files: list[Path], k: int) -> tuple[list[Path], list[str]]:
    """Leave out the average maps over fewer than ``k`` subjects (or of unknown size)."""
    import pandas as pd

    sizes: dict[str, int] = {}
    run = RunDir(run_dir)
    maps_tsv = run.saliency.maps_table
    if maps_tsv.is_file():
        t = pd.read_csv(maps_tsv, sep="\t")
        sizes = {str(f): int(n) for f, n in zip(t["file"], t["n"], strict=True)}
    # tables read off one average map go (or stay) with it
    derived = {run.atlas.region_scores.relative_to(run_dir).as_posix(): run.saliency.mean_rtiv_subset.name}
    kept, withheld = [], []
    for f in files:
        source = derived.get(f.relative_to(run_dir).as_posix())
        if source is not None and sizes.get(source, 0) < k:
            withheld.append(f"{f.relative_to(run_dir).as_posix()}: read off {source}, withheld with it")
            continue
        if f.name.endswith((".nii", ".nii.gz")):
            n = sizes.get(f.name)
            if n is None or n < k:
                why = "size unknown" if n is None else f"fewer than {k} subjects"
                withheld.append(f"{f.relative_to(run_dir).as_posix()}: average map withheld ({why}; restricted cohort)")
                continue
        kept.append(f)
    return kept, withheld


#: A myst-nb glue role or directive in markdown: ``{glue}`key```, ``{glue:text}`key:.2f```, ``{glue:figure} key``.
_GLUE_REF = re.compile(r"\{glue(?::[a-z]+)?\}(?:`([^`]+)`| +([^\s`]+))")


def glue_references(notebook: Any) -> set[str]:
    """The glue keys that a notebook's markdown cells refer to (roles and directives).

    Parameters
    ----------
    notebook
        A notebook (:class:`nbformat.NotebookNode`) or the path of an ``.ipynb``.
    """
    nb = nbformat.read(str(notebook), as_version=4) if isinstance(notebook, str | os.PathLike) else notebook
    keys: set[str] = set()
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for role, directive in _GLUE_REF.findall(cell.source):
                keys.add((role or directive).split(":")[0].strip())
    return keys


def unresolved_glue(notebook: Any) -> set[str]:
    """Glue keys an executed notebook's prose refers to but none of its cells glued.

    myst-nb renders such a reference as nothing (and logs ``No key ... found in glue data``), so a
    sentence silently loses its number; a built book should have none.

    Parameters
    ----------
    notebook
        An executed notebook (:class:`nbformat.NotebookNode`) or the path of one.
    """
    nb = nbformat.read(str(notebook), as_version=4) if isinstance(notebook, str | os.PathLike) else notebook
    glued = {out.get("metadata", {}).get("scrapbook", {}).get("name")
             for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])}
    return glue_references(nb) - glued
