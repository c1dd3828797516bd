"""Minimal preprocessing (paper section 2.2): brain extraction, rigid registration, z-score, and TIV.

The paper extracts the brain with SynthStrip (or uses CC-359's masks), registers it to MNI152 with a
6-degree-of-freedom rigid FSL FLIRT, keeps the (193, 229, 193) 1 mm grid and z-scores the intensities;
TIV comes from FreeSurfer ``recon-all`` (eTIV). Here the same steps use pip-installable tools that run
offline:

1. :func:`skull_strip` -- ``deepbet`` (a deep-learning extractor whose weights ship in its wheel), a
   mask provided by the cohort, or the template's brain mask carried over by an affine registration.
2. :func:`rigid_register` -- ANTsPy rigid (rotation + translation, no scaling: brain volumes are kept),
   estimated on a coarse copy of both images, then applied once to the full-resolution image onto
   :func:`brainsex.templates.target_grid`. Or, with ``PreprocessConfig.registration="affine"``,
   :func:`affine_register`: one 12-parameter affine whose rigid part is applied the same way and whose
   determinant gives eTIV (step 4) -- half the time, measured equivalent on the phantom only.
3. :func:`zscore` -- mean and sd inside the brain mask (default) or over the whole volume (what the
   paper's public code does).
4. TIV -- :func:`etiv_affine` (FreeSurfer's eTIV idea: template TIV divided by the determinant of a
   12-parameter affine subject -> template) and :func:`mask_volume_ml` (volume of the brain mask).
5. :func:`nonlinear_transform` / :func:`apply_to_map` -- ANTsPy SyN, computed on request and cached
   by content (:mod:`brainsex.registration`, which holds every ANTs wrapper), for warping saliency
   maps to the template (the paper used FSL FNIRT, section 2.4).

:func:`preprocess_subject` runs the steps for one participant and writes its outputs atomically into
``out_dir/sub-<id>/`` with a JSON marker written last; :func:`preprocess_cohort` runs them in parallel,
resumes where a killed run stopped, isolates failures and writes ``qc.tsv`` and ``preprocessed.tsv``.

Threads: ITK reads ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` once, at its first use in a process, and
ANTs registrations are only bit-for-bit reproducible with one thread (and a fixed
``ANTS_RANDOM_SEED``). :func:`set_threads` sets both (and torch's threads); the parallel workers call
it before anything else, so ``n_workers`` workers use ``n_workers`` cores in all.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import logging
import math
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from brainsex import BrainsexError
from brainsex._docs import fill_doc
from brainsex.io import atomic_path, read_table, sha256_file, write_json_atomic, write_table
from brainsex.registration import (
    LPS,
    apply_to_map,
    load_ants,
    new_image,
    nonlinear_transform,
    register_linear,
    set_threads,
    to_ants,
    transform_matrix,
)
from brainsex.run import PhantomDir, PreprocessDir

__all__ = [
    "PIPELINE_VERSION",
    "PreprocessError",
    "Reference",
    "RigidResult",
    "set_threads",
    "load_t1",
    "skull_strip",
    "rigid_register",
    "affine_register",
    "apply_rigid",
    "transform_matrix",
    "rigid_error",
    "similarity",
    "zscore",
    "mask_volume_ml",
    "affine_to_template",
    "etiv_affine",
    "etiv_from_matrix",
    "nonlinear_transform",
    "apply_to_map",
    "dice",
    "subject_dir",
    "nonlinear_prefix",
    "PreprocessConfig",
    "preprocess_subject",
    "preprocess_cohort",
    "recorded_registration",
    "QC_COLUMNS",
    "PREPROCESSED_COLUMNS",
]

logger = logging.getLogger("brainsex")

#: Bump when the outputs of :func:`preprocess_subject` change for the same inputs (invalidates markers).
PIPELINE_VERSION = "preprocess-2"

#: Columns of ``preprocess/qc.tsv``.
QC_COLUMNS = [
    "participant_id", "status", "reason", "method", "similarity", "mask_ml", "etiv_ml", "affine_det",
    "rotation_deg", "translation_mm", "t_load_s", "t_strip_s", "t_rigid_s", "t_zscore_s", "t_etiv_s",
    "t_nonlinear_s", "t_write_s", "t_total_s", "image_pp", "mask_pp", "mask_native", "rigid_transform",
    "affine_transform",
]
#: Columns added to the participants table in ``preprocess/preprocessed.tsv`` (run-directory contract).
PREPROCESSED_COLUMNS = ["image_pp", "mask_pp", "etiv_ml", "mask_ml", "similarity", "status", "reason"]

_VOXEL_MM_RANGE = (0.2, 12.0)
_FOV_MM_RANGE = (60.0, 640.0)
_FINE_MM = 4.0  # registration grid: transforms are estimated at this voxel size (or the input's, if coarser)
Method = Literal["auto", "deepbet", "mask", "template"]


class PreprocessError(BrainsexError):
    """A participant cannot be preprocessed; the message is the reason recorded in the QC table."""


# ------------------------------------------------------------------------------------ conversions
def _grid_image(shape: Sequence[int], affine: np.ndarray) -> nib.Nifti1Image:
    return new_image(np.zeros(tuple(shape), np.float32), affine)


def _voxel_sizes(img: nib.spatialimages.SpatialImage) -> np.ndarray:
    return nib.affines.voxel_sizes(img.affine)


def _smooth_to(img: nib.Nifti1Image, voxel_mm: float) -> np.ndarray:
    """Gaussian anti-aliasing before sampling ``img`` on a grid of ``voxel_mm`` (FWHM = voxel)."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    vs = _voxel_sizes(img)
    sigma = np.sqrt(np.clip(voxel_mm**2 - vs**2, 0, None)) / (2.3548 * vs)
    return ndimage.gaussian_filter(data, sigma) if np.any(sigma > 0.3) else data


