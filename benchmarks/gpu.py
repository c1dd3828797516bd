"""Paper-profile training on a GPU: samples/s and the fraction of the hardware floor (issue 8).

The paper's setting (section 2.5): SFCN with the full widths on the 1 mm grid 193x229x193, batch 16,
half of the scans rotated by up to 15 degrees. Here the scans are synthetic volumes held on the GPU (no
disk, no host-to-device copy) and the rotation runs on the GPU for the whole batch at once, with the
training loop's own function (:func:`brainsex.train.rotate_batch`: MONAI's batched ``AffineTransform``,
angles from :func:`brainsex.train.random_rotation_angles`); the same function applied one scan at a
time is timed beside it. Variants, measured one after the other in the same process:

* ``fp32, contiguous`` -- the naive baseline;
* ``fp32, channels_last_3d``;
* ``bf16 autocast, channels_last_3d``;
* ``bf16 autocast, channels_last_3d, torch.compile``.

The floor of one epoch (1,688 training and 211 validation scans, the paper's split) is
``max(compute floor, memory floor)`` per scan:

* compute floor = FLOPs / measured matmul rate, with FLOPs = ``count_macs`` x 2 (multiply + add) x 3
  (forward, gradient w.r.t. activations, gradient w.r.t. weights) for training and x 2 for validation,
  and the rate of ``torch.matmul`` in bf16 on large squares (the tensor-core peak one can reach);
* memory floor = activation bytes / measured copy bandwidth, with the bytes of every layer's output in
  bf16 moved 5 times in training (written and read in the forward pass; the saved activation and the
  incoming gradient read and the outgoing gradient written in the backward pass) and 2 times in
  validation, and the bandwidth of a large device-to-device ``copy_`` (bytes read + written).

``floor_fraction`` = floor epoch time / measured epoch time (1 = at the floor); the issue's target is
"within 2x of the floor", i.e. a fraction >= 0.5.

Run on a GPU (one call, sized to finish within 8 minutes on an H200; not yet run on one)::

    python benchmarks/gpu.py --out benchmarks/results

and on a CPU at a tiny size (32^3, narrow channels, 2 steps; what the test does)::

    python benchmarks/gpu.py --tiny --out /tmp/gpu-tiny

Writes ``gpu-<date>.md`` and ``gpu-<date>.csv`` (``gpu-<date>-tiny.*`` with ``--tiny``) into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python benchmarks/gpu.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    PeakMemory,
    Stopwatch,
    ensure_brainsex_importable,
    machine_info,
    machine_markdown,
    markdown_table,
    pass_fail,
    summarise,
)

#: The paper's split (section 2.5): training and validation scans per epoch.
PAPER_TRAIN_SCANS, PAPER_VAL_SCANS = 1688, 211
#: "Paper-profile epoch within 2x of the floor".
FLOOR_TARGET = 0.5
#: Activation traffic per training step and per validation step, in units of all activations' bytes.
TRAIN_TRAFFIC, INFER_TRAFFIC = 5, 2

COLUMNS = ("kind", "variant", "dtype", "layout", "compile", "shape", "channels", "batch", "value", "unit", "min",
           "max", "ratio", "ratio_to", "epoch_s", "floor_epoch_s", "compute_floor_ms", "memory_floor_ms",
           "floor_fraction", "target", "pass", "peak_cuda_mb", "peak_rss_mb", "note")


@dataclass
class GpuConfig:
    """What to measure (defaults: the paper profile)."""

    shape: tuple[int, int, int] = (193, 229, 193)
    channels: tuple[int, ...] = (32, 64, 128, 256, 256, 64)
    batch: int = 16
    n_volumes: int = 32
    warmup: int = 3
    steps: int = 5
    repeats: int = 3
    infer_steps: int = 3
    matmul_n: int = 8192
    copy_mb: int = 2048
    compile: bool = True
    compile_backend: str = "inductor"
    budget_s: float = 300.0
    tiny: bool = False
    micro_batch: int | str = "auto"
    memory_gb: float | None = None


def tiny_config() -> GpuConfig:
    """A configuration that runs on a CPU in seconds (for the test)."""
    return GpuConfig(shape=(32, 32, 32), channels=(4, 8, 8, 8, 8, 4), batch=2, n_volumes=4, warmup=1, steps=1,
                     repeats=2, infer_steps=1, matmul_n=512, copy_mb=16, compile=True, compile_backend="eager",
                     budget_s=120.0, tiny=True)


# ------------------------------------------------------------------------------------- hardware rates
def matmul_rate(device, dtype, n: int, repeats: int = 5) -> float:
    """FLOP/s of ``torch.matmul`` on two ``n x n`` matrices (2 n^3 FLOPs each), median of ``repeats``."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if a.is_cuda else None
    for _ in range(3):
        a @ b  # noqa: B018 - warm-up
    inner = 10 if a.is_cuda else 2
    times = []
    for _ in range(repeats):
        with Stopwatch(sync) as sw:
            for _ in range(inner):
                a @ b  # noqa: B018
        times.append(sw.seconds / inner)
    return 2 * n**3 / summarise(times)["median"]


