"""Training the SFCN sex classifier as in the paper (section 2.5), resumable and multi-GPU ready.

Paper settings (the ``paper`` profile): Adam with initial learning rate 0.01, batch size 16, binary
cross-entropy, ``ReduceLROnPlateau`` on the validation loss (factor 0.1 after 5 epochs without
improvement), 50 epochs, on-the-fly augmentation rotating 50 % of the training scans by up to 15 degrees,
and the checkpoint with the lowest validation loss kept for evaluation (``select="val_loss"``; the CPU
demo may keep the last epoch instead, ``select="last"``, because its 32-scan validation set makes the
lowest-loss epoch a noisy choice).

Differences from the paper's public code, on purpose:

* No augmentation and no shuffling of the validation (and test) data; the public code augments and
  shuffles its validation loader, which makes the validation loss noisy and the checkpoint choice random.
* ``BCEWithLogitsLoss`` on the logit instead of a sigmoid layer followed by ``BCELoss``: the same function,
  computed without overflow.
* ``weight_decay`` defaults to 0 (the paper's text names none; its public code passes 1e-5 to Adam).
* The rotation (probability 0.5, an angle drawn uniformly in [-15, 15] degrees about each of the three
  axes, bilinear, border padding) is applied to the whole batch at once on the model's device
  (:func:`rotate_batch`: MONAI's batched spatial transformer
  :class:`~monai.networks.layers.AffineTransform` with the rotation matrices of
  :func:`monai.transforms.utils.create_rotate`, the code path of MONAI's ``Rotate``/``RandRotated``),
  instead of one scan at a time in the loader.

Engineering:

* Volumes are decoded once into memory (MONAI :class:`~monai.data.CacheDataset`) and checked once for
  shape and finite values; the loader only delivers these cached tensors. The rotations of each batch are
  drawn from a ``torch.Generator`` seeded from ``(seed, epoch, rank, batch index)`` on the CPU, so results
  do not depend on worker count, on the device, or on interruptions.
* Every epoch writes ``last.pt`` (model, optimiser, scheduler, grad scaler, RNG states, epoch, history)
  and, when the validation loss improves, ``best.pt``, both atomically, plus ``history.tsv``. Because the
  shuffling (``DistributedSampler.set_epoch``), dropout (``torch.manual_seed`` per epoch) and augmentation
  streams are all re-derived from the seed and the epoch number, ``resume=True`` after a kill ends with
  exactly the weights and history of an uninterrupted run (on the same device and thread count).
* Under ``torchrun --nproc_per_node=N`` (``RANK``/``WORLD_SIZE`` set) the same call trains with
  :class:`~torch.nn.parallel.DistributedDataParallel` and a ``DistributedSampler``; ``batch_size`` stays
  the *global* batch (the paper's 16 is split across processes); only rank 0 writes files.
* bf16 (or fp16 with gradient scaling) autocast on CUDA; ``channels_last_3d`` memory format (default on).
* Memory (issue 18): the effective batch stays ``batch_size`` (the paper's 16), but it goes through the
  network in micro-batches chosen from the free memory (:func:`brainsex.memory.plan_training`;
  ``TrainConfig.micro_batch`` overrides), whose gradients are accumulated (each part's mean loss weighted
  by its share of the batch) before one optimiser step. At 1 mm with the full widths one scan needs
  several GB while training, so the paper's batch of 16 fits neither a 16 GB GPU nor a 24 GB machine.
  Where the whole batch fits (the demo and smoke grids) it is one pass, bit for bit the earlier code.

What micro-batches change compared with the paper: the *gradient* is the full batch's for every layer
without batch statistics (``tests/test_memory.py`` checks it on SFCN with batch normalisation removed),
but **batch normalisation** normalises each micro-batch with that micro-batch's own mean and variance,
which are noisier than a batch of 16's (and couple fewer scans), and its running statistics (used at
evaluation) are updated once per micro-batch instead of once per batch, so they follow the training
a little faster (momentum 0.1 applied more often). With micro-batches of 2-4 scans of a 3-D volume
each statistic still averages millions of voxels, so the effect is small;
``benchmarks/micro_batch.py`` measures it on the demo (test accuracy with and without accumulation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from brainsex import BrainsexError
from brainsex.io import atomic_path, write_table
from brainsex.memory import MemoryPlan, choose_batch_size, plan_training, split_sizes
from brainsex.model import PAPER_CHANNELS, SFCN, sfcn_output_grid
from brainsex.run import TrainDir

__all__ = [
    "TrainConfig",
    "TrainResult",
    "HISTORY_COLUMNS",
    "train",
    "predict",
    "load_model",
    "resolve_device",
    "labels_from_table",
    "random_rotation_angles",
    "rotation_affines",
    "rotate_batch",
    "VolumeStore",
    "ScanDataset",
]

log = logging.getLogger("brainsex.train")

#: Columns of ``history.tsv``, one row per epoch.
HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "samples_per_s")

CHECKPOINT_FORMAT = "brainsex-sfcn/1"

#: The rotation augmentation's implementation, stored in checkpoints: a run trained with another one
#: (the earlier per-scan ``RandRotated`` in the loader) cannot be resumed to the same result.
AUGMENTATION = "rotate_batch/1: monai AffineTransform per batch, generator seeded by (seed, epoch, rank, batch)"

# Config fields that change the result; a resumed run must use the same values.
_RESULT_FIELDS = ("batch_size", "lr", "weight_decay", "rotate_prob", "rotate_deg", "scheduler", "scheduler_factor",
                  "scheduler_patience", "seed", "amp", "select")
#: Learning-rate schedules of :class:`TrainConfig`.
SCHEDULERS = ("plateau", "cosine")

# Independent random streams derived from (seed, epoch, ...).
_STREAM_DROPOUT, _STREAM_AUGMENT, _STREAM_LOADER = 1, 2, 3


@dataclass
class TrainConfig:
    """Training settings (defaults: the paper's, section 2.5).

    Parameters
    ----------
    epochs
        Number of epochs (50 in the paper).
    batch_size
        Global batch size (16 in the paper); under DDP each of N processes gets ``batch_size // N``.
    lr
        Initial Adam learning rate (0.01).
    weight_decay
        Adam weight decay. 0 here; the paper's public code used 1e-5.
    rotate_prob, rotate_deg
        Probability that a training scan is rotated, and the largest angle in degrees about each axis
        (0.5 and 15 in the paper). ``rotate_prob=0`` disables augmentation.
    scheduler
        ``"plateau"`` (the paper's): ``ReduceLROnPlateau`` on the validation loss. ``"cosine"``: the
        learning rate follows half a cosine from ``lr`` to 0 over ``epochs`` (``CosineAnnealingLR``),
        whatever the validation loss does, so a short run always ends annealed; with few epochs the
        plateau rule may never fire and the last epoch is then taken at the full rate (the demo, see
        its profile). A cosine run resumes only with the same ``epochs``.
    scheduler_factor, scheduler_patience
        ``"plateau"`` only: multiply the learning rate by ``factor`` after ``patience`` epochs without
        improvement of the validation loss (0.1 and 5).
    select
        Which weights ``best.pt`` keeps: ``"val_loss"`` (the paper's: the epoch with the lowest validation
        loss) or ``"last"`` (the final epoch). With a small validation set (32 scans in the demo) the
        lowest validation loss is a noisy criterion that tends to pick an early, under-trained epoch;
        ``"last"`` avoids that. The validation loss still drives the learning-rate schedule.
    seed
        Seeds model initialisation, shuffling, dropout and augmentation.
    device
        ``"auto"`` (CUDA, else MPS, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"mps"``.
    amp
        Mixed precision on CUDA only: ``"auto"`` (bf16 where supported, else fp16), ``"bf16"``,
        ``"fp16"`` or ``"off"``. Ignored on CPU and MPS.
    channels_last
        Use the ``channels_last_3d`` memory format for the model and inputs. On by default: on 2 CPU cores
        the default (contiguous) layout had erratic training steps, at times 5-10x slower (flushing
        denormals cured it but slowed everything else), while ``channels_last_3d`` stayed steady at a
        similar or better speed; on GPUs it suits cuDNN's tensor-core kernels.
    num_workers
        DataLoader worker processes (0: load in the main process; with the in-memory cache this is
        usually fastest on a CPU). Also the number of threads that fill the cache.
    cache
        Decode every NIfTI once and keep the volumes in memory (MONAI ``CacheDataset``).
    cache_dtype
        ``"float32"`` or ``"float16"`` (halves the memory of the cache; inputs are cast back to float32).
    num_threads
        If set, ``torch.set_num_threads(num_threads)`` before training.
    deterministic
        On CUDA, request deterministic algorithms (slower); CPU runs are deterministic anyway.
    micro_batch
        Scans per forward/backward pass: ``"auto"`` (the largest that fits the device's free memory,
        :func:`brainsex.memory.plan_training`) or an integer. The optimiser still steps once per
        ``batch_size`` scans, on the gradient accumulated over the micro-batches, so the effective batch
        stays the paper's; batch normalisation, however, normalises each micro-batch with its own
        statistics (see the module notes). On the demo and smoke grids the whole batch fits.
    checkpointing
        Activation checkpointing of the first two blocks (``True``); ``"auto"``/``False``: off (measured
        not to lower SFCN's peak memory, see :mod:`brainsex.memory`).
    """

    epochs: int = 50
    batch_size: int = 16
    lr: float = 0.01
    weight_decay: float = 0.0
    rotate_prob: float = 0.5
    rotate_deg: float = 15.0
    scheduler: str = "plateau"
    scheduler_factor: float = 0.1
    scheduler_patience: int = 5
    select: str = "val_loss"
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = True
    num_workers: int = 0
    cache: bool = True
    cache_dtype: str = "float32"
    num_threads: int | None = None
    deterministic: bool = False
    micro_batch: int | str = "auto"
    checkpointing: bool | str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.amp, bool):
            self.amp = "auto" if self.amp else "off"
        checks = [
            (isinstance(self.epochs, int) and self.epochs >= 1, "epochs must be an integer >= 1"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size must be an integer >= 1"),
            (float(self.lr) > 0, "lr must be > 0"),
            (float(self.weight_decay) >= 0, "weight_decay must be >= 0"),
            (0.0 <= float(self.rotate_prob) <= 1.0, "rotate_prob must be in [0, 1]"),
            (0.0 <= float(self.rotate_deg) <= 180.0, "rotate_deg must be in [0, 180]"),
            (self.scheduler in SCHEDULERS, f"scheduler must be one of {', '.join(SCHEDULERS)}"),
            (0.0 < float(self.scheduler_factor) < 1.0, "scheduler_factor must be in (0, 1)"),
            (int(self.scheduler_patience) >= 0, "scheduler_patience must be >= 0"),
            (self.select in ("val_loss", "last"), "select must be 'val_loss' or 'last'"),
            (self.amp in ("auto", "bf16", "fp16", "off"), "amp must be 'auto', 'bf16', 'fp16' or 'off'"),
            (int(self.num_workers) >= 0, "num_workers must be >= 0"),
            (self.cache_dtype in ("float32", "float16"), "cache_dtype must be 'float32' or 'float16'"),
            (self.num_threads is None or int(self.num_threads) >= 1, "num_threads must be >= 1 or None"),
            (self.micro_batch == "auto" or (isinstance(self.micro_batch, int) and not isinstance(self.micro_batch, bool)
                                            and self.micro_batch >= 1), "micro_batch must be 'auto' or an integer >= 1"),
            (self.checkpointing in ("auto", True, False), "checkpointing must be 'auto', True or False"),
        ]
        for ok, msg in checks:
            if not ok:
                raise BrainsexError(f"TrainConfig: {msg} (got {self!r})")

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TrainConfig:
        """Build a config from profile parameters (keys that are not fields, and None values, are ignored).

        Parameters
        ----------
        params : dict
            Profile or notebook parameters.

        Returns
        -------
        TrainConfig
            The validated config.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in params.items() if k in names and v is not None}
        return cls(**kwargs)


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes
    ----------
    out_dir
        Folder with ``best.pt``, ``last.pt`` and ``history.tsv``.
    best_checkpoint, last_checkpoint
        Paths of the selected (lowest validation loss, or the last with ``select="last"``) and the latest
        checkpoints.
    history
        One row per epoch (:data:`HISTORY_COLUMNS`).
    best_epoch, best_val_loss, best_val_acc
        The epoch (1-based) of the selected checkpoint and its validation metrics.
    epochs_run
        Epochs computed by this call (fewer than ``epochs`` after a resume).
    device
        The device trained on.
    in_shape
        The input grid.
    world_size
        Number of processes (1 without DDP).
    model
        The best model (eval mode) on ``device``.
    memory
        The micro-batch, evaluation batch and checkpointing used (:class:`brainsex.memory.MemoryPlan`).
    """

    out_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    history: pd.DataFrame
    best_epoch: int
    best_val_loss: float
    best_val_acc: float
    epochs_run: int
    device: str
    in_shape: tuple[int, int, int]
    world_size: int = 1
    model: SFCN | None = field(default=None, repr=False)
    memory: MemoryPlan | None = None


# --------------------------------------------------------------------------------------------- helpers
def _derive_seed(*values: int) -> int:
    """A 32-bit seed derived from integers, independent across different tuples."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(1)[0])


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device for a name: ``"auto"`` picks CUDA, then MPS, then CPU.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda", "cuda:N", "mps"}, default="auto"
        Device name (case-insensitive).

    Returns
    -------
    torch.device
        The device.

    Raises
    ------
    BrainsexError
        If the requested device is not available on this machine.
    """
    name = str(device).lower()
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps is not None and mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_ok else torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BrainsexError(f"device '{device}' requested but CUDA is not available (torch {torch.__version__})")
        return torch.device(name)
    if name == "mps":
        if not mps_ok:
            raise BrainsexError("device 'mps' requested but the MPS backend is not available")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise BrainsexError(f"unknown device '{device}'; use 'auto', 'cpu', 'cuda' or 'mps'")


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def labels_from_table(table: pd.DataFrame) -> np.ndarray:
    """Class labels (1 = male, 0 = female) from a ``y`` column, else from ``sex`` ('M'/'F').

    Parameters
    ----------
    table : pandas.DataFrame
        Subjects with ``y`` or ``sex``.

    Returns
    -------
    numpy.ndarray
        float32 labels (0.0 or 1.0), one per row.

    Raises
    ------
    BrainsexError
        If neither column exists or a value is not a valid label.
    """
    if "y" in table.columns:
        y = pd.to_numeric(table["y"], errors="coerce")
        bad = ~y.isin([0, 1])
        if bad.any():
            raise BrainsexError(f"column 'y' must be 0 (female) or 1 (male); found {sorted(map(str, table.loc[bad, 'y'].unique()))[:5]}")
        return y.to_numpy(dtype=np.float32)
    if "sex" in table.columns:
        sex = table["sex"].astype(str).str.strip().str.upper()
        bad = ~sex.isin(["M", "F"])
        if bad.any():
            raise BrainsexError(f"column 'sex' must be 'M' or 'F'; found {sorted(table.loc[bad, 'sex'].astype(str).unique())[:5]}")
        return (sex == "M").to_numpy(dtype=np.float32)
    raise BrainsexError("table needs a 'y' (1 = male) or a 'sex' ('M'/'F') column")


def random_rotation_angles(n: int, max_deg: float = 15.0, prob: float = 0.5,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Rotation angles for ``n`` scans (paper section 2.5: half of the scans rotated by up to 15 degrees).

    Parameters
    ----------
    n
        Number of scans.
    max_deg
        Largest angle in degrees about each axis; the angles are uniform in ``[-max_deg, max_deg]``.
    prob
        Probability that a scan is rotated.
    generator
        A CPU ``torch.Generator`` for reproducible draws.

    Returns
    -------
    torch.Tensor
        ``(n, 3)`` float64 angles in radians about the first, second and third spatial axis (the ``angle``
        of MONAI's ``Rotate``); a row of zeros for a scan that is not rotated.
    """
    if int(n) < 0 or not 0.0 <= float(prob) <= 1.0 or float(max_deg) < 0:
        raise BrainsexError(f"random_rotation_angles: need n >= 0, prob in [0, 1], max_deg >= 0 "
                            f"(got n={n}, prob={prob}, max_deg={max_deg})")
    rotated = torch.rand(int(n), generator=generator, dtype=torch.float64) < float(prob)
    angles = (torch.rand(int(n), 3, generator=generator, dtype=torch.float64) * 2 - 1) * math.radians(max_deg)
    return torch.where(rotated[:, None], angles, torch.zeros_like(angles))


def rotation_affines(angles: torch.Tensor | np.ndarray, shape: Sequence[int]) -> torch.Tensor:
    """Voxel-index affines ``(n, 4, 4)`` that rotate a volume of ``shape`` about its centre.

    ``T(c) @ R @ T(-c)`` with ``R`` from :func:`monai.transforms.utils.create_rotate` (rotation order
    "XYZ") and ``c = (shape - 1) / 2``: the matrix MONAI's ``Rotate`` builds for ``keep_size=True``.

    Parameters
    ----------
    angles : torch.Tensor or numpy.ndarray
        Rotation angles in radians, shape ``(n, 3)`` (about x, y, z).
    shape : sequence of int
        The volume's 3-D shape.

    Returns
    -------
    torch.Tensor
        float32 affines, shape ``(n, 4, 4)``.
    """
    from monai.transforms.utils import create_rotate, create_translate

    angles = np.asarray(torch.as_tensor(angles, dtype=torch.float64).cpu(), dtype=np.float64)
    if angles.ndim != 2 or angles.shape[1] != 3 or len(shape) != 3:
        raise BrainsexError(f"rotation_affines: need angles of shape (n, 3) and a 3-D shape "
                            f"(got angles {angles.shape}, shape {tuple(shape)})")
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    to_centre, back = create_translate(3, (-centre).tolist()), create_translate(3, centre.tolist())
    return torch.as_tensor(np.stack([back @ create_rotate(3, a.tolist()) @ to_centre for a in angles]),
                           dtype=torch.float32)


def rotate_batch(x: torch.Tensor, angles: torch.Tensor | np.ndarray, mode: str = "bilinear",
                 padding_mode: str = "border") -> torch.Tensor:
    """Rotate each volume of a batch about its centre, all at once on ``x``'s device (paper section 2.5).

    The resampling is MONAI's batched spatial transformer
    :class:`~monai.networks.layers.AffineTransform` (``normalized=False``, ``reverse_indexing=True``,
    ``align_corners=False``) with the affines of :func:`rotation_affines`: the same computation as
    ``monai.transforms.Rotate(angle, keep_size=True)`` applied to each scan, in one call.

    Parameters
    ----------
    x
        ``(B, C, D, H, W)`` float tensor on any device.
    angles
        ``(B, 3)`` angles in radians (see :func:`random_rotation_angles`); scans whose row is all zeros are
        returned unchanged (not resampled).
    mode, padding_mode
        Interpolation (``"bilinear"``) and padding (``"border"``: the edge value outside the volume).

    Returns
    -------
    torch.Tensor
        The rotated batch: same shape, dtype and device as ``x``.
    """
    from monai.networks.layers import AffineTransform

    if not isinstance(x, torch.Tensor) or x.ndim != 5:
        raise BrainsexError(f"rotate_batch: x must be a (B, C, D, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    angles = torch.as_tensor(angles, dtype=torch.float64).cpu()
    if tuple(angles.shape) != (x.shape[0], 3):
        raise BrainsexError(f"rotate_batch: angles must have shape ({x.shape[0]}, 3), got {tuple(angles.shape)}")
    idx = torch.nonzero(angles.abs().sum(1) > 0).flatten()
    if len(idx) == 0:
        return x
    xform = AffineTransform(normalized=False, mode=mode, padding_mode=padding_mode, align_corners=False,
                            reverse_indexing=True)
    theta = rotation_affines(angles[idx], x.shape[2:]).to(x.device)
    dev_idx = idx.to(x.device)
    rotated = xform(x.index_select(0, dev_idx).float(), theta)
    return x.index_copy(0, dev_idx, rotated.to(x.dtype))


def _plain(x: Any) -> torch.Tensor:
    """A plain float32 tensor (MONAI returns MetaTensors)."""
    if hasattr(x, "as_tensor"):
        x = x.as_tensor()
    x = torch.as_tensor(x)
    return x.float() if x.dtype != torch.float32 else x


def _check_volume(image: Any, path: str, in_shape: tuple[int, int, int]) -> None:
    shape = tuple(image.shape)
    if shape != (1, *in_shape):
        got = shape[1:] if len(shape) == 4 and shape[0] == 1 else shape
        raise BrainsexError(f"{path}: volume shape {got} differs from the model's in_shape {in_shape}; "
                            f"all inputs must be on the same grid (re-run preprocessing or pass in_shape)")
    t = torch.as_tensor(image)
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        n_bad = int((~finite).sum())
        raise BrainsexError(f"{path}: volume contains {n_bad} NaN/inf voxel(s); check its preprocessing")


def _load_transform(cache_dtype: str = "float32"):
    from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged

    dtype = torch.float16 if cache_dtype == "float16" else torch.float32
    return Compose([
        LoadImaged(keys="image", image_only=True, reader="NibabelReader"),
        EnsureChannelFirstd(keys="image", channel_dim="no_channel"),
        EnsureTyped(keys="image", dtype=dtype, track_meta=False),
    ])


def _image_paths(table: pd.DataFrame, col: str = "image_pp") -> list[str]:
    if col not in table.columns:
        raise BrainsexError(f"table has no '{col}' column (path to a preprocessed, z-scored NIfTI volume)")
    paths = []
    for p in table[col]:
        if not isinstance(p, str | os.PathLike) or not str(p).strip() or str(p) == "nan":
            raise BrainsexError(f"column '{col}' has an empty path; rows that failed preprocessing must be dropped")
        paths.append(str(p))
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise BrainsexError(f"{len(missing)} image(s) not found, e.g. {missing[0]}")
    return paths


def _infer_in_shape(path: str) -> tuple[int, int, int]:
    import nibabel as nib

    try:
        shape = nib.load(path).shape
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise BrainsexError(f"{path}: cannot be read as NIfTI ({exc})") from exc
    if len(shape) != 3:
        raise BrainsexError(f"{path}: expected a 3-D volume, got shape {shape}")
    return tuple(int(s) for s in shape)  # type: ignore[return-value]


class VolumeStore:
    """Decoded volumes: all in memory (MONAI ``CacheDataset``, checked once) or decoded on each access.

    Parameters
    ----------
    paths
        NIfTI files of z-scored volumes on the common grid.
    in_shape
        The grid every volume must have; a volume of another shape or with NaN/inf is a
        :class:`BrainsexError` naming the file.
    cache
        Decode every file once into memory (``True``) or on each access.
    cache_dtype
        ``"float32"`` or ``"float16"`` (volumes are returned as float32 either way).
    num_workers
        Threads that fill the cache.
    progress
        Progress bar while filling the cache.

    ``store[i]`` is the ``(1, *in_shape)`` float32 tensor of ``paths[i]``.
    """

    def __init__(self, paths: Sequence[str], in_shape: tuple[int, int, int], cache: bool = True,
                 cache_dtype: str = "float32", num_workers: int = 0, progress: bool = False) -> None:
        from monai.data import CacheDataset, Dataset

        self.paths = list(paths)
        self.in_shape = in_shape
        self.cache = cache
        data = [{"image": p} for p in self.paths]
        transform = _load_transform(cache_dtype if cache else "float32")
        try:
            if cache:
                self.ds = CacheDataset(data, transform=transform, num_workers=max(1, num_workers),
                                       progress=progress, copy_cache=False)
            else:
                self.ds = Dataset(data, transform=transform)
        except Exception as exc:
            raise BrainsexError(f"cannot load the images ({_root_cause(exc)})") from exc
        if cache:  # check once, in memory
            for i in range(len(self.ds)):
                _check_volume(self.ds[i]["image"], self.paths[i], in_shape)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        try:
            img = self.ds[i]["image"]
        except Exception as exc:
            raise BrainsexError(f"{self.paths[i]}: cannot be loaded ({_root_cause(exc)})") from exc
        if not self.cache:
            _check_volume(img, self.paths[i], self.in_shape)
        return _plain(img)


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}"


class ScanDataset(torch.utils.data.Dataset):
    """Items ``{"image", "y", "index"}`` for rows ``indices`` of a :class:`VolumeStore`, as stored.

    No augmentation here: the training loop rotates whole batches on the model's device
    (:func:`rotate_batch`), so the loader only delivers the cached tensors.
    """

    def __init__(self, store: VolumeStore, indices: Sequence[int], labels: np.ndarray) -> None:
        self.store = store
        self.indices = [int(i) for i in indices]
        self.labels = labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.indices[i]
        return {"image": self.store[index], "y": torch.tensor(self.labels[index], dtype=torch.float32),
                "index": index}


def _dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def _acc_dtype(device: torch.device) -> torch.dtype:
    """Accumulator dtype for epoch sums: float64, except on MPS, which has none."""
    return torch.float32 if device.type == "mps" else torch.float64


def _unwrap(model: nn.Module) -> SFCN:
    return model.module if hasattr(model, "module") else model  # type: ignore[return-value]


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()  # noqa: NPY002 - the global state is what we save
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
        "augment": "per-batch generators seeded from (seed, epoch, rank, batch); nothing to store",
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))  # noqa: NPY002
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(state["cuda"])


def _data_signature(ids: Sequence[str], splits: Sequence[str], labels: np.ndarray,
                    in_shape: tuple[int, int, int], paths: Sequence[str] | None = None) -> str:
    """What a checkpoint was trained on: subjects, subsets, labels, grid and each image file's version.

    A file's version is its size and modification time (not its name, so a copied run directory
    resumes): a scan preprocessed again since the checkpoint, even under the same name, makes a
    resume start afresh instead of continuing a model trained on the old images.
    """
    h = hashlib.sha256(repr(tuple(in_shape)).encode())
    for i, s, y in zip(ids, splits, labels, strict=True):
        h.update(f"{i}\t{s}\t{int(y)}\n".encode())
    for path in paths or ():
        st = os.stat(path)
        h.update(f"{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _save(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _torch_load(path: Path, map_location: Any = "cpu") -> dict:
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as exc:
        raise BrainsexError(f"{path}: checkpoint not found") from exc
    except Exception as exc:
        raise BrainsexError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT or "model_state" not in obj:
        raise BrainsexError(f"{path}: not a brainsex SFCN checkpoint (expected format '{CHECKPOINT_FORMAT}')")
    return obj


def load_model(
    checkpoint: str | os.PathLike,
    device: str | torch.device = "cpu",
    channels: Sequence[int] | None = None,
    in_shape: Sequence[int] | None = None,
) -> SFCN:
    """Load an SFCN from a ``best.pt``/``last.pt`` checkpoint, in eval mode.

    Parameters
    ----------
    checkpoint
        Path written by :func:`train`.
    device
        Where to put the model.
    channels, in_shape
        If given, the architecture the caller expects; a checkpoint trained with other channel widths or
        another input grid is refused with a message naming both.

    Raises
    ------
    BrainsexError
        If the file is missing, is not an SFCN checkpoint, or its architecture differs from the expected
        one or from its own weights.
    """
    path = Path(checkpoint)
    ckpt = _torch_load(path)
    cfg = dict(ckpt.get("model_config") or {})
    try:
        model = SFCN(channels=cfg["channels"], in_shape=cfg["in_shape"], dropout=cfg.get("dropout", 0.5),
                     in_channels=cfg.get("in_channels", 1))
    except KeyError as exc:
        raise BrainsexError(f"{path}: checkpoint lacks the model configuration key {exc}") from exc
    if channels is not None and tuple(int(c) for c in channels) != model.channels:
        raise BrainsexError(f"{path}: checkpoint is an SFCN with channels={list(model.channels)}, "
                            f"expected channels={list(channels)}")
    if in_shape is not None and tuple(int(s) for s in in_shape) != model.in_shape:
        raise BrainsexError(f"{path}: checkpoint was trained on in_shape={model.in_shape}, "
                            f"expected in_shape={tuple(in_shape)}")
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as exc:
        raise BrainsexError(f"{path}: weights do not fit SFCN(channels={list(model.channels)}, "
                            f"in_shape={model.in_shape}): {str(exc).splitlines()[0]}") from exc
    return model.to(resolve_device(device) if isinstance(device, str) else device).eval()


def _prepare(table: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(table, pd.DataFrame):
        raise BrainsexError(f"table must be a pandas DataFrame, got {type(table).__name__}")
    for col in ("participant_id", "image_pp", "split"):
        if col not in table.columns:
            raise BrainsexError(f"training table has no '{col}' column (columns: {', '.join(map(str, table.columns))})")
    if "status" in table.columns:
        failed = table["status"].astype(str) != "ok"
        if failed.any():
            log.info("dropping %d row(s) whose preprocessing status is not 'ok'", int(failed.sum()))
            table = table[~failed]
    return table.reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- train
def train(
    table: pd.DataFrame,
    config: TrainConfig | None = None,
    out_dir: str | os.PathLike = "train",
    in_shape: Sequence[int] | None = None,
    channels: Sequence[int] = PAPER_CHANNELS,
    dropout: float = 0.5,
    resume: bool | str = False,
    progress: bool = True,
) -> TrainResult:
    """Train SFCN on the ``train`` rows, select on the ``val`` rows (paper section 2.5).

    Parameters
    ----------
    table
        One row per subject with ``participant_id``, ``image_pp`` (a z-scored NIfTI on the common grid),
        ``y`` (1 = male) or ``sex`` ('M'/'F'), and ``split`` (``train``/``val``/``test``; test rows are not
        read). Rows with a ``status`` other than ``ok`` are dropped.
    config
        Training settings; default :class:`TrainConfig` (the paper's).
    out_dir
        Folder for ``best.pt``, ``last.pt`` and ``history.tsv`` (``<run_dir>/train`` in the book).
    in_shape
        Input grid; ``None`` reads it from the first image's header.
    channels, dropout
        SFCN architecture (see :class:`brainsex.model.SFCN`).
    resume
        ``True``: continue from ``out_dir/last.pt`` if it exists (after a kill, or to extend ``epochs``);
        the data, architecture and result-determining settings must be those of the checkpoint, else a
        :class:`BrainsexError`. ``"auto"``: the same when they match, otherwise (or when the checkpoint has
        more epochs than asked for) train from scratch, replacing it -- for notebooks re-run with other
        parameters. ``False``: always from scratch.
    progress
        Show tqdm progress bars (rank 0 only).

    Returns
    -------
    TrainResult

    Raises
    ------
    BrainsexError
        For an empty training or validation split, a single class in the training split, an image whose
        shape differs from ``in_shape`` or that contains NaN/inf, a missing file, or a checkpoint that does
        not match on resume.
    """
    config = config or TrainConfig()
    if resume not in (True, False, "auto"):
        raise BrainsexError(f"resume must be True, False or 'auto', got {resume!r}")
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    out_dir = Path(out_dir)
    table = _prepare(table)
    splits = table["split"].astype(str)
    train_idx = np.flatnonzero(splits.to_numpy() == "train")
    val_idx = np.flatnonzero(splits.to_numpy() == "val")
    if len(train_idx) == 0:
        raise BrainsexError("the training split is empty: no row has split == 'train'")
    if len(val_idx) == 0:
        raise BrainsexError("the validation split is empty: no row has split == 'val' (needed for the "
                            "learning-rate schedule and to choose the best checkpoint)")
    used = np.concatenate([train_idx, val_idx])
    labels = np.zeros(len(table), dtype=np.float32)
    labels[used] = labels_from_table(table.iloc[used])
    classes = np.unique(labels[train_idx])
    if len(classes) < 2:
        only = "male" if classes[0] == 1 else "female"
        raise BrainsexError(f"the training split has a single class (all {len(train_idx)} subjects are {only}); "
                            f"a classifier needs both sexes")
    if table["participant_id"].iloc[used].duplicated().any():
        raise BrainsexError("participant_id repeats within train/val; keep one scan per subject (stratified_split does)")
    paths = _image_paths(table.iloc[used])
    in_shape = tuple(int(s) for s in in_shape) if in_shape is not None else _infer_in_shape(paths[0])
    if len(in_shape) != 3:
        raise BrainsexError(f"in_shape must have three numbers, got {in_shape}")

    rank, world, local_rank = _dist_env()
    distributed = world > 1
    device = resolve_device(config.device)
    if device.type == "cuda" and distributed:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    we_initialised = False
    if distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            we_initialised = True
    is_main = rank == 0
    progress = progress and is_main
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not config.deterministic
        if config.deterministic:
            torch.backends.cudnn.deterministic = True
            torch.use_deterministic_algorithms(True, warn_only=True)
    amp_dtype = _amp_dtype(config.amp, device)
    if config.batch_size < world:
        raise BrainsexError(f"batch_size {config.batch_size} is smaller than the number of processes {world}")
    per_rank_batch = config.batch_size // world
    if config.batch_size % world:
        log.warning("batch_size %d is not divisible by %d processes; using %d per process",
                    config.batch_size, world, per_rank_batch)

    try:
        return _train_loop(_LoopInputs(
            table=table, labels=labels, train_idx=train_idx, val_idx=val_idx, paths=paths, used=used,
            in_shape=in_shape, config=config, out_dir=out_dir, channels=tuple(int(c) for c in channels),
            dropout=float(dropout), resume=resume, progress=progress, rank=rank, world=world, device=device,
            amp_dtype=amp_dtype, per_rank_batch=per_rank_batch, is_main=is_main))
    finally:
        if we_initialised:
            import torch.distributed as dist

            dist.destroy_process_group()


@dataclass
class _LoopInputs:
    """What :func:`train` has checked and resolved, handed to the epoch loop."""

    table: pd.DataFrame  # the prepared table (all rows)
    labels: np.ndarray  # 1 = male, for every row (used rows filled)
    train_idx: np.ndarray  # rows of the training split
    val_idx: np.ndarray  # rows of the validation split
    paths: list[str]  # images of the used rows (train, then val)
    used: np.ndarray  # train_idx followed by val_idx
    in_shape: tuple[int, int, int]
    config: TrainConfig
    out_dir: Path
    channels: tuple[int, ...]
    dropout: float
    resume: bool | str
    progress: bool  # already False on ranks other than 0
    rank: int
    world: int
    device: torch.device
    amp_dtype: torch.dtype | None
    per_rank_batch: int  # the effective batch of this process
    is_main: bool


@dataclass
class _Fit:
    """What one training run updates: the model (and its DDP wrapper), optimiser, schedule and scaler."""

    model: SFCN
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    loss_fn: nn.Module
    memory_format: torch.memory_format
    autocast: Any
    plan: MemoryPlan
    min_part: int  # smallest micro-batch batch normalisation can train on


@dataclass
class _Progress:
    """The history so far and the selected epoch (restored on resume)."""

    history: list[dict[str, float]] = field(default_factory=list)
    start_epoch: int = 0
    best_val_loss: float = math.inf
    best_val_acc: float = float("nan")
    best_epoch: int = 0


def _memory_plan(run: _LoopInputs) -> tuple[MemoryPlan, int]:
    """Scans per forward/backward pass (planned with the cache already in memory) and the minimum."""
    plan = plan_training(run.per_rank_batch, run.channels, run.in_shape, device=run.device, amp_dtype=run.amp_dtype,
                         micro_batch=run.config.micro_batch, checkpointing=run.config.checkpointing)
    min_part = 2 if math.prod(sfcn_output_grid(run.in_shape)) == 1 else 1  # BatchNorm needs 2 values per channel
    if plan.micro_batch < min_part:
        raise BrainsexError(f"micro_batch {plan.micro_batch}: on the grid {run.in_shape} the last blocks have one "
                            f"voxel, so batch normalisation needs at least {min_part} scans per pass")
    if run.is_main:
        log.info("memory: %s", plan.describe())
    return plan, min_part


def _data_loaders(run: _LoopInputs, store: VolumeStore, plan: MemoryPlan) -> tuple[Any, torch.Generator, Any, Any]:
    """Sampler, loader generator, training and validation loaders over the store's positions."""
    from torch.utils.data import DataLoader, Subset
    from torch.utils.data.distributed import DistributedSampler

    config, world, rank = run.config, run.world, run.rank
    pos_labels = run.labels[run.used]
    n_train = len(run.train_idx)
    train_ds = ScanDataset(store, range(n_train), pos_labels)
    val_ds = ScanDataset(store, range(n_train, len(run.used)), pos_labels)  # never augmented
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=config.seed)
    per_rank_n = len(sampler)
    drop_last = per_rank_n % run.per_rank_batch == 1 and per_rank_n > 1  # BatchNorm cannot train on one sample
    loader_gen = torch.Generator()
    pin = run.device.type == "cuda"
    train_loader = DataLoader(train_ds, batch_size=run.per_rank_batch, sampler=sampler, drop_last=drop_last,
                              num_workers=config.num_workers, pin_memory=pin, generator=loader_gen)
    val_shard = Subset(val_ds, list(range(rank, len(val_ds), world)))
    val_loader = DataLoader(val_shard, batch_size=plan.eval_batch, shuffle=False,
                            num_workers=config.num_workers, pin_memory=pin)
    return sampler, loader_gen, train_loader, val_loader


def _new_fit(run: _LoopInputs, plan: MemoryPlan, min_part: int) -> _Fit:
    """Seeded model, optimiser and schedule (paper section 2.5)."""
    config, device, amp_dtype = run.config, run.device, run.amp_dtype
    random.seed(config.seed)
    np.random.seed(config.seed)  # noqa: NPY002 - seed the global generators third-party code may use
    torch.manual_seed(config.seed)
    model = SFCN(channels=run.channels, in_shape=run.in_shape, dropout=run.dropout)
    model.checkpoint_blocks = plan.checkpoint_blocks
    memory_format = torch.channels_last_3d if config.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(config.epochs))
    else:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=config.scheduler_factor,
                                                               patience=config.scheduler_patience)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    return _Fit(model=model, train_model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                loss_fn=nn.BCEWithLogitsLoss(), memory_format=memory_format, autocast=autocast, plan=plan,
                min_part=min_part)