def _resample(img: nib.Nifti1Image, shape: Sequence[int], affine: np.ndarray, order: int = 1,
              antialias: bool = True) -> np.ndarray:
    """Sample ``img`` at the voxel centres of (shape, affine); 0 outside."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    if antialias and order > 0:
        data = _smooth_to(img, float(np.max(_voxel_sizes(_grid_image(shape, affine)))))
    vox = np.linalg.inv(img.affine) @ affine
    if np.allclose(vox, np.eye(4)) and tuple(data.shape) == tuple(shape):
        return data
    return ndimage.affine_transform(data, vox, output_shape=tuple(shape), order=order, mode="constant", cval=0.0)


def _coarse_grid(img: nib.Nifti1Image, voxel_mm: float) -> tuple[tuple[int, ...], np.ndarray]:
    """A grid of ``voxel_mm`` covering ``img`` (same orientation and centre)."""
    vs = _voxel_sizes(img)
    shape = tuple(max(int(math.ceil(n * v / voxel_mm)), 1) for n, v in zip(img.shape[:3], vs, strict=True))
    direction = img.affine[:3, :3] / vs
    centre = img.affine[:3, :3] @ ((np.asarray(img.shape[:3]) - 1) / 2.0) + img.affine[:3, 3]
    aff = np.eye(4)
    aff[:3, :3] = direction * voxel_mm
    aff[:3, 3] = centre - aff[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return shape, aff


def _downsample(img: nib.Nifti1Image, voxel_mm: float) -> nib.Nifti1Image:
    """``img`` on a ``voxel_mm`` grid (smoothed first); unchanged when already that coarse."""
    if np.max(_voxel_sizes(img)) >= voxel_mm - 1e-6:
        return img
    shape, aff = _coarse_grid(img, voxel_mm)
    return new_image(_resample(img, shape, aff, order=1), aff)


_COARSE_CACHE: dict[tuple[int, float], tuple[nib.Nifti1Image, nib.Nifti1Image]] = {}


def _downsample_cached(img: nib.Nifti1Image, voxel_mm: float) -> nib.Nifti1Image:
    """:func:`_downsample` remembered per image object (the template is reused for every subject)."""
    key = (id(img), float(voxel_mm))
    hit = _COARSE_CACHE.get(key)
    if hit is not None and hit[0] is img:
        return hit[1]
    out = _downsample(img, voxel_mm)
    if len(_COARSE_CACHE) >= 16:
        _COARSE_CACHE.clear()
    _COARSE_CACHE[key] = (img, out)  # keeps img alive, so its id is not reused while cached
    return out


def _metric_mask(mask: nib.Nifti1Image, voxel_mm: float, margin_mm: float) -> nib.Nifti1Image:
    """The template mask on the coarse grid, dilated by ``margin_mm`` (where the metric is sampled)."""
    key = (id(mask), float(voxel_mm), float(margin_mm), "metric")
    hit = _COARSE_CACHE.get(key)  # type: ignore[arg-type]
    if hit is not None and hit[0] is mask:
        return hit[1]
    lo = _downsample(new_image(np.asarray(mask.dataobj) > 0, mask.affine, np.float32), voxel_mm)
    inside = np.asarray(lo.dataobj) >= 0.5
    if margin_mm > 0:
        dist = ndimage.distance_transform_edt(~inside, sampling=_voxel_sizes(lo))
        inside = dist <= margin_mm
    out = new_image(inside, lo.affine, np.float32)
    _COARSE_CACHE[key] = (mask, out)  # type: ignore[index]
    return out


def _crop_nonzero(img: nib.Nifti1Image, margin_mm: float = 8.0) -> nib.Nifti1Image:
    """``img`` cropped to the bounding box of its non-zero voxels plus a margin (same world space)."""
    data = np.asarray(img.dataobj)
    if not data.any():
        return img
    margin = np.ceil(margin_mm / _voxel_sizes(img)).astype(int)
    slices = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.flatnonzero(data.any(axis=other))
        lo, hi = max(int(idx[0]) - margin[ax], 0), min(int(idx[-1]) + 1 + margin[ax], data.shape[ax])
        slices.append(slice(lo, hi))
    origin = img.affine @ np.array([slices[0].start, slices[1].start, slices[2].start, 1.0])
    aff = img.affine.copy()
    aff[:, 3] = origin
    return new_image(data[tuple(slices)], aff, data.dtype.type)


# ------------------------------------------------------------------------------------ references
@dataclass(frozen=True)
class Reference:
    """The template the subjects are registered to, on the target grid.

    Attributes
    ----------
    template : nibabel.Nifti1Image
        Brain-extracted T1 template on the target grid (:func:`brainsex.templates.load_template`).
    mask : nibabel.Nifti1Image
        Its brain mask on the same grid.
    tiv_ml : float
        The template's intracranial volume in ml (the volume of its 1 mm brain mask by default), the
        numerator of eTIV (:func:`etiv_affine`).
    name : str
        Free text for the QC table and the book.
    fine_template, fine_mask : nibabel.Nifti1Image, optional
        The same template on a finer grid, used to *estimate* the transforms when the target grid is
        coarser than the registration grid (the 8 mm smoke profile registers at 4 mm and only
        resamples onto 8 mm). Default: ``template`` and ``mask``.
    """

    template: nib.Nifti1Image
    mask: nib.Nifti1Image
    tiv_ml: float
    name: str = "template"
    fine_template: nib.Nifti1Image | None = None
    fine_mask: nib.Nifti1Image | None = None

    @property
    def registration_template(self) -> nib.Nifti1Image:
        """The template transforms are estimated on: ``fine_template`` when set, else ``template``."""
        return self.fine_template if self.fine_template is not None else self.template

    @property
    def registration_mask(self) -> nib.Nifti1Image:
        """The brain mask on :attr:`registration_template`'s grid."""
        return self.fine_mask if self.fine_mask is not None else self.mask

    @classmethod
    @fill_doc
    def load(cls, voxel_size: float = 1.0, source: str = "auto") -> Reference:
        """The MNI152 template, brain mask and TIV from :mod:`brainsex.templates` (cached per process).

        Parameters
        ----------
        voxel_size : float, default=1.0
            Target grid voxel size in mm; above 4 mm the transforms are estimated on a 4 mm copy
            (``fine_template``, ``fine_mask``).
        source : {"auto", "templateflow", "offline"}, default="auto"
            %(reference_source)s

        Returns
        -------
        Reference
            The reference; its ``tiv_ml`` is the volume of the 1 mm brain mask.
        """
        return _load_reference(float(voxel_size), source)

    @classmethod
    def _build(cls, voxel_size: float, source: str) -> Reference:
        from brainsex import templates

        tiv = mask_volume_ml(templates.load_brain_mask(1.0, source=source))
        fine = {}
        if voxel_size > _FINE_MM:
            fine = {"fine_template": templates.load_template(_FINE_MM, source=source),
                    "fine_mask": templates.load_brain_mask(_FINE_MM, source=source)}
        return cls(templates.load_template(voxel_size, source=source), templates.load_brain_mask(voxel_size, source=source),
                   tiv, name=f"MNI152 ({source})", **fine)

    @property
    def voxel_size(self) -> float:
        """Largest voxel size of the target grid in mm."""
        return float(np.max(_voxel_sizes(self.template)))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of the target grid."""
        return tuple(self.template.shape[:3])  # type: ignore[return-value]

    @property
    def affine(self) -> np.ndarray:
        """Voxel-to-world matrix of the target grid."""
        return self.template.affine

    def fingerprint(self) -> str:
        """Short hash of the template and mask arrays and grid (part of each subject's marker; cached)."""
        cached = self.__dict__.get("_fingerprint")
        if cached is None:
            import hashlib

            h = hashlib.sha256()
            for img in (self.template, self.mask, self.registration_template, self.registration_mask):
                h.update(np.ascontiguousarray(np.asarray(img.dataobj, dtype=np.float32)).tobytes())
                h.update(np.round(np.asarray(img.affine, dtype=np.float64), 4).tobytes())
            h.update(f"{self.tiv_ml:.4f}".encode())
            cached = h.hexdigest()[:16]
            self.__dict__["_fingerprint"] = cached  # frozen dataclass: bypass __setattr__
        return cached


@functools.lru_cache(maxsize=4)
def _load_reference(voxel_size: float, source: str) -> Reference:
    return Reference._build(voxel_size, source)


_WORKER_REFERENCES: dict[str, Reference] = {}


def _worker_reference(ref: Reference) -> Reference:
    """One Reference object per fingerprint in a worker, so that its coarse copies are cached."""
    return _WORKER_REFERENCES.setdefault(ref.fingerprint(), ref)


# ------------------------------------------------------------------------------------------ input
def load_t1(image: str | os.PathLike | nib.spatialimages.SpatialImage, name: str | None = None) -> nib.Nifti1Image:
    """Read a T1 image, check it and reorient it to RAS (nibabel ``as_closest_canonical``).

    Parameters
    ----------
    image : path or nibabel image
        The T1-weighted scan.
    name : str, optional
        How to call the image in error messages (default: its path).

    Returns
    -------
    nibabel.Nifti1Image
        3-D float32 image in RAS orientation (a 4-D image with one volume is squeezed).

    Raises
    ------
    PreprocessError
        Missing or corrupt file, more than one volume, voxel sizes or field of view outside plausible
        ranges for a head scan, non-finite values, or constant intensity.
    """
    label = name or (str(image) if not isinstance(image, nib.spatialimages.SpatialImage) else "image")
    if isinstance(image, nib.spatialimages.SpatialImage):
        img = image
    else:
        path = Path(image)
        if not path.is_file():
            raise PreprocessError(f"{label}: image file not found")
        try:
            img = nib.load(path)
        except Exception as exc:
            raise PreprocessError(f"{label}: cannot read the image ({type(exc).__name__}: {exc})") from exc
    shape = tuple(img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise PreprocessError(f"{label}: expected a 3-D image, got shape {tuple(img.shape)}"
                              + (" (a 4-D series; give one volume)" if len(img.shape) == 4 else ""))
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        raise PreprocessError(f"{label}: corrupt or truncated image data ({type(exc).__name__}: {exc})") from exc
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise PreprocessError(f"{label}: the image affine is invalid (singular or not finite)")
    vs = np.linalg.norm(affine[:3, :3], axis=0)
    lo, hi = _VOXEL_MM_RANGE
    if np.any(vs < lo) or np.any(vs > hi):
        raise PreprocessError(f"{label}: voxel sizes {np.round(vs, 3).tolist()} mm are outside the plausible range "
                              f"[{lo}, {hi}] mm for a head scan; check the header")
    fov = vs * np.asarray(shape)
    lo, hi = _FOV_MM_RANGE
    if np.any(fov < lo) or np.any(fov > hi):
        raise PreprocessError(f"{label}: field of view {np.round(fov, 1).tolist()} mm is implausible for a head "
                              f"scan (expected {lo}-{hi} mm per axis); check the voxel sizes in the header")
    finite = np.isfinite(data)
    if not finite.all():
        raise PreprocessError(f"{label}: {int((~finite).sum())} voxels are NaN or infinite")
    if float(data.max()) - float(data.min()) <= 0:
        raise PreprocessError(f"{label}: constant intensity ({float(data.flat[0])}); not an image of a head")
    out = nib.as_closest_canonical(new_image(data, affine))
    return new_image(np.asarray(out.dataobj, dtype=np.float32), out.affine)


def _load_mask(mask: str | os.PathLike | nib.spatialimages.SpatialImage, like: nib.Nifti1Image,
               name: str = "mask") -> nib.Nifti1Image:
    """A binary mask on the grid of ``like`` (resampled with nearest neighbour if needed)."""
    if not isinstance(mask, nib.spatialimages.SpatialImage):
        if not Path(mask).is_file():
            raise PreprocessError(f"{name}: mask file {mask} not found")
        try:
            mask = nib.load(mask)
            np.asarray(mask.dataobj)
        except Exception as exc:
            raise PreprocessError(f"{name}: cannot read the mask {mask} ({type(exc).__name__}: {exc})") from exc
    data = np.asarray(mask.dataobj, dtype=np.float32)
    data = data.reshape(data.shape[:3]) if data.ndim == 4 and data.shape[3] == 1 else data
    if data.ndim != 3:
        raise PreprocessError(f"{name}: expected a 3-D mask, got shape {data.shape}")
    m = new_image(np.nan_to_num(data) > 0, mask.affine, np.float32)
    out = _resample(m, like.shape[:3], like.affine, order=0, antialias=False)
    return new_image(out > 0.5, like.affine, np.uint8)


# ------------------------------------------------------------------------------- brain extraction
@functools.cache
def _deepbet_model():
    from deepbet import BrainExtraction

    return BrainExtraction(no_gpu=True)


def _deepbet_mask(data: np.ndarray, threshold: float, network_size: int) -> np.ndarray:
    import torch

    bet = _deepbet_model()
    with torch.jit.optimized_execution(False), torch.inference_mode():
        prob = bet.run_model(data.astype(np.float32).copy(), shape=(network_size,) * 3)
        mask = prob > threshold
        if not mask.any():
            raise PreprocessError("brain extraction found no brain (empty mask)")
        return bet.postprocess(mask).astype(bool)


def skull_strip(
    img: nib.Nifti1Image,
    method: Literal["deepbet", "mask", "template"] = "deepbet",
    mask: str | os.PathLike | nib.spatialimages.SpatialImage | None = None,
    reference: Reference | None = None,
    threshold: float = 0.5,
    work_voxel_mm: float = 2.0,
    max_voxel_mm: float = 4.0,
    network_size: int = 192,
    name: str = "image",
) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """Extract the brain (paper section 2.2: SynthStrip, or the masks shipped with CC-359).

    Parameters
    ----------
    img : nibabel.Nifti1Image
        A T1 head image (from :func:`load_t1`).
    method : {"deepbet", "mask", "template"}, default="deepbet"
        ``"deepbet"``: the deepbet network (Fisch et al. 2024; weights ship in its wheel; CPU).
        ``"mask"``: use ``mask`` (e.g. the CC-359 masks). ``"template"``: register the template, with a
        generic skull and scalp around it, to the head (ANTs similarity then affine, mutual
        information, 4 mm) and carry the template's brain mask over; cruder (Dice about 0.93 against
        deepbet on a real head), but needs no network.
    mask : path or image, optional
        The mask for ``method="mask"`` (resampled to ``img`` with nearest neighbour if on another grid).
    reference : Reference, optional
        Template for ``method="template"`` (default :meth:`Reference.load` at 2 mm).
    threshold : float, default=0.5
        Probability threshold of deepbet.
    work_voxel_mm, max_voxel_mm : float, default=2.0, 4.0
        deepbet expects about 1 mm heads; an image with voxels coarser than ``max_voxel_mm`` is
        upsampled (linear) to ``work_voxel_mm`` for the extraction and the mask is brought back.
        deepbet itself resamples the head's bounding box to ``network_size`` voxels a side.
    network_size : int, default=192
        deepbet's working size: the head's bounding box is resampled to this many voxels a side (deepbet's
        own default is 256; 192 is about twice as fast on the CPU, with Dice 0.99 against 256 on a real
        1 mm head and the same Dice against the phantom's true masks at 4 mm).
    name : str
        Name for error messages.

    Returns
    -------
    brain : nibabel.Nifti1Image
        ``img`` with zeros outside the brain (float32).
    mask : nibabel.Nifti1Image
        The brain mask on ``img``'s grid (uint8).

    Raises
    ------
    PreprocessError
        When no brain is found or the mask is missing/unreadable.
    """
    data = np.asarray(img.dataobj, dtype=np.float32)
    if method == "mask":
        if mask is None or (isinstance(mask, str) and not mask.strip()):
            raise PreprocessError(f"{name}: method='mask' needs a mask")
        m = np.asarray(_load_mask(mask, img, name=name).dataobj).astype(bool)
    elif method == "deepbet":
        vs = _voxel_sizes(img)
        try:
            if np.max(vs) > max_voxel_mm + 1e-6:
                shape, aff = _coarse_grid(img, work_voxel_mm)
                up = ndimage.affine_transform(data, np.linalg.inv(img.affine) @ aff, output_shape=shape, order=1,
                                              mode="nearest")
                m_up = _deepbet_mask(up, threshold, network_size)
                back = _resample(new_image(m_up, aff), img.shape, img.affine, order=1)
                m = back >= 0.5
            else:
                m = _deepbet_mask(data, threshold, network_size)
        except PreprocessError:
            raise
        except (AssertionError, ValueError) as exc:  # deepbet's own checks (no foreground, empty mask)
            raise PreprocessError(f"{name}: brain extraction failed ({exc or type(exc).__name__})") from exc
    elif method == "template":
        m = _template_mask(img, reference, name)
    else:
        raise BrainsexError(f"method must be 'deepbet', 'mask' or 'template', got {method!r}")
    if not m.any():
        raise PreprocessError(f"{name}: the brain mask is empty after extraction ({method})")
    mask_img = new_image(m, img.affine, np.uint8)
    brain = new_image(np.where(m, data, 0.0), img.affine)
    return brain, mask_img


def _pseudo_head(template: nib.Nifti1Image, mask: nib.Nifti1Image) -> nib.Nifti1Image:
    """The brain-extracted template with a generic head around it: dark CSF and skull, bright scalp.

    Shell distances from the brain mask (mm): CSF 0-2, skull 2-7, scalp 7-13 (typical adult values);
    intensities relative to the template's white matter. Used only to find the head in an image.
    """
    data = np.asarray(template.dataobj, dtype=np.float32)
    inside = np.asarray(mask.dataobj) >= 0.5
    vs = _voxel_sizes(template)
    dist = ndimage.distance_transform_edt(~inside, sampling=vs).astype(np.float32)

    def band(lo: float, hi: float) -> np.ndarray:
        return (1 / (1 + np.exp(-(dist - lo) / 0.7))) * (1 - 1 / (1 + np.exp(-(dist - hi) / 0.7)))

    wm = float(np.percentile(data[inside], 99)) if inside.any() else 1.0
    head = np.where(inside, data, 0.0) + wm * (0.15 * band(0.0, 2.0) + 0.05 * band(2.0, 7.0) + 0.8 * band(7.0, 13.0))
    return new_image(head, template.affine)


def _pseudo_head_cached(ref: Reference, voxel_mm: float = 2.0) -> nib.Nifti1Image:
    """:func:`_pseudo_head` of the reference, built on a grid of at most ``voxel_mm`` (cached)."""
    key = (id(ref.template), float(voxel_mm), "head")
    hit = _COARSE_CACHE.get(key)  # type: ignore[arg-type]
    if hit is not None and hit[0] is ref.template:
        return hit[1]
    out = _pseudo_head(_downsample_cached(ref.template, voxel_mm),
                       new_image(np.asarray(_downsample_cached(ref.mask, voxel_mm).dataobj) >= 0.5,
                                  _downsample_cached(ref.mask, voxel_mm).affine, np.uint8))
    _COARSE_CACHE[key] = (ref.template, out)  # type: ignore[index]
    return out


def _template_mask(img: nib.Nifti1Image, reference: Reference | None, name: str,
                   reg_voxel_mm: float = 4.0, margin_mm: float = 8.0) -> np.ndarray:
    """Brain mask from the template (see :func:`skull_strip`, ``method="template"``).

    The template with a generic head around it (:func:`_pseudo_head`) is registered to the image in
    two stages at ``reg_voxel_mm``: a similarity transform (rotation, translation, one scale) on the
    whole image, then a 12-parameter affine whose metric is restricted to the brain found by the first
    stage plus ``margin_mm`` (without that restriction the affine stretches the brain onto the scalp
    and neck of real scans). The template's brain mask is carried over with the result.
    """
    ants = load_ants()
    ref = reference if reference is not None else Reference.load(2.0)
    coarse = max(reg_voxel_mm, float(np.max(_voxel_sizes(img))))
    mask_lo = _downsample_cached(ref.mask, coarse)
    head = _downsample(_pseudo_head_cached(ref), coarse)
    fixed = _downsample(img, coarse)
    schedule = ((100, 50, 20), (4, 2, 1), (2, 1, 0), 0.25)
    with tempfile.TemporaryDirectory(prefix="brainsex-reg-") as tmp:
        try:
            sim = register_linear(fixed, head, "Similarity", str(Path(tmp) / "s_"), *schedule)
            first = ants.apply_transforms(fixed=to_ants(fixed), moving=to_ants(mask_lo), transformlist=sim,
                                          interpolator="linear").numpy() >= 0.5
            if not first.any():
                raise PreprocessError(f"{name}: the template does not overlap the image after registration")
            near = ndimage.distance_transform_edt(~first, sampling=_voxel_sizes(fixed)) <= margin_mm
            fwd = register_linear(fixed, head, "Affine", str(Path(tmp) / "a_"), *schedule, initial_transform=sim[0],
                            fixed_mask=new_image(near, fixed.affine, np.float32))
        except RuntimeError as exc:
            raise PreprocessError(f"{name}: template registration for brain extraction failed ({exc})") from exc
        warped = ants.apply_transforms(fixed=to_ants(img), moving=to_ants(ref.mask), transformlist=fwd,
                                       interpolator="linear")
    return warped.numpy() >= 0.5


# ---------------------------------------------------------------------------------- registration
@functools.cache
def _scratch_dir() -> Path:
    """A per-process temporary folder for transforms nobody asked to keep (removed at exit)."""
    import atexit

    path = Path(tempfile.mkdtemp(prefix="brainsex-preprocess-"))
    atexit.register(shutil.rmtree, path, True)
    return path


@dataclass
class RigidResult:
    """Output of :func:`rigid_register`.

    Attributes
    ----------
    image : nibabel.Nifti1Image
        The brain resampled once onto the target grid.
    mask : nibabel.Nifti1Image or None
        The brain mask on the target grid (when a mask was given).
    transform : pathlib.Path
        ANTs transform file (``.mat``), template -> subject in ITK's sense (use it as
        ``transformlist`` of ``ants.apply_transforms`` to bring a subject image to the template grid).
    matrix : numpy.ndarray
        The same transform as a 4 x 4 RAS world matrix mapping template coordinates to subject ones.
    similarity : float
        :func:`similarity` of the registered brain with the template inside the template mask.
    """

    image: nib.Nifti1Image
    mask: nib.Nifti1Image | None
    transform: Path
    matrix: np.ndarray
    similarity: float
    info: dict[str, Any] = field(default_factory=dict)


def _centroid(mask: nib.Nifti1Image) -> np.ndarray:
    """World coordinates (mm) of the centre of a mask."""
    ijk = np.argwhere(np.asarray(mask.dataobj) > 0)
    centre = ijk.mean(axis=0) if len(ijk) else (np.asarray(mask.shape[:3]) - 1) / 2.0
    return (mask.affine @ np.append(centre, 1.0))[:3]


def rigid_error(estimated: np.ndarray, true: np.ndarray, centre: Sequence[float] = (0.0, -18.0, 18.0)
                ) -> tuple[float, float]:
    """Rotation (degrees) and translation (mm, at ``centre``) between two rigid world matrices.

    Parameters
    ----------
    estimated, true : numpy.ndarray of shape (4, 4)
        Matrices mapping template coordinates to subject coordinates (e.g. :attr:`RigidResult.matrix`
        and :func:`brainsex.synthetic.pose_matrix`).
    centre : sequence of 3 floats
        Point (template mm) where the translation error is measured (default: the centre of the brain).
    """
    err = np.linalg.inv(true) @ estimated
    cos = np.clip((np.trace(err[:3, :3]) - 1.0) / 2.0, -1.0, 1.0)
    c = np.append(np.asarray(centre, float), 1.0)
    return float(np.degrees(np.arccos(cos))), float(np.linalg.norm((err @ c - c)[:3]))


def similarity(img: nib.Nifti1Image, template: nib.Nifti1Image, mask: nib.Nifti1Image | None = None) -> float:
    """Normalised cross-correlation (Pearson r) of two images on one grid, inside ``mask``.

    The registration QC score of :func:`rigid_register` (computed there on the coarse registration
    grid, so that it does not depend on the target voxel size): 1 for identical images; for the
    values correct registrations reach see ``similarity_threshold`` of :class:`PreprocessConfig`.

    Parameters
    ----------
    img, template : nibabel.Nifti1Image
        Two images on one grid.
    mask : nibabel.Nifti1Image, optional
        Voxels compared (default: all).

    Returns
    -------
    float
        Pearson r; 0 when fewer than two voxels or a constant image.
    """
    a = np.asarray(img.dataobj, dtype=np.float64)
    b = np.asarray(template.dataobj, dtype=np.float64)
    if a.shape != b.shape:
        raise BrainsexError(f"similarity: images have different shapes {a.shape} and {b.shape}")
    m = np.asarray(mask.dataobj).astype(bool) if mask is not None else np.ones(a.shape, bool)
    a, b = a[m], b[m]
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _reach(src: nib.Nifti1Image, matrix: np.ndarray, shape: Sequence[int], affine: np.ndarray,
           margin: int = 2) -> tuple[slice, slice, slice]:
    """Voxel box of the target grid (shape, affine) covering ``src`` mapped by ``inv(matrix)``."""
    n = np.asarray(src.shape[:3]) - 1
    corners = np.array([[i, j, k, 1.0] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])]).T
    vox = np.linalg.inv(affine) @ np.linalg.inv(matrix) @ src.affine @ corners
    lo = np.clip(np.floor(vox[:3].min(axis=1)).astype(int) - margin, 0, np.asarray(shape) - 1)
    hi = np.clip(np.ceil(vox[:3].max(axis=1)).astype(int) + margin + 1, lo + 1, np.asarray(shape))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]


