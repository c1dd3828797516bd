"""Fresh-clone wall times of the README's two commands (issue 17).

``python -m benchmarks.fresh_clone`` clones the repository's committed ``HEAD`` into a scratch folder
twice and times, in each clone, what a newcomer's command does:

* ``make test``: setting up ``.venv`` (``make install``), the browser packages (``make browser``) and
  the test suite, in the same order as ``make test`` itself;
* ``make book``: ``make install`` and then the demo book (every chapter and the HTML); the build
  driver's own per-chapter timings are read from the clone's ``runs/demo/.build/*.json``.

The phases are timed separately and summed, which is what one ``make test`` / ``make book`` costs
because each phase is a make target that the next one finds done. It writes ``fresh_clone.md`` and
``fresh_clone.csv`` (columns ``command, phase, seconds, target_s, pass, note``) into ``--out``.

Caches outside the clone are not cleared: the package installer's download cache and Debian's
chromium (when already installed) make a warm setup; the header says which. Run it on an otherwise
idle machine: the other benchmark rules apply (no assertions, targets as columns).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import REPO_ROOT, git_commit, machine_info, machine_markdown, markdown_table

#: Targets of issue 17, in seconds (fresh clone, this 2-core machine).
TARGETS = {"make test": 480.0, "make book": 600.0}
STRETCH = {"make book": 360.0}
COLUMNS = ("command", "phase", "seconds", "target_s", "pass", "note")


def _clean_env() -> dict[str, str]:
    """The caller's environment without the variables that would point a clone at another venv."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def _timed(cmd: Sequence[str], cwd: Path, log: Path) -> tuple[float, int]:
    """Run ``cmd`` in ``cwd``, appending its output to ``log``; return (seconds, exit status)."""
    t0 = time.perf_counter()
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        rc = subprocess.call(list(cmd), cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, env=_clean_env())
    return time.perf_counter() - t0, rc


def clone(dest: Path, repo: Path = REPO_ROOT) -> Path:
    """Clone the committed ``HEAD`` of ``repo`` into ``dest`` (what a newcomer gets)."""
    subprocess.run(["git", "clone", "--quiet", str(repo), str(dest)], check=True)
    return dest


def chapter_seconds(clone_dir: Path, profile: str = "demo") -> list[dict[str, Any]]:
    """Per-chapter wall times recorded by the build driver in a clone's run directory."""
    rows = []
    for path in sorted((clone_dir / "runs" / profile / ".build").glob("*.json")):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if "seconds" in info:
            rows.append({"command": "make book", "phase": f"chapter {path.stem}",
                         "seconds": float(info["seconds"]), "target_s": None, "pass": None,
                         "note": "build driver's timing (part of 'book')"})
    return rows


def measure(command: str, workdir: Path, log: Path, repo: Path = REPO_ROOT) -> list[dict[str, Any]]:
    """Time the phases of ``command`` ("make test" or "make book") in a fresh clone under ``workdir``.

    Parameters
    ----------
    command : str
        ``"make test"`` or ``"make book"``.
    workdir : Path
        Scratch folder; the clone goes to ``workdir/<command with a dash>``.
    log : Path
        File that receives every phase's output.
    repo : Path
        Repository to clone (default: this one).

    Returns
    -------
    list of dict
        One row per phase plus a ``total`` row with the target and pass/fail.
    """
    phases = {"make test": ["install", "browser", "test"], "make book": ["install", "book"]}
    if command not in phases:
        raise ValueError(f"unknown command {command!r}; expected one of {sorted(phases)}")
    dest = clone(workdir / command.replace(" ", "-"), repo)
    rows: list[dict[str, Any]] = []
    total, ok = 0.0, True
    for phase in phases[command]:
        seconds, rc = _timed(["make", phase], dest, log)
        total += seconds
        ok = ok and rc == 0
        rows.append({"command": command, "phase": phase, "seconds": seconds, "target_s": None, "pass": None,
                     "note": "" if rc == 0 else f"exit status {rc} (see {log.name})"})
        if rc != 0:
            break
    if command == "make book":
        rows.extend(chapter_seconds(dest))
    target = TARGETS[command]
    note = "" if ok else "FAILED: a phase exited non-zero"
    if command in STRETCH:
        note = (note + "; " if note else "") + f"stretch <= {STRETCH[command]:g} s: " + \
            ("met" if ok and total <= STRETCH[command] else "not met")
    rows.append({"command": command, "phase": "total", "seconds": total, "target_s": target,
                 "pass": bool(ok and total <= target), "note": note})
    return rows


def write(rows: Sequence[dict[str, Any]], out: Path, header: dict[str, Any], argv: Sequence[str]) -> Path:
    """Write ``fresh_clone.csv`` and ``fresh_clone.md`` into ``out``; return the markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "fresh_clone.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k) for k in COLUMNS})
    shown = [{**r, "seconds": round(float(r["seconds"]), 1),
              "pass": "" if r["pass"] is None else ("pass" if r["pass"] else "**FAIL**")} for r in rows]
    md = [f"# Fresh clone to result: `make test` and `make book` ({header['date']})", "",
          f"Command: `python -m benchmarks.fresh_clone {' '.join(argv)}`".rstrip() + "  ",
          f"Commit: `{header['git_commit']}`; installer cache: {header['cache']}; "
          f"chromium before the run: {header['chromium']}.", "",
          "## Machine", "", machine_markdown(header["machine"]), "",
          "## Wall times", "", markdown_table(shown, COLUMNS), ""]
    path = out / "fresh_clone.md"
    path.write_text("\n".join(md))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.fresh_clone``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["test", "book"], help="time one command only")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the clones")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="brainsex-fresh-"))
    workdir.mkdir(parents=True, exist_ok=True)
    header = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_commit": git_commit(),
              "chromium": "installed" if shutil.which("chromium") else "not installed",
              "cache": "warm (not cleared)", "machine": machine_info({"mode": "fresh clone"})}
    commands = ["make test", "make book"] if args.only is None else [f"make {args.only}"]
    rows: list[dict[str, Any]] = []
    log = args.out / "fresh_clone.log"
    args.out.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    try:
        for command in commands:
            print(f"timing '{command}' in a fresh clone under {workdir} ...", flush=True)
            rows.extend(measure(command, workdir, log))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    path = write(rows, args.out, header, argv)
    for r in rows:
        if r["phase"] == "total":
            print(f"{r['command']}: {r['seconds']:.0f} s (target {r['target_s']:g} s) "
                  f"{'pass' if r['pass'] else 'FAIL'}")
    print(f"wrote {path}")
    failed = [r for r in rows if r["note"].startswith(("exit status", "FAILED"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