def _restore(run: _LoopInputs, fit: _Fit, signature: str, layout: TrainDir) -> _Progress:
    """Resume from ``last.pt`` when asked and it matches; otherwise clear a previous run's outputs."""
    config, resume, is_main, last_path = run.config, run.resume, run.is_main, layout.last
    ckpt = None
    if resume and last_path.is_file():
        try:
            ckpt = _torch_load(last_path, map_location="cpu")
            _check_resume(ckpt, fit.model, config, signature, last_path, run.world)
            if resume == "auto" and int(ckpt["epoch"]) > config.epochs:
                raise BrainsexError(f"{last_path}: has {ckpt['epoch']} epochs, more than the {config.epochs} asked for")
        except BrainsexError as exc:
            if resume != "auto":
                raise
            if is_main:
                log.warning("not resuming (%s); training from scratch", exc)
            ckpt = None
    if ckpt is None:
        if resume and is_main and not last_path.is_file():
            log.info("resume requested but %s does not exist; starting from scratch", last_path)
        if is_main:  # a fresh run replaces a previous run's outputs, so a crash never leaves a mix
            for stale in (layout.best, last_path, layout.history):
                stale.unlink(missing_ok=True)
        return _Progress()
    fit.model.load_state_dict(ckpt["model_state"])
    fit.optimizer.load_state_dict(ckpt["optimizer_state"])
    fit.scheduler.load_state_dict(ckpt["scheduler_state"])
    if ckpt.get("scaler_state"):
        fit.scaler.load_state_dict(ckpt["scaler_state"])
    _set_rng_state(ckpt["rng"])
    if is_main:
        log.info("resuming from %s after epoch %d", last_path, int(ckpt["epoch"]))
    return _Progress(history=[dict(h) for h in ckpt["history"]], start_epoch=int(ckpt["epoch"]),
                     best_val_loss=float(ckpt["best_val_loss"]), best_val_acc=float(ckpt["best_val_acc"]),
                     best_epoch=int(ckpt["best_epoch"]))


