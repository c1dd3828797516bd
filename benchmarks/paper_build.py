"""The ``paper`` profile end to end at 1 mm on this machine, with its peak memory (issue 18).

``python -m benchmarks.paper_build`` runs, from the repository root,

    brainsex build --profile paper -p cohorts "[phantom]" -p n_subjects 32 -p epochs 1 -p n_workers 2
                   -p tbm_subjects 0 -p max_scans 1 --no-html

(the paper's grid, widths and batch of 16 on a small phantom cohort -- 32 subjects is about the smallest
whose stratified split leaves the test set the 3 scans that the TIV chapter's bins need; ``--subjects``,
``--max-scans``, ``--profile`` and ``-p KEY VALUE`` change it) while sampling the resident memory of the whole process
tree (the build driver and each chapter's kernel), then measures, each in its own process on the run's
test scans, the seconds per scan of inference (``brainsex.train.predict``) and of saliency maps
(``brainsex.saliency.saliency_maps``), with their peak memory and the batch sizes chosen from the free
memory. Training's seconds per scan come from the run's ``history.tsv``, the micro-batch from its
checkpoint, each chapter's wall time and kernel peak memory from the build's stamps.

It writes ``paper_build_<date>[_<tag>].md`` and ``.json`` to ``--out`` (default ``benchmarks/results``).
The build driver skips chapters whose inputs did not change, so running it again on the same
``--run-dir`` continues a build that stopped; the chapters' seconds then come from their stamps (the
attempt that ran them) and the report adds them up beside the last attempt's wall time.
It takes about an hour on 2 cores and up to ~20 GB of memory: run it alone (under the shared lock).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import (
    REPO_ROOT,
    ensure_brainsex_importable,
    machine_info,
    machine_markdown,
    markdown_table,
)

GB = 2**30


def _probe(kind: str, run_dir: Path, n: int) -> dict[str, Any]:
    """In this (fresh) process: seconds per scan and peak memory of inference or saliency on test scans."""
    import resource

    from brainsex.io import read_table
    from brainsex.memory import choose_batch_size, sfcn_sample_bytes
    from brainsex.train import load_model, predict

    pre = read_table(run_dir / "preprocess" / "preprocessed.tsv")
    split = read_table(run_dir / "train" / "split.tsv")
    table = pre.merge(split[["participant_id", "split"]], on="participant_id")
    table = table[table["split"] == "test"].head(n).reset_index(drop=True)
    model = load_model(run_dir / "train" / "best.pt", device="cpu")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if kind == "eval":
        batch = choose_batch_size(model, "auto", mode="eval", cap=16)
        predict(model, table, device="cpu", progress=False)
    else:
        import nibabel as nib

        from brainsex.saliency import saliency_maps

        batch = choose_batch_size(model, "auto", mode="grad", cap=8)
        saliency_maps(model, [nib.load(p) for p in table["image_pp"]], method="saliency")
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mode = "eval" if kind == "eval" else "grad"
    return {"kind": kind, "n": len(table), "seconds": seconds, "seconds_per_scan": seconds / max(len(table), 1),
            "batch": batch, "peak_rss_gb": peak / GB, "growth_gb": (peak - base) / GB,
            "estimate_gb_per_scan": sfcn_sample_bytes(model.channels, model.in_shape, mode) / GB}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.paper_build", description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="paper")
    p.add_argument("--subjects", type=int, default=32)
    p.add_argument("--max-scans", type=int, default=1, help="scans the validity chapter explains (occlusion of "
                   "116 regions at 1 mm takes ~10 min per scan on 2 cores)")
    p.add_argument("-p", "--param", nargs=2, action="append", metavar=("KEY", "VALUE"), default=[])
    p.add_argument("--run-dir", default=None, help="default: a temporary folder")
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="", help="suffix of the result files (paper_build_<date>_<tag>)")
    p.add_argument("--timeout", type=float, default=None,
                   help="stop the build after this many seconds and report the chapters that finished")
    p.add_argument("--report-only", action="store_true", help="do not build; report on --run-dir's last build")
    p.add_argument("--probe", choices=("eval", "saliency"), help=argparse.SUPPRESS)
    p.add_argument("--probe-n", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    ensure_brainsex_importable()
    if args.probe:
        print(json.dumps(_probe(args.probe, Path(args.run_dir), args.probe_n)))
        return 0

    from brainsex.memory import RssWatch, memory_limit_bytes

    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="brainsex-paper-"))
    if args.report_only:
        result = json.loads((run_dir / "build_result.json").read_text())
        result["tag"] = args.tag or result.get("tag", "")
        report(result, run_dir, Path(args.out))
        return 0 if result["exit_code"] == 0 else 1
    params = [("cohorts", "[phantom]"), ("n_subjects", str(args.subjects)), ("epochs", "1"), ("n_workers", "2"),
              ("tbm_subjects", "0"), ("max_scans", str(args.max_scans)), *[tuple(kv) for kv in args.param]]
    cmd = [sys.executable, "-m", "brainsex.cli", "build", "--profile", args.profile, "--run-dir", str(run_dir),
           "--no-html", "--root", str(REPO_ROOT)]
    for k, v in params:
        cmd += ["-p", k, v]
    print("running:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    timed_out = False
    with RssWatch(interval=0.5) as watch:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                stdout, stderr = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    (run_dir / "build_stdout.txt").write_text(stdout + "\n--- stderr ---\n" + stderr)
    result: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "tag": args.tag, "command": " ".join(cmd[2:]), "run_dir": str(run_dir),
        "exit_code": proc.returncode, "timed_out_after_s": args.timeout if timed_out else None,
        "wall_s": wall, "peak_rss_gb": watch.peak_bytes / GB,
        "min_available_gb": (watch.min_available_bytes or 0) / GB, "memory_limit_gb": memory_limit_bytes() / GB,
        "error": [ln for ln in stderr.strip().splitlines() if "IPKernelApp" not in ln][-40:] if proc.returncode else [],
    }
    (run_dir / "build_result.json").write_text(json.dumps(result, indent=2))
    report(result, run_dir, Path(args.out))
    return 0 if proc.returncode == 0 else 1


def report(result: dict[str, Any], run_dir: Path, out: Path) -> None:
    """Add chapter timings, training speed, the memory plan and the inference/saliency probes; write."""
    chapters = []
    for stamp in sorted((run_dir / ".build").glob("*.json")):
        info = json.loads(stamp.read_text())
        chapters.append({"chapter": stamp.stem, "seconds": info.get("seconds"),
                         "kernel_peak_gb": (info.get("peak_rss_bytes") or 0) / GB})
    result["chapters"] = chapters
    hist = run_dir / "train" / "history.tsv"
    if hist.is_file():
        import pandas as pd
        import torch

        h = pd.read_csv(hist, sep="\t")
        result["train_seconds_per_scan"] = float(1.0 / h["samples_per_s"].median())
        mem = torch.load(run_dir / "train" / "last.pt", weights_only=True, map_location="cpu").get("memory") or {}
        result["memory_plan"] = mem
        for kind in ("eval", "saliency"):
            probe = subprocess.run([sys.executable, "-m", "benchmarks.paper_build", "--probe", kind, "--run-dir",
                                    str(run_dir)], cwd=REPO_ROOT, capture_output=True, text=True)
            try:
                result[kind] = json.loads(probe.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                result[kind] = {"error": probe.stderr.strip().splitlines()[-5:]}
    write(result, out)


def write(result: dict[str, Any], out: Path) -> None:
    """``paper_build_<date>.json`` and ``.md``."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"paper_build_{result['date']}{'_' + result['tag'] if result.get('tag') else ''}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    plan = result.get("memory_plan") or {}
    ev, sal = result.get("eval") or {}, result.get("saliency") or {}
    rows = [
        {"quantity": "build exit code", "value": result["exit_code"]},
        {"quantity": "stopped after (s)", "value": result.get("timed_out_after_s") or "ran to the end"},
        {"quantity": "wall time of the build (s)", "value": f"{result['wall_s']:.0f}"},
        {"quantity": "sum of the chapters' times (s; all attempts on this run folder)",
         "value": f"{sum(c['seconds'] or 0 for c in result.get('chapters', [])):.0f}"},
        {"quantity": "peak resident memory, build + kernels (GB)", "value": f"{result['peak_rss_gb']:.1f}"},
        {"quantity": "lowest available memory during the build (GB)", "value": f"{result['min_available_gb']:.1f}"},
        {"quantity": "training: seconds per scan (1 mm, full SFCN)", "value": _f(result.get("train_seconds_per_scan"))},
        {"quantity": "training: batch / micro-batch / accumulation steps",
         "value": f"{plan.get('batch_size')} / {plan.get('micro_batch')} / "
                  f"{-(-int(plan.get('batch_size') or 0) // max(int(plan.get('micro_batch') or 1), 1))}"},
        {"quantity": "training: estimated GB per scan / planned budget (GB)",
         "value": f"{(plan.get('sample_bytes') or 0) / GB:.1f} / {(plan.get('budget_bytes') or 0) / GB:.1f}"},
        {"quantity": "evaluation: seconds per scan (batch chosen)", "value": f"{_f(ev.get('seconds_per_scan'))} "
                                                                            f"({ev.get('batch')})"},
        {"quantity": "evaluation: peak GB (estimate per scan)", "value": f"{_f(ev.get('peak_rss_gb'))} "
                                                                        f"({_f(ev.get('estimate_gb_per_scan'))})"},
        {"quantity": "saliency: seconds per scan (batch chosen)", "value": f"{_f(sal.get('seconds_per_scan'))} "
                                                                          f"({sal.get('batch')})"},
        {"quantity": "saliency: peak GB (estimate per scan)", "value": f"{_f(sal.get('peak_rss_gb'))} "
                                                                      f"({_f(sal.get('estimate_gb_per_scan'))})"},
    ]
    text = [f"# Paper profile at 1 mm on this machine ({result['date']})", "",
            f"`{result['command']}`", "", machine_markdown(machine_info()), "",
            markdown_table(rows, ["quantity", "value"]), "", "## Chapters", "",
            markdown_table([{"chapter": c["chapter"], "seconds": f"{c['seconds']:.0f}" if c["seconds"] else "",
                             "kernel peak GB": f"{c['kernel_peak_gb']:.1f}"} for c in result["chapters"]],
                           ["chapter", "seconds", "kernel peak GB"])]
    if result["error"]:
        text += ["", "## The build failed", "", "```", *result["error"], "```"]
    stem.with_suffix(".md").write_text("\n".join(text) + "\n")
    print(stem.with_suffix(".md").read_text())


def _f(x: Any) -> str:
    return f"{x:.2f}" if isinstance(x, int | float) else "n/a"


if __name__ == "__main__":
    sys.exit(main())