def _box_in(crop: nib.Nifti1Image, full: nib.Nifti1Image) -> tuple[slice, slice, slice]:
    """The slices of ``full`` that :func:`_crop_nonzero` kept in ``crop`` (same voxel grid)."""
    start = np.rint(np.linalg.inv(full.affine) @ crop.affine[:, 3]).astype(int)[:3]
    return tuple(slice(int(a), int(a) + int(n)) for a, n in zip(start, crop.shape[:3], strict=True))  # type: ignore[return-value]


def rigid_register(
    brain_img: nib.Nifti1Image,
    template_brain: nib.Nifti1Image,
    voxel_size: float | None = None,
    mask: nib.Nifti1Image | None = None,
    template_mask: nib.Nifti1Image | None = None,
    transform_path: str | os.PathLike | None = None,
    reg_voxel_mm: float = 4.0,
    iterations: Sequence[int] = (100, 20),
    shrink_factors: Sequence[int] = (2, 1),
    smoothing_sigmas: Sequence[float] = (1, 0),
    sampling: float = 0.2,
    metric: str = "mattes",
    type_of_transform: Literal["Rigid", "QuickRigid", "DenseRigid"] = "Rigid",
    metric_margin_mm: float | None = 8.0,
    target: tuple[Sequence[int], np.ndarray] | None = None,
) -> RigidResult:
    """Rigid (6 degrees of freedom) registration of a brain to the template (paper section 2.2).

    The paper used FSL FLIRT with 6 DOF so that brain volumes are kept. Here ANTsPy estimates the
    rigid transform on copies of both images smoothed and sampled at ``reg_voxel_mm`` (a pyramid of
    ``shrink_factors`` on top of that), starting from the alignment of the centres of mass; the
    full-resolution image is then resampled once (linear interpolation) onto the target grid.

    Parameters
    ----------
    brain_img : nibabel.Nifti1Image
        Brain-extracted subject image (any grid, RAS or not).
    template_brain : nibabel.Nifti1Image
        Brain-extracted template.
    voxel_size : float, optional
        Target grid :func:`brainsex.templates.target_grid` (``voxel_size``); default: ``target``, or the
        template's own grid. The transform is always estimated against ``template_brain`` (at
        ``reg_voxel_mm``), whatever the target grid.
    mask : nibabel.Nifti1Image, optional
        Subject brain mask; resampled too (linear, >= 0.5) and zeroing the image outside it.
    template_mask : nibabel.Nifti1Image, optional
        Template brain mask, for :attr:`RigidResult.similarity` (default: template > 0).
    transform_path : path, optional
        Where to copy the ANTs ``.mat`` file (atomically); default: a temporary file.
    reg_voxel_mm : float, default=4.0
        Voxel size of the copies the transform is estimated on (never finer than the inputs). On the
        phantom, 4 mm is as accurate as 2 or 3 mm and several times faster.
    iterations, shrink_factors, smoothing_sigmas, sampling, metric
        ANTs settings per pyramid level (Mattes mutual information); sampling is the fraction of
        voxels used for the metric. The cost is almost all metric evaluations (iterations x samples,
        about 1.5 us each), most of them on the finest level: the defaults do the search on a 2x
        coarser level and only refine at ``reg_voxel_mm`` (a third, 16 mm level held too few voxels
        to help). On a 4 mm phantom of 24 subjects: median error 0.6 deg / 0.65 mm (the earlier
        (100, 50, 20) x (4, 2, 1), sampling 0.25: 0.6 deg / 0.76 mm) in about 60 % of the time.
    type_of_transform : {"Rigid", "QuickRigid", "DenseRigid"}, default="Rigid"
        ANTs' rigid variants (all rotation + translation only). "QuickRigid" uses ANTs' own
        (short) iteration schedule.
    metric_margin_mm : float or None, default=8.0
        Sample the metric only within this distance of the template brain mask (about 3 times fewer
        samples, same accuracy); None samples the whole grid.
    target : (shape, affine), optional
        Explicit target grid (instead of ``voxel_size``).

    Returns
    -------
    RigidResult
    """
    if type_of_transform not in ("Rigid", "QuickRigid", "DenseRigid"):
        raise BrainsexError(f"type_of_transform must be a rigid type, got {type_of_transform!r}")
    r = _registration_inputs(brain_img, template_brain, voxel_size, template_mask, reg_voxel_mm, metric_margin_mm,
                             target)
    kw: dict[str, Any] = {"iterations": iterations, "shrink_factors": shrink_factors,
                          "smoothing_sigmas": smoothing_sigmas, "sampling": sampling, "metric": metric}
    if type_of_transform == "QuickRigid":
        kw.update({"iterations": (20, 20, 0, 0), "shrink_factors": (8, 4, 2, 1), "smoothing_sigmas": (3, 2, 1, 0)})
    out_tx = _estimate_rigid(r.fixed_lo, r.moving_lo, "DenseRigid" if type_of_transform == "DenseRigid" else "Rigid",
                             transform_path, r.fixed_mask, kw)
    matrix = transform_matrix(out_tx)
    sim = _coarse_similarity(r.fixed_lo, r.moving_lo, _downsample_cached(r.tmask, r.coarse), out_tx)
    image, mask_out = _resample_rigid(r.brain_c, mask, matrix, out_tx, r.shape, r.affine)
    return RigidResult(image=image, mask=mask_out, transform=out_tx, matrix=matrix, similarity=sim,
                       info={"reg_voxel_mm": r.coarse})