def _train_epoch(run: _LoopInputs, fit: _Fit, loader: Any, epoch: int, lr: float, bar: Any) -> tuple[torch.Tensor, float]:
    """One pass over the training loader; returns the sums (loss * n, correct, n) and its seconds."""
    config, device, distributed = run.config, run.device, run.world > 1
    rotating = config.rotate_prob > 0 and config.rotate_deg > 0
    fit.train_model.train()
    sums = torch.zeros(3, dtype=_acc_dtype(device), device=device)  # loss*n, correct, n
    t_train = time.perf_counter()
    for step, batch in enumerate(loader):
        images = batch["image"]
        y_all = batch["y"].to(device, non_blocking=True)
        n_batch = len(y_all)
        angles = None
        if rotating:  # paper section 2.5: angles drawn for the whole batch, applied on the model's device
            gen = torch.Generator().manual_seed(_derive_seed(config.seed, _STREAM_AUGMENT, epoch, run.rank, step))
            angles = random_rotation_angles(n_batch, config.rotate_deg, config.rotate_prob, gen)
        fit.optimizer.zero_grad(set_to_none=True)
        parts = split_sizes(n_batch, fit.plan.micro_batch, min_size=fit.min_part)
        batch_loss = torch.zeros((), dtype=sums.dtype, device=device)
        start = 0
        for j, size in enumerate(parts):  # gradient accumulation over micro-batches
            part = slice(start, start + size)
            start += size
            x, y = images[part].to(device, non_blocking=True), y_all[part]
            if angles is not None:
                x = rotate_batch(x, angles[part])
            x = x.contiguous(memory_format=fit.memory_format)
            last_part = j == len(parts) - 1
            sync = fit.train_model.no_sync() if distributed and not last_part else contextlib.nullcontext()
            with sync:
                with fit.autocast():
                    logits = fit.train_model(x)
                    loss = fit.loss_fn(logits.float(), y)
                # the batch's mean loss is the size-weighted sum of the parts' means
                fit.scaler.scale(loss if len(parts) == 1 else loss * (size / n_batch)).backward()
            with torch.no_grad():
                batch_loss += loss.detach().to(sums.dtype) * size
                sums += torch.stack([loss.detach().to(sums.dtype) * size,
                                     ((logits > 0) == (y > 0.5)).sum().to(sums.dtype),
                                     torch.tensor(float(size), dtype=_acc_dtype(device), device=device)])
            del x, logits, loss
        fit.scaler.step(fit.optimizer)
        fit.scaler.update()
        bar.update(1)
        if run.progress and (step % 5 == 0):
            bar.set_postfix(loss=f"{(batch_loss / n_batch).item():.4f}", lr=f"{lr:.2g}", refresh=False)
    return sums, time.perf_counter() - t_train


