"""The benchmark suite behind ``python -m benchmarks``: one run, every variant side by side.

Sections (issue 8):

1. ``book`` -- wall time per chapter of the last ``brainsex build`` (read from ``runs/demo/.build``).
2. ``preprocess`` -- seconds per subject (phantom -> template grid), one worker vs two.
3. ``pipeline`` -- samples/s of the training input (the train module's in-memory loader, ``VolumeStore``
   + ``ScanDataset``, with the batched rotation of the training loop, ``rotate_batch``) against the
   paper code's design (decode every ``.nii.gz`` every epoch with nibabel and rotate one scan at a time,
   ``num_workers=0``), and against the training step.
4. ``train`` -- training-step samples/s of SFCN at the demo and paper widths, naive vs optimised
   (memory layout, threads; on CUDA also bf16 autocast and ``torch.compile``).
5. ``saliency`` -- Captum saliency samples/s, batched vs one scan at a time.
6. peak memory of each case (resident memory of the process tree, sampled; CUDA's peak on a GPU).

Each section except ``book`` runs in its own Python process (so thread settings, ITK's once-per-process
thread count and the memory high-water mark of one section do not leak into the next; ``--quick`` runs
them all in one process to save the imports), in a temporary
folder that holds a tiny phantom made for the run. Every number is a median over ``repeats`` timings
taken in this run; ratios compare variants measured minutes apart on the same machine, never against a
number from another day.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._common import (
    REPO_ROOT,
    PeakMemory,
    Stopwatch,
    ensure_brainsex_importable,
    fmt,
    machine_info,
    machine_markdown,
    markdown_table,
    maxrss_mb,
    n_cores,
    pass_fail,
    summarise,
)

#: Columns of ``results.csv`` (one row per measured case or derived ratio).
COLUMNS = ("section", "case", "variant", "grid_mm", "shape", "channels", "batch", "threads", "n", "repeats",
           "value", "unit", "min", "max", "ratio", "ratio_to", "target", "pass", "peak_rss_mb", "rss_growth_mb",
           "peak_cuda_mb",
           "note")

SECTIONS = ("book", "preprocess", "pipeline", "train", "saliency")
CHILD_SECTIONS = SECTIONS[1:]

#: SFCN widths: the demo profile's and the paper's (section 2.3).
DEMO_CHANNELS = (8, 16, 32, 32, 32, 16)
PAPER_CHANNELS = (32, 64, 128, 256, 256, 64)

# Targets of issue 8.
BOOK_TARGET_S, BOOK_STRETCH_S = 600.0, 300.0
LOADER_VS_TRAIN_TARGET = 3.0
LOADER_VS_PAPER_TARGET = 20.0


# ---------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class PreprocessCase:
    voxel: float
    n_subjects: int
    workers: tuple[int, ...]
    repeats: int


@dataclass(frozen=True)
class PipelineCase:
    voxel: float
    n_volumes: int
    batch: int
    epochs: int  # the first one (cache fill) plus the repeats


@dataclass(frozen=True)
class TrainCase:
    model: str
    channels: tuple[int, ...]
    voxel: float
    batch: int
    threads: tuple[int, ...]
    layouts: tuple[str, ...]
    repeats: int
    steps: int = 1


@dataclass(frozen=True)
class SaliencyCase:
    model: str
    channels: tuple[int, ...]
    voxel: float
    n: int
    batch: int
    repeats: int


@dataclass(frozen=True)
class Plan:
    mode: str
    repeats: int
    cores: int
    preprocess: tuple[PreprocessCase, ...]
    pipeline: tuple[PipelineCase, ...]
    train: tuple[TrainCase, ...]
    saliency: tuple[SaliencyCase, ...]


def make_plan(mode: str = "default", repeats: int | None = None, cores: int | None = None) -> Plan:
    """What each mode measures.

    ``quick`` (the test, about a minute): the 8 mm grid only, one phantom subject, two repeats.
    ``default``: the demo grid (4 mm) for everything, one subject preprocessed at 1 mm, the paper's
    widths at the demo grid. ``full``: adds the 1 mm input pipeline and the paper model at 1 mm.
    """
    if mode not in ("quick", "default", "full"):
        raise ValueError(f"mode must be 'quick', 'default' or 'full', got {mode!r}")
    cores = int(cores or n_cores())
    r = int(repeats) if repeats else (2 if mode == "quick" else 3)
    if r < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    threads = tuple(sorted({1, min(2, cores), cores}))
    layouts = ("contiguous", "channels_last_3d")
    workers = tuple(sorted({1, min(2, cores)}))
    if mode == "quick":
        return Plan(mode, r, cores,
                    preprocess=(PreprocessCase(8.0, 1, (1,), 1),),
                    pipeline=(PipelineCase(8.0, 16, 8, 1 + r),),
                    train=(TrainCase("demo", DEMO_CHANNELS, 8.0, 8, threads, layouts, r),
                           TrainCase("paper", PAPER_CHANNELS, 8.0, 4, threads, layouts, r)),
                    saliency=(SaliencyCase("demo", DEMO_CHANNELS, 8.0, 4, 4, r),))
    pre = (PreprocessCase(4.0, 4 if mode == "default" else 8, workers, min(r, 2)),
           PreprocessCase(1.0, 1 if mode == "default" else 2, (1,), 1))
    pipe = (PipelineCase(4.0, 32, 16, 1 + r),)
    train = (TrainCase("demo", DEMO_CHANNELS, 4.0, 16, threads, layouts, r),
             TrainCase("paper", PAPER_CHANNELS, 4.0, 16, threads, layouts, r))
    sal = (SaliencyCase("demo", DEMO_CHANNELS, 4.0, 16, 8, r), SaliencyCase("paper", PAPER_CHANNELS, 4.0, 8, 8, r))
    if mode == "full":
        pipe += (PipelineCase(1.0, 16, 16, 1 + min(r, 2)),)
        train += (TrainCase("paper", PAPER_CHANNELS, 1.0, 2, (cores,), layouts, min(r, 2)),)
    return Plan(mode, r, cores, pre, pipe, train, sal)


# ----------------------------------------------------------------------------------------------- rows
def row(section: str, case: str, **kw: Any) -> dict[str, Any]:
    """A result row with every column of :data:`COLUMNS` (missing ones empty)."""
    unknown = set(kw) - set(COLUMNS)
    if unknown:
        raise KeyError(f"unknown result columns {sorted(unknown)}")
    out: dict[str, Any] = dict.fromkeys(COLUMNS)
    out.update(section=section, case=case, **kw)
    return out


def _grid(voxel: float) -> tuple[int, int, int]:
    from brainsex.templates import target_grid

    return tuple(int(s) for s in target_grid(voxel)[0])  # type: ignore[return-value]


def _shape_txt(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def _ch_txt(channels: Sequence[int]) -> str:
    return "[" + ",".join(str(int(c)) for c in channels) + "]"


# ----------------------------------------------------------------------------------------------- book
def book_rows(run_dir: str | os.PathLike, root: str | os.PathLike = REPO_ROOT) -> list[dict[str, Any]]:
    """Per-chapter wall time of the last ``brainsex build`` from ``<run_dir>/.build/<chapter>.json``.

    Chapters are listed in the book's order (``_toc.yml``); a chapter without a timing file reads
    "not run". The book is never run here. The timings are from the build itself (its date is given in
    the ``note``), so unlike every other row they were not measured in this run.
    """
    import datetime

    from brainsex.run import RunDir

    run = RunDir(run_dir)
    stamps = run.stamps
    try:
        from brainsex.book import toc_notebooks

        chapters = [p.stem for p in toc_notebooks(root)]
    except Exception:  # a broken toc must not stop the benchmarks; fall back to the stamps present
        chapters = sorted(p.stem for p in stamps.glob(run.stamp("*").name)) if stamps.is_dir() else []
    rows = []
    seconds = []
    for stem in chapters:
        stamp = run.stamp(stem)
        if not stamp.is_file():
            rows.append(row("book", stem, unit="s", note="not run"))
            continue
        try:
            sec = float(json.loads(stamp.read_text())["seconds"])
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            rows.append(row("book", stem, unit="s", note=f"unreadable timing file {stamp}"))
            continue
        when = datetime.datetime.fromtimestamp(stamp.stat().st_mtime).isoformat(timespec="minutes")
        seconds.append(sec)
        rows.append(row("book", stem, value=sec, unit="s", n=1, note=f"chapter run {when}"))
    complete = bool(chapters) and len(seconds) == len(chapters)
    total = sum(seconds) if seconds else math.nan
    if not chapters or not seconds:
        note = f"not run (no timings in {stamps})"
    elif complete:
        note = f"sum of {len(chapters)} chapters (build driver's timings; HTML build not included)"
    else:
        note = f"incomplete: {len(seconds)} of {len(chapters)} chapters have timings"
    rows.append(row("book", "total", value=total, unit="s", n=len(seconds),
                    target=f"<= {BOOK_TARGET_S:.0f} s (stretch <= {BOOK_STRETCH_S:.0f} s)",
                    **{"pass": pass_fail(total, BOOK_TARGET_S, higher_is_better=False) if complete else None},
                    note=note))
    return rows


# ----------------------------------------------------------------------------------------- phantom data
def phantom_participants(workdir: Path, voxel: float, n: int, seed: int = 0):
    """A tiny phantom (``brainsex.synthetic.make_cohort``) with its ``image`` column, made once per grid."""
    from brainsex.synthetic import make_cohort

    root = workdir / f"phantom-{voxel:g}mm"
    table = make_cohort(root, n=n, voxel_size=voxel, seed=seed, progress=False)
    table = table.copy()
    table["mask"] = ""  # make_cohort returns the image paths it wrote; the benchmark skull-strips
    return table


def volume_bank(workdir: Path, voxel: float, n: int) -> list[Path]:
    """``n`` z-scored volumes on the ``voxel`` mm template grid, as ``.nii.gz`` files.

    Copies of the phantom subjects preprocessed by the ``preprocess`` section when there are any (real
    content, so decoding costs what it costs in the book); otherwise the template brain, z-scored inside
    its mask, with a little noise per copy.
    """
    import nibabel as nib
    import numpy as np

    bank = workdir / f"bank-{voxel:g}mm"
    have = sorted(bank.glob("vol-*.nii.gz"))
    if len(have) >= n:
        return have[:n]
    bank.mkdir(parents=True, exist_ok=True)
    sources = sorted((workdir / f"preprocess-{voxel:g}mm").rglob("*desc-preproc_T1w.nii.gz"))
    out = []
    if sources:
        for i in range(n):
            dst = bank / f"vol-{i:03d}.nii.gz"
            shutil.copyfile(sources[i % len(sources)], dst)
            out.append(dst)
        return out
    from brainsex.preprocess import Reference

    ref = Reference.load(voxel)
    data = np.asarray(ref.template.dataobj, dtype=np.float32)
    mask = np.asarray(ref.mask.dataobj) > 0
    rng = np.random.default_rng(0)
    for i in range(n):
        vol = data + rng.normal(0, 0.05, data.shape).astype(np.float32) * mask
        vol = np.where(mask, (vol - vol[mask].mean()) / vol[mask].std(), 0).astype(np.float32)
        dst = bank / f"vol-{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(vol, ref.template.affine), dst)
        out.append(dst)
    return out


def _load_stack(paths: Sequence[Path]):
    import nibabel as nib
    import numpy as np

    return np.stack([np.asarray(nib.load(p).dataobj, dtype=np.float32) for p in paths])


# ------------------------------------------------------------------------------------------ preprocess
def run_preprocess(plan: Plan, workdir: Path) -> list[dict[str, Any]]:
    """Seconds per subject of :func:`brainsex.preprocess.preprocess_cohort` (phantom, deepbet, ANTs)."""
    from brainsex.io import read_table
    from brainsex.preprocess import preprocess_cohort
    from brainsex.run import PreprocessDir

    rows = []
    for pc in plan.preprocess:
        shape = _grid(pc.voxel)
        participants = phantom_participants(workdir, pc.voxel, pc.n_subjects)
        base = None
        for workers in pc.workers:
            per_subject, throughput, n_failed = [], [], 0
            with PeakMemory() as mem:
                for rep in range(pc.repeats):
                    out = workdir / f"preprocess-{pc.voxel:g}mm" / f"w{workers}-r{rep}"
                    with Stopwatch() as sw:
                        preprocess_cohort(participants, out, voxel_size=pc.voxel, n_workers=workers, resume=False,
                                          progress=False)
                    throughput.append(sw.seconds / len(participants))
                    qc = read_table(PreprocessDir(out).qc)
                    ok = qc["status"].astype(str) == "ok"
                    n_failed += int((~ok).sum())
                    per_subject += [float(v) for v in qc.loc[ok, "t_total_s"]]
            s = summarise(throughput)
            note = f"{n_failed} subject-run(s) failed" if n_failed else ""
            common = dict(grid_mm=pc.voxel, shape=_shape_txt(shape), threads=1, n=len(participants),
                          repeats=pc.repeats, peak_rss_mb=mem.peak_rss_mb, rss_growth_mb=mem.growth_rss_mb)
            base = base or s["median"]
            rows.append(row("preprocess", "wall time / subject", variant=f"{workers} worker(s)",
                            value=s["median"], unit="s/subject", min=s["min"], max=s["max"],
                            ratio=base / s["median"] if s["median"] else math.nan,
                            ratio_to="speed-up vs 1 worker", note=note or "deepbet + ANTs rigid + eTIV", **common))
            if workers == 1:
                p = summarise(per_subject)
                rows.append(row("preprocess", "per-subject time (qc t_total_s)", variant="1 worker",
                                value=p["median"], unit="s/subject", min=p["min"], max=p["max"],
                                note="median over subjects x repeats", **{**common, "peak_rss_mb": None, "rss_growth_mb": None}))
    return rows


# -------------------------------------------------------------------------------------------- pipeline
#: Case names of the pipeline section (``derived_rows`` divides the first by the training step).
BOOK_LOADER = "book loader (in-memory cache, batched rotation)"
BOOK_DELIVERY = "book loader (in-memory cache, no augmentation)"
PAPER_LOADER = "paper-code design (nibabel decode every epoch, per-scan rotation)"
PAPER_DELIVERY = "paper-code design (nibabel decode every epoch, no augmentation)"


def _derive_seed(*values: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(1)[0])


class PaperCodeDataset:
    """The paper's public code's input design: every item re-reads and re-decodes its ``.nii.gz``.

    ``nibabel.load(path).get_fdata()`` (float64) on each access, then, with ``rotate=True``, the
    paper's rotation (half of the scans, up to 15 degrees about each axis) applied to this one scan, in
    the main process (``num_workers=0``). The rotation is the book's own function
    (:func:`brainsex.train.rotate_batch` on a batch of one, angles seeded per epoch and item), so the
    comparison with the book's loader measures the design -- decoding every epoch, one scan at a time --
    not two implementations.
    """

    def __init__(self, paths: Sequence[Path], labels, rotate: bool = False, seed: int = 0,
                 rotate_prob: float = 0.5, rotate_deg: float = 15.0) -> None:
        self.paths = [str(p) for p in paths]
        self.labels = labels
        self.rotate = bool(rotate)
        self.seed = int(seed)
        self.rotate_prob, self.rotate_deg = float(rotate_prob), float(rotate_deg)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import nibabel as nib
        import torch

        from brainsex.train import random_rotation_angles, rotate_batch

        image = torch.from_numpy(nib.load(self.paths[i]).get_fdata()).float()[None]
        if self.rotate:
            gen = torch.Generator().manual_seed(_derive_seed(self.seed, 2, self.epoch, i))
            angles = random_rotation_angles(1, self.rotate_deg, self.rotate_prob, generator=gen)
            image = rotate_batch(image[None], angles)[0]
        return {"image": image, "y": torch.tensor(float(self.labels[i])), "index": i}


def _epoch_times(ds, batch_size: int, epochs: int, batch_fn=None) -> list[float]:
    """Seconds per full pass over a shuffled ``DataLoader(ds, num_workers=0)``, one per epoch.

    ``batch_fn(images, epoch, step)``, if given, is applied to each collated batch of images (the
    training loop's batched augmentation).
    """
    import torch
    from torch.utils.data import DataLoader

    times = []
    for epoch in range(epochs):
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)
        loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=0,
                            generator=torch.Generator().manual_seed(epoch))
        with Stopwatch() as sw:
            for step, batch in enumerate(loader):
                if batch_fn is not None:
                    batch["image"] = batch_fn(batch["image"], epoch, step)
        times.append(sw.seconds)
    return times


def run_pipeline(plan: Plan, workdir: Path) -> list[dict[str, Any]]:
    """Loader samples/s: the book's (cache + batched rotation, as in training) vs the paper code's design."""
    import numpy as np
    import torch

    from brainsex.train import ScanDataset, TrainConfig, VolumeStore, random_rotation_angles, rotate_batch

    torch.set_num_threads(plan.cores)
    cfg = TrainConfig()  # the paper's rotation: prob 0.5, 15 degrees
    rows = []
    for pc in plan.pipeline:
        shape = _grid(pc.voxel)
        paths = volume_bank(workdir, pc.voxel, pc.n_volumes)
        labels = (np.arange(pc.n_volumes) % 2).astype(np.float32)
        common = dict(grid_mm=pc.voxel, shape=_shape_txt(shape), batch=pc.batch, threads=plan.cores,
                      n=pc.n_volumes, repeats=pc.epochs - 1)

        def batched_rotation(images, epoch: int, step: int):
            """What ``brainsex.train`` does to each training batch (on the CPU here)."""
            gen = torch.Generator().manual_seed(_derive_seed(cfg.seed, 2, epoch, 0, step))
            return rotate_batch(images, random_rotation_angles(len(images), cfg.rotate_deg, cfg.rotate_prob, gen))

        results: dict[str, dict[str, Any]] = {}
        # The book's loader: decode once into memory (MONAI CacheDataset); the training loop rotates batches
        # with the training step's threads, so it is also timed with one thread (the loader / training-step
        # ratio compares the two at the same thread count).
        with PeakMemory() as mem:
            with Stopwatch() as fill:
                store = VolumeStore([str(p) for p in paths], shape, cache=True)
            ds = ScanDataset(store, range(pc.n_volumes), labels)
            for name, batch_fn in ((BOOK_LOADER, batched_rotation), (BOOK_DELIVERY, None)):
                times = _epoch_times(ds, pc.batch, pc.epochs, batch_fn)
                results[name] = {"first": fill.seconds + times[0], "after": [pc.n_volumes / t for t in times[1:]]}
            if plan.cores > 1:
                torch.set_num_threads(1)
                times = _epoch_times(ds, pc.batch, pc.epochs, batched_rotation)
                one_thread = summarise([pc.n_volumes / t for t in times[1:]])
                torch.set_num_threads(plan.cores)
        cache_mem = (mem.peak_rss_mb, mem.growth_rss_mb)
        # The paper code's design: decode every .nii.gz on every access, rotate each scan, no workers, no cache.
        with PeakMemory() as mem:
            for name, rotate in ((PAPER_LOADER, True), (PAPER_DELIVERY, False)):
                times = _epoch_times(PaperCodeDataset(paths, labels, rotate=rotate, seed=0), pc.batch, pc.epochs)
                results[name] = {"first": times[0], "after": [pc.n_volumes / t for t in times[1:]]}
        paper_mem = (mem.peak_rss_mb, mem.growth_rss_mb)

        notes = {BOOK_LOADER: "train.VolumeStore (MONAI CacheDataset) + ScanDataset, num_workers=0; "
                              "train.rotate_batch on each batch (MONAI AffineTransform), as the training loop does",
                 BOOK_DELIVERY: "delivery only",
                 PAPER_LOADER: "get_fdata per item, train.rotate_batch on each scan alone, num_workers=0, no cache",
                 PAPER_DELIVERY: "delivery only"}
        refs = {BOOK_LOADER: (PAPER_LOADER, "with rotation"), BOOK_DELIVERY: (PAPER_DELIVERY, "delivery only")}
        med = {k: summarise(v["after"])["median"] for k, v in results.items()}
        for key in (BOOK_LOADER, BOOK_DELIVERY, PAPER_LOADER, PAPER_DELIVERY):
            s = summarise(results[key]["after"])
            ref, what = refs.get(key, (None, None))
            ratio = med[key] / med[ref] if ref and med[ref] else None
            target = f">= {LOADER_VS_PAPER_TARGET:g}x paper-code design ({what})" if ref else None
            mem_ = cache_mem if key.startswith("book") else paper_mem
            rows.append(row("pipeline", key, variant="epochs after the first", value=s["median"],
                            unit="samples/s", min=s["min"], max=s["max"], ratio=ratio,
                            ratio_to=f"x {ref}" if ref else None, target=target,
                            **{"pass": pass_fail(ratio, LOADER_VS_PAPER_TARGET) if target else None},
                            peak_rss_mb=mem_[0], rss_growth_mb=mem_[1], note=notes[key], **common))
            if key == BOOK_LOADER and plan.cores > 1:
                rows.append(row("pipeline", key, variant="epochs after the first, 1 thread", value=one_thread["median"],
                                unit="samples/s", min=one_thread["min"], max=one_thread["max"],
                                note="the same with torch.set_num_threads(1), for the 1-thread training step",
                                **{**common, "threads": 1}))
            rows.append(row("pipeline", key, variant="first epoch",
                            value=pc.n_volumes / results[key]["first"], unit="samples/s",
                            note="includes decoding into the cache" if key.startswith("book") else "",
                            **{**common, "repeats": 1}))
    return rows


# ----------------------------------------------------------------------------------------------- train
def _train_variants(case: TrainCase, cuda: bool) -> list[dict[str, Any]]:
    variants = [dict(device="cpu", layout=lay, threads=t, amp=False, compile=False)
                for t in case.threads for lay in case.layouts]
    if cuda:
        variants += [dict(device="cuda", layout="channels_last_3d", threads=case.threads[-1], amp=amp, compile=comp)
                     for amp, comp in ((False, False), (True, False), (True, True))]
    return variants


def _variant_name(v: dict[str, Any]) -> str:
    parts = [v["device"], v["layout"], f"{v['threads']} thread{'s' if v['threads'] > 1 else ''}"
             if v["device"] == "cpu" else ("bf16 autocast" if v["amp"] else "fp32")]
    if v["compile"]:
        parts.append("torch.compile")
    return ", ".join(parts)


def train_step_rate(channels: Sequence[int], shape: Sequence[int], x_cpu, device: str = "cpu",
                    layout: str = "channels_last_3d", threads: int | None = None, amp: bool = False,
                    compile: bool = False, repeats: int = 3, steps: int = 1, warmup: int = 1) -> dict[str, Any]:
    """Seconds per training step (forward, BCE loss, backward, Adam) of SFCN on one fixed batch.

    Returns the per-step times of ``repeats`` timings of ``steps`` steps each, after ``warmup`` steps,
    and the peak memory.
    """
    import contextlib

    import torch
    from torch import nn

    from brainsex.model import SFCN

    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    fmt_ = torch.channels_last_3d if layout == "channels_last_3d" else torch.contiguous_format
    cuda = device.startswith("cuda")
    with PeakMemory(cuda=cuda) as mem:
        model = SFCN(channels=channels, in_shape=shape).to(device=device, memory_format=fmt_).train()
        step_model = torch.compile(model) if compile else model
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        x = x_cpu.to(device).contiguous(memory_format=fmt_)
        y = (torch.arange(x.shape[0], device=device) % 2).float()
        loss_fn = nn.BCEWithLogitsLoss()
        ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if (amp and cuda) else contextlib.nullcontext

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with ctx():
                logits = step_model(x)
            loss = loss_fn(logits.float(), y)
            loss.backward()
            opt.step()

        sync = torch.cuda.synchronize if cuda else None
        for _ in range(warmup):
            step()
        times = []
        for _ in range(repeats):
            with Stopwatch(sync) as sw:
                for _ in range(steps):
                    step()
            times.append(sw.seconds / steps)
    return {"times": times, "peak_rss_mb": mem.peak_rss_mb, "rss_growth_mb": mem.growth_rss_mb,
            "peak_cuda_mb": mem.peak_cuda_mb}


def run_train(plan: Plan, workdir: Path) -> list[dict[str, Any]]:
    """Training-step samples/s, naive (contiguous, 1 thread) vs optimised variants, same batch."""
    import torch

    cuda = torch.cuda.is_available()
    rows = []
    for case in plan.train:
        shape = _grid(case.voxel)
        vols = _load_stack(volume_bank(workdir, case.voxel, min(case.batch, 8)))
        idx = [i % len(vols) for i in range(case.batch)]
        x = torch.from_numpy(vols[idx])[:, None]
        base = None
        for i, v in enumerate(_train_variants(case, cuda)):
            warm = 3 if v["device"] == "cuda" else 1
            res = train_step_rate(case.channels, shape, x, device=v["device"], layout=v["layout"],
                                  threads=v["threads"], amp=v["amp"], compile=v["compile"], repeats=case.repeats,
                                  steps=case.steps if v["device"] == "cpu" else max(case.steps, 5), warmup=warm)
            rates = [case.batch / t for t in res["times"]]
            s = summarise(rates)
            if base is None:
                base = s["median"]
            rows.append(row("train", f"{case.model} model", variant=_variant_name(v), grid_mm=case.voxel,
                            shape=_shape_txt(shape), channels=_ch_txt(case.channels), batch=case.batch,
                            threads=v["threads"], n=case.batch, repeats=case.repeats, value=s["median"],
                            unit="samples/s", min=s["min"], max=s["max"], ratio=s["median"] / base,
                            ratio_to="x naive (cpu, contiguous, 1 thread)", peak_rss_mb=res["peak_rss_mb"],
                            rss_growth_mb=res["rss_growth_mb"],
                            peak_cuda_mb=res["peak_cuda_mb"], note="naive baseline" if i == 0 else None))
    return rows


# -------------------------------------------------------------------------------------------- saliency
def run_saliency(plan: Plan, workdir: Path) -> list[dict[str, Any]]:
    """Captum saliency (``brainsex.saliency.saliency_maps``) samples/s, batched vs one scan at a time."""
    import torch

    from brainsex.model import SFCN
    from brainsex.saliency import saliency_maps

    torch.set_num_threads(plan.cores)
    rows = []
    for case in plan.saliency:
        shape = _grid(case.voxel)
        vols = _load_stack(volume_bank(workdir, case.voxel, case.n))
        torch.manual_seed(0)
        model = SFCN(channels=case.channels, in_shape=shape).eval()
        saliency_maps(model, vols[:1], batch_size=1)  # warm-up
        base = None
        for batch in (1, case.batch):
            times = []
            with PeakMemory() as mem:
                for _ in range(case.repeats):
                    with Stopwatch() as sw:
                        saliency_maps(model, vols, batch_size=batch)
                    times.append(sw.seconds)
            s = summarise([case.n / t for t in times])
            base = base or s["median"]
            rows.append(row("saliency", f"{case.model} model", variant="one by one" if batch == 1 else f"batch {batch}",
                            grid_mm=case.voxel, shape=_shape_txt(shape), channels=_ch_txt(case.channels),
                            batch=batch, threads=plan.cores, n=case.n, repeats=case.repeats, value=s["median"],
                            unit="samples/s", min=s["min"], max=s["max"], ratio=s["median"] / base,
                            ratio_to="x one by one", peak_rss_mb=mem.peak_rss_mb,
                            rss_growth_mb=mem.growth_rss_mb, note="captum Saliency, abs"))
    return rows


RUNNERS = {"preprocess": run_preprocess, "pipeline": run_pipeline, "train": run_train, "saliency": run_saliency}


# ------------------------------------------------------------------------------------------- derived
def derived_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Loader throughput divided by the training step's, per grid and model width (target >= 3x).

    The training rate is the fastest variant measured for that model and grid, so the comparison is
    against the step the loader would have to keep up with; the loader's rate is the one measured with
    that variant's thread count when there is one (the rotation runs in the training loop, with the
    step's threads).
    """
    out = []
    loaders = [r for r in rows if r["section"] == "pipeline" and r["case"] == BOOK_LOADER
               and str(r["variant"]).startswith("epochs after the first")]
    for grid in sorted({r["grid_mm"] for r in loaders}):
        at_grid = [r for r in loaders if r["grid_mm"] == grid]
        steps = [r for r in rows if r["section"] == "train" and r["grid_mm"] == grid and _finite(r["value"])]
        for model in sorted({r["case"] for r in steps}):
            best = max((r for r in steps if r["case"] == model), key=lambda r: r["value"])
            same = [r for r in at_grid if r["threads"] == best["threads"]]
            lr = same[0] if same else next((r for r in at_grid if r["variant"] == "epochs after the first"), at_grid[0])
            ratio = lr["value"] / best["value"] if _finite(lr["value"]) else math.nan
            out.append(row("pipeline", f"loader / training step ({model})", variant=best["variant"],
                           grid_mm=lr["grid_mm"], shape=lr["shape"], channels=best["channels"], batch=best["batch"],
                           value=ratio, unit="x", ratio=ratio,
                           ratio_to=f"loader {fmt(lr['value'])} / step {fmt(best['value'])} samples/s",
                           target=f">= {LOADER_VS_TRAIN_TARGET:g}x training step",
                           **{"pass": pass_fail(ratio, LOADER_VS_TRAIN_TARGET)},
                           note="fastest training variant of this run"))
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# -------------------------------------------------------------------------------------------- output
_SECTION_TITLES = {
    "book": "1. `make book` (demo profile): wall time per chapter",
    "preprocess": "2. Preprocessing: seconds per subject",
    "pipeline": "3. Input pipeline: loader samples/s",
    "train": "4. Training step: samples/s",
    "saliency": "5. Saliency: samples/s",
    "memory": "6. Peak memory",
}

_HEADERS = {"grid_mm": "grid (mm)", "peak_rss_mb": "peak RSS (MiB)", "rss_growth_mb": "RSS growth (MiB)", "peak_cuda_mb": "peak CUDA (MiB)",
            "ratio_to": "ratio is", "value": "median"}


def _present(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[str]:
    return [c for c in columns if any(r.get(c) not in (None, "") and not (isinstance(r.get(c), float)
                                                                         and math.isnan(r[c])) for r in rows)]


def results_markdown(rows: Sequence[dict[str, Any]], machine: dict[str, Any], command: str, plan: Plan,
                     seconds: float, failures: dict[str, str]) -> str:
    """The Markdown report: machine header, targets, one table per section."""
    lines = [f"# Benchmarks ({plan.mode} mode), {machine['date']}", "",
             f"Command: `{command}`  ", f"Run time: {seconds:.0f} s. Every number below is a median over "
             f"the stated repeats measured in this run (except the book's chapter times, which are the build "
             f"driver's); ratios compare variants measured in this same run.", "",
             "## Machine", "", machine_markdown(machine), ""]
    targets = [r for r in rows if r.get("target")]
    if targets:
        lines += ["## Targets (issue 8)", "",
                  markdown_table(targets, ["section", "case", "variant", "grid_mm", "value", "unit", "ratio", "target",
                                           "pass", "note"], _HEADERS), ""]
    if failures:
        lines += ["## Sections that failed", ""] + [f"- **{k}**: {v}" for k, v in failures.items()] + [""]
    cols = [c for c in COLUMNS if c != "section"]
    for section, title in _SECTION_TITLES.items():
        sec_rows = [r for r in rows if r["section"] == section]
        if section == "memory":
            mem_rows = [r for r in rows if _finite(r.get("peak_rss_mb")) or _finite(r.get("peak_cuda_mb"))]
            lines += [f"## {title}", "",
                      "Peak resident memory of the process and its worker processes while each case ran "
                      "(sampled from /proc every 10 ms), how much of it the case added (RSS growth: peak minus "
                      "the resident memory when the case started), CUDA's `max_memory_allocated` on a GPU, and "
                      "each section process's `getrusage` high-water mark.", ""]
            if mem_rows:
                lines += [markdown_table(mem_rows, _present(mem_rows, ["section", "case", "variant", "grid_mm",
                                                                       "peak_rss_mb", "rss_growth_mb",
                                                                       "peak_cuda_mb"]), _HEADERS), ""]
            if sec_rows:
                lines += [markdown_table(sec_rows, _present(sec_rows, ["case", "value", "unit", "note"]), _HEADERS), ""]
            continue
        if not sec_rows:
            continue
        lines += [f"## {title}", "", markdown_table(sec_rows, _present(sec_rows, cols), _HEADERS), ""]
    return "\n".join(lines) + "\n"


def write_results(rows: Sequence[dict[str, Any]], out: Path, markdown: str, machine: dict[str, Any]) -> dict[str, Path]:
    """Write ``results.csv``, ``results.md`` and ``machine.json`` atomically into ``out``."""
    import pandas as pd

    from brainsex.io import write_json_atomic, write_table, write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(list(rows), columns=list(COLUMNS))
    paths = {"csv": write_table(table, out / "results.csv"), "md": write_text_atomic(out / "results.md", markdown),
             "machine": write_json_atomic(out / "machine.json", machine)}
    return paths


# ----------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=(
        "Measure the brainsex pipeline on this machine and write results.md / results.csv: book build time, "
        "preprocessing, input pipeline, training step, saliency and peak memory, variants side by side."))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="8 mm grid, one subject, two repeats (about a minute)")
    mode.add_argument("--full", action="store_true", help="also the 1 mm input pipeline and paper model at 1 mm")
    p.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"), help="output folder")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default 2 quick, else 3)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--book-run-dir", default=str(REPO_ROOT / "runs" / "demo"),
                   help="run directory whose .build/*.json timings are reported (default runs/demo)")
    p.add_argument("--workdir", default=None, help="scratch folder for the phantom (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_mode", default=None, help=argparse.SUPPRESS)
    return p