@dataclass(frozen=True)
class _RegistrationInputs:
    """What both linear registrations start from (:func:`_registration_inputs`)."""

    tmask: nib.Nifti1Image
    shape: tuple[int, ...]
    affine: np.ndarray
    coarse: float
    fixed_lo: nib.Nifti1Image
    brain_c: nib.Nifti1Image
    moving_lo: nib.Nifti1Image
    fixed_mask: nib.Nifti1Image | None


def _registration_inputs(brain_img: nib.Nifti1Image, tmpl: nib.Nifti1Image, voxel_size: float | None,
                         template_mask: nib.Nifti1Image | None, reg_voxel_mm: float, metric_margin_mm: float | None,
                         target: tuple[Sequence[int], np.ndarray] | None) -> _RegistrationInputs:
    """Template mask, output grid and the coarse copies a linear registration estimates on.

    Estimation runs on coarse copies (on the template's grid if that is coarser; a coarser subject is
    used as it is); the subject is cropped to its brain first (cheaper smoothing).
    """
    tmask = template_mask if template_mask is not None else new_image(
        np.asarray(tmpl.dataobj) > 0, tmpl.affine, np.uint8)
    shape, affine = _rigid_target(tmpl, voxel_size, target)
    coarse = max(float(reg_voxel_mm), float(np.max(_voxel_sizes(tmpl))))
    brain_c = _crop_nonzero(brain_img, 2 * coarse)
    return _RegistrationInputs(
        tmask=tmask, shape=shape, affine=affine, coarse=coarse, fixed_lo=_downsample_cached(tmpl, coarse),
        brain_c=brain_c, moving_lo=_downsample(brain_c, coarse),
        fixed_mask=None if metric_margin_mm is None else _metric_mask(tmask, coarse, metric_margin_mm))


def _rigid_target(tmpl: nib.Nifti1Image, voxel_size: float | None,
                  target: tuple[Sequence[int], np.ndarray] | None) -> tuple[tuple[int, ...], np.ndarray]:
    """The grid a rigid registration resamples onto: ``voxel_size``'s, ``target``, or the template's."""
    if voxel_size is not None:
        from brainsex import templates

        return templates.target_grid(voxel_size)
    if target is not None:
        return tuple(int(n) for n in target[0]), np.asarray(target[1], dtype=np.float64)
    return tmpl.shape[:3], tmpl.affine


def _estimate_rigid(fixed_lo: nib.Nifti1Image, moving_lo: nib.Nifti1Image, kind: str,
                    transform_path: str | os.PathLike | None, fixed_mask: nib.Nifti1Image | None,
                    kw: dict[str, Any]) -> Path:
    """Run ANTs on the coarse copies; keep the transform at ``transform_path`` (or a scratch file)."""
    with tempfile.TemporaryDirectory(prefix="brainsex-reg-") as tmp:
        try:
            fwd = register_linear(fixed_lo, moving_lo, kind, str(Path(tmp) / "rigid_"), fixed_mask=fixed_mask, **kw)
        except RuntimeError as exc:
            raise PreprocessError(f"rigid registration failed ({exc})") from exc
        src = Path(fwd[0])
        if transform_path is None:
            fd, dst = tempfile.mkstemp(prefix="rigid-", suffix=".mat", dir=_scratch_dir())
            os.close(fd)
            shutil.copyfile(src, dst)
            return Path(dst)
        out_tx = Path(transform_path)
        with atomic_path(out_tx) as t:
            shutil.copyfile(src, t)
        return out_tx


def _coarse_similarity(fixed_lo: nib.Nifti1Image, moving_lo: nib.Nifti1Image, tmask_lo: nib.Nifti1Image,
                       transform: Path) -> float:
    """QC score on the coarse grid (independent of the target voxel size)."""
    ants = load_ants()
    warped_lo = ants.apply_transforms(fixed=to_ants(fixed_lo), moving=to_ants(moving_lo),
                                      transformlist=[str(transform)], interpolator="linear")
    return similarity(new_image(warped_lo.numpy(), fixed_lo.affine), fixed_lo,
                      new_image(np.asarray(tmask_lo.dataobj) >= 0.5, fixed_lo.affine, np.uint8))


def _resample_rigid(brain_c: nib.Nifti1Image, mask: nib.Nifti1Image | None, matrix: np.ndarray, transform: Path,
                    shape: Sequence[int], affine: np.ndarray) -> tuple[nib.Nifti1Image, nib.Nifti1Image | None]:
    """Resample once: full-resolution subject (and mask) -> target grid.

    Anti-aliased when the grid is coarser, and only over the part of the grid the subject's brain can
    reach; the image is zeroed outside the resampled mask (linear, >= 0.5).
    """
    ants = load_ants()
    grid_vs = float(np.max(_voxel_sizes(_grid_image((1, 1, 1), affine))))
    src_img = brain_c
    if grid_vs > 1.5 * float(np.max(_voxel_sizes(brain_c))):
        src_img = new_image(_smooth_to(brain_c, grid_vs), brain_c.affine)
    box = _reach(brain_c, matrix, shape, affine)
    sub_aff = affine.copy()
    sub_aff[:3, 3] = (affine @ np.array([box[0].start, box[1].start, box[2].start, 1.0]))[:3]
    sub_shape = tuple(b.stop - b.start for b in box)
    target = to_ants(_grid_image(sub_shape, sub_aff))
    moved = ants.apply_transforms(fixed=target, moving=to_ants(src_img), transformlist=[str(transform)],
                                  interpolator="linear")
    data = np.zeros(tuple(shape), np.float32)
    data[box] = moved.numpy()
    if mask is None:
        return new_image(data, affine), None
    mask_c = new_image(np.asarray(mask.dataobj, np.float32), mask.affine)
    mask_c = mask_c.slicer[_box_in(brain_c, mask_c)] if mask_c.shape[:3] != brain_c.shape[:3] else mask_c
    mm = ants.apply_transforms(fixed=target, moving=to_ants(mask_c), transformlist=[str(transform)],
                               interpolator="linear")
    m = np.zeros(tuple(shape), bool)
    m[box] = mm.numpy() >= 0.5
    data = np.where(m, data, 0.0).astype(np.float32)
    return new_image(data, affine), new_image(m, affine, np.uint8)


def apply_rigid(
    brain_img: nib.Nifti1Image,
    transform: str | os.PathLike,
    target: tuple[Sequence[int], np.ndarray],
    mask: nib.Nifti1Image | None = None,
    reference: Reference | None = None,
    reg_voxel_mm: float = 4.0,
) -> tuple[nib.Nifti1Image, nib.Nifti1Image | None]:
    """Resample a brain (and its mask) onto the target grid with a rigid transform already estimated.

    The resampling step of :func:`rigid_register`, the same code: used to put a changed copy of a
    scan (a counterfactual, :mod:`brainsex.reliance`) through a subject's recorded transform
    (``rigid_transform`` of :meth:`brainsex.run.PreprocessDir.subject_outputs`) without estimating it again.

    Parameters
    ----------
    brain_img : nibabel.Nifti1Image
        Brain-extracted subject image (:func:`skull_strip`).
    transform : path
        The ANTs ``.mat`` file :func:`rigid_register` wrote.
    target : (shape, affine)
        The target grid (the preprocessed image's).
    mask : nibabel.Nifti1Image, optional
        Subject brain mask; resampled too (linear, >= 0.5) and zeroing the image outside it.
    reference : Reference, optional
        The template the transform was estimated against, and ``reg_voxel_mm``: together they set
        the crop margin :func:`rigid_register` used (so the output is the same, bit for bit).
        Default: the margin of a 4 mm registration.
    reg_voxel_mm : float, default=4.0
        As given to :func:`rigid_register`.

    Returns
    -------
    image, mask : nibabel.Nifti1Image
        The resampled brain (zero outside the mask) and mask (None without one).
    """
    path = Path(transform)
    if not path.is_file():
        raise PreprocessError(f"{path}: rigid transform not found")
    tmpl_vs = float(np.max(_voxel_sizes(reference.registration_template))) if reference is not None else 0.0
    coarse = max(float(reg_voxel_mm), tmpl_vs)
    brain_c = _crop_nonzero(brain_img, 2 * coarse)
    shape, affine = tuple(int(n) for n in target[0]), np.asarray(target[1], dtype=np.float64)
    return _resample_rigid(brain_c, mask, transform_matrix(path), path, shape, affine)


def affine_register(
    brain_img: nib.Nifti1Image,
    template_brain: nib.Nifti1Image,
    voxel_size: float | None = None,
    mask: nib.Nifti1Image | None = None,
    template_mask: nib.Nifti1Image | None = None,
    transform_path: str | os.PathLike | None = None,
    affine_path: str | os.PathLike | None = None,
    reg_voxel_mm: float = 4.0,
    iterations: Sequence[int] = (60, 10),
    shrink_factors: Sequence[int] = (2, 1),
    smoothing_sigmas: Sequence[float] = (1, 0),
    sampling: float = 0.2,
    metric: str = "mattes",
    metric_margin_mm: float | None = 8.0,
    target: tuple[Sequence[int], np.ndarray] | None = None,
) -> RigidResult:
    """One 12-parameter affine registration serving both the model input (its rigid part) and eTIV.

    The affine subject -> template is estimated like :func:`rigid_register`'s rigid transform (coarse
    copies at ``reg_voxel_mm``, starting from the alignment of the centres of mass, the metric sampled
    near the template brain). Its rigid part -- the rotation of the polar decomposition of its linear
    part, and the translation that maps the template brain's centre as the affine does -- is written to
    ``transform_path`` and applied once to the full-resolution image, exactly as :func:`rigid_register`
    applies its own (no scaling: brain volumes are kept, as with the paper's 6-DOF FLIRT, section 2.2).
    The affine itself gives eTIV (:func:`etiv_from_matrix`), so no second registration is needed.

    Measured (``benchmarks/results/etiv_registration_2026-12-03.md``) against :func:`rigid_register`
    followed by :func:`etiv_affine` started from it. On a 4 mm phantom of 24 subjects with their true
    masks: half the time a subject (all steps); eTIV r = 0.999 with the two-registration eTIV (median
    difference 4.6 ml, about what a change of ANTs' random seed gives) and r = 0.973 with the true TIV
    (the same); median pose error 0.65 deg / 0.85 mm against 0.59 deg / 0.67 mm. On 24 real IXI heads
    (4 mm, deepbet masks) the rigid part is another pose than the rigid registration's (median 1.4 deg
    / 1.8 mm apart, up to 7 deg), with a lower similarity to the template (median 0.521 against
    0.532), and eTIV agrees less (r = 0.980): so it is not the default.

    Parameters
    ----------
    brain_img : nibabel.Nifti1Image
        Brain-extracted subject image (any grid, RAS or not).
    template_brain : nibabel.Nifti1Image
        Brain-extracted template.
    voxel_size : float, optional
        Target grid :func:`brainsex.templates.target_grid` (``voxel_size``); default: ``target``, or the
        template's own grid.
    mask : nibabel.Nifti1Image, optional
        Subject brain mask; resampled too (linear, >= 0.5) and zeroing the image outside it.
    template_mask : nibabel.Nifti1Image, optional
        Template brain mask: for :attr:`RigidResult.similarity`, the metric's sampling region and the
        centre of the rigid part (default: template > 0).
    transform_path : path, optional
        Where to write the rigid part as an ANTs ``.mat`` file (atomically); default: a temporary file.
    affine_path : path, optional
        Where to copy the affine's ANTs ``.mat`` file (atomically); default: not kept.
    reg_voxel_mm : float, default=4.0
        Voxel size of the copies the affine is estimated on (never finer than the template).
    iterations : sequence of int, default=(60, 10)
        Iterations per pyramid level (Mattes mutual information). Against (100, 20): 35 % less time for
        the same eTIV agreement and a pose error 0.05 deg / 0.02 mm larger (median, 4 mm phantom).
    shrink_factors : sequence of int, default=(2, 1)
        Downsampling per level.
    smoothing_sigmas : sequence of float, default=(1, 0)
        Smoothing per level (voxels).
    sampling : float, default=0.2
        Share of voxels the metric samples.
    metric : str, default="mattes"
        ANTs metric.
    metric_margin_mm : float or None, default=8.0
        Sample the metric only within this distance of the template brain mask; None samples the
        whole grid.
    target : (shape, affine), optional
        Explicit target grid (instead of ``voxel_size``).

    Returns
    -------
    RigidResult
        The rigid part as :attr:`RigidResult.transform` and :attr:`RigidResult.matrix`; ``info`` holds
        ``"affine_matrix"`` (4 x 4 RAS, template -> subject; :func:`etiv_from_matrix` takes it) and
        ``"reg_voxel_mm"``.
    """
    r = _registration_inputs(brain_img, template_brain, voxel_size, template_mask, reg_voxel_mm, metric_margin_mm,
                             target)
    with tempfile.TemporaryDirectory(prefix="brainsex-reg-") as tmp:
        try:
            fwd = register_linear(r.fixed_lo, r.moving_lo, "Affine", str(Path(tmp) / "affine_"), iterations,
                                  shrink_factors, smoothing_sigmas, sampling, metric, fixed_mask=r.fixed_mask)
        except RuntimeError as exc:
            raise PreprocessError(f"affine registration failed ({exc})") from exc
        full = transform_matrix(fwd[0])
        if affine_path is not None:
            with atomic_path(affine_path) as t:
                shutil.copyfile(fwd[0], t)
    matrix = _rigid_part(full, _centroid(r.tmask))
    out_tx = _write_linear_transform(matrix, transform_path)
    sim = _coarse_similarity(r.fixed_lo, r.moving_lo, _downsample_cached(r.tmask, r.coarse), out_tx)
    image, mask_out = _resample_rigid(r.brain_c, mask, matrix, out_tx, r.shape, r.affine)
    return RigidResult(image=image, mask=mask_out, transform=out_tx, matrix=matrix, similarity=sim,
                       info={"reg_voxel_mm": r.coarse, "affine_matrix": full})