def _validate(run: _LoopInputs, fit: _Fit, loader: Any, sums: torch.Tensor) -> torch.Tensor:
    """Validation sums; across processes, rank 0's BatchNorm statistics and summed training sums."""
    distributed = run.world > 1
    if distributed:  # evaluate every shard with rank 0's BatchNorm statistics, the ones saved
        import torch.distributed as dist

        for buf in fit.model.buffers():
            dist.broadcast(buf, 0)
    val_sums = _evaluate(fit.model, loader, fit.loss_fn, run.device, fit.memory_format, fit.autocast)
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(sums)
        dist.all_reduce(val_sums)
    return val_sums


def _save_epoch(run: _LoopInputs, fit: _Fit, state: _Progress, layout: TrainDir, signature: str, epoch: int,
                val_loss: float, val_acc: float, improved: bool) -> None:
    """Write ``best.pt`` (when this epoch is selected), ``last.pt`` and ``history.tsv`` (rank 0 only)."""
    base = {"format": CHECKPOINT_FORMAT, "model_config": fit.model.config, "model_state": fit.model.state_dict(),
            "epoch": epoch + 1, "val_loss": val_loss, "val_acc": val_acc, "best_val_loss": state.best_val_loss,
            "best_val_acc": state.best_val_acc, "best_epoch": state.best_epoch,
            "train_config": dataclasses.asdict(run.config), "data_signature": signature,
            "world_size": run.world, "torch_version": str(torch.__version__), "augmentation": AUGMENTATION,
            "memory": dataclasses.asdict(fit.plan)}
    if improved:
        _save(base, layout.best)
    _save({**base, "optimizer_state": fit.optimizer.state_dict(), "scheduler_state": fit.scheduler.state_dict(),
           "scaler_state": fit.scaler.state_dict() if fit.scaler.is_enabled() else None, "rng": _rng_state(),
           "history": state.history}, layout.last)
    write_table(pd.DataFrame(state.history, columns=list(HISTORY_COLUMNS)), layout.history)


