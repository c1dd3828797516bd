"""How many scans fit at once: memory estimates for SFCN and the batch sizes chosen from them.

The paper trains with batches of 16 scans on a 1 mm grid (section 2.5). For the full SFCN (channels
32...256) one scan's activations at 1 mm take several GB during training (the first convolution's output
alone is 32 x 193 x 229 x 193 floats, 1.1 GB), so 16 of them fit neither a 16 GB GPU nor a 24 GB
workstation. This module estimates the peak memory per scan for a grid, the channel widths, the
precision and the kind of pass (training, inference, input gradients), reads how much memory the device
has free, and chooses how many scans go through the network at once:

* **training** keeps the effective batch (the paper's 16) and splits it into *micro-batches* whose
  gradients are accumulated before the optimiser step (:func:`choose_micro_batch`); the result is the
  same gradient as one full batch for layers without batch statistics (tested), while batch
  normalisation computes its statistics over each micro-batch (see :mod:`brainsex.train`);
* **inference** (evaluation, prediction, occlusion) and **input gradients** (saliency maps) use the
  largest batch that fits, capped at their usual size (:func:`choose_batch_size`).

The estimate is analytic (:func:`sfcn_sample_bytes`): the tensors autograd keeps for the backward pass
(each convolution's output, each batch normalisation's output, the max-pooling indices, each ReLU's
output) plus the two gradient tensors alive while the first block is back-propagated; activation
checkpointing (:func:`torch.utils.checkpoint.checkpoint` on the large early blocks) keeps only the
blocks' inputs and recomputes the rest during the backward pass. A safety factor covers the
allocator's fragmentation and the convolution kernels' scratch buffers (1.0: measured on the CPU at
2 mm with the paper's widths, the estimate was 680 MB per training scan against 484-545 MB resident,
and 272 against 268 MB for inference); ``benchmarks/`` compares the estimate with the peak memory
measured on the 1 mm paper-profile build.

Measured, not assumed: activation checkpointing of the first blocks did *not* lower the peak on the
CPU (540 MB per scan with the first two blocks checkpointed, 484 MB without, and 1.5x the time),
because SFCN's peak is the back-propagation of the first block, which checkpointing recomputes rather
than avoids; it stays available (``checkpointing=True``) but off by default. Autocast to bf16/fp16 on
CUDA halves the activations (``dtype_bytes=2``); ``channels_last_3d`` is kept for speed (see
:class:`brainsex.train.TrainConfig`), it does not change the memory.

Every choice can be overridden: ``micro_batch`` (training) and ``batch_size`` (inference) accept an
integer instead of ``"auto"``, and the environment variable ``BRAINSEX_MEMORY_BUDGET`` (e.g. ``16G``)
replaces the measured free memory (to plan for a smaller GPU than the one at hand).
"""

from __future__ import annotations

import logging
import math
import os
import re
import resource
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from brainsex import BrainsexError

__all__ = [
    "MODES",
    "SAFETY_FACTOR",
    "BUDGET_ENV",
    "MemoryPlan",
    "parse_bytes",
    "format_bytes",
    "sfcn_sample_bytes",
    "memory_budget",
    "choose_micro_batch",
    "choose_batch_size",
    "plan_training",
    "split_sizes",
    "fixed_bytes",
    "peak_rss_bytes",
    "LIMIT_ENV",
    "memory_limit_bytes",
    "RssWatch",
    "MEMORY_PARAMETERS",
]

log = logging.getLogger("brainsex.memory")

#: Kinds of pass: ``train`` (forward + backward to the weights), ``grad`` (forward + backward to the
#: input: saliency maps), ``eval`` (forward without gradients: prediction, occlusion).
MODES = ("train", "grad", "eval")

#: Multiplies the analytic estimate: allocator fragmentation, convolution scratch space and layout copies
#: (oneDNN on CPU reorders channels-last tensors; cuDNN asks for workspaces).
SAFETY_FACTOR = 1.0