def copy_bandwidth(device, megabytes: int, repeats: int = 5) -> float:
    """Bytes/s (read + written) of ``dst.copy_(src)`` on a ``megabytes`` MiB buffer, median of ``repeats``."""
    import torch

    n = megabytes * 2**20 // 4
    src = torch.empty(n, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if src.is_cuda else None
    for _ in range(2):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        with Stopwatch(sync) as sw:
            dst.copy_(src)
        times.append(sw.seconds)
    return 2 * n * 4 / summarise(times)["median"]


def activation_elements(channels: Sequence[int], shape: Sequence[int]) -> int:
    """Elements of the input and of every layer's output in one forward pass of SFCN for one scan.

    Counted on the ``meta`` device (shapes only, nothing computed).
    """
    import torch

    from brainsex.model import SFCN

    with torch.device("meta"):
        model = SFCN(channels=channels, in_shape=shape).eval()  # same shapes as in training
        x = torch.empty(1, 1, *shape)
    total = [x.numel()]
    hooks = [m.register_forward_hook(lambda _m, _i, out: total.append(out.numel()))
             for m in model.modules() if not list(m.children())]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return int(sum(total))


def floors(cfg: GpuConfig, rate_flops: float, bandwidth: float) -> dict[str, float]:
    """Per-scan floor times (seconds) for a training step and a validation step, and per epoch."""
    from brainsex.model import count_macs

    macs = count_macs(cfg.channels, cfg.shape)
    act_bytes = activation_elements(cfg.channels, cfg.shape) * 2  # bf16
    train_c, infer_c = macs * 2 * 3 / rate_flops, macs * 2 / rate_flops
    train_m, infer_m = TRAIN_TRAFFIC * act_bytes / bandwidth, INFER_TRAFFIC * act_bytes / bandwidth
    train_f, infer_f = max(train_c, train_m), max(infer_c, infer_m)
    return {"macs": macs, "activation_bytes": act_bytes, "train_compute_s": train_c, "train_memory_s": train_m,
            "infer_compute_s": infer_c, "infer_memory_s": infer_m, "train_s": train_f, "infer_s": infer_f,
            "epoch_s": PAPER_TRAIN_SCANS * train_f + PAPER_VAL_SCANS * infer_f}


# ------------------------------------------------------------------------------------------- data
def synthetic_volumes(n: int, shape: Sequence[int], device, seed: int = 0):
    """``n`` smooth, brain-like, z-scored volumes ``(n, 1, *shape)`` made directly on ``device``."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device=device).manual_seed(seed)
    coarse = torch.randn(n, 1, *[max(2, s // 8) for s in shape], generator=g, device=device)
    vol = F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=False)
    axes = [torch.linspace(-1, 1, s, device=device) for s in shape]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    mask = ((zz / 0.8) ** 2 + (yy / 0.85) ** 2 + (xx / 0.75) ** 2 <= 1).float()
    vol = (vol + 2.0) * mask
    inside = mask.bool().expand_as(vol)
    mean, std = vol[inside].mean(), vol[inside].std()
    return torch.where(inside, (vol - mean) / std, torch.zeros_like(vol)).contiguous()


# ---------------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    name: str
    amp: bool
    channels_last: bool
    compile: bool


VARIANTS = (Variant("fp32, contiguous (naive)", False, False, False),
            Variant("fp32, channels_last_3d", False, True, False),
            Variant("bf16 autocast, channels_last_3d", True, True, False),
            Variant("bf16 autocast, channels_last_3d, torch.compile", True, True, True))


def _autocast(device, enabled: bool):
    import torch

    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def run_variant(cfg: GpuConfig, variant: Variant, cache, device, seed: int = 0) -> dict[str, Any]:
    """Training samples/s (GPU-side rotation included) and validation samples/s of one variant."""
    import torch
    from torch import nn

    from brainsex.memory import plan_training, split_sizes
    from brainsex.model import SFCN, sfcn_output_grid
    from brainsex.train import random_rotation_angles, rotate_batch

    cuda = device.type == "cuda"
    # the training loop's memory plan: the batch in micro-batches that fit (all at once where it fits)
    plan = plan_training(cfg.batch, cfg.channels, cfg.shape, device=device,
                         amp_dtype=torch.bfloat16 if (cuda and variant.amp) else None, micro_batch=cfg.micro_batch)
    parts = split_sizes(cfg.batch, plan.micro_batch, min_size=2 if math.prod(sfcn_output_grid(cfg.shape)) == 1 else 1)
    sync = torch.cuda.synchronize if cuda else None
    fmt = torch.channels_last_3d if variant.channels_last else torch.contiguous_format
    torch.manual_seed(seed)
    g = torch.Generator(device=device).manual_seed(seed)
    g_rot = torch.Generator().manual_seed(seed)  # rotation angles are drawn on the CPU, as in brainsex.train
    out: dict[str, Any] = {"micro_batch": plan.micro_batch, "accumulation_steps": len(parts)}
    with PeakMemory(cuda=cuda) as mem:
        model = SFCN(channels=cfg.channels, in_shape=cfg.shape).to(device=device, memory_format=fmt)
        net = torch.compile(model, backend=cfg.compile_backend) if variant.compile else model
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        loss_fn = nn.BCEWithLogitsLoss()
        labels = (torch.arange(cache.shape[0], device=device) % 2).float()

        def train_step() -> None:
            idx = torch.randint(0, cache.shape[0], (cfg.batch,), generator=g, device=device)
            angles = random_rotation_angles(cfg.batch, max_deg=15.0, prob=0.5, generator=g_rot)
            x_all = rotate_batch(cache[idx], angles)
            opt.zero_grad(set_to_none=True)
            start = 0
            for size in parts:  # gradient accumulation, as in brainsex.train
                x = x_all[start:start + size].contiguous(memory_format=fmt)
                with _autocast(device, variant.amp):
                    logits = net(x)
                loss = loss_fn(logits.float(), labels[idx[start:start + size]])
                (loss * (size / cfg.batch) if len(parts) > 1 else loss).backward()
                start += size
            opt.step()

        model.train()
        with Stopwatch(sync) as warm:
            for _ in range(cfg.warmup):
                train_step()
        out["warmup_s"] = warm.seconds
        times = []
        for _ in range(cfg.repeats):
            with Stopwatch(sync) as sw:
                for _ in range(cfg.steps):
                    train_step()
            times.append(sw.seconds / cfg.steps)
        out["train"] = [cfg.batch / t for t in times]
        if not variant.compile:  # a compiled model would recompile for eval mode; see note in the table
            model.eval()
            x = cache[: plan.eval_batch].contiguous(memory_format=fmt)
            with torch.no_grad(), _autocast(device, variant.amp):
                model(x)
                with Stopwatch(sync) as sw:
                    for _ in range(cfg.infer_steps):
                        model(x)
            out["infer"] = plan.eval_batch * cfg.infer_steps / sw.seconds
    out["peak_cuda_mb"], out["peak_rss_mb"] = mem.peak_cuda_mb, mem.peak_rss_mb
    return out


def augmentation_rates(cfg: GpuConfig, cache, device) -> list[dict[str, Any]]:
    """Samples/s of the rotation alone (``brainsex.train.rotate_batch``): whole batch vs one scan at a time."""
    import torch

    from brainsex.train import random_rotation_angles, rotate_batch

    sync = torch.cuda.synchronize if device.type == "cuda" else None
    g = torch.Generator().manual_seed(0)
    x = cache[: cfg.batch]
    rotate_batch(x, random_rotation_angles(cfg.batch, prob=1.0, generator=g))  # warm-up
    batched, per_scan = [], []
    for _ in range(cfg.repeats):
        angles = random_rotation_angles(cfg.batch, max_deg=15.0, prob=0.5, generator=g)
        with Stopwatch(sync) as sw:
            rotate_batch(x, angles)
        batched.append(cfg.batch / sw.seconds)
        with Stopwatch(sync) as sw:
            for j in range(cfg.batch):
                rotate_batch(x[j : j + 1], angles[j : j + 1])
        per_scan.append(cfg.batch / sw.seconds)
    s, m = summarise(batched), summarise(per_scan)
    note = "prob 0.5, up to 15 deg about each axis, bilinear, border (MONAI AffineTransform)"
    return [{"kind": "augmentation", "variant": "batched rotation (brainsex.train.rotate_batch, as in training)",
             "value": s["median"], "unit": "samples/s", "min": s["min"], "max": s["max"],
             "ratio": s["median"] / m["median"], "ratio_to": "batched / one scan at a time", "note": note},
            {"kind": "augmentation", "variant": "the same, one scan at a time", "value": m["median"],
             "unit": "samples/s", "min": m["min"], "max": m["max"], "note": note}]


# ------------------------------------------------------------------------------------------- report
def _markdown(rows: list[dict[str, Any]], machine: dict[str, Any], cfg: GpuConfig, fl: dict[str, float],
              hw: dict[str, float], command: str, seconds: float) -> str:
    cfg_rows = [{"what": k, "value": v} for k, v in asdict(cfg).items()]
    floor_rows = [
        {"what": "forward MACs per scan (model.count_macs)", "value": fl["macs"]},
        {"what": "training FLOPs per scan (x2 x3)", "value": fl["macs"] * 6},
        {"what": "activation bytes per scan (bf16, all layer outputs)", "value": fl["activation_bytes"]},
        {"what": f"matmul rate, {hw['rate_dtype']} (TFLOP/s)", "value": hw["rate"] / 1e12},
        {"what": "matmul rate, fp32 default precision (TFLOP/s)", "value": hw["rate_fp32"] / 1e12},
        {"what": "copy bandwidth, read + write (GB/s)", "value": hw["bandwidth"] / 1e9},
        {"what": "training compute floor per scan (ms)", "value": fl["train_compute_s"] * 1e3},
        {"what": "training memory floor per scan (ms)", "value": fl["train_memory_s"] * 1e3},
        {"what": f"epoch floor, {PAPER_TRAIN_SCANS} train + {PAPER_VAL_SCANS} val scans (s)",
         "value": fl["epoch_s"]},
    ]
    train_cols = ["variant", "batch", "value", "unit", "min", "max", "ratio", "epoch_s", "floor_epoch_s",
                  "floor_fraction", "target", "pass", "peak_cuda_mb", "peak_rss_mb", "note"]
    headers = {"value": "median", "epoch_s": "epoch (s)", "floor_epoch_s": "floor epoch (s)",
               "floor_fraction": "fraction of floor", "peak_cuda_mb": "peak CUDA (MiB)",
               "peak_rss_mb": "peak RSS (MiB)", "ratio": "x naive"}
    title = "tiny CPU check" if cfg.tiny else "paper profile"
    lines = [f"# GPU benchmark ({title}), {machine['date']}", "", f"Command: `{command}`  ",
             f"Run time: {seconds:.0f} s. Medians over {cfg.repeats} timings of {cfg.steps} steps after "
             f"{cfg.warmup} warm-up steps; all variants measured in this run.", "",
             "## Machine", "", machine_markdown(machine), "", "## Configuration", "",
             markdown_table(cfg_rows, ["what", "value"]), "", "## Floors", "",
             "Floor per epoch = scans x max(FLOPs / matmul rate, activation traffic / copy bandwidth); "
             "see the docstring of `benchmarks/gpu.py` and `benchmarks/README.md`.", "",
             markdown_table(floor_rows, ["what", "value"]), "",
             "## Training (GPU-side rotation included)", "",
             markdown_table([r for r in rows if r["kind"] == "train"], train_cols, headers), "",
             "## Augmentation alone", "",
             markdown_table([r for r in rows if r["kind"] == "augmentation"],
                            ["variant", "value", "unit", "min", "max", "ratio", "ratio_to", "note"],
                            {**headers, "ratio": "ratio", "ratio_to": "ratio is"}), "",
             "## Input pipeline vs training", "",
             markdown_table([r for r in rows if r["kind"] == "pipeline"],
                            ["variant", "value", "unit", "target", "pass", "note"], headers), ""]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu.py", description=(
        "Paper-profile SFCN training throughput on a GPU (1 mm, batch 16, full widths, GPU-side rotation): "
        "fp32 vs bf16 autocast vs torch.compile, and the fraction of the compute/memory floor."))
    p.add_argument("--tiny", action="store_true", help="32^3 input, narrow channels, 2 steps: runs on a CPU")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="output folder")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cuda, cpu")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 16; 2 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default inductor; 'eager' with --tiny, which needs no compiler)")
    p.add_argument("--micro-batch", default=None,
                   help="scans per forward/backward pass: auto (default: from the free memory) or a number")
    p.add_argument("--memory-gb", type=float, default=None,
                   help="limit this process to this much GPU memory (torch.cuda.set_per_process_memory_fraction), "
                        "e.g. 16 for a T4-sized card")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip the variants not started after this many seconds (default 300, 120 with --tiny)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the GPU benchmark and write ``gpu-<date>.md`` / ``.csv``; returns 0, or 2 on bad arguments."""
    args = _parser().parse_args(argv)
    ensure_brainsex_importable()
    import torch

    t_start = time.perf_counter()
    dev_name = "cuda" if (args.device == "auto" and torch.cuda.is_available()) else args.device
    dev_name = "cpu" if dev_name == "auto" else dev_name
    if dev_name.startswith("cuda") and not torch.cuda.is_available():
        print("gpu.py: error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device(dev_name)
    if device.type != "cuda" and not args.tiny:
        print("gpu.py: error: the paper profile needs a GPU (it would take hours on a CPU); use --tiny",
              file=sys.stderr)
        return 2
    cfg = tiny_config() if args.tiny else GpuConfig()
    micro = None if args.micro_batch is None else (args.micro_batch if args.micro_batch == "auto"
                                                    else int(args.micro_batch))
    over = {k: v for k, v in {"batch": args.batch, "steps": args.steps, "repeats": args.repeats,
                              "compile_backend": args.compile_backend, "budget_s": args.budget_s,
                              "micro_batch": micro, "memory_gb": args.memory_gb}.items()
            if v is not None}
    if args.no_compile:
        over["compile"] = False
    cfg = replace(cfg, **over)
    if cfg.batch < 2 or cfg.steps < 1 or cfg.repeats < 1:
        print("gpu.py: error: --batch must be >= 2 (batch norm), --steps and --repeats >= 1", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if cfg.memory_gb:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.memory_gb * 2**30 / total), device)
    else:  # the tiny check: one thread, so a shared CPU does not turn it into a test of oversubscription
        torch.set_num_threads(1)

    # Hardware rates and floors.
    rate_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hw = {"rate": matmul_rate(device, rate_dtype, cfg.matmul_n), "rate_dtype": str(rate_dtype).replace("torch.", ""),
          "rate_fp32": matmul_rate(device, torch.float32, cfg.matmul_n),
          "bandwidth": copy_bandwidth(device, cfg.copy_mb)}
    fl = floors(cfg, hw["rate"], hw["bandwidth"])
    shape_txt, ch_txt = "x".join(map(str, cfg.shape)), "[" + ",".join(map(str, cfg.channels)) + "]"
    common = {"shape": shape_txt, "channels": ch_txt, "batch": cfg.batch}

    machine = machine_info({"device": str(device), "torch_threads": torch.get_num_threads(),
                            "profile": "tiny" if cfg.tiny else "paper"})
    command = "python benchmarks/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    stem = f"gpu-{datetime.date.today().isoformat()}" + ("-tiny" if cfg.tiny else "")
    paths = (out / f"{stem}.md", out / f"{stem}.csv")
    rows: list[dict[str, Any]] = []

    def report(final: bool) -> str:
        """Write the tables; called after every variant, so a run cut short still leaves its numbers."""
        md = _markdown(rows, machine, cfg, fl, hw, command, time.perf_counter() - t_start)
        if not final:
            md = md.replace("\n## Machine", "\n**Partial: the run is still going or was cut short.**\n\n## Machine", 1)
        _write_tables(paths, md, rows)
        return md

    cache = synthetic_volumes(cfg.n_volumes, cfg.shape, device)
    base = best_train = infer_ref = math.nan
    for variant in VARIANTS:
        r = {"kind": "train", "variant": variant.name, "dtype": "bf16" if variant.amp else "fp32",
             "layout": "channels_last_3d" if variant.channels_last else "contiguous", "compile": variant.compile,
             "unit": "samples/s", **common}
        if variant.compile and not cfg.compile:
            rows.append({**r, "note": "skipped (--no-compile)"})
            continue
        if time.perf_counter() - t_start > cfg.budget_s:
            rows.append({**r, "note": f"skipped: time budget of {cfg.budget_s:.0f} s spent"})
            continue
        print(f"[gpu.py] {variant.name} ...", file=sys.stderr, flush=True)
        try:
            res = run_variant(cfg, variant, cache, device)
        except Exception as exc:  # out of memory, a compiler missing: report it, go on with the next variant
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append({**r, "note": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"})
            report(final=False)
            continue
        s = summarise(res["train"])
        base = s["median"] if math.isnan(base) else base
        best_train = s["median"] if math.isnan(best_train) else max(best_train, s["median"])
        infer_ref = res.get("infer", infer_ref)
        epoch = PAPER_TRAIN_SCANS / s["median"] + PAPER_VAL_SCANS / infer_ref
        frac = fl["epoch_s"] / epoch
        note = (f"micro-batch {res['micro_batch']} ({res['accumulation_steps']} per step); "
                f"warm-up {res['warmup_s']:.1f} s")
        if variant.compile:
            note += f" (compile, backend {cfg.compile_backend}); validation at the previous variant's rate"
        if device.type == "cuda" and not variant.amp and torch.backends.cudnn.allow_tf32:
            note += "; cuDNN convolutions in TF32 (PyTorch's default for fp32)"
        rows.append({**r, "value": s["median"], "min": s["min"], "max": s["max"], "ratio": s["median"] / base,
                     "ratio_to": "x naive", "epoch_s": epoch, "floor_epoch_s": fl["epoch_s"],
                     "compute_floor_ms": fl["train_compute_s"] * 1e3, "memory_floor_ms": fl["train_memory_s"] * 1e3,
                     "floor_fraction": frac, "target": f">= {FLOOR_TARGET:g} (epoch within 2x of the floor)",
                     "pass": pass_fail(frac, FLOOR_TARGET), "peak_cuda_mb": res["peak_cuda_mb"],
                     "peak_rss_mb": res["peak_rss_mb"], "note": note})
        report(final=False)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    aug_rows = augmentation_rates(cfg, cache, device)
    rows += [{**common, **a} for a in aug_rows]
    ratio = aug_rows[0].get("value", math.nan) / best_train
    rows.append({"kind": "pipeline", "variant": "GPU rotation / fastest training step", "value": ratio, "unit": "x",
                 "target": ">= 3x training step", "pass": pass_fail(ratio, 3.0), **common,
                 "note": "volumes held on the GPU: no decoding or host-to-device copy per epoch"})
    md = report(final=True)
    print(md)
    print(f"[gpu.py] wrote {paths[0]} and {paths[1]} in {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    return 0


def _write_tables(paths: tuple[Path, Path], markdown: str, rows: list[dict[str, Any]]) -> None:
    """Write the Markdown and CSV tables atomically (``brainsex.io.write_text_atomic``)."""
    import csv
    import io

    from brainsex.io import write_text_atomic

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v) for k, v in r.items()})
    write_text_atomic(paths[0], markdown)
    write_text_atomic(paths[1], buf.getvalue())


if __name__ == "__main__":
    sys.exit(main())