def _rigid_part(matrix: np.ndarray, centre: Sequence[float]) -> np.ndarray:
    """Rotation of ``matrix``'s polar decomposition, translated so that ``centre`` maps as under ``matrix``."""
    from scipy.linalg import polar

    rot, _ = polar(np.asarray(matrix, np.float64)[:3, :3])
    if np.linalg.det(rot) <= 0:
        raise PreprocessError(f"affine registration gave a reflection (det {np.linalg.det(matrix[:3, :3]):.3g})")
    c = np.asarray(centre, np.float64)
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = matrix[:3, :3] @ c + matrix[:3, 3] - rot @ c
    return out


def _write_linear_transform(matrix: np.ndarray, transform_path: str | os.PathLike | None) -> Path:
    """Write a RAS world matrix (template -> subject) as an ANTs ``.mat`` file, atomically (or to scratch)."""
    ants = load_ants()
    lps = LPS @ matrix @ LPS
    tx = ants.create_ants_transform(transform_type="AffineTransform", precision="float", dimension=3,
                                    matrix=lps[:3, :3], translation=lps[:3, 3], center=[0.0, 0.0, 0.0])
    if transform_path is None:
        fd, dst = tempfile.mkstemp(prefix="rigid-", suffix=".mat", dir=_scratch_dir())
        os.close(fd)
        ants.write_transform(tx, dst)
        return Path(dst)
    out = Path(transform_path)
    with atomic_path(out) as t:
        ants.write_transform(tx, str(t))
    return out


# ------------------------------------------------------------------------------------- intensity
def zscore(img: nib.Nifti1Image, mask: nib.Nifti1Image | np.ndarray | None = None,
           mode: Literal["brain", "volume"] = "brain") -> nib.Nifti1Image:
    """Z-score the intensities (paper section 2.2: subtract the mean, divide by the standard deviation).

    Parameters
    ----------
    img : nibabel.Nifti1Image
        The (registered) image.
    mask : image or array, optional
        Brain mask; default: the non-zero voxels of ``img``.
    mode : {"brain", "volume"}, default="brain"
        ``"brain"``: mean and sd of the voxels inside the mask; voxels outside are set to 0 (the brain's
        mean). ``"volume"``: mean and sd of the whole volume, background included, and every voxel
        transformed -- what the paper's public code does; the statistics then depend on how much
        background the field of view holds.

    Returns
    -------
    nibabel.Nifti1Image
        float32, same grid.
    """
    data = np.asarray(img.dataobj, dtype=np.float64)
    if mode == "volume":
        values = data.ravel()
    elif mode == "brain":
        m = (np.asarray(mask.dataobj) if isinstance(mask, nib.spatialimages.SpatialImage) else
             (data != 0) if mask is None else np.asarray(mask)).astype(bool)
        if m.shape != data.shape:
            raise BrainsexError(f"zscore: mask shape {m.shape} differs from image shape {data.shape}")
        values = data[m]
    else:
        raise BrainsexError(f"zscore: mode must be 'brain' or 'volume', got {mode!r}")
    if values.size < 2:
        raise PreprocessError("zscore: the mask holds fewer than 2 voxels")
    mean, sd = float(values.mean()), float(values.std())
    if not np.isfinite(sd) or sd <= 0:
        raise PreprocessError(f"zscore: zero or undefined standard deviation ({sd}) inside the {mode}")
    z = (data - mean) / sd
    if mode == "brain":
        z = np.where(m, z, 0.0)
    return new_image(z, img.affine)


# --------------------------------------------------------------------------------------------- TIV
def mask_volume_ml(mask: nib.spatialimages.SpatialImage | str | os.PathLike) -> float:
    """Volume of a binary mask in ml (non-zero voxels times the voxel volume / 1000).

    Parameters
    ----------
    mask : nibabel image or path
        The mask.

    Returns
    -------
    float
        Volume in ml.
    """
    img = nib.load(mask) if not isinstance(mask, nib.spatialimages.SpatialImage) else mask
    vox_ml = abs(float(np.linalg.det(img.affine[:3, :3]))) / 1000.0
    return float(np.count_nonzero(np.asarray(img.dataobj))) * vox_ml


def affine_to_template(
    img: nib.Nifti1Image,
    template: nib.Nifti1Image,
    transform_path: str | os.PathLike | None = None,
    initial_transform: str | os.PathLike | None = None,
    reg_voxel_mm: float = 4.0,
    iterations: Sequence[int] = (30, 10),
    shrink_factors: Sequence[int] = (2, 1),
    smoothing_sigmas: Sequence[float] = (1, 0),
    sampling: float = 0.25,
    metric: str = "mattes",
    template_mask: nib.Nifti1Image | None = None,
    metric_margin_mm: float = 8.0,
) -> np.ndarray:
    """12-parameter affine registration of ``img`` (moving) to ``template`` (fixed), estimated coarsely.

    With ``template_mask`` the metric is sampled within ``metric_margin_mm`` of it (faster). The default
    schedule is short because the affine normally starts from the rigid result (``initial_transform``):
    30 iterations at twice ``reg_voxel_mm`` and 10 at ``reg_voxel_mm`` gave the same eTIV accuracy on
    the 4 mm phantom (24 subjects: r = 0.978 with the true TIV, median eTIV / TIV 1.013) as
    (100, 50, 20) x (4, 2, 1) (r = 0.979, 1.012) in 60 % of the time; 5 final iterations were too few
    on 8 mm images.

    Parameters
    ----------
    img : nibabel.Nifti1Image
        Moving image (brain-extracted subject).
    template : nibabel.Nifti1Image
        Fixed image (brain-extracted template).
    transform_path : path, optional
        Where to keep the affine ``.mat`` file.
    initial_transform : path, optional
        ANTs transform to start from (e.g. the rigid one).
    reg_voxel_mm : float, default=4.0
        Voxel size of the finest level (at least the template's).
    iterations : sequence of int, default=(30, 10)
        Iterations per pyramid level.
    shrink_factors : sequence of int, default=(2, 1)
        Downsampling per level.
    smoothing_sigmas : sequence of float, default=(1, 0)
        Smoothing per level.
    sampling : float, default=0.25
        Share of voxels the metric samples.
    metric : str, default="mattes"
        ANTs metric.
    template_mask : nibabel.Nifti1Image, optional
        Template brain mask; the metric is sampled within ``metric_margin_mm`` of it.
    metric_margin_mm : float, default=8.0
        Margin around ``template_mask``.

    Returns
    -------
    numpy.ndarray of shape (4, 4)
        RAS world matrix mapping template coordinates to subject coordinates; its determinant is
        subject volume / template volume.
    """
    coarse = max(float(reg_voxel_mm), float(np.max(_voxel_sizes(template))))
    fixed_lo = _downsample_cached(template, coarse)
    moving_lo = _downsample(_crop_nonzero(img, 2 * coarse), coarse)
    with tempfile.TemporaryDirectory(prefix="brainsex-reg-") as tmp:
        try:
            fwd = register_linear(fixed_lo, moving_lo, "Affine", str(Path(tmp) / "affine_"), iterations, shrink_factors,
                            smoothing_sigmas, sampling, metric,
                            initial_transform=None if initial_transform is None else str(initial_transform),
                            fixed_mask=None if template_mask is None else _metric_mask(template_mask, coarse,
                                                                                      metric_margin_mm))
        except RuntimeError as exc:
            raise PreprocessError(f"affine registration (eTIV) failed ({exc})") from exc
        # with an initial transform ANTs writes the composed affine as the first forward transform
        matrix = transform_matrix(fwd[0])
        if transform_path is not None:
            with atomic_path(transform_path) as t:
                shutil.copyfile(fwd[0], t)
    return matrix


def etiv_affine(
    img: nib.Nifti1Image,
    template: nib.Nifti1Image,
    template_tiv_ml: float,
    transform_path: str | os.PathLike | None = None,
    initial_transform: str | os.PathLike | None = None,
    reg_voxel_mm: float = 4.0,
    template_mask: nib.Nifti1Image | None = None,
) -> float:
    """Estimated total intracranial volume in the FreeSurfer sense (paper section 2.2, TIV).

    FreeSurfer's eTIV (Buckner et al. 2004) divides the atlas' intracranial volume by the determinant
    of the 12-parameter affine that maps the subject to the atlas::

        eTIV = TIV_template / det(A_subject->template) = TIV_template * det(A_template->subject)

    Here the affine is an ANTsPy registration of the brain-extracted image to the brain-extracted
    template, estimated on ``reg_voxel_mm`` copies (optionally starting from the rigid transform).

    Parameters
    ----------
    img : nibabel.Nifti1Image
        Brain-extracted subject image.
    template : nibabel.Nifti1Image
        Brain-extracted template.
    template_tiv_ml : float
        The template's TIV in ml (:attr:`Reference.tiv_ml`).
    transform_path : path, optional
        Where to keep the affine ``.mat`` file.
    initial_transform : path, optional
        ANTs transform to start from (e.g. :attr:`RigidResult.transform`).
    reg_voxel_mm : float, default=4.0
        Voxel size the affine is estimated at.
    template_mask : nibabel.Nifti1Image, optional
        Template brain mask; restricts the metric to the brain and its surroundings (faster).

    Returns
    -------
    float
        eTIV in ml.
    """
    if not (np.isfinite(template_tiv_ml) and template_tiv_ml > 0):
        raise BrainsexError(f"template_tiv_ml must be a positive volume in ml, got {template_tiv_ml!r}")
    matrix = affine_to_template(img, template, transform_path=transform_path, initial_transform=initial_transform,
                                reg_voxel_mm=reg_voxel_mm, template_mask=template_mask)
    return etiv_from_matrix(matrix, template_tiv_ml)


def etiv_from_matrix(matrix: np.ndarray, template_tiv_ml: float) -> float:
    """The eTIV of an affine already estimated: ``template_tiv_ml * det(matrix)`` (see :func:`etiv_affine`).

    Parameters
    ----------
    matrix : numpy.ndarray of shape (4, 4)
        RAS world matrix mapping template coordinates to subject coordinates (:func:`affine_to_template`,
        or ``info["affine_matrix"]`` of :func:`affine_register`).
    template_tiv_ml : float
        The template's TIV in ml (:attr:`Reference.tiv_ml`).

    Returns
    -------
    float
        eTIV in ml.
    """
    if not (np.isfinite(template_tiv_ml) and template_tiv_ml > 0):
        raise BrainsexError(f"template_tiv_ml must be a positive volume in ml, got {template_tiv_ml!r}")
    det = float(np.linalg.det(np.asarray(matrix, np.float64)[:3, :3]))
    if not np.isfinite(det) or det <= 0:
        raise PreprocessError(f"affine registration (eTIV) gave a degenerate transform (det {det})")
    return float(template_tiv_ml) * det