#: Environment variable that replaces the measured free memory, e.g. ``16G`` or ``8000000000``.
BUDGET_ENV = "BRAINSEX_MEMORY_BUDGET"

#: Environment variable that replaces the machine's memory size when judging whether a process that
#: died was near the limit (:func:`memory_limit_bytes`), e.g. ``24G``.
LIMIT_ENV = "BRAINSEX_MEMORY_LIMIT"

#: The parameters that lower a chapter's memory, with what they do (quoted in error messages).
MEMORY_PARAMETERS = (
    ("micro_batch", "scans per forward/backward pass while training (e.g. -p micro_batch 1)"),
    ("batch_size", "scans per optimiser step (changes the training itself)"),
    ("voxel_size", "a coarser grid (e.g. -p voxel_size 2: 8x fewer voxels)"),
)

#: Fraction of the free memory the choice plans to use (the rest: other processes, the data cache's
#: growth, the Python heap).
USABLE_FRACTION = 0.8

_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
          "g": 1024**3, "gb": 1024**3, "gib": 1024**3, "t": 1024**4, "tb": 1024**4, "tib": 1024**4}


def parse_bytes(value: str | int | float) -> int:
    """Bytes from ``16G``, ``800M``, ``1.5GiB`` or a plain number (binary units).

    Parameters
    ----------
    value : str or int or float
        A positive size.

    Returns
    -------
    int
        Bytes.

    Raises
    ------
    BrainsexError
        For an unreadable or non-positive size.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value <= 0:
            raise BrainsexError(f"memory size must be positive, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise BrainsexError(f"cannot read the memory size {value!r}; write e.g. 16G, 800M or 8000000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    """``1.2 GB`` style (binary units).

    Parameters
    ----------
    n : float
        Bytes.

    Returns
    -------
    str
        One decimal and a unit (B, kB, MB, GB, TB).
    """
    for unit, size in (("TB", 1024**4), ("GB", 1024**3), ("MB", 1024**2), ("kB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _blocks(channels: Sequence[int], in_shape: Sequence[int], in_channels: int = 1) -> list[dict[str, int]]:
    """Per 3x3x3 block: voxels before/after pooling and channel counts."""
    from brainsex.model import sfcn_pool_kernels

    shape = [int(s) for s in in_shape]
    out = []
    c_in = int(in_channels)
    for c_out, k in zip([int(c) for c in channels[:5]], sfcn_pool_kernels(shape), strict=True):
        v = math.prod(shape)
        shape = [s // kk for s, kk in zip(shape, k, strict=True)]
        out.append({"c_in": c_in, "c": c_out, "v": v, "vp": math.prod(shape)})
        c_in = c_out
    return out


def sfcn_sample_bytes(
    channels: Sequence[int],
    in_shape: Sequence[int],
    mode: str = "train",
    dtype_bytes: int = 4,
    checkpoint_blocks: int = 0,
    in_channels: int = 1,
    safety: float = SAFETY_FACTOR,
) -> int:
    """Estimated peak memory of one scan in SFCN, in bytes (activations only; weights are per model).

    Parameters
    ----------
    channels, in_shape, in_channels
        The architecture (:class:`brainsex.model.SFCN`).
    mode
        ``"train"``, ``"grad"`` (gradient to the input, as for saliency maps) or ``"eval"`` (no gradients).
    dtype_bytes
        Bytes per activation: 4 (float32), 2 under bf16/fp16 autocast.
    checkpoint_blocks
        How many of the first 3x3x3 blocks are checkpointed (their activations recomputed in the backward
        pass instead of kept).
    safety
        Multiplies the sum (:data:`SAFETY_FACTOR`).

    Returns
    -------
    int
        Bytes per scan. For the paper's model at 193x229x193 in float32 about 7 GB for training and
        2.8 GB for inference.
    """
    if mode not in MODES:
        raise BrainsexError(f"mode must be one of {MODES}, got {mode!r}")
    blocks = _blocks(channels, in_shape, in_channels)
    b = int(dtype_bytes)
    x_bytes = 4 * in_channels * blocks[0]["v"]  # the input stays float32
    if mode == "eval":  # conv output and batch-norm output of one block coexist; the rest is freed
        peak = max(blk["c_in"] * blk["v"] * b + 2 * blk["c"] * blk["v"] * b for blk in blocks)
        return int(safety * (x_bytes + peak))
    # autograd keeps, per block: conv output (batch norm's input), batch-norm output (max-pool's input),
    # the int64 max-pool indices and the ReLU output (the next convolution's input)
    kept = [2 * blk["c"] * blk["v"] * b + blk["c"] * blk["vp"] * 8 for blk in blocks]
    relu = [blk["c"] * blk["vp"] * b for blk in blocks]
    k = max(0, min(int(checkpoint_blocks), len(blocks)))
    stored = sum(relu) + sum(kept[k:])  # checkpointed blocks keep only their inputs (the previous ReLU)
    # back-propagating block i: its recomputed (or kept) tensors plus two gradients of its conv output size
    peak = max((kept[i] if i < k else 0) + 2 * blk["c"] * blk["v"] * b + stored for i, blk in enumerate(blocks))
    grad_input = x_bytes if mode == "grad" else 0
    return int(safety * (x_bytes + grad_input + peak))


def _cgroup_free() -> int | None:
    """Memory left under a cgroup (v2 or v1) limit, if one is set."""
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                              "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = open(limit_f).read().strip()
            usage = int(open(usage_f).read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            return max(0, int(limit) - usage)
    return None


def memory_budget(device: Any = "cpu") -> int:
    """Bytes the next computation may use on ``device``.

    ``BRAINSEX_MEMORY_BUDGET`` if set; on CUDA the free memory from ``torch.cuda.mem_get_info`` (within
    ``torch.cuda.set_per_process_memory_fraction`` when one is set); elsewhere the available RAM
    (``psutil.virtual_memory().available``), lowered to what an address-space limit (``RLIMIT_AS``) or
    a cgroup limit leaves. :data:`USABLE_FRACTION` of it is returned.

    Parameters
    ----------
    device
        A ``torch.device`` or its name.
    """
    env = os.environ.get(BUDGET_ENV)
    if env:
        return int(USABLE_FRACTION * parse_bytes(env))
    import torch

    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)  # our cache is reusable
        get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        if get_fraction is not None:
            cap = int(get_fraction(dev) * total) - torch.cuda.memory_allocated(dev)
            free = min(free, cap)
        return int(USABLE_FRACTION * max(free, 0))
    import psutil

    free = int(psutil.virtual_memory().available)
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        free = min(free, int(soft) - int(psutil.Process().memory_info().vms))
    cg = _cgroup_free()
    if cg is not None:
        free = min(free, cg)
    return int(USABLE_FRACTION * max(free, 0))


def _dtype_bytes(amp_dtype: Any) -> int:
    return 2 if amp_dtype is not None and str(amp_dtype) in ("torch.bfloat16", "torch.float16") else 4


def _resolve(value: int | str | None, name: str) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise BrainsexError(f"{name} must be 'auto' or a positive integer, got {value!r}") from None
    if n < 1 or n != float(value):
        raise BrainsexError(f"{name} must be 'auto' or a positive integer, got {value!r}")
    return n


def choose_micro_batch(batch_size: int, sample_bytes: int, budget_bytes: int, fixed_bytes: int = 0) -> int:
    """Scans per forward/backward pass so that ``batch_size`` is processed in micro-batches that fit.

    Parameters
    ----------
    batch_size
        The effective batch (the optimiser's step sees its accumulated gradient).
    sample_bytes
        Peak memory per scan (:func:`sfcn_sample_bytes`).
    budget_bytes
        Memory available (:func:`memory_budget`).
    fixed_bytes
        Memory needed whatever the batch (weights, gradients, optimiser state, one batch of inputs).

    Returns
    -------
    int
        The largest micro-batch ``m <= batch_size`` with ``fixed + m * sample <= budget``; at least 1
        (with a warning when even one scan exceeds the budget).
    """
    batch_size = int(batch_size)
    if batch_size < 1 or sample_bytes <= 0:
        raise BrainsexError(f"choose_micro_batch: need batch_size >= 1 and sample_bytes > 0 "
                            f"(got {batch_size}, {sample_bytes})")
    room = int(budget_bytes) - int(fixed_bytes)
    m = room // int(sample_bytes)
    if m < 1:
        log.warning("one scan needs about %s but only %s is free; trying one scan at a time (lower voxel_size "
                    "resolution or use a larger device if it runs out of memory)",
                    format_bytes(sample_bytes + fixed_bytes), format_bytes(budget_bytes))
        return 1
    return int(min(batch_size, m))


def split_sizes(n: int, micro_batch: int, min_size: int = 1) -> list[int]:
    """Sizes of the micro-batches of a batch of ``n``: ``ceil(n / micro_batch)`` near-equal parts.

    Near-equal parts (e.g. 16 with micro-batch 6 -> 6, 5, 5 rather than 6, 6, 4) keep batch
    normalisation's statistics equally noisy across the parts.

    Parameters
    ----------
    n
        Scans in the batch.
    micro_batch
        The most scans per part.
    min_size
        The fewest scans per part where ``n`` allows it (2 where batch normalisation sees a single voxel
        per channel, as on the coarse grids): fewer, larger parts are used then.
    """
    n, micro_batch, min_size = int(n), int(micro_batch), int(min_size)
    if n < 0 or micro_batch < 1 or min_size < 1:
        raise BrainsexError(f"split_sizes: need n >= 0, micro_batch >= 1 and min_size >= 1 "
                            f"(got {n}, {micro_batch}, {min_size})")
    if n == 0:
        return []
    parts = min(-(-n // micro_batch), max(1, n // min_size))
    base, extra = divmod(n, parts)
    return [base + 1] * extra + [base] * (parts - extra)


@dataclass(frozen=True)
class MemoryPlan:
    """How a training run uses memory (:func:`plan_training`).

    Attributes
    ----------
    batch_size
        The effective batch per process (the optimiser step).
    micro_batch
        Scans per forward/backward pass; ``batch_size`` is split into ``ceil(batch_size / micro_batch)``
        near-equal parts whose gradients are accumulated.
    eval_batch
        Scans per pass when evaluating the validation set.
    checkpoint_blocks
        First 3x3x3 blocks run under activation checkpointing (0: none).
    sample_bytes
        Estimated training peak per scan with that checkpointing.
    budget_bytes
        The memory the choice planned for.
    source
        ``"auto"`` or ``"override"``.
    """

    batch_size: int
    micro_batch: int
    eval_batch: int
    checkpoint_blocks: int
    sample_bytes: int
    budget_bytes: int
    source: str

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimiser step."""
        return len(split_sizes(self.batch_size, self.micro_batch))

    def describe(self) -> str:
        """One line for logs and the training chapter."""
        ck = f", activation checkpointing on the first {self.checkpoint_blocks} block(s)" if self.checkpoint_blocks else ""
        return (f"batch {self.batch_size} as {self.accumulation_steps} micro-batch(es) of <= {self.micro_batch} "
                f"({self.source}; about {format_bytes(self.sample_bytes)} per scan, "
                f"budget {format_bytes(self.budget_bytes)}{ck}); evaluation {self.eval_batch} scans per pass")


def fixed_bytes(channels: Sequence[int], in_shape: Sequence[int], batch_size: int, in_channels: int = 1) -> int:
    """Memory a training run needs whatever its micro-batch.

    Weights, gradients and two Adam moments (float32), plus one batch of float32 inputs.

    Parameters
    ----------
    channels, in_shape, in_channels
        The SFCN architecture.
    batch_size
        Scans per batch (the inputs of a whole batch are on the device before they are split).
    """
    blocks = _blocks(channels, in_shape, in_channels)
    params = sum(blk["c_in"] * blk["c"] * 27 + 3 * blk["c"] for blk in blocks)
    params += int(channels[4]) * int(channels[5]) + 3 * int(channels[5]) + int(channels[5]) + 1
    return 4 * params * 4 + 4 * in_channels * blocks[0]["v"] * int(batch_size)


def plan_training(
    batch_size: int,
    channels: Sequence[int],
    in_shape: Sequence[int],
    device: Any = "cpu",
    amp_dtype: Any = None,
    micro_batch: int | str = "auto",
    checkpointing: bool | str = "auto",
    budget_bytes: int | None = None,
) -> MemoryPlan:
    """Choose the micro-batch, the evaluation batch and activation checkpointing for a training run.

    Parameters
    ----------
    batch_size
        Effective batch per process.
    channels, in_shape
        The SFCN architecture.
    device
        Where it trains (for :func:`memory_budget`).
    amp_dtype
        The autocast dtype (``None``: float32 activations).
    micro_batch
        ``"auto"`` (the largest that fits) or a number of scans (the override; capped at ``batch_size``).
    checkpointing
        ``True``: checkpoint the first two blocks; ``"auto"`` and ``False``: no checkpointing (measured
        not to lower the peak for SFCN, see the module notes).
    budget_bytes
        Memory to plan for; default :func:`memory_budget` of ``device``.

    Returns
    -------
    MemoryPlan
    """
    batch_size = int(batch_size)
    fixed_m = _resolve(micro_batch, "micro_batch")
    if checkpointing not in ("auto", True, False):
        raise BrainsexError(f"checkpointing must be 'auto', true or false, got {checkpointing!r}")
    budget = int(budget_bytes) if budget_bytes is not None else memory_budget(device)
    b = _dtype_bytes(amp_dtype)
    fixed = fixed_bytes(channels, in_shape, batch_size)
    plain = sfcn_sample_bytes(channels, in_shape, "train", b, 0)
    ckpt = sfcn_sample_bytes(channels, in_shape, "train", b, 2)
    m_plain = choose_micro_batch(batch_size, plain, budget, fixed)
    m_ckpt = choose_micro_batch(batch_size, ckpt, budget, fixed) if checkpointing is True else m_plain
    # "auto" leaves checkpointing off: measured on the CPU (2 mm grid, full widths) it raised the peak
    # (540 vs 484 MB per scan) and the time (2.9 vs 1.9 s per scan), because the peak is the first
    # block's backward pass, which checkpointing recomputes rather than avoids.
    use_ckpt = bool(checkpointing) if checkpointing != "auto" else False
    if fixed_m is not None:
        micro, source = min(fixed_m, batch_size), "override"
    else:
        micro, source = (m_ckpt if use_ckpt else m_plain), "auto"
    eval_batch = choose_micro_batch(batch_size, sfcn_sample_bytes(channels, in_shape, "eval", b), budget, fixed)
    return MemoryPlan(batch_size=batch_size, micro_batch=int(micro), eval_batch=int(eval_batch),
                      checkpoint_blocks=2 if use_ckpt else 0, sample_bytes=ckpt if use_ckpt else plain,
                      budget_bytes=budget, source=source)


def choose_batch_size(
    model: Any,
    batch_size: int | str = "auto",
    mode: str = "eval",
    device: Any = None,
    cap: int = 16,
    amp_dtype: Any = None,
    budget_bytes: int | None = None,
) -> int:
    """Scans per pass for inference (``mode="eval"``) or input gradients (``mode="grad"``).

    Parameters
    ----------
    model
        The network; an SFCN (anything with ``channels`` and ``in_shape``) gets the estimate of
        :func:`sfcn_sample_bytes`, any other module ``cap``.
    batch_size
        ``"auto"`` or a positive integer (returned as given: the override).
    mode
        ``"eval"`` or ``"grad"``.
    device
        Where it runs; default the model's parameters' device.
    cap
        The largest batch ``"auto"`` returns (the usual batch: more does not speed up a CPU).
    amp_dtype
        Autocast dtype, if any.
    budget_bytes
        Memory to plan for; default :func:`memory_budget`.
    """
    fixed_n = _resolve(batch_size, "batch_size")
    if fixed_n is not None:
        return fixed_n
    if mode not in ("eval", "grad"):
        raise BrainsexError(f"choose_batch_size: mode must be 'eval' or 'grad', got {mode!r}")
    channels, in_shape = getattr(model, "channels", None), getattr(model, "in_shape", None)
    if channels is None or in_shape is None:
        return int(cap)
    if device is None:
        try:
            device = next(model.parameters()).device
        except (AttributeError, StopIteration):
            device = "cpu"
    budget = int(budget_bytes) if budget_bytes is not None else memory_budget(device)
    per = sfcn_sample_bytes(channels, in_shape, mode, _dtype_bytes(amp_dtype),
                            in_channels=int(getattr(model, "in_channels", 1)))
    return choose_micro_batch(int(cap), per, budget, fixed_bytes(channels, in_shape, 1))


def peak_rss_bytes(children: bool = False) -> int:
    """Peak resident memory of this process (or of its waited-for children), from ``getrusage``.

    Parameters
    ----------
    children : bool, default=False
        Report the children's peak (``RUSAGE_CHILDREN``) instead of this process's.

    Returns
    -------
    int
        Bytes.
    """
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return int(resource.getrusage(who).ru_maxrss) * 1024  # kilobytes on Linux


def memory_limit_bytes() -> int:
    """The memory a process on this machine can have at most.

    ``BRAINSEX_MEMORY_LIMIT``, else a cgroup limit, else the physical memory
    (``psutil.virtual_memory().total``).

    Returns
    -------
    int
        Bytes.
    """
    env = os.environ.get(LIMIT_ENV)
    if env:
        return parse_bytes(env)
    import psutil

    total = int(psutil.virtual_memory().total)
    for limit_f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = open(limit_f).read().strip()
        except OSError:
            continue
        if limit.isdigit() and int(limit) < total:
            return int(limit)
    return total


class RssWatch:
    """Sample, in a background thread, the resident memory of a process's descendants.

    The descendants are a notebook's kernel or a training run; the machine's available memory is
    sampled too.

    Parameters
    ----------
    pid
        Whose descendants to watch (default: this process). With ``include_self`` the process itself
        counts too.
    interval
        Seconds between samples.
    include_self
        Add the watched process's own resident memory.

    Attributes
    ----------
    peak_bytes
        Largest sum of resident memory seen over the watched processes.
    min_available_bytes
        Smallest ``psutil.virtual_memory().available`` seen.

    Use as a context manager: ``with RssWatch() as w: ...; w.peak_bytes``.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.2, include_self: bool = False) -> None:
        self.pid = int(pid) if pid is not None else os.getpid()
        self.interval = float(interval)
        self.include_self = include_self
        self.peak_bytes = 0
        self.min_available_bytes: int | None = None
        self._stop = None
        self._thread = None

    def sample(self) -> None:
        """Take one sample now."""
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = root.children(recursive=True) + ([root] if self.include_self else [])
        except psutil.Error:
            procs = []
        total = 0
        for proc in procs:
            try:
                total += int(proc.memory_info().rss)
            except psutil.Error:
                pass
        self.peak_bytes = max(self.peak_bytes, total)
        avail = int(psutil.virtual_memory().available)
        self.min_available_bytes = avail if self.min_available_bytes is None else min(self.min_available_bytes, avail)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> RssWatch:
        import threading

        self._stop = threading.Event()
        self.sample()
        self._thread = threading.Thread(target=self._run, name="brainsex-rss-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