def _child_main(args: argparse.Namespace) -> int:
    """Run one or more sections in this process; write {section: {rows, maxrss_mb, seconds} or {error}}."""
    import traceback

    plan = make_plan(args._mode, args.repeats)
    out: dict[str, Any] = {}
    for section in args._child.split(","):
        t0 = time.perf_counter()
        print(f"[benchmarks:{section}] start", flush=True)
        try:
            rows = RUNNERS[section](plan, Path(args.workdir))
        except Exception as exc:  # report and go on with the next section of this process
            traceback.print_exc()
            out[section] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            continue
        out[section] = {"rows": rows, "maxrss_mb": maxrss_mb(), "seconds": time.perf_counter() - t0}
        Path(args._result).write_text(json.dumps(out, default=str))
    Path(args._result).write_text(json.dumps(out, default=str))
    return 0


def section_groups(mode: str, sections: Sequence[str]) -> list[list[str]]:
    """Sections per process: one each, except ``quick``, where one process runs them all (saves the
    seconds of importing torch and MONAI per section; their memory high-water marks are then cumulative)."""
    chosen = [s for s in CHILD_SECTIONS if s in sections]
    if not chosen:
        return []
    return [chosen] if mode == "quick" else [[s] for s in chosen]


def _run_child(group: Sequence[str], mode: str, args: argparse.Namespace, workdir: Path) -> tuple[dict, str]:
    name = "+".join(group)
    result = workdir / f"result-{name}.json"
    log = workdir / f"log-{name}.txt"
    cmd = [sys.executable, "-m", "benchmarks", "--_child", ",".join(group), "--_result", str(result),
           "--_mode", mode, "--workdir", str(workdir)]
    if args.repeats:
        cmd += ["--repeats", str(args.repeats)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)
    res = json.loads(result.read_text()) if result.is_file() else {}
    tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-15:])
    return res, (f"exit status {proc.returncode}; last lines of {log.name}:\n{tail}"
                 if proc.returncode != 0 or any("error" in v for v in res.values()) else "")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks [--quick|--full] [--out DIR] [--repeats N] [--sections ...]``."""
    ensure_brainsex_importable()
    args = _parser().parse_args(argv)
    if args._child:
        return _child_main(args)
    mode = "quick" if args.quick else "full" if args.full else "default"
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = sorted(set(sections) - set(SECTIONS))
    if bad:
        print(f"benchmarks: error: unknown section(s) {bad}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    if args.repeats is not None and args.repeats < 1:
        print("benchmarks: error: --repeats must be >= 1", file=sys.stderr)
        return 2
    plan = make_plan(mode, args.repeats)
    command = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
    t_start = time.perf_counter()
    machine = machine_info({"mode": mode, "repeats": plan.repeats})
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="brainsex-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    try:
        if "book" in sections:
            rows += book_rows(args.book_run_dir)
        for group in section_groups(mode, sections):
            t0 = time.perf_counter()
            print(f"[benchmarks] {' + '.join(group)} ...", file=sys.stderr, flush=True)
            res, err = _run_child(group, mode, args, workdir)
            dt = time.perf_counter() - t0
            shared = len(group) > 1
            for section in group:
                got = res.get(section)
                if not got or "error" in got:
                    failures[section] = (got or {}).get("error") or "did not finish"
                    continue
                rows += got["rows"]
                rows.append(row("memory", f"{section} process", value=got["maxrss_mb"], unit="MiB",
                                note=f"getrusage ru_maxrss{' so far (sections share one process)' if shared else ''}; "
                                     f"section took {got['seconds']:.0f} s"))
            state = "FAILED" if any(s in failures for s in group) else "done"
            print(f"[benchmarks] {' + '.join(group)} {state} in {dt:.0f} s", file=sys.stderr, flush=True)
            if err:
                print(err, file=sys.stderr, flush=True)
        rows += derived_rows(rows)
        order = {s: i for i, s in enumerate((*SECTIONS, "memory"))}
        rows.sort(key=lambda r: order.get(r["section"], 99))  # stable: keeps each section's own order
        seconds = time.perf_counter() - t_start
        md = results_markdown(rows, machine, command, plan, seconds, failures)
        paths = write_results(rows, Path(args.out), md, machine)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"[benchmarks] wrote {paths['md']} and {paths['csv']} in {seconds:.0f} s", file=sys.stderr)
    return 1 if failures else 0