def dice(a: nib.spatialimages.SpatialImage | np.ndarray, b: nib.spatialimages.SpatialImage | np.ndarray) -> float:
    """Dice overlap 2|A and B| / (|A| + |B|) of two masks on one grid.

    Parameters
    ----------
    a, b : nibabel image or numpy.ndarray
        Masks (non-zero inside) of the same shape.

    Returns
    -------
    float
        Dice in [0, 1]; 1 when both masks are empty.
    """
    x = (np.asarray(a.dataobj) if isinstance(a, nib.spatialimages.SpatialImage) else np.asarray(a)).astype(bool)
    y = (np.asarray(b.dataobj) if isinstance(b, nib.spatialimages.SpatialImage) else np.asarray(b)).astype(bool)
    if x.shape != y.shape:
        raise BrainsexError(f"dice: masks have different shapes {x.shape} and {y.shape}")
    total = int(x.sum()) + int(y.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(x, y).sum()) / total


# --------------------------------------------------------------------------------------- subjects
def _pid(row: Mapping[str, Any]) -> str:
    pid = str(row.get("participant_id", "")).strip()
    if not pid or pid.lower() == "nan":
        raise BrainsexError("participants row without participant_id")
    return pid if pid.startswith("sub-") else f"sub-{pid}"


def subject_dir(out_dir: str | os.PathLike, participant_id: str) -> Path:
    """``out_dir/sub-<id>/`` (the id keeps its ``sub-`` prefix once).

    Parameters
    ----------
    out_dir : path
        The run directory's ``preprocess`` folder.
    participant_id : str
        With or without the ``sub-`` prefix.

    Returns
    -------
    pathlib.Path
        The subject's output folder.
    """
    return PreprocessDir(out_dir).subject(_pid({"participant_id": participant_id}))


def _output_paths(sdir: Path, pid: str) -> dict[str, Path]:
    paths = PreprocessDir(sdir.parent).subject_outputs(pid)
    paths.pop("marker")
    return paths


def nonlinear_prefix(out_dir: str | os.PathLike, participant_id: str) -> Path:
    """Cache prefix of a subject's non-linear transform (:func:`nonlinear_transform`) in ``out_dir``.

    The transform maps the subject's preprocessed image (``image_pp``, rigidly registered) to the
    template; a later stage (saliency) computes it on request with
    ``nonlinear_transform(image_pp, template, nonlinear_prefix(out_dir, pid))`` and reuses it.

    Parameters
    ----------
    out_dir : path
        The run directory's ``preprocess`` folder.
    participant_id : str
        With or without the ``sub-`` prefix.

    Returns
    -------
    pathlib.Path
        The cache prefix.
    """
    pid = _pid({"participant_id": participant_id})
    return PreprocessDir(out_dir).syn_prefix(pid)


def _marker_path(sdir: Path, pid: str) -> Path:
    return PreprocessDir(sdir.parent).subject_outputs(pid)["marker"]


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and str(value).strip() not in ("", "nan", "None")


def _file_fingerprint(path: Any) -> dict[str, Any]:
    """An input file's identity by content (size and SHA-256), never by its path.

    A run folder that is copied or moved (or a cohort whose images moved) keeps its preprocessing: the
    outputs depend on the bytes, not on where they lie (as :class:`brainsex.cache.FileCache` keys).
    """
    p = Path(str(path))
    if not p.is_file():
        return {"missing": True}
    return {"size": p.stat().st_size, "sha256": sha256_file(p)}


