"""Saliency maps of the sex classifier and the operations the paper applies to them.

The paper (section 2.4) explains the classifier with *class saliency maps* (Simonyan et al., 2013):
the gradient of the class score with respect to the input voxels, computed with Captum
(Kokhlikyan et al., 2020) for every correctly classified test scan. Each map is min-max normalised
to [0, 1] (section 2.4), brought into template space with a non-linear registration and averaged
(section 2.5): over all correct scans (Figure 3, by sex), over the balanced subset of the TIV overlap
range R_tiv (Figure 6) and by TIV tertile and sex (Figure 8). The paper compares average maps with a
Spearman correlation (section 3). Alternatives the paper mentions having tried (SmoothGrad) and
two standard alternatives (Integrated Gradients, occlusion of atlas regions) are here too, so that
the validity chapter can compare them on the same model.

The functions take any ``torch.nn.Module`` that maps a batch ``(N, C, X, Y, Z)`` to one logit per
sample (``(N,)`` or ``(N, 1)``; the positive class is *male*) and plain numpy arrays / nibabel images;
they do not depend on a particular architecture.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainsex import BrainsexError
from brainsex.io import as_array

__all__ = [
    "METHODS",
    "saliency_maps",
    "occlusion_by_region",
    "minmax_normalise",
    "average_maps",
    "group_average",
    "spearman_maps",
    "save_map",
    "template_space_maps",
    "spearman_or_nan",
]

#: Attribution methods understood by :func:`saliency_maps`.
METHODS = ("saliency", "smoothgrad", "integrated_gradients")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _model_device(model: Any, device: Any) -> Any:
    import torch

    if device is not None:
        return torch.device(device)
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _one_output_forward(model: Any, target: Any):
    """Wrap ``model`` so that it returns one scalar per sample (the quantity to explain).

    ``target`` None or ``"male"`` explains the male logit; ``"female"`` its negative (the logit of the
    female class, ``log(p_F / p_M)``); an integer selects an output column of a multi-output model.
    """
    import torch

    if isinstance(target, str) and target not in ("male", "female"):
        raise BrainsexError(f"target={target!r}: expected None, 'male', 'female' or an output index")

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        out = out.reshape(out.shape[0], -1)
        if out.shape[1] == 1:
            if target is not None and not isinstance(target, str) and int(target) != 0:
                raise BrainsexError(f"target={target!r}: the model has a single output (index 0)")
            logit = out[:, 0]
            return -logit if target == "female" else logit
        if target is None or isinstance(target, str):
            raise BrainsexError(
                f"the model returns {out.shape[1]} outputs per sample; pass target=<output index>")
        return out[:, int(target)]

    return forward


class _Batches:
    """Index a stack/sequence of volumes and return batches as float32 arrays of shape (B, C, X, Y, Z)."""

    def __init__(self, volumes: Any):
        if hasattr(volumes, "detach"):
            volumes = volumes.detach().cpu().numpy()
        if not hasattr(volumes, "__len__") or not hasattr(volumes, "__getitem__"):
            raise BrainsexError("volumes: expected an array (N, X, Y, Z) / (N, C, X, Y, Z) or a sequence of volumes")
        self.volumes = volumes
        self.n = len(volumes)
        if self.n == 0:
            raise BrainsexError("volumes: empty, there is nothing to explain")
        first = as_array(volumes[0], "volumes[0]")
        if first.ndim not in (3, 4):
            raise BrainsexError(f"volumes: each volume must be (X, Y, Z) or (C, X, Y, Z), got shape {first.shape}")
        self.shape = first.shape
        self.has_channel = first.ndim == 4

    def get(self, start: int, stop: int) -> np.ndarray:
        arrays = []
        for i in range(start, stop):
            a = as_array(self.volumes[i], f"volumes[{i}]")
            if a.shape != self.shape:
                raise BrainsexError(f"volumes[{i}]: shape {a.shape} differs from volumes[0] {self.shape}")
            arrays.append(a)
        batch = np.stack(arrays).astype(np.float32, copy=False)
        if not np.isfinite(batch).all():
            raise BrainsexError(f"volumes[{start}:{stop}]: contains NaN or infinite values")
        return batch if self.has_channel else batch[:, None]


# --------------------------------------------------------------------------------------------------
# attribution
# --------------------------------------------------------------------------------------------------
def saliency_maps(
    model: Any,
    volumes: Any,
    method: str = "saliency",
    signed: bool = False,
    batch_size: int | str = "auto",
    device: Any = None,
    target: Any = None,
    progress: bool = False,
    **kw: Any,
) -> np.ndarray:
    """Attribution maps of a one-logit classifier for a stack of volumes, computed with Captum.

    The model is put in eval mode (its previous mode is restored afterwards) and run batch by batch on
    its own device (or ``device``). With a single output the quantity explained is the *logit* of the
    male class (pre-sigmoid), as in class saliency (Simonyan et al., 2013; paper section 2.4).

    Note on classes: with one sigmoid output the female score is the negative male logit, so with
    ``abs=True`` (the Captum default used by the paper, ``signed=False`` here) the "male" and
    "female" maps are *the same quantity*; signed maps (``signed=True``) for the two classes differ
    only by their sign. A voxel's signed gradient says in which direction changing it pushes the
    decision; the absolute map only says how much.

    Parameters
    ----------
    model
        ``torch.nn.Module`` mapping ``(N, C, X, Y, Z)`` to ``(N,)`` / ``(N, 1)`` logits (or ``(N, K)``
        with an integer ``target``).
    volumes
        Array / tensor ``(N, X, Y, Z)`` or ``(N, C, X, Y, Z)``, or any sequence (``len`` and indexing,
        e.g. a lazy loader) of volumes ``(X, Y, Z)`` / ``(C, X, Y, Z)`` or nibabel images.
    method
        ``"saliency"`` (``captum.attr.Saliency``: the input gradient), ``"smoothgrad"``
        (``NoiseTunnel`` over ``Saliency``: the gradient averaged over noisy copies) or
        ``"integrated_gradients"`` (``IntegratedGradients`` from a zero baseline, which on z-scored
        scans is the mean intensity).
    signed
        False: absolute values (Captum ``abs=True``; for Integrated Gradients the absolute value of
        the attribution). True: the raw, signed attribution.
    batch_size
        Scans per forward/backward pass, or ``"auto"``: up to 8, fewer where the model's input-gradient
        pass would not fit the free memory (:func:`brainsex.memory.choose_batch_size`; at 1 mm with the
        paper's widths one scan needs several GB). For SmoothGrad ``"auto"`` bounds the noisy copies
        per pass (Captum's ``nt_samples_batch_size``) the same way.
    device
        Device to run on; default the device of the model's parameters.
    target
        None or ``"male"``: explain the male logit; ``"female"``: its negative; an integer: that output
        column of a multi-output model.
    progress
        Show a tqdm progress bar over batches.
    **kw
        Method options. ``smoothgrad``: ``nt_samples`` (default 10), ``noise_level`` (default 0.15,
        the noise standard deviation as a fraction of the intensity range of the first volume) or an
        absolute ``stdevs``, ``seed`` (default 0). ``integrated_gradients``: ``n_steps`` (default 32),
        ``internal_batch_size`` (default ``batch_size``).

    Returns
    -------
    numpy.ndarray
        float32 maps with the same shape as ``volumes`` (``(N, X, Y, Z)`` or ``(N, C, X, Y, Z)``), in
        the scans' own space: warp them to the template (the subject's non-linear transform) before
        averaging. At 1 mm every map is ~29 MB; for many scans call this on chunks of subjects.
    """
    import torch
    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency
    from tqdm.auto import tqdm

    if method not in METHODS:
        raise BrainsexError(f"method={method!r}: expected one of {', '.join(METHODS)}")
    from brainsex.memory import choose_batch_size

    if batch_size != "auto" and (not isinstance(batch_size, int | np.integer) or int(batch_size) < 1):
        raise BrainsexError(f"batch_size={batch_size}: must be 'auto' or an integer >= 1")
    known = {"smoothgrad": {"nt_samples", "noise_level", "stdevs", "seed"},
             "integrated_gradients": {"n_steps", "internal_batch_size"}, "saliency": set()}[method]
    unknown = set(kw) - known
    if unknown:
        raise BrainsexError(f"saliency_maps(method={method!r}): unknown option(s) {sorted(unknown)}")

    batches = _Batches(volumes)
    dev = _model_device(model, device)
    nt_batch = None  # SmoothGrad: noisy copies per pass (None: all of a scan's at once)
    if batch_size == "auto":
        nt = int(kw.get("nt_samples", 10)) if method == "smoothgrad" else 1
        fits = choose_batch_size(model, "auto", mode="grad", device=dev, cap=8 * nt)  # passes of <= fits scans
        batch_size = max(1, fits // nt)
        if fits < nt:
            nt_batch = fits
    forward = _one_output_forward(model, target)
    if method == "saliency":
        explainer = Saliency(forward)
    elif method == "smoothgrad":
        explainer = NoiseTunnel(Saliency(forward))
        if "stdevs" in kw:
            stdevs = float(kw["stdevs"])
        else:
            first = batches.get(0, 1)
            stdevs = float(kw.get("noise_level", 0.15)) * float(first.max() - first.min())
        torch.manual_seed(int(kw.get("seed", 0)))
    else:
        explainer = IntegratedGradients(forward)

    was_training = model.training
    model.eval()
    out = []
    try:
        starts = range(0, batches.n, int(batch_size))
        for start in tqdm(starts, desc=f"{method} maps", disable=not progress, leave=False):
            stop = min(start + int(batch_size), batches.n)
            x = torch.from_numpy(batches.get(start, stop)).to(dev).requires_grad_(True)
            if method == "saliency":
                attr = explainer.attribute(x, abs=not signed)
            elif method == "smoothgrad":
                attr = explainer.attribute(x, nt_type="smoothgrad", nt_samples=int(kw.get("nt_samples", 10)),
                                           nt_samples_batch_size=nt_batch, stdevs=stdevs, abs=not signed)
            else:
                attr = explainer.attribute(
                    x, baselines=0.0, n_steps=int(kw.get("n_steps", 32)),
                    internal_batch_size=int(kw.get("internal_batch_size", batch_size)))
                if not signed:
                    attr = attr.abs()
            out.append(attr.detach().float().cpu().numpy())
    finally:
        model.train(was_training)
    maps = np.concatenate(out, axis=0)
    return maps if batches.has_channel else maps[:, 0]


def occlusion_by_region(
    model: Any,
    volume: Any,
    atlas_data: Any,
    labels: pd.DataFrame | Sequence[int] | None = None,
    baseline: float = 0.0,
    batch_size: int | str = "auto",
    device: Any = None,
) -> pd.DataFrame:
    """Region occlusion: the change of the male logit when each atlas region is set to ``baseline``.

    Implemented with ``captum.attr.FeatureAblation`` (one feature per region, ``batch_size`` occluded
    copies per forward pass). On z-scored scans ``baseline=0`` is the mean brain intensity.

    Parameters
    ----------
    model
        One-logit ``torch.nn.Module`` (positive class male).
    volume
        One scan ``(X, Y, Z)`` or ``(C, X, Y, Z)`` (array, tensor or nibabel image).
    atlas_data
        Integer label array ``(X, Y, Z)`` on the scan's grid (0 = background).
    labels
        Label table (column ``label``; ``name``, ``region``, ``hemisphere`` are copied when present) or a
        sequence of label ids. Default: every non-zero label in ``atlas_data``. Labels absent from the
        atlas get ``n_voxels`` 0 and a zero change.
    baseline
        The value occluded voxels are set to.
    batch_size
        Occluded copies per forward pass, or ``"auto"``: up to 8, fewer where they would not fit the free
        memory (:func:`brainsex.memory.choose_batch_size`, inference).
    device
        Device; default the model's.

    Returns
    -------
    pandas.DataFrame
        One row per region: ``label`` (+ label-table columns), ``n_voxels``, ``logit`` (unoccluded),
        ``logit_occluded``, ``delta_logit`` = logit - logit_occluded (the drop in the male logit;
        positive: the region pushed towards *male*), ``abs_delta``; sorted by ``abs_delta`` descending.
    """
    import torch
    from captum.attr import FeatureAblation

    vol = as_array(volume, "volume").astype(np.float32)
    if vol.ndim == 3:
        vol = vol[None]
    if vol.ndim != 4:
        raise BrainsexError(f"volume: expected (X, Y, Z) or (C, X, Y, Z), got shape {vol.shape}")
    if not np.isfinite(vol).all():
        raise BrainsexError("volume: contains NaN or infinite values")
    atlas = as_array(atlas_data, "atlas_data")
    if atlas.shape != vol.shape[1:]:
        raise BrainsexError(f"atlas_data: shape {atlas.shape} differs from the volume's grid {vol.shape[1:]}; "
                            "resample the atlas first (brainsex.atlas.resample_atlas_to)")
    atlas = np.rint(atlas).astype(np.int64)
    table: pd.DataFrame
    if labels is None:
        ids = [int(v) for v in np.unique(atlas) if v != 0]
        table = pd.DataFrame({"label": ids})
    elif isinstance(labels, pd.DataFrame):
        if "label" not in labels.columns:
            raise BrainsexError("labels: the label table needs a 'label' column")
        table = labels.reset_index(drop=True).copy()
        table["label"] = table["label"].astype(int)
    else:
        table = pd.DataFrame({"label": [int(v) for v in labels]})
    table = table[table["label"] != 0].reset_index(drop=True)
    if table.empty:
        raise BrainsexError("labels: no region to occlude")

    # feature ids: 0 = everything not in a listed region, i + 1 = the i-th listed region
    feature = np.zeros(atlas.shape, dtype=np.int64)
    for i, lab in enumerate(table["label"]):
        feature[atlas == lab] = i + 1
    counts = np.bincount(feature.ravel(), minlength=len(table) + 1)

    from brainsex.memory import choose_batch_size

    dev = _model_device(model, device)
    per_eval = choose_batch_size(model, batch_size, mode="eval", device=dev, cap=8)
    forward = _one_output_forward(model, None)
    was_training = model.training
    model.eval()
    try:
        x = torch.from_numpy(vol[None]).to(dev)
        mask = torch.from_numpy(feature[None, None]).to(dev)
        with torch.no_grad():
            logit = float(forward(x)[0])
            attr = FeatureAblation(forward).attribute(
                x, baselines=float(baseline), feature_mask=mask, perturbations_per_eval=int(per_eval))
    finally:
        model.train(was_training)
    attr = attr[0, 0].detach().cpu().numpy()
    delta = np.zeros(len(table))
    for i in range(len(table)):
        if counts[i + 1]:
            delta[i] = float(attr[feature == i + 1].flat[0])
    out = table.copy()
    out["n_voxels"] = counts[1:].astype(int)
    out["logit"] = logit
    out["delta_logit"] = delta
    out["logit_occluded"] = logit - delta
    out["abs_delta"] = np.abs(delta)
    out = out.sort_values(["abs_delta", "label"], ascending=[False, True], kind="mergesort")
    return out.reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# normalisation, averaging, comparison
# --------------------------------------------------------------------------------------------------
def minmax_normalise(map_data: Any, mask: Any = None, constant: str = "raise") -> np.ndarray:
    """Min-max normalise one map to [0, 1] (paper section 2.4): ``(m - min) / (max - min)``.

    Parameters
    ----------
    map_data
        A map (array, tensor or nibabel image).
    mask
        Optional boolean brain mask: the minimum and maximum are taken inside it and voxels outside
        are set to 0.
    constant
        What to do when the map is constant (all zero, for instance) so that min-max is undefined:
        ``"raise"`` (default) raises :class:`~brainsex.BrainsexError`; ``"zeros"`` returns a map of
        zeros (no voxel is more important than another). Never NaN.

    Returns
    -------
    numpy.ndarray
        float32 map with values in [0, 1].
    """
    m = as_array(map_data, "map").astype(np.float64)
    if constant not in ("raise", "zeros"):
        raise BrainsexError(f"constant={constant!r}: expected 'raise' or 'zeros'")
    if m.size == 0:
        raise BrainsexError("map: empty array")
    if not np.isfinite(m).all():
        raise BrainsexError("map: contains NaN or infinite values; min-max normalisation is undefined")
    if mask is not None:
        mk = as_array(mask, "mask").astype(bool)
        if mk.shape != m.shape:
            raise BrainsexError(f"mask: shape {mk.shape} differs from the map's {m.shape}")
        if not mk.any():
            raise BrainsexError("mask: empty (no voxel inside)")
        vals = m[mk]
    else:
        mk, vals = None, m
    lo, hi = float(vals.min()), float(vals.max())
    if not hi > lo:
        if constant == "zeros":
            return np.zeros(m.shape, dtype=np.float32)
        raise BrainsexError(f"map: constant (every voxel = {lo:g}); min-max normalisation is undefined "
                            "(pass constant='zeros' to get a zero map)")
    out = np.clip((m - lo) / (hi - lo), 0.0, 1.0)
    if mk is not None:
        out[~mk] = 0.0
    return out.astype(np.float32)


def _stack(maps: Any, name: str = "maps") -> np.ndarray:
    if isinstance(maps, np.ndarray) or hasattr(maps, "detach"):
        arr = as_array(maps, name)
    else:
        items = [as_array(m, f"{name}[{i}]") for i, m in enumerate(maps)]
        if not items:
            raise BrainsexError(f"{name}: empty, nothing to average")
        shapes = {a.shape for a in items}
        if len(shapes) > 1:
            raise BrainsexError(f"{name}: maps of different shapes {sorted(shapes)}; bring them to one grid first")
        arr = np.stack(items)
    if arr.ndim < 2 or arr.shape[0] == 0:
        raise BrainsexError(f"{name}: expected a stack of maps (N, ...), got shape {arr.shape}")
    return arr


def average_maps(maps: Any, mask: Any = None) -> np.ndarray:
    """Voxel-wise mean of a stack of maps (paper section 2.5), zero outside an optional mask.

    Parameters
    ----------
    maps
        Array ``(N, X, Y, Z)`` or a sequence of same-shape maps / images (already in one space).
    mask
        Optional boolean mask ``(X, Y, Z)``; voxels outside are set to 0.

    Returns
    -------
    numpy.ndarray
        float32 mean map ``(X, Y, Z)``.
    """
    arr = _stack(maps)
    if not np.isfinite(arr).all():
        raise BrainsexError("maps: contain NaN or infinite values")
    mean = arr.mean(axis=0, dtype=np.float64)
    if mask is not None:
        mk = as_array(mask, "mask").astype(bool)
        if mk.shape != mean.shape:
            raise BrainsexError(f"mask: shape {mk.shape} differs from the maps' {mean.shape}")
        mean = np.where(mk, mean, 0.0)
    return mean.astype(np.float32)


def group_average(maps: Any, groups: pd.Series | Sequence[Hashable], mask: Any = None) -> dict[Hashable, np.ndarray]:
    """Average maps within groups: ``{group: mean map}``.

    Used for the averages the paper shows: all correct scans (one group), by sex (Figure 3), by TIV
    tertile x sex (Figure 8; pass e.g. ``tertile.astype(str) + " " + sex``) and the balanced R_tiv
    subset (Figure 6; select the maps first).

    Parameters
    ----------
    maps
        ``(N, X, Y, Z)`` array or sequence of N maps.
    groups
        N group keys, in the order of ``maps`` (position, not index, matters). Missing keys (NaN/None)
        leave that map out.
    mask
        Optional mask passed to :func:`average_maps`.

    Returns
    -------
    dict
        Group key -> float32 mean map, keys in sorted order (insertion order if keys do not sort).
    """
    arr = _stack(maps)
    keys = pd.Series(list(groups)) if not isinstance(groups, pd.Series) else groups.reset_index(drop=True)
    if len(keys) != arr.shape[0]:
        raise BrainsexError(f"groups: {len(keys)} keys for {arr.shape[0]} maps")
    present = keys[keys.notna()]
    if present.empty:
        raise BrainsexError("groups: every key is missing")
    uniq = list(pd.unique(present))
    try:
        uniq = sorted(uniq)
    except TypeError:
        pass
    return {k: average_maps(arr[(keys == k).to_numpy()], mask=mask) for k in uniq}


def spearman_or_nan(a: Any, b: Any, mask: Any) -> tuple[float, float]:
    """:func:`spearman_maps`, or ``(nan, nan)`` when it is undefined (a constant map), for reports.

    Parameters
    ----------
    a, b : array-like or nibabel image
        Two maps on one grid.
    mask : array-like or nibabel image
        Brain mask on the same grid.

    Returns
    -------
    rho, p : float
        Spearman's rho and its p-value, or NaN for both on any input :func:`spearman_maps` rejects.
    """
    try:
        return spearman_maps(a, b, mask)
    except BrainsexError:
        return float("nan"), float("nan")


def spearman_maps(a: Any, b: Any, mask: Any) -> tuple[float, float]:
    """Spearman rank correlation of two maps inside a brain mask (paper section 3, Figures 3 and 6).

    ``scipy.stats.spearmanr`` over the voxels inside ``mask``. With tens of thousands of voxels the
    p-value is essentially always tiny; voxels are not independent (maps are smooth), so it overstates
    the evidence, and the correlation itself is the number to read.

    Parameters
    ----------
    a, b : array-like or nibabel image
        Two maps on one grid.
    mask : array-like or nibabel image
        Brain mask on the same grid (at least 3 voxels).

    Returns
    -------
    rho, p : float
        Spearman's rho and its p-value.

    Raises
    ------
    BrainsexError
        For different shapes, fewer than 3 voxels, non-finite values or a constant map in the mask.
    """
    from scipy.stats import spearmanr

    x, y = as_array(a, "a"), as_array(b, "b")
    mk = as_array(mask, "mask").astype(bool)
    if x.shape != y.shape or x.shape != mk.shape:
        raise BrainsexError(f"spearman_maps: shapes differ (a {x.shape}, b {y.shape}, mask {mk.shape})")
    xv, yv = x[mk].astype(np.float64), y[mk].astype(np.float64)
    if xv.size < 3:
        raise BrainsexError(f"mask: {xv.size} voxels inside; need at least 3 for a correlation")
    if not (np.isfinite(xv).all() and np.isfinite(yv).all()):
        raise BrainsexError("spearman_maps: NaN or infinite values inside the mask")
    if np.ptp(xv) == 0 or np.ptp(yv) == 0:
        raise BrainsexError("spearman_maps: a map is constant inside the mask; the correlation is undefined")
    res = spearmanr(xv, yv)
    return float(res.statistic), float(res.pvalue)


def save_map(array: Any, affine: Any, path: str | os.PathLike) -> Path:
    """Write a map as NIfTI (float32) atomically and return its path.

    Parameters
    ----------
    array : array-like or nibabel image
        The map.
    affine : array-like
        Its 4 x 4 voxel-to-world matrix.
    path : path
        Destination (``.nii`` or ``.nii.gz``).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    import nibabel as nib

    from brainsex.io import atomic_path

    data = as_array(array, "array")
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.isfinite(aff).all():
        raise BrainsexError(f"affine: expected a finite 4x4 matrix, got shape {aff.shape}")
    if data.ndim not in (3, 4):
        raise BrainsexError(f"array: expected a 3D (or 4D) map, got shape {data.shape}")
    path = Path(path)
    if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
        raise BrainsexError(f"{path}: a map is saved as .nii or .nii.gz")
    img = nib.Nifti1Image(data.astype(np.float32), aff)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return path


# --------------------------------------------------------------------------------------------------
# from a trained model and a table of scans to normalised maps in template space
# --------------------------------------------------------------------------------------------------
def _warp_one(map_img: Any, moving_path: str, template: Any, cache_prefix: str, warp: str) -> np.ndarray:
    """Warp one subject's map to the template with its cached SyN transform (a joblib task)."""
    from brainsex.registration import apply_to_map, nonlinear_transform, set_threads

    set_threads(1)
    import nibabel as nib

    if warp == "none":
        return np.asarray(map_img.get_fdata(dtype=np.float32))
    moving = nib.load(moving_path)
    transforms = nonlinear_transform(moving, template, cache_prefix)
    return np.asarray(apply_to_map(map_img, transforms, template).get_fdata(dtype=np.float32))


def template_space_maps(
    model: Any,
    table: pd.DataFrame,
    template: Any,
    method: str = "saliency",
    signed: bool = False,
    warp: str = "syn",
    cache_dir: str | os.PathLike | None = None,
    image_col: str = "image_pp",
    batch_size: int | str = "auto",
    device: Any = None,
    n_jobs: int = 1,
    progress: bool = True,
    **kw: Any,
) -> np.ndarray:
    """Saliency maps of ``table``'s scans, min-max normalised and warped to the template (sections 2.4-2.5).

    The paper computes one map per correctly classified test scan, normalises it to [0, 1] and warps it
    to MNI152 with a non-linear registration (FSL FNIRT) before averaging. Here the warp is the ANTsPy
    SyN transform of each subject's preprocessed image to the template, computed once and cached
    (:func:`brainsex.preprocess.nonlinear_transform`).

    Parameters
    ----------
    model
        The trained classifier (one male logit per scan).
    table
        Rows with ``participant_id`` and ``image_col`` (preprocessed images on the template grid).
    template
        The template image (nibabel) on the same grid: the target of the warp.
    method, signed, batch_size, device, **kw
        Passed to :func:`saliency_maps`. Signed maps are normalised by their largest absolute value to
        [-1, 1] instead of min-max, so that the sign survives.
    warp
        ``"syn"`` (the paper's non-linear step) or ``"none"`` (maps stay in the rigidly registered space).
    cache_dir
        Folder for the per-subject transforms (required for ``warp="syn"``).
    image_col
        Column of the preprocessed images.
    n_jobs
        Parallel warps (joblib).
    progress
        Progress bar over subjects.

    Returns
    -------
    numpy.ndarray
        ``(n_scans, X, Y, Z)`` float32 maps on the template grid, in ``table``'s row order. Memory is
        ``n_scans x voxels x 4`` bytes: at 1 mm about 34 MB per scan.
    """
    import nibabel as nib
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    if warp not in ("syn", "none"):
        raise BrainsexError(f"warp must be 'syn' or 'none' (got {warp!r})")
    if warp == "syn" and cache_dir is None:
        raise BrainsexError("template_space_maps: warp='syn' needs a cache_dir for the transforms")
    if len(table) == 0:
        raise BrainsexError("template_space_maps: the table of scans is empty")
    if image_col not in table.columns:
        raise BrainsexError(f"template_space_maps: the table has no column '{image_col}'")
    paths = [str(p) for p in table[image_col]]
    images = [nib.load(p) for p in paths]
    raw = saliency_maps(model, images, method=method, signed=signed, batch_size=batch_size, device=device,
                        progress=progress, **kw)
    maps, n_flat = [], 0
    for m in raw:
        peak = float(np.max(np.abs(m)))
        n_flat += peak == 0 or float(np.min(m)) == float(np.max(m))
        if signed:
            maps.append((m / peak).astype(np.float32) if peak > 0 else np.zeros_like(m, dtype=np.float32))
        else:
            maps.append(minmax_normalise(m, constant="zeros"))
    if n_flat:
        import warnings

        warnings.warn(f"{n_flat} of {len(raw)} saliency maps are constant (the model's output does not depend on "
                      "those inputs); they enter the averages as zero maps", stacklevel=2)
    cache = Path(cache_dir) if cache_dir is not None else None
    tasks = []
    for pid, img, path, m in zip(table["participant_id"], images, paths, maps, strict=True):
        map_img = nib.Nifti1Image(np.asarray(m, dtype=np.float32), img.affine)
        prefix = str(cache / f"{pid}_") if cache is not None else ""
        tasks.append(delayed(_warp_one)(map_img, path, template, prefix, warp))
    it = tasks if not progress else tqdm(tasks, desc="warping maps", leave=False)
    warped = Parallel(n_jobs=n_jobs)(it) if n_jobs != 1 else [t[0](*t[1], **t[2]) for t in it]
    return np.stack(warped).astype(np.float32)