def _train_loop(run: _LoopInputs) -> TrainResult:
    """Train for the remaining epochs of ``run``: data, model, resume, epochs, checkpoints."""
    from tqdm.auto import tqdm

    config, device = run.config, run.device
    # Data: one store over train+val rows (positions 0..len(used)-1), decoded once.
    store = VolumeStore(run.paths, run.in_shape, cache=config.cache, cache_dtype=config.cache_dtype,
                        num_workers=config.num_workers, progress=run.progress)
    plan, min_part = _memory_plan(run)
    sampler, loader_gen, train_loader, val_loader = _data_loaders(run, store, plan)
    fit = _new_fit(run, plan, min_part)
    ids = run.table["participant_id"].astype(str).to_numpy()[run.used]
    signature = _data_signature(ids, run.table["split"].astype(str).to_numpy()[run.used], run.labels[run.used],
                                run.in_shape, run.paths)
    run.out_dir.mkdir(parents=True, exist_ok=True)
    layout = TrainDir(run.out_dir)
    state = _restore(run, fit, signature, layout)
    if run.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        fit.train_model = DistributedDataParallel(fit.model, device_ids=[device.index] if device.type == "cuda" else None)

    epochs_run = 0
    for epoch in range(state.start_epoch, config.epochs):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        loader_gen.manual_seed(_derive_seed(config.seed, _STREAM_LOADER, epoch, run.rank))
        torch.manual_seed(_derive_seed(config.seed, _STREAM_DROPOUT, epoch, run.rank))
        lr = float(fit.optimizer.param_groups[0]["lr"])
        bar = tqdm(total=len(train_loader), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not run.progress,
                   leave=True, unit="batch", dynamic_ncols=True)
        sums, train_seconds = _train_epoch(run, fit, train_loader, epoch, lr, bar)
        val_sums = _validate(run, fit, val_loader, sums)
        train_loss, train_acc = (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()
        val_loss, val_acc = (val_sums[0] / val_sums[2]).item(), (val_sums[1] / val_sums[2]).item()
        if config.scheduler == "cosine":
            fit.scheduler.step()
        else:
            fit.scheduler.step(val_loss)
        state.history.append({"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc,
                              "val_loss": val_loss, "val_acc": val_acc, "lr": lr, "seconds": time.perf_counter() - t0,
                              "samples_per_s": float(sums[2].item()) / max(train_seconds, 1e-9)})
        improved = val_loss < state.best_val_loss if config.select == "val_loss" else True
        if improved:
            state.best_val_loss, state.best_val_acc, state.best_epoch = val_loss, val_acc, epoch + 1
        if run.progress:
            bar.set_postfix(loss=f"{train_loss:.4f}", acc=f"{train_acc:.3f}", val_loss=f"{val_loss:.4f}",
                            val_acc=f"{val_acc:.3f}", best=state.best_epoch, refresh=True)
        bar.close()
        if run.is_main:
            _save_epoch(run, fit, state, layout, signature, epoch, val_loss, val_acc, improved)
        epochs_run += 1

    if run.world > 1:
        import torch.distributed as dist

        dist.barrier()
    if not layout.best.is_file():
        raise BrainsexError(f"{layout.best}: no best checkpoint (resume with epochs <= the finished epochs?)")
    best = load_model(layout.best, device=device)
    return TrainResult(out_dir=run.out_dir, best_checkpoint=layout.best, last_checkpoint=layout.last,
                       history=pd.DataFrame(state.history, columns=list(HISTORY_COLUMNS)), best_epoch=state.best_epoch,
                       best_val_loss=state.best_val_loss, best_val_acc=state.best_val_acc, epochs_run=epochs_run,
                       device=str(device), in_shape=tuple(run.in_shape), world_size=run.world, model=best, memory=plan)


def _check_resume(ckpt: dict, model: SFCN, config: TrainConfig, signature: str, path: Path, world: int) -> None:
    if ckpt.get("model_config") != model.config:
        raise BrainsexError(f"{path}: cannot resume, the checkpoint's model {ckpt.get('model_config')} differs from "
                            f"the requested {model.config}")
    if "optimizer_state" not in ckpt or "rng" not in ckpt:
        raise BrainsexError(f"{path}: cannot resume from this checkpoint (no optimiser/RNG state; is it a best.pt?)")
    old = ckpt.get("train_config") or {}
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # checkpoints before a field existed
    old = {k: old.get(k, defaults[k]) for k in _RESULT_FIELDS}
    diff = {k: (old[k], getattr(config, k)) for k in _RESULT_FIELDS if old[k] != getattr(config, k)}
    old_epochs = int((ckpt.get("train_config") or {}).get("epochs", config.epochs))
    if config.scheduler == "cosine" and old_epochs != int(config.epochs):
        diff["epochs"] = (old_epochs, int(config.epochs))  # the cosine's length is the run's
    if diff:
        txt = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise BrainsexError(f"{path}: cannot resume with different settings ({txt}); use another out_dir or resume=False")
    if config.rotate_prob > 0 and config.rotate_deg > 0 and ckpt.get("augmentation") != AUGMENTATION:
        raise BrainsexError(f"{path}: cannot resume, the checkpoint was trained with another rotation augmentation "
                            f"({ckpt.get('augmentation') or 'per-scan RandRotated in the loader'}); "
                            f"use another out_dir or resume=False")
    if ckpt.get("data_signature") != signature:
        raise BrainsexError(f"{path}: cannot resume, the train/val subjects, labels, in_shape or image files "
                            f"(preprocessed again?) differ from the "
                            f"checkpoint's; use another out_dir or resume=False")
    if int(ckpt.get("world_size", 1)) != world:
        log.warning("resuming a %s-process run with %d process(es): results will differ from an uninterrupted run",
                    ckpt.get("world_size"), world)


@torch.no_grad()
def _evaluate(model: SFCN, loader, loss_fn, device, memory_format, autocast) -> torch.Tensor:
    """Sums (loss * n, correct, n) over a loader, in eval mode, on the unwrapped model."""
    model.eval()
    sums = torch.zeros(3, dtype=_acc_dtype(device), device=device)
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
        y = batch["y"].to(device, non_blocking=True)
        with autocast():
            logits = model(x).float()
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")
        sums += torch.stack([loss.to(sums.dtype), ((logits > 0) == (y > 0.5)).sum().to(sums.dtype),
                             torch.tensor(float(len(y)), dtype=_acc_dtype(device), device=device)])
    return sums


# --------------------------------------------------------------------------------------------- predict
def predict(
    model_or_checkpoint: SFCN | str | os.PathLike,
    table: pd.DataFrame,
    batch_size: int | str = "auto",
    device: str = "auto",
    num_workers: int = 0,
    amp: str = "off",
    progress: bool = True,
) -> pd.DataFrame:
    """P(male) for every row of ``table`` (paper section 2.3: sigmoid of the single output).

    Parameters
    ----------
    model_or_checkpoint
        A trained :class:`~brainsex.model.SFCN` or the path of a checkpoint written by :func:`train`.
    table
        Rows with ``participant_id`` and ``image_pp``.
    batch_size
        Scans per forward pass: ``"auto"`` (up to 16, fewer where they would not fit the free memory,
        :func:`brainsex.memory.choose_batch_size`) or an integer.
    num_workers
        DataLoader workers (no shuffling, no augmentation).
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``; for a model object, ``"auto"`` keeps the model's device.
    amp
        Autocast on CUDA (``"bf16"``, ``"fp16"``, ``"auto"``) or ``"off"``.
    progress
        Show a progress bar.

    Returns
    -------
    pandas.DataFrame
        ``participant_id`` and ``prob_male``, in the order of ``table``.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    if isinstance(model_or_checkpoint, nn.Module):
        model = _unwrap(model_or_checkpoint)
        if not isinstance(model, SFCN):
            raise BrainsexError(f"predict needs an SFCN or a checkpoint path, got {type(model).__name__}")
        dev = next(model.parameters()).device if device == "auto" else resolve_device(device)
    else:
        dev = resolve_device(device)
        model = load_model(model_or_checkpoint, device=dev)
    model = model.to(dev)
    if not isinstance(table, pd.DataFrame) or "participant_id" not in table.columns:
        raise BrainsexError("predict needs a DataFrame with 'participant_id' and 'image_pp' columns")
    if len(table) == 0:
        return pd.DataFrame({"participant_id": pd.Series(dtype=str), "prob_male": pd.Series(dtype=float)})
    paths = _image_paths(table)
    store = VolumeStore(paths, model.in_shape, cache=False)
    ds = ScanDataset(store, range(len(paths)), np.zeros(len(paths), dtype=np.float32))
    amp_dtype = _amp_dtype(amp, dev)
    batch_size = choose_batch_size(model, batch_size, mode="eval", device=dev, cap=16, amp_dtype=amp_dtype)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    probs = np.empty(len(paths), dtype=np.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc="predict", disable=not progress, unit="batch"):
                x = batch["image"].to(dev)
                ctx = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
                with ctx:
                    logits = model(x).float()
                probs[batch["index"].numpy()] = torch.sigmoid(logits).double().cpu().numpy()
    finally:
        model.train(was_training)
    return pd.DataFrame({"participant_id": table["participant_id"].to_numpy(), "prob_male": probs})