def _clean(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _read_marker(marker: Path, params: Mapping[str, Any]) -> dict[str, Any] | None:
    """The marker's QC row when the subject is done with ``params`` and its outputs verify, else None."""
    if not marker.is_file():
        return None
    try:
        content = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if content.get("version") != PIPELINE_VERSION or content.get("params") != json.loads(json.dumps(params)):
        return None
    for entry in content.get("outputs", {}).values():
        p = marker.parent / entry["file"]
        if not p.is_file() or p.stat().st_size != entry["size"] or sha256_file(p) != entry["sha256"]:
            return None
    qc = dict(content.get("qc", {}))
    for key, entry in content.get("outputs", {}).items():
        if key in QC_COLUMNS:
            qc[key] = str(marker.parent / entry["file"])
    return qc


def recorded_registration(preprocessed: pd.DataFrame, out_dir: str | os.PathLike) -> str:
    """The :attr:`PreprocessConfig.registration` a cohort was preprocessed with, read from its markers.

    Parameters
    ----------
    preprocessed : pandas.DataFrame
        ``preprocessed.tsv`` (``participant_id``, ``status``) of the cohort.
    out_dir : path
        Its ``preprocess`` folder (:class:`brainsex.run.PreprocessDir`).

    Returns
    -------
    str
        ``"rigid+affine"`` or ``"affine"``.

    Raises
    ------
    BrainsexError
        When no preprocessed subject has a readable marker, or the subjects disagree.
    """
    folder = PreprocessDir(out_dir)
    ok = preprocessed[preprocessed["status"] == "ok"] if "status" in preprocessed.columns else preprocessed
    found: set[str] = set()
    for pid in ok["participant_id"].astype(str):
        marker = folder.subject_outputs(_pid({"participant_id": pid}))["marker"]  # IXI002 -> sub-IXI002
        try:
            params = json.loads(marker.read_text())["params"]
        except (OSError, KeyError, json.JSONDecodeError):
            continue
        found.add(str(params.get("registration", "rigid+affine")))  # recorded only when not the default
    if len(found) != 1:
        raise BrainsexError(f"{folder.root}: " + ("no readable subject marker" if not found else
                                                  f"subjects preprocessed with different registrations {sorted(found)}"))
    return found.pop()


def _remove_strays(sdir: Path) -> None:
    """Delete temporary files a killed run left behind (names start with '.' and contain '.tmp')."""
    if not sdir.is_dir():
        return
    for p in sdir.iterdir():
        if p.is_file() and p.name.startswith(".") and ".tmp" in p.name:
            with contextlib.suppress(OSError):
                p.unlink()


def _save_nifti(img: nib.Nifti1Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings of one preprocessing run (paper section 2.2).

    Shared by :func:`preprocess_subject`, :func:`preprocess_cohort` and its workers. Every field is part of each subject's marker: a subject done with other settings is recomputed.

    Parameters
    ----------
    voxel_size : float, default=1.0
        Target grid voxel size in mm (1 mm: the paper's 193 x 229 x 193; profiles: paper 1, demo 4,
        smoke 8).
    method : {"auto", "deepbet", "mask", "template"}, default="auto"
        Brain extraction (:func:`skull_strip`); "auto" uses the row's ``mask`` when present, deepbet
        otherwise.
    similarity_threshold : float, default=0.1
        A registration whose :func:`similarity` is below this is recorded as failed (diverged): a
        floor for registrations that matched nothing. Correct registrations score about 0.55-0.75 on
        the phantom and 0.39-0.61 on real 2 mm IXI heads, so the cohort-relative check that fails
        clearly wrong registrations runs after the whole cohort is done
        (:func:`brainsex.qc.review_registrations`).
    zscore_mode : {"brain", "volume"}, default="brain"
        Where the z-score statistics are taken (:func:`zscore`).
    etiv : bool, default=True
        Record eTIV (otherwise ``etiv_ml`` is NaN).
    mask_ml_range : (float, float), default=(500.0, 3000.0)
        Plausible native brain-mask volumes in ml; outside means a failed extraction or a wrong voxel
        size in the header.
    reg_voxel_mm : float, default=4.0
        Voxel size the pose (and, with ``registration="affine"``, the eTIV affine) is estimated at.
    etiv_voxel_mm : float, default=4.0
        Voxel size the eTIV affine is estimated at with ``registration="rigid+affine"``
        (:func:`etiv_affine`); unused otherwise.
    deepbet_size : int, default=192
        ``network_size`` of :func:`skull_strip` (deepbet's input grid).
    nonlinear : bool, default=False
        Also compute the non-linear transform preprocessed image -> template now (cached at
        :func:`nonlinear_prefix`; otherwise a later stage computes it on request).
    registration : {"rigid+affine", "affine"}, default="rigid+affine"
        ``"rigid+affine"``: :func:`rigid_register`, then :func:`etiv_affine` started from the rigid
        transform (``t_etiv_s``). ``"affine"``: one 12-parameter affine registration
        (:func:`affine_register`) whose rigid part places the brain on the target grid and whose
        determinant gives eTIV (:func:`etiv_from_matrix`); its time is all in ``t_rigid_s``. On the
        4 mm phantom it takes half the time for the same eTIV (r = 0.999, and 0.973 with the true TIV)
        and a median pose error 0.06 deg / 0.2 mm larger; on real IXI heads its pose differs from the
        rigid registration's by a median 1.4 deg and eTIV agrees at r = 0.980 only
        (``benchmarks/results/etiv_registration_2026-12-03.md``).
    """

    voxel_size: float = 1.0
    method: Method = "auto"
    similarity_threshold: float = 0.1
    zscore_mode: Literal["brain", "volume"] = "brain"
    etiv: bool = True
    mask_ml_range: tuple[float, float] = (500.0, 3000.0)
    reg_voxel_mm: float = 4.0
    etiv_voxel_mm: float = 4.0
    deepbet_size: int = 192
    nonlinear: bool = False
    registration: Literal["rigid+affine", "affine"] = "rigid+affine"

    def __post_init__(self) -> None:
        if self.registration not in ("affine", "rigid+affine"):
            raise BrainsexError(f"registration must be 'affine' or 'rigid+affine', got {self.registration!r}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> PreprocessConfig:
        """Build a config from keyword arguments, naming any that is not a setting.

        Parameters
        ----------
        **kwargs
            Fields of :class:`PreprocessConfig`.

        Returns
        -------
        PreprocessConfig
            The settings.

        Raises
        ------
        BrainsexError
            For a keyword that is not a field.
        """
        unknown = sorted(set(kwargs) - {f.name for f in fields(cls)})
        if unknown:
            raise BrainsexError(f"unknown preprocessing setting(s) {unknown}; valid: {[f.name for f in fields(cls)]}")
        return cls(**kwargs)

    def marker_params(self, method: str, image: Any, mask: Any, reference: Reference) -> dict[str, Any]:
        """The parameters recorded in a subject's marker (inputs' fingerprints, settings, template).

        Parameters
        ----------
        method : str
            The brain extraction actually used ("auto" resolved).
        image, mask : path or None
            The subject's input image and native brain mask (fingerprinted by size and SHA-256).
        reference : Reference
            The template (its :meth:`Reference.fingerprint`).

        Returns
        -------
        dict
            JSON-serialisable; a marker is reused only when this matches exactly.
        """
        return {
            "image": _file_fingerprint(image) if _present(image) else None,
            "mask": _file_fingerprint(mask) if mask is not None else None,
            "voxel_size": float(self.voxel_size), "method": method,
            "similarity_threshold": float(self.similarity_threshold), "zscore_mode": self.zscore_mode,
            "etiv": bool(self.etiv), "mask_ml_range": [float(v) for v in self.mask_ml_range],
            "reg_voxel_mm": float(self.reg_voxel_mm), "etiv_voxel_mm": float(self.etiv_voxel_mm),
            "deepbet_size": int(self.deepbet_size), "reference": reference.fingerprint(),
            "nonlinear": bool(self.nonlinear),
            # only when not the default, so that markers written before the setting existed stay valid
            **({"registration": self.registration} if self.registration != "rigid+affine" else {}),
        }


@dataclass
class _Subject:
    """One participant's job: its inputs, output paths, the resolved method and the template."""

    pid: str
    image: Any
    mask: str | None
    method: str
    reference: Reference
    sdir: Path
    paths: dict[str, Path]
    marker: Path
    syn: Path

    @property
    def name(self) -> str:
        return f"{self.pid} ({self.image})"


class _Clock:
    """Seconds spent in each step, for the QC row (``t_<step>_s``)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.t = time.perf_counter()

    def tick(self, key: str) -> None:
        now = time.perf_counter()
        self.times[key] = round(now - self.t, 3)
        self.t = now


def _subject_job(row: Mapping[str, Any], out_dir: str | os.PathLike, config: PreprocessConfig,
                 reference: Reference | None) -> _Subject:
    pid = _pid(row)
    sdir = subject_dir(out_dir, pid)
    mask = row.get("mask") if _present(row.get("mask")) else None
    method = config.method if config.method != "auto" else ("mask" if mask is not None else "deepbet")
    ref = reference if reference is not None else Reference.load(config.voxel_size)
    return _Subject(pid=pid, image=row.get("image"), mask=mask, method=method, reference=ref, sdir=sdir,
                    paths=_output_paths(sdir, pid), marker=_marker_path(sdir, pid),
                    syn=nonlinear_prefix(out_dir, pid))  # warps are keyed by the image's content


def _check_mask_volume(job: _Subject, config: PreprocessConfig, mask_ml: float) -> None:
    lo, hi = config.mask_ml_range
    if not lo <= mask_ml <= hi:
        raise PreprocessError(f"{job.pid}: brain mask volume {mask_ml:.0f} ml outside the plausible range "
                              f"[{lo:.0f}, {hi:.0f}] ml (failed extraction, or wrong voxel sizes in the header)")


def _rigid_step(job: _Subject, config: PreprocessConfig, brain: nib.Nifti1Image, mask: nib.Nifti1Image,
                qc: dict[str, Any], written: dict[str, Path]) -> RigidResult:
    """Rigid placement onto the target grid; records the pose and the similarity.

    :func:`rigid_register`, or the rigid part of :func:`affine_register` (which also keeps the affine).
    """
    ref = job.reference
    if config.registration == "affine":
        reg = affine_register(brain, ref.registration_template, mask=mask, template_mask=ref.registration_mask,
                              transform_path=job.paths["rigid_transform"], affine_path=job.paths["affine_transform"],
                              reg_voxel_mm=config.reg_voxel_mm, target=(ref.shape, ref.affine))
        written["affine_transform"] = job.paths["affine_transform"]
    else:
        reg = rigid_register(brain, ref.registration_template, mask=mask, template_mask=ref.registration_mask,
                             transform_path=job.paths["rigid_transform"], reg_voxel_mm=config.reg_voxel_mm,
                             target=(ref.shape, ref.affine))
    written["rigid_transform"] = job.paths["rigid_transform"]
    qc["similarity"] = reg.similarity
    # the subject's pose: rotation angle, and displacement of the template brain's centre
    qc["rotation_deg"], qc["translation_mm"] = rigid_error(reg.matrix, np.eye(4), _centroid(ref.mask))
    return reg


def _check_registration(job: _Subject, config: PreprocessConfig, reg: RigidResult) -> None:
    if not np.isfinite(reg.similarity) or reg.similarity < config.similarity_threshold:
        raise PreprocessError(f"{job.pid}: registration diverged (similarity {reg.similarity:.3f} < threshold "
                              f"{config.similarity_threshold})")
    assert reg.mask is not None
    if not np.asarray(reg.mask.dataobj).any():
        raise PreprocessError(f"{job.pid}: the registered brain mask is empty")


def _etiv_step(job: _Subject, config: PreprocessConfig, brain: nib.Nifti1Image, reg: RigidResult,
               qc: dict[str, Any], written: dict[str, Path]) -> None:
    """The eTIV of the affine subject -> template: the registration's own, or one started from the rigid one."""
    ref = job.reference
    if "affine_matrix" in reg.info:  # registration="affine": already estimated
        qc["etiv_ml"] = etiv_from_matrix(reg.info["affine_matrix"], ref.tiv_ml)
        qc["affine_det"] = qc["etiv_ml"] / ref.tiv_ml
        return
    qc["etiv_ml"] = etiv_affine(brain, ref.registration_template, ref.tiv_ml,
                                transform_path=job.paths["affine_transform"],
                                initial_transform=job.paths["rigid_transform"], reg_voxel_mm=config.etiv_voxel_mm,
                                template_mask=ref.registration_mask)
    qc["affine_det"] = qc["etiv_ml"] / ref.tiv_ml
    written["affine_transform"] = job.paths["affine_transform"]


def _write_step(job: _Subject, z: nib.Nifti1Image, reg: RigidResult, mask: nib.Nifti1Image,
                written: dict[str, Path]) -> None:
    assert reg.mask is not None
    for key, img in (("image_pp", z), ("mask_pp", reg.mask), ("mask_native", mask)):
        _save_nifti(img, job.paths[key])
        written[key] = job.paths[key]


def _run_steps(job: _Subject, config: PreprocessConfig, qc: dict[str, Any], clock: _Clock,
               written: dict[str, Path]) -> None:
    """Load -> skull strip -> rigid -> z-score -> eTIV -> write (-> non-linear); raises on failure."""
    if not _present(job.image):
        raise PreprocessError(f"{job.pid}: no image path in the participants table")
    img = load_t1(job.image, name=job.name)
    clock.tick("t_load_s")
    brain, mask = skull_strip(img, method=job.method, mask=job.mask, reference=job.reference,
                              network_size=config.deepbet_size, name=job.name)
    qc["mask_ml"] = mask_volume_ml(mask)
    clock.tick("t_strip_s")
    _check_mask_volume(job, config, qc["mask_ml"])
    reg = _rigid_step(job, config, brain, mask, qc, written)
    clock.tick("t_rigid_s")
    _check_registration(job, config, reg)
    z = zscore(reg.image, reg.mask, mode=config.zscore_mode)
    clock.tick("t_zscore_s")
    if config.etiv:
        _etiv_step(job, config, brain, reg, qc, written)
    clock.tick("t_etiv_s")
    _write_step(job, z, reg, mask, written)
    clock.tick("t_write_s")
    if config.nonlinear:
        files = nonlinear_transform(z, job.reference.template, job.syn)
        written.update({f"nonlinear_{i}": f for i, f in enumerate(files)})
        clock.tick("t_nonlinear_s")


def _failure_reason(pid: str, exc: Exception) -> str:
    if isinstance(exc, BrainsexError):
        return str(exc) if pid in str(exc) else f"{pid}: {exc}"
    return f"{pid}: {type(exc).__name__}: {exc}"


def _record(job: _Subject, params: dict[str, Any], qc: dict[str, Any], written: dict[str, Path]) -> dict[str, Any]:
    """Remove a failed subject's partial outputs, write the marker (last), return the QC row."""
    if qc["status"] != "ok":
        for p in written.values():  # nothing half-done is left for a later stage to read
            with contextlib.suppress(OSError):
                p.unlink()
        written = {}
    outputs = {k: {"file": str(p.relative_to(job.sdir)), "size": p.stat().st_size, "sha256": sha256_file(p)}
               for k, p in written.items()}
    for k in job.paths:
        qc[k] = str(written[k]) if k in written else None
    stored = {k: _clean(v) for k, v in qc.items() if k not in job.paths}
    write_json_atomic(job.marker, {"version": PIPELINE_VERSION, "params": params, "qc": stored, "outputs": outputs})
    return {k: _clean(v) for k, v in qc.items()}


def _preprocess_one(row: Mapping[str, Any], out_dir: str | os.PathLike, config: PreprocessConfig,
                    reference: Reference | None, resume: bool, retry_failed: bool) -> dict[str, Any]:
    """:func:`preprocess_subject` with its settings in ``config``."""
    t_start = time.perf_counter()
    job = _subject_job(row, out_dir, config, reference)
    params = config.marker_params(job.method, job.image, job.mask, job.reference)
    if resume:
        done = _read_marker(job.marker, params)
        if done is not None and (done.get("status") == "ok" or not retry_failed):
            return done
    _remove_strays(job.sdir)
    job.sdir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        job.marker.unlink()
    qc: dict[str, Any] = {c: None for c in QC_COLUMNS}
    qc.update({"participant_id": job.pid, "method": job.method, "status": "failed", "reason": ""})
    clock = _Clock()
    written: dict[str, Path] = {}
    try:
        _run_steps(job, config, qc, clock, written)
        qc["status"] = "ok"
    except (BrainsexError, MemoryError, RuntimeError, OSError, ValueError, AssertionError) as exc:  # library failures
        qc["reason"] = _failure_reason(job.pid, exc)
    qc.update(clock.times)
    qc["t_total_s"] = round(time.perf_counter() - t_start, 3)
    return _record(job, params, qc, written)


def preprocess_subject(
    row: Mapping[str, Any] | pd.Series,
    out_dir: str | os.PathLike,
    voxel_size: float = 1.0,
    reference: Reference | None = None,
    method: Method = "auto",
    similarity_threshold: float = 0.1,
    zscore_mode: Literal["brain", "volume"] = "brain",
    etiv: bool = True,
    mask_ml_range: tuple[float, float] = (500.0, 3000.0),
    reg_voxel_mm: float = 4.0,
    etiv_voxel_mm: float = 4.0,
    deepbet_size: int = 192,
    resume: bool = True,
    retry_failed: bool = False,
    nonlinear: bool = False,
    registration: Literal["rigid+affine", "affine"] = "rigid+affine",
) -> dict[str, Any]:
    """Preprocess one participant and write its outputs into ``out_dir/sub-<id>/`` (atomically).

    Steps (paper section 2.2): :func:`load_t1` (reorients to RAS), :func:`skull_strip`, a rigid
    placement onto :func:`brainsex.templates.target_grid` (``voxel_size``) -- the rigid part of
    :func:`affine_register`, or :func:`rigid_register` (``registration``) --, :func:`zscore` inside the
    registered mask, and the TIV estimates :func:`mask_volume_ml` and eTIV (the affine's determinant,
    :func:`etiv_from_matrix`, or :func:`etiv_affine`).

    Every file is written under a temporary name and renamed; a JSON marker
    (``sub-<id>_preprocess.json``) with the QC row, the parameters and each output's size and SHA-256 is
    written last. A subject counts as done only when its marker matches the parameters and every
    output verifies; otherwise it is recomputed (stray temporary files of a killed run are removed).
    A failure (bad input, empty mask, diverged registration) is recorded, not raised.

    Parameters
    ----------
    row : mapping
        A row of ``cohort/participants.tsv`` (``participant_id``, ``image``, optional ``mask``).
    out_dir : path
        The ``preprocess`` folder of the run directory.
    voxel_size : float, default=1.0
        Target grid (see :class:`PreprocessConfig`, which describes every setting below).
    reference : Reference, optional
        Template; default :meth:`Reference.load` (``voxel_size``).
    method : {"auto", "deepbet", "mask", "template"}, default="auto"
        Brain extraction; "auto" uses the row's ``mask`` when present, deepbet otherwise.
    similarity_threshold : float, default=0.1
        A registration whose :func:`similarity` is below this is recorded as failed.
    zscore_mode : {"brain", "volume"}, default="brain"
        See :func:`zscore`.
    etiv : bool, default=True
        Compute :func:`etiv_affine` (otherwise ``etiv_ml`` is NaN).
    mask_ml_range : (float, float), default=(500.0, 3000.0)
        Plausible native brain-mask volumes in ml.
    reg_voxel_mm : float, default=4.0
        Voxel size the rigid transform is estimated at.
    etiv_voxel_mm : float, default=4.0
        Voxel size the affine (eTIV) transform is estimated at.
    deepbet_size : int, default=192
        ``network_size`` of :func:`skull_strip`.
    resume : bool, default=True
        Reuse a verified earlier result.
    retry_failed : bool, default=False
        With ``resume``, recompute subjects recorded as failed.
    nonlinear : bool, default=False
        Also compute the non-linear transform preprocessed image -> template now (cached at
        :func:`nonlinear_prefix`; otherwise a later stage computes it on request).
    registration : {"rigid+affine", "affine"}, default="rigid+affine"
        A rigid registration and a second (affine) one for eTIV, or one affine registration for both.

    Returns
    -------
    dict
        The QC row (:data:`QC_COLUMNS`).
    """
    config = PreprocessConfig(voxel_size=voxel_size, method=method, similarity_threshold=similarity_threshold,
                              zscore_mode=zscore_mode, etiv=etiv, mask_ml_range=mask_ml_range,
                              reg_voxel_mm=reg_voxel_mm, etiv_voxel_mm=etiv_voxel_mm, deepbet_size=deepbet_size,
                              nonlinear=nonlinear, registration=registration)
    return _preprocess_one(row, out_dir, config, reference, resume, retry_failed)


def _subject_task(row: dict[str, Any], out_dir: str, config: PreprocessConfig, reference: Reference,
                  resume: bool, retry_failed: bool, threads: int, seed: int) -> dict[str, Any]:
    set_threads(threads, seed)
    try:
        return _preprocess_one(row, out_dir, config, _worker_reference(reference), resume, retry_failed)
    except Exception as exc:  # never let one subject stop the batch
        pid = str(row.get("participant_id"))
        return {**{c: None for c in QC_COLUMNS}, "participant_id": pid, "status": "failed",
                "reason": f"{pid}: unexpected {type(exc).__name__}: {exc}"}


def preprocess_cohort(
    participants: pd.DataFrame | str | os.PathLike,
    out_dir: str | os.PathLike,
    voxel_size: float = 1.0,
    n_workers: int = 2,
    resume: bool = True,
    progress: bool = True,
    similarity_threshold: float = 0.1,
    reference: Reference | None = None,
    method: Method = "auto",
    zscore_mode: Literal["brain", "volume"] = "brain",
    etiv: bool = True,
    threads_per_worker: int = 1,
    seed: int = 1,
    **kwargs: Any,
) -> pd.DataFrame:
    """Preprocess every participant, in parallel, resumably; write ``qc.tsv`` and ``preprocessed.tsv``.

    Parameters
    ----------
    participants : DataFrame or path
        ``cohort/participants.tsv`` (columns ``participant_id``, ``image``, optional ``mask``, ...).
    out_dir : path
        The run directory's ``preprocess`` folder.
    voxel_size : float, default=1.0
        Target grid voxel size (profiles: paper 1, demo 4, smoke 8).
    n_workers : int, default=2
        Parallel worker processes (joblib/loky); 1 runs in this process.
    resume : bool, default=True
        Keep subjects whose outputs verify (see :func:`preprocess_subject`).
    progress : bool, default=True
        tqdm progress bar.
    similarity_threshold : float, default=0.1
        Registrations below this are recorded as failed (see :func:`preprocess_subject`).
    reference : Reference, optional
        Default :meth:`Reference.load` (``voxel_size``).
    method, zscore_mode, etiv
        See :func:`preprocess_subject`.
    threads_per_worker : int, default=1
        ITK/torch threads in each worker (:func:`set_threads`). Outputs repeat bit for bit only with 1.
    seed : int, default=1
        ANTs random seed.
    **kwargs
        More settings of :class:`PreprocessConfig` (``reg_voxel_mm``, ``deepbet_size``, ``nonlinear``,
        ``registration``, ...) and ``retry_failed`` (:func:`preprocess_subject`); another name raises
        :class:`~brainsex.BrainsexError` before any subject runs.

    Returns
    -------
    pandas.DataFrame
        ``preprocessed.tsv``: the participants columns plus :data:`PREPROCESSED_COLUMNS`, one row per
        participant in the input order (failed ones with ``status="failed"`` and their ``reason``).
    """
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    table = read_table(participants) if not isinstance(participants, pd.DataFrame) else participants.copy()
    for col in ("participant_id", "image"):
        if col not in table.columns:
            raise BrainsexError(f"participants table lacks the column '{col}'")
    if table["participant_id"].duplicated().any():
        dup = table.loc[table["participant_id"].duplicated(), "participant_id"].tolist()[:5]
        raise BrainsexError(f"participants table has duplicate participant_id values: {dup}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ref = reference if reference is not None else Reference.load(voxel_size)
    ref.fingerprint()  # computed once here, travels with the pickled reference to the workers
    retry_failed = bool(kwargs.pop("retry_failed", False))
    config = PreprocessConfig.from_kwargs(voxel_size=voxel_size, method=method,
                                          similarity_threshold=similarity_threshold, zscore_mode=zscore_mode,
                                          etiv=etiv, **kwargs)
    task = (str(out), config, ref, resume, retry_failed, threads_per_worker, seed)
    rows = table.to_dict("records")
    results: list[dict[str, Any]] = []
    bar = tqdm(total=len(rows), desc=f"preprocess ({voxel_size:g} mm)", unit="subject", disable=not progress)
    if n_workers <= 1 or len(rows) <= 1:
        set_threads(threads_per_worker, seed)
        for row in rows:
            results.append(_subject_task(row, *task))
            bar.update()
    else:
        tasks = (delayed(_subject_task)(row, *task) for row in rows)
        for res in Parallel(n_jobs=n_workers, backend="loky", return_as="generator_unordered")(tasks):
            results.append(res)
            bar.update()
    bar.close()
    qc = pd.DataFrame(results)
    for c in QC_COLUMNS:
        if c not in qc.columns:
            qc[c] = None
    order = {_pid(r): i for i, r in enumerate(rows)}
    qc = qc[QC_COLUMNS].assign(_o=qc["participant_id"].map(order)).sort_values("_o").drop(columns="_o")
    qc = qc.reset_index(drop=True)
    write_table(qc, PreprocessDir(out).qc)
    pp = table.drop(columns=[c for c in PREPROCESSED_COLUMNS if c in table.columns])
    key = pp["participant_id"].map(lambda p: _pid({"participant_id": p}))
    merged = qc.set_index("participant_id")[PREPROCESSED_COLUMNS]
    pp = pd.concat([pp.reset_index(drop=True), merged.loc[key.to_numpy()].reset_index(drop=True)], axis=1)
    write_table(pp, PreprocessDir(out).table)
    n_failed = int((pp["status"] != "ok").sum())
    if n_failed:
        logger.warning("preprocessing: %d of %d participants failed (see %s)", n_failed, len(pp), PreprocessDir(out).qc)
    return pp


# ------------------------------------------------------------------------------------------ QC views
def qc_mosaic_slices(
    table: pd.DataFrame, n: int = 32, seed: int = 0, image_col: str = "image_pp", flag_quantile: float = 0.05,
    similarity_threshold: float | None = None,
) -> tuple[list[np.ndarray], list[str], list[bool]]:
    """Mid-axial slices of up to ``n`` preprocessed subjects for a QC mosaic, lowest similarity first.

    The subjects with the lowest similarity to the template are always included (they are the ones to
    look at); the rest of the ``n`` are a seeded random sample. A subject is *flagged* when its
    similarity is below ``similarity_threshold`` or in the lowest ``flag_quantile`` of the cohort.

    Parameters
    ----------
    table : pandas.DataFrame
        ``preprocessed.tsv`` rows: ``participant_id``, ``image_col``, ``similarity``.
    n : int, default=32
        Subjects shown at most; the ``max(1, n // 4)`` lowest-similarity ones are always among them.
    seed : int, default=0
        Seed of the random sample.
    image_col : str, default="image_pp"
        Column of the images.
    flag_quantile : float, default=0.05
        Subjects at or below this quantile of similarity are flagged.
    similarity_threshold : float, optional
        Subjects below this are flagged too.

    Returns
    -------
    slices, names, flagged
        2D arrays (x by y), participant IDs and flags, in display order.
    """
    if len(table) == 0:
        raise BrainsexError("qc_mosaic_slices: no preprocessed subjects")
    t = table.reset_index(drop=True)
    sim = pd.to_numeric(t.get("similarity", pd.Series(np.nan, index=t.index)), errors="coerce")
    cut = float(sim.quantile(flag_quantile)) if sim.notna().any() else -np.inf
    flag = (sim <= cut) | (sim < similarity_threshold if similarity_threshold is not None else False)
    worst = list(sim.sort_values().index[: max(1, n // 4)])
    rest = [i for i in t.index if i not in worst]
    rng = np.random.default_rng(seed)
    pick = worst + list(rng.choice(rest, size=min(len(rest), n - len(worst)), replace=False)) if rest else worst
    slices, names, flagged = [], [], []
    for i in pick:
        img = nib.load(str(t.loc[i, image_col]))
        data = np.asanyarray(img.dataobj)
        slices.append(np.asarray(data[:, :, data.shape[2] // 2], dtype=np.float32))
        names.append(str(t.loc[i, "participant_id"]))
        flagged.append(bool(flag.loc[i]))
    return slices, names, flagged


def registration_errors(table: pd.DataFrame, cohort_dir: str | os.PathLike,
                        qc: pd.DataFrame | None = None) -> pd.DataFrame | None:
    """Rotation and translation error of each rigid registration against the phantom's true pose.

    Reads ``<cohort_dir>/*/ground_truth/poses.tsv`` (written by :func:`brainsex.synthetic.make_cohort`)
    and compares each subject's ``rigid_transform`` (from ``preprocess/qc.tsv``, joined on
    ``participant_id``; pass ``qc`` when ``table`` lacks that column) with
    :func:`brainsex.synthetic.pose_matrix` using :func:`rigid_error`.

    Parameters
    ----------
    table : pandas.DataFrame
        ``preprocessed.tsv`` (or any table with ``participant_id``, and ``rigid_transform`` unless ``qc``
        is given).
    cohort_dir : path
        The run directory's ``cohort`` folder.
    qc : pandas.DataFrame, optional
        ``preprocess/qc.tsv``, for the transform paths.

    Returns
    -------
    pandas.DataFrame or None
        Index ``participant_id``; ``rotation_error_deg``, ``translation_error_mm``. None when the cohort
        has no ground truth (real data) or no subject could be compared.
    """
    from brainsex.synthetic import pose_matrix

    root = Path(cohort_dir)
    files = sorted(p for p in (PhantomDir(d).poses for d in (root.iterdir() if root.is_dir() else ()) if d.is_dir())
                   if p.is_file())
    if not files:
        return None
    poses = pd.concat([pd.read_csv(f, sep="\t") for f in files]).drop_duplicates("participant_id")
    poses = poses.set_index("participant_id")
    t = table
    if "rigid_transform" not in t.columns:
        if qc is None:
            raise BrainsexError("registration_errors: pass the QC table (qc.tsv) for the transform paths")
        t = t.merge(qc[["participant_id", "rigid_transform"]], on="participant_id", how="left")
    rows = []
    for pid, tx in zip(t["participant_id"], t["rigid_transform"], strict=True):
        if pid not in poses.index or not isinstance(tx, str) or not Path(tx).is_file():
            continue
        rot, trans = rigid_error(transform_matrix(tx), pose_matrix(poses.loc[pid]))
        rows.append({"participant_id": pid, "rotation_error_deg": rot, "translation_error_mm": trans})
    return pd.DataFrame(rows).set_index("participant_id") if rows else None


def strip_agreement(table: pd.DataFrame, n: int = 8, seed: int = 0, method: Method = "deepbet",
                    image_col: str = "image", mask_col: str = "mask") -> pd.DataFrame:
    """Run a brain extractor on a sample of subjects that come with a reference mask; Dice against it.

    When a cohort provides masks (CC-359; the phantom's true masks), preprocessing uses them and the
    extractor never runs. This checks the extractor anyway, on ``n`` randomly chosen subjects.

    Parameters
    ----------
    table : pandas.DataFrame
        Participants with ``participant_id``, ``image_col`` and ``mask_col``.
    n : int, default=8
        Subjects checked at most.
    seed : int, default=0
        Seed of the sample.
    method : {"deepbet", "template"}, default="deepbet"
        Extractor (:func:`skull_strip`).
    image_col : str, default="image"
        Column of the raw images.
    mask_col : str, default="mask"
        Column of the reference masks; rows with an empty one are skipped.

    Returns
    -------
    pandas.DataFrame
        ``participant_id``, ``dice``, ``mask_ml`` (extracted), ``reference_ml``, ``seconds``.
    """
    have = table[table[mask_col].astype(str).str.len() > 0] if mask_col in table.columns else table.iloc[0:0]
    if len(have) == 0:
        raise BrainsexError("strip_agreement: no subject has a reference mask to compare with")
    sample = have.sample(n=min(n, len(have)), random_state=seed)
    rows = []
    for r in sample.itertuples():
        img = load_t1(getattr(r, image_col))
        ref = nib.load(str(getattr(r, mask_col)))
        t0 = time.perf_counter()
        _, mask = skull_strip(img, method=method)
        dt = time.perf_counter() - t0
        rows.append({"participant_id": r.participant_id, "dice": dice(mask, ref), "mask_ml": mask_volume_ml(mask),
                     "reference_ml": mask_volume_ml(ref), "seconds": dt})
    return pd.DataFrame(rows)
