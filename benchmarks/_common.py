"""Helpers shared by ``python -m benchmarks`` and ``benchmarks/gpu.py``.

Only the standard library is imported at module level (torch is imported inside the functions that need
it), so that ``gpu.py`` runs on a bare GPU machine that has torch but not the rest of the stack.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Library versions written into every results header.
LIBRARIES = ("torch", "monai", "antspyx", "numpy", "nibabel", "captum", "deepbet", "brainsex")


def ensure_brainsex_importable() -> None:
    """Put ``<repo>/src`` on ``sys.path`` when the package is not installed (e.g. on a lent GPU machine)."""
    try:
        import brainsex  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT / "src"))


# ------------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def n_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS/Windows
        return os.cpu_count() or 1


def memory_total_gb() -> float:
    """Physical memory in GiB (``/proc/meminfo``), NaN where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return math.nan


def package_version(name: str) -> str:
    """Installed version of a distribution, or ``"not installed"``."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_commit(root: Path = REPO_ROOT) -> str:
    """Short commit of the checkout, with ``+dirty`` when files differ from it; ``"unknown"`` without git."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def gpu_info() -> dict[str, Any]:
    """Name, count, memory and CUDA/cuDNN versions of the visible GPUs (empty when there is none)."""
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "gpu_count": torch.cuda.device_count(),
            "gpu_memory_gb": round(props.total_memory / 2**30, 1),
            "gpu_multiprocessors": props.multi_processor_count,
            "cuda": str(torch.version.cuda), "cudnn": str(torch.backends.cudnn.version())}


def machine_info(extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything a reader needs to judge the numbers: date, CPU, cores, memory, load, GPU, versions."""
    now = datetime.datetime.now(datetime.timezone.utc).astimezone()
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        load = "unknown"
    info: dict[str, Any] = {
        "date": now.isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": n_cores(),
        "logical_cpus": os.cpu_count(),
        "memory_gb": round(memory_total_gb(), 1),
        "load_average_1_5_15min": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "git_commit": git_commit(),
    }
    info.update({f"{lib}_version": package_version(lib) for lib in LIBRARIES})
    gpu = gpu_info()
    info.update(gpu if gpu else {"gpu": "none"})
    info.update(dict(extra or {}))
    return info


# -------------------------------------------------------------------------------------------- timing
def summarise(values: Iterable[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements (NaN for none)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def timed(fn: Callable[[], Any], sync: Callable[[], Any] | None = None) -> float:
    """Seconds one call of ``fn`` takes (``sync`` is called before and after, e.g. CUDA synchronize)."""
    if sync:
        sync()
    t0 = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t0


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds`` (``sync`` is called on entry and exit)."""

    def __init__(self, sync: Callable[[], Any] | None = None) -> None:
        self.sync = sync
        self.seconds = math.nan
        self._t0 = 0.0

    def __enter__(self) -> Stopwatch:
        if self.sync:
            self.sync()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.sync:
            self.sync()
        self.seconds = time.perf_counter() - self._t0


# -------------------------------------------------------------------------------------------- memory
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes(pid: int | str = "self") -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def _children(pid: int | str = "self") -> list[int]:
    kids: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                kids += [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
    except OSError:
        pass
    return kids


def tree_rss_bytes() -> int:
    """Resident memory of this process plus all its descendants (worker processes), from ``/proc``."""
    total, stack, seen = _rss_bytes(), _children(), set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += _rss_bytes(pid)
        stack += _children(pid)
    return total


def maxrss_mb() -> float:
    """``getrusage`` high-water mark of this process's resident memory in MiB (since it started)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


class PeakMemory:
    """Peak memory while a block runs: resident memory of the process tree, sampled, and CUDA's peak.

    ``getrusage`` only gives a whole-process high-water mark, so a thread samples ``/proc`` (this
    process and its worker processes) every ``interval`` seconds while the block runs; on Linux without
    ``/proc`` it falls back to ``getrusage``. On CUDA, ``torch.cuda.max_memory_allocated`` is reset on
    entry and read on exit.

    Attributes (after the block): ``peak_rss_mb``, ``start_rss_mb``, ``growth_rss_mb`` (peak minus start:
    what the block itself added), ``peak_cuda_mb`` (NaN without CUDA).
    """

    def __init__(self, interval: float = 0.01, cuda: bool = False) -> None:
        self.interval = float(interval)
        self.cuda = bool(cuda)
        self.peak_rss_mb = math.nan
        self.start_rss_mb = math.nan
        self.peak_cuda_mb = math.nan
        self.growth_rss_mb = math.nan
        self._stop = threading.Event()
        self._peak = 0
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, tree_rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = tree_rss_bytes()
        self.start_rss_mb = start / 2**20 if start else maxrss_mb()
        self._peak = start
        if start:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._peak = max(self._peak, tree_rss_bytes())
            self.peak_rss_mb = self._peak / 2**20
        else:
            self.peak_rss_mb = maxrss_mb()
        self.growth_rss_mb = max(0.0, self.peak_rss_mb - self.start_rss_mb)
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.peak_cuda_mb = torch.cuda.max_memory_allocated() / 2**20


# -------------------------------------------------------------------------------------------- tables
def fmt(value: Any, digits: int = 3) -> str:
    """A cell for Markdown: numbers with ``digits`` significant digits, NaN/None as empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value == 0:
            return "0"
        if abs(value) >= 10 ** digits:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _cell(value: Any, column: str) -> str:
    if column == "pass" and isinstance(value, bool):
        return "pass" if value else "**FAIL**"
    if column == "pass" and isinstance(value, str) and value in ("True", "False"):
        return "pass" if value == "True" else "**FAIL**"
    return fmt(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                   headers: Mapping[str, str] | None = None) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` restricted to ``columns``."""
    headers = dict(headers or {})
    head = "| " + " | ".join(headers.get(c, c) for c in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(r.get(c), c) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def machine_markdown(info: Mapping[str, Any]) -> str:
    """The machine header as a two-column Markdown table."""
    rows = [{"what": k, "value": v} for k, v in info.items()]
    return markdown_table(rows, ["what", "value"])


def pass_fail(value: float, threshold: float, higher_is_better: bool = True) -> bool | None:
    """Whether ``value`` meets ``threshold`` (None when the value is missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return bool(value >= threshold) if higher_is_better else bool(value <= threshold)
