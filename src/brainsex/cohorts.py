"""Cohort loaders: every cohort of ``data_manifest.yaml`` becomes one tidy participants table.

The paper pools four cohorts (CC-359, OASIS-3, ADNI, Cam-CAN; section 2.1, Table 1), keeps subjects
with sex and age, and uses each subject's earliest scan. This module does the same for whatever the
manifest declares, through one adapter per ``kind``:

``synthetic``
    The phantom (:func:`brainsex.synthetic.make_cohort`), generated into the run directory.
``ixi``
    The open IXI dataset (CC BY-SA 3.0): ``IXI.xls`` demographics and ``IXI-T1.tar`` images
    (:func:`fetch_ixi` downloads and checks them with pooch). Scanner from the file name: ``Guys``
    Philips 1.5 T, ``HH`` Philips 3 T, ``IOP`` GE 1.5 T.
``bids``
    A BIDS dataset (``participants.tsv``, ``sub-<id>[/ses-<s>]/anat/...``); earliest session kept.
``table``
    Any participants table (TSV, CSV, XLS, XLSX) and an image path pattern.

Every adapter returns ``(table, exclusions)``. ``table`` has the run-directory columns
(:data:`COLUMNS`): participant_id, sex (``F``/``M``), age, dataset, vendor (an open category:
``GE``, ``Philips``, ``Siemens``, ``Canon``, ... or ``unknown``), field (tesla, NaN when unknown), tiv_ml (NaN when unknown), image (absolute path), mask (path or
empty), cohort (manifest name), shareable. Subjects with bad input (missing or corrupt image, image
not 3-D, missing or unknown sex, missing age, duplicate ID with
conflicting rows, a path pattern matching nothing, an image without demographics) are not errors:
they are listed in ``exclusions`` (participant_id, cohort, reason) and the run goes on. Images are
checked cheaply (header and file size, no decoding). Vendor and field strength never exclude anyone:
when the table lacks them they come from the BIDS sidecar JSON (:func:`read_sidecar`), else
``unknown``. A manifest that does not fit its files (missing
participants table, a mapped column that does not exist) is an error for the whole cohort.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from brainsex import BrainsexError
from brainsex.io import write_table
from brainsex.manifest import CohortEntry, Manifest, expand_env, load_manifest
from brainsex.run import RunDir

__all__ = [
    "COLUMNS",
    "EXCLUSION_COLUMNS",
    "IXI_SITES",
    "IXI_DOWNLOADS",
    "load_cohort",
    "load_cohorts",
    "table1_public",
    "fetch_ixi",
    "check_image",
    "normalise_vendor",
    "normalise_field",
    "read_sidecar",
    "KNOWN_VENDORS",
    "UNKNOWN",
    "no_subjects_message",
    "read_participants",
    "table1",
    "public_exclusions",
]

#: Columns of ``cohort/participants.tsv`` (the run-directory contract).
COLUMNS = ["participant_id", "sex", "age", "dataset", "vendor", "field", "tiv_ml", "image", "mask", "cohort",
           "shareable"]
#: Columns of ``cohort/exclusions.tsv``.
EXCLUSION_COLUMNS = ["participant_id", "cohort", "reason"]

#: IXI acquisition site (second field of the file name) -> (vendor, field strength in T).
IXI_SITES: dict[str, tuple[str, float]] = {"Guys": ("Philips", 1.5), "HH": ("Philips", 3.0), "IOP": ("GE", 1.5)}

#: IXI files, their URLs and checksums. The MD5 sums are the ones TorchIO (``torchio.datasets.IXI``)
#: and MONAI's tutorials check the same files against.
IXI_DOWNLOADS: dict[str, dict[str, str]] = {
    "images": {"url": "http://biomedic.doc.ic.ac.uk/brain-development/downloads/IXI/IXI-T1.tar",
               "known_hash": "md5:34901a0593b41dd19c1a1f746eac2d58", "fname": "IXI-T1.tar"},
    "demographics": {"url": "http://biomedic.doc.ic.ac.uk/brain-development/downloads/IXI/IXI.xls",
                     "known_hash": "md5:066002afe250e4375d132266fcfceac5", "fname": "IXI.xls"},
}

_SYNTHETIC_KEYS = {"spec", "region_effect", "tiv_effect", "contrast_effect", "sex_regions", "reference_source",
                   "provide_masks"}
_MISSING = {"", "nan", "none", "n/a", "na", "null", "-", "?"}


# ------------------------------------------------------------------------------------ small checks
def check_image(path: str | os.PathLike) -> str | None:
    """Why an image cannot be used (a short reason), or None when it looks fine.

    Reads the header only: the file exists and is not empty, nibabel can parse it, it is 3-D (a
    trailing singleton 4th dimension is accepted), its voxel sizes are positive, and the file is long
    enough for its data (for ``.nii.gz`` the gzip trailer's length field is compared, which catches
    truncated downloads without decompressing).

    Parameters
    ----------
    path : path
        A NIfTI (or other nibabel-readable) image.

    Returns
    -------
    str or None
        The reason the image is unusable, or None.
    """
    p = Path(path)
    if not p.is_file():
        return f"image not found: {p}"
    size = p.stat().st_size
    if size == 0:
        return f"image file is empty: {p.name}"
    try:
        img = nib.load(p)
        shape = tuple(int(s) for s in img.shape)
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    except Exception as exc:  # nibabel raises many kinds (ImageFileError, OSError, EOFError, zlib.error)
        return f"image cannot be read ({type(exc).__name__}: {str(exc)[:120]})"
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        return f"image is not 3-D (shape {tuple(img.shape)})"
    if min(shape) < 2:
        return f"image has a degenerate dimension (shape {shape})"
    if not all(math.isfinite(z) and z > 0 for z in zooms):
        return f"image has invalid voxel sizes {zooms}"
    if isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        offset = int(getattr(img.dataobj, "offset", 0) or img.header.get_data_offset())
        expected = offset + int(np.prod(img.shape)) * img.get_data_dtype().itemsize
        if p.name.endswith(".gz"):
            with open(p, "rb") as fh:
                fh.seek(-4, os.SEEK_END)
                isize = int.from_bytes(fh.read(4), "little")  # uncompressed length mod 2**32
            if isize != expected % 2**32:
                # rare legitimate cases (several gzip members, trailing bytes) pass the full check
                got = _gunzip_length(p)
                if got is None or got < expected:
                    return f"image file is truncated or corrupt ({got or 0} of {expected} bytes after decompression)"
        elif size < expected:
            return f"image file is truncated ({size} of {expected} bytes)"
    return None


def _gunzip_length(path: Path) -> int | None:
    """Length of a gzip file's decompressed content, or None when it is not a complete gzip stream."""
    n = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                n += len(chunk)
    except (OSError, EOFError, zlib.error):
        return None
    return n


#: Canonical spelling of scanner manufacturers (lower-case word -> name). Any other manufacturer is kept
#: as written (vendor is an open category: a Canon or Hitachi scanner is data, not an error).
KNOWN_VENDORS: dict[str, str] = {"ge": "GE", "gehc": "GE", "philips": "Philips", "siemens": "Siemens",
                                 "canon": "Canon", "toshiba": "Toshiba", "hitachi": "Hitachi", "fujifilm": "Fujifilm",
                                 "bruker": "Bruker", "united": "United Imaging", "uih": "United Imaging"}
#: The value recorded when a scan's vendor is not known (field strength: NaN).
UNKNOWN = "unknown"


def normalise_vendor(value: Any) -> str | None:
    """A manufacturer name in one spelling: 'GE MEDICAL SYSTEMS' -> GE, 'SIEMENS' -> Siemens, 'Canon' -> Canon.

    Vendor is an open category: a manufacturer outside :data:`KNOWN_VENDORS` is kept as written
    (whitespace collapsed). None only when the value is missing.

    Parameters
    ----------
    value : object
        The manufacturer as a cohort or a DICOM/BIDS sidecar spells it.

    Returns
    -------
    str or None
        The normalised name.
    """
    if _is_missing(value):
        return None
    text = " ".join(str(value).split())
    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    if "general" in words and "electric" in words:
        return "GE"
    for w in words:
        if w in KNOWN_VENDORS:
            return KNOWN_VENDORS[w]
    return text


def normalise_field(value: Any) -> float | None:
    """Field strength in tesla: '3T', '3.0', 2.89, '1.5 T', '15' (CC-359), 15000 (gauss) -> 1.5 or 3.0.

    Other strengths are kept (an open category): '7T' -> 7.0, 0.55 -> 0.55. None when missing or
    not a number.

    Parameters
    ----------
    value : object
        The field strength as a cohort or a sidecar writes it.

    Returns
    -------
    float or None
        Tesla.
    """
    if _is_missing(value):
        return None
    m = re.search(r"\d+(\.\d+)?", str(value).replace(",", "."))
    if not m:
        return None
    x = float(m.group(0))
    if x > 1000:  # gauss
        x /= 10000.0
    elif 12 <= x <= 35:  # '15' / '30' as in CC-359's file names (1.5 T / 3.0 T)
        x /= 10.0
    if 1.2 <= x <= 1.8:
        return 1.5
    if 2.5 <= x <= 3.5:
        return 3.0
    if 0 < x <= 12:
        return round(x, 2)
    return None


def read_sidecar(image: str | os.PathLike, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """``Manufacturer`` and ``MagneticFieldStrength`` from an image's BIDS sidecar JSON.

    Looks for ``<image>.json`` next to the image, then (BIDS inheritance) a ``*T1w.json`` at the top
    of ``root``. Missing or unreadable sidecars give an empty dict.

    Parameters
    ----------
    image : path
        The NIfTI image.
    root : path or None
        The dataset root, for a dataset-level sidecar.

    Returns
    -------
    dict
        ``{"vendor": ..., "field": ...}`` for the keys found.
    """
    import json

    p = Path(image)
    stem = p.name[: -len(".nii.gz")] if p.name.endswith(".nii.gz") else p.stem
    candidates = [p.with_name(stem + ".json")]
    if root is not None:
        candidates += sorted(Path(root).glob("*T1w.json"))
    out: dict[str, Any] = {}
    for c in candidates:
        if not c.is_file():
            continue
        try:
            meta = json.loads(c.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict):
            for key, bids_key in (("vendor", "Manufacturer"), ("field", "MagneticFieldStrength")):
                if key not in out and not _is_missing(meta.get(bids_key)):
                    out[key] = meta[bids_key]
    return out


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return str(value).strip().lower() in _MISSING


def _code(value: Any) -> str:
    """A table value as a lower-case code: 1.0 -> '1', ' F ' -> 'f'."""
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value).strip().lower()


def _natural_key(text: str) -> tuple[tuple[int, Any], ...]:
    """Sort key that orders 'ses-2' before 'ses-10' (numbers compare as numbers)."""
    return tuple((0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", str(text)) if t)


def read_participants(path: str | os.PathLike) -> pd.DataFrame:
    """Read a participants table: ``.tsv``, ``.csv``, ``.xls`` (xlrd) or ``.xlsx`` (openpyxl).

    Parameters
    ----------
    path : path
        The table; text tables are read as strings (empty cells missing).

    Returns
    -------
    pandas.DataFrame
        The table as it is (no column mapping).

    Raises
    ------
    BrainsexError
        When the file is missing, needs an uninstalled reader, or cannot be parsed.
    """
    p = Path(path)
    if not p.is_file():
        raise BrainsexError(f"{p}: participants table not found")
    suffix = p.suffix.lower()
    try:
        if suffix in (".xls", ".xlsx"):
            return pd.read_excel(p)
        sep = "," if suffix == ".csv" else "\t"
        return pd.read_csv(p, sep=sep, dtype=str, keep_default_na=False, na_values=[""])
    except ImportError as exc:
        raise BrainsexError(f"{p}: reading {suffix} files needs an extra package ({exc})") from None
    except Exception as exc:  # xlrd/openpyxl/pandas parser errors
        raise BrainsexError(f"{p}: cannot be read as a participants table ({type(exc).__name__}: {exc})") from None


# ------------------------------------------------------------------------------------ shared logic
def _root(entry: CohortEntry, manifest: Manifest | None, base: str | os.PathLike | None) -> Path:
    if manifest is not None:
        return manifest.resolve_root(entry, base=base)
    root = Path(expand_env(entry.root, key=f"cohorts[{entry.name}].root")).expanduser()
    return root if root.is_absolute() else Path(base or Path.cwd()) / root


def _need_columns(df: pd.DataFrame, entry: CohortEntry, path: Path) -> None:
    cols = entry.columns
    wanted = {k: getattr(cols, k) for k in ("id", "sex", "age", "dataset", "vendor", "field", "tiv_ml", "session")}
    missing = {k: v for k, v in wanted.items() if v is not None and v not in df.columns}
    if missing:
        key = ", ".join(f"columns.{k}: '{v}'" for k, v in missing.items())
        raise BrainsexError(
            f"{path}: cohort '{entry.name}' maps {key} but the table has no such column; "
            f"its columns are {list(df.columns)}"
        )


def _value(row: Mapping[str, Any], column: str | None, default: Any = None) -> Any:
    if column is None:
        return default
    v = row.get(column)
    return default if _is_missing(v) else v


def _format(pattern: str, **values: Any) -> str:
    try:
        return pattern.format(**values)
    except (KeyError, ValueError, IndexError) as exc:
        raise BrainsexError(f"image/mask pattern '{pattern}' cannot be filled with {values} ({exc})") from None


def _find(root: Path, pattern: str) -> list[Path]:
    return sorted(root.glob(pattern), key=lambda p: _natural_key(str(p)))


def _validate(rows: list[dict[str, Any]], entry: CohortEntry, exclusions: list[dict[str, str]]) -> pd.DataFrame:
    """Turn raw rows (sex_raw, age_raw, vendor_raw, field_raw, image, ...) into contract rows."""
    coding = entry.sex_coding
    out = []
    for r in rows:
        pid = str(r["participant_id"])

        def exclude(reason: str, pid: str = pid) -> None:
            exclusions.append({"participant_id": pid, "cohort": entry.name, "reason": reason})

        if r.get("reason"):
            exclude(r["reason"])
            continue
        if _is_missing(r.get("sex_raw")):
            exclude("missing sex")
            continue
        code = _code(r["sex_raw"])
        if code in coding.female:
            sex = "F"
        elif code in coding.male:
            sex = "M"
        elif code == "0":
            exclude("missing sex (coded 0)")
            continue
        else:
            exclude(f"unknown sex code '{r['sex_raw']}' (female: {coding.female}, male: {coding.male})")
            continue
        try:
            age = float(r.get("age_raw")) if not _is_missing(r.get("age_raw")) else math.nan
        except (TypeError, ValueError):
            exclude(f"age '{r.get('age_raw')}' is not a number")
            continue
        if not math.isfinite(age) or age <= 0:
            exclude("missing age (sex and age are required, as in the paper)")
            continue
        problem = check_image(r["image"])
        if problem:
            exclude(problem)
            continue
        vendor_raw, field_raw = r.get("vendor_raw"), r.get("field_raw")
        if _is_missing(vendor_raw) or _is_missing(field_raw):  # a BIDS sidecar may know; else "unknown"
            side = read_sidecar(r["image"], r.get("root"))
            vendor_raw = side.get("vendor") if _is_missing(vendor_raw) else vendor_raw
            field_raw = side.get("field") if _is_missing(field_raw) else field_raw
        vendor = normalise_vendor(vendor_raw) or UNKNOWN
        field = normalise_field(field_raw)
        field = math.nan if field is None else field
        try:
            tiv = float(r.get("tiv_raw")) if not _is_missing(r.get("tiv_raw")) else math.nan
        except (TypeError, ValueError):
            tiv = math.nan
        out.append({"participant_id": pid, "sex": sex, "age": round(age, 2), "dataset": str(r["dataset"]),
                    "vendor": vendor, "field": field, "tiv_ml": tiv, "image": str(Path(r["image"]).resolve()),
                    "mask": str(Path(r["mask"]).resolve()) if r.get("mask") else "", "cohort": entry.name,
                    "shareable": bool(entry.shareable)})
    return pd.DataFrame(out, columns=COLUMNS)


def _dedupe(df: pd.DataFrame, id_col: str, compare: Sequence[str], entry: CohortEntry, path: Path,
            exclusions: list[dict[str, str]], pid_of: Any) -> pd.DataFrame:
    """Keep one row per ID: identical duplicates collapse, conflicting ones exclude the subject."""
    ids = df[id_col].map(lambda v: None if _is_missing(v) else _code(v))
    for i in np.flatnonzero(ids.isna().to_numpy()):
        exclusions.append({"participant_id": f"{path.name} row {i + 2}", "cohort": entry.name,
                           "reason": "missing participant ID"})
    df = df.loc[ids.notna()].copy()
    df["_key"] = ids[ids.notna()]
    keep = []
    cols = [c for c in compare if c in df.columns]
    for _key, grp in df.groupby("_key", sort=False):
        if len(grp) == 1:
            keep.append(grp.index[0])
            continue
        distinct = grp[cols].astype(str).drop_duplicates()
        if len(distinct) == 1:
            keep.append(grp.index[0])
        else:
            exclusions.append({"participant_id": pid_of(grp.iloc[0][id_col]), "cohort": entry.name,
                               "reason": f"duplicate participant ID with conflicting rows ({len(grp)} rows in {path.name})"})
    return df.loc[keep].drop(columns="_key")


def _mapped_cols(entry: CohortEntry) -> list[str]:
    c = entry.columns
    return [x for x in (c.sex, c.age, c.dataset, c.vendor, c.field, c.tiv_ml) if x]


# ----------------------------------------------------------------------------------------- adapters
def _load_synthetic(entry: CohortEntry, root: Path, n: int | None, voxel_size: float, seed: int, n_workers: int,
                    progress: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    from brainsex.synthetic import make_cohort

    opts = dict(entry.synthetic)
    unknown = set(opts) - _SYNTHETIC_KEYS
    if unknown:
        raise BrainsexError(f"cohorts[{entry.name}].synthetic: unknown option(s) {sorted(unknown)}; "
                            f"allowed: {sorted(_SYNTHETIC_KEYS)}")
    # provide_masks: hand the phantom's true brain masks to preprocessing, as CC-359 ships its own masks
    provide_masks = bool(opts.pop("provide_masks", False))
    regions = opts.pop("sex_regions", None)  # YAML: [[Pallidum, right], "Left Entorhinal"] or {"Right Pallidum": -1}
    if isinstance(regions, list):
        regions = [tuple(r) if isinstance(r, list) else r for r in regions]
    participants = make_cohort(root, n=n, voxel_size=voxel_size, seed=seed, n_workers=n_workers, progress=progress,
                               sex_regions=regions, **opts)
    rows = []
    for r in participants.to_dict("records"):
        pid = r["participant_id"]
        rows.append({"participant_id": pid, "sex_raw": r["sex"], "age_raw": r["age"], "dataset": r["dataset"],
                     "vendor_raw": r["vendor"], "field_raw": r["field"], "tiv_raw": r["tiv_ml"],
                     "image": Path(r["image"]), "mask": Path(r["mask"]) if provide_masks else ""})
    exclusions: list[dict[str, str]] = []
    return _validate(rows, entry, exclusions), pd.DataFrame(exclusions, columns=EXCLUSION_COLUMNS)


_IXI_NAME = re.compile(r"^IXI(\d+)-([A-Za-z]+)-(\d+)-T1\.nii(\.gz)?$")


def _load_ixi(entry: CohortEntry, root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    table_path = root / (entry.participants or "IXI.xls")
    if not table_path.is_file():
        raise BrainsexError(f"{table_path}: IXI demographics not found; download with "
                            f"brainsex.cohorts.fetch_ixi('{root}') or point cohorts[{entry.name}].root at your copy")
    df = read_participants(table_path)
    _need_columns(df, entry, table_path)
    id_col = entry.columns.id
    exclusions: list[dict[str, str]] = []

    def pid_of(v: Any) -> str:
        return f"IXI{int(float(v)):03d}"

    bad_id = ~df[id_col].map(lambda v: _is_missing(v) or re.fullmatch(r"\d+(\.0+)?", str(v).strip()) is not None)
    for v in df.loc[bad_id, id_col]:
        exclusions.append({"participant_id": str(v), "cohort": entry.name, "reason": f"IXI_ID '{v}' is not a number"})
    df = _dedupe(df.loc[~bad_id], id_col, _mapped_cols(entry), entry, table_path, exclusions, pid_of)
    demo = {int(float(v)): row for v, row in zip(df[id_col], df.to_dict("records"), strict=True)}
    excluded = {e["participant_id"] for e in exclusions}

    glob = re.sub(r"\{[^}]*\}", "*", entry.image_pattern or "IXI*-T1.nii.gz")
    images: dict[int, list[tuple[str, Path]]] = {}
    for p in sorted(root.rglob(glob), key=lambda q: _natural_key(str(q))):
        m = _IXI_NAME.match(p.name)
        if m:
            images.setdefault(int(m.group(1)), []).append((m.group(2), p))
    rows = []
    for ixi_id in sorted(set(images) | set(demo)):
        pid = pid_of(ixi_id)
        if pid in excluded:
            continue
        if ixi_id not in demo:
            exclusions.append({"participant_id": pid, "cohort": entry.name,
                               "reason": f"image without demographics (no row in {table_path.name})"})
            continue
        if ixi_id not in images:
            exclusions.append({"participant_id": pid, "cohort": entry.name,
                               "reason": f"no T1 image matches '{glob}' under {root}"})
            continue
        site, path = images[ixi_id][0]
        vendor, field = IXI_SITES.get(site, (None, None))
        row = demo[ixi_id]
        rows.append({"participant_id": pid, "sex_raw": row.get(entry.columns.sex),
                     "age_raw": _value(row, entry.columns.age), "dataset": entry.dataset or entry.name,
                     "vendor_raw": vendor, "field_raw": field, "tiv_raw": _value(row, entry.columns.tiv_ml),
                     "image": path, "mask": "", "reason": None})
    table = _validate(rows, entry, exclusions)
    return table, pd.DataFrame(exclusions, columns=EXCLUSION_COLUMNS)


def _load_tabular(entry: CohortEntry, root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``bids`` and ``table`` kinds: a participants table, then one image per row from the pattern."""
    bids = entry.kind == "bids"
    table_path = root / (entry.participants or "participants.tsv")
    df = read_participants(table_path)
    _need_columns(df, entry, table_path)
    cols = entry.columns
    exclusions: list[dict[str, str]] = []

    def bare(v: Any) -> str:
        s = str(v).strip()
        return s[4:] if bids and s.startswith("sub-") else s

    def pid_of(v: Any) -> str:
        return f"sub-{bare(v)}" if bids else str(v).strip()

    df_all = df
    if cols.session and cols.session in df.columns:  # one row per session: keep each subject's earliest
        df = df.assign(_order=df[cols.session].map(lambda s: _natural_key(str(s).removeprefix("ses-"))))
        df = df.sort_values("_order", kind="stable").drop(columns="_order")
        df = df.drop_duplicates(subset=[cols.id, cols.session])
        df = df.groupby(df[cols.id].map(lambda v: str(v).strip()), sort=False).head(1)
    df = _dedupe(df, cols.id, _mapped_cols(entry), entry, table_path, exclusions, pid_of)

    listed = {bare(v) for v in df_all[cols.id] if not _is_missing(v)}
    rows = []
    for row in df.to_dict("records"):
        raw_id = row[cols.id]
        pid = pid_of(raw_id)
        values: dict[str, Any] = {"id": bare(raw_id) if bids else _typed_id(raw_id)}
        if cols.session:
            values["session"] = str(_value(row, cols.session, "")).removeprefix("ses-")
        pattern = _format(entry.image_pattern or "", **values)
        found = _find(root, pattern)
        mask = ""
        if entry.mask_pattern:
            masks = _find(root, _format(entry.mask_pattern, **values))
            mask = str(masks[0]) if masks else ""
        rows.append({"participant_id": pid, "sex_raw": row.get(cols.sex), "age_raw": _value(row, cols.age),
                     "dataset": _value(row, cols.dataset, entry.dataset or entry.name),
                     "vendor_raw": _value(row, cols.vendor, entry.vendor),
                     "field_raw": _value(row, cols.field, entry.field), "tiv_raw": _value(row, cols.tiv_ml),
                     "image": found[0] if found else None, "mask": mask, "root": root,
                     "reason": None if found else f"no image matches '{pattern}' under {root}"})
    if bids:  # subjects on disk without a participants row
        for d in sorted(root.glob("sub-*"), key=lambda q: _natural_key(q.name)):
            if d.is_dir() and d.name[4:] not in listed:
                exclusions.append({"participant_id": d.name, "cohort": entry.name,
                                   "reason": f"image without demographics (no row in {table_path.name})"})
    table = _validate(rows, entry, exclusions)
    return table, pd.DataFrame(exclusions, columns=EXCLUSION_COLUMNS)


def _typed_id(v: Any) -> Any:
    """IDs that are whole numbers stay numbers so that patterns like '{id:03d}' work."""
    s = str(v).strip()
    return int(float(s)) if re.fullmatch(r"\d+(\.0+)?", s) else s


def _subsample(table: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """At most ``n`` subjects, strata (dataset x vendor x field x sex) kept by largest remainder."""
    from brainsex.synthetic import allocate_strata

    if n >= len(table):
        return table
    groups = table.groupby(["dataset", "vendor", "field", "sex"], sort=True)
    sizes = groups.size()
    quota = allocate_strata(sizes.to_numpy(), n)
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for key, q in zip(sizes.index, quota, strict=True):
        idx = table.index[groups.indices[key]]
        keep.extend(rng.choice(np.asarray(idx), size=int(q), replace=False).tolist())
    return table.loc[sorted(keep)].reset_index(drop=True)


# ------------------------------------------------------------------------------------------ public
def load_cohort(
    entry: CohortEntry,
    manifest: Manifest | None = None,
    run_dir: str | os.PathLike | None = None,
    n: int | None = None,
    voxel_size: float = 1.0,
    seed: int = 0,
    n_workers: int = 1,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Load one cohort of the manifest as a tidy table (see the module docstring).

    Parameters
    ----------
    entry : CohortEntry
        The manifest entry (``manifest.cohort(name)``).
    manifest : Manifest or None
        Used to resolve a relative ``root`` against the manifest's folder (real cohorts).
    run_dir : path or None
        Run directory; a synthetic cohort's relative ``root`` is inside it (``cohort/phantom``).
    n : int or None
        Number of subjects: the phantom's size; real cohorts are subsampled to at most ``n``, keeping
        dataset x vendor x field x sex strata. None keeps everything.
    voxel_size : float, default=1.0
        Voxel size (mm) at which the phantom is generated (real images are left as they are).
    seed : int, default=0
        Seed for the phantom and for subsampling.
    n_workers, progress
        Passed to :func:`brainsex.synthetic.make_cohort`.

    Returns
    -------
    table : pandas.DataFrame
        One row per usable subject, columns :data:`COLUMNS`.
    exclusions : pandas.DataFrame
        One row per excluded subject: participant_id, cohort, reason.
    """
    if entry.kind == "synthetic":
        root = _root(entry, None if run_dir is not None else manifest, run_dir)
        table, excl = _load_synthetic(entry, root, n, voxel_size, seed, n_workers, progress)
        return table, excl
    root = _root(entry, manifest, None)
    if entry.kind == "ixi" and entry.download and not (root / (entry.participants or "IXI.xls")).is_file():
        try:
            fetch_ixi(root, entry, progressbar=progress)
        except Exception as exc:  # network errors, hash mismatches (pooch raises ValueError), full disks
            raise BrainsexError(
                f"cohorts[{entry.name}]: downloading IXI into {root} failed ({type(exc).__name__}: {str(exc)[:300]}). "
                f"Put an extracted IXI-T1.tar and {entry.participants or 'IXI.xls'} there by hand, or set "
                "BRAINSEX_DATA to a folder holding IXI/") from exc
    if not root.is_dir():
        raise BrainsexError(f"cohorts[{entry.name}].root: folder {root} does not exist (from '{entry.root}')")
    if entry.kind == "ixi":
        table, excl = _load_ixi(entry, root)
    else:
        table, excl = _load_tabular(entry, root)
    if n is not None:
        table = _subsample(table, int(n), seed)
    return table, excl


def load_cohorts(
    manifest: Manifest | str | os.PathLike,
    names: Iterable[str] | None = None,
    run_dir: str | os.PathLike = ".",
    n: int | None = None,
    voxel_size: float = 1.0,
    seed: int = 0,
    n_workers: int = 1,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Load several cohorts and write ``<run_dir>/cohort/participants.tsv`` and ``exclusions.tsv``.

    Parameters
    ----------
    manifest : Manifest or path
        The manifest (or its file).
    names : iterable of str or None
        Cohorts to load (a profile's ``cohorts``); None loads every enabled cohort. Naming a cohort
        that is disabled in the manifest is an error (enable it once its root points at your copy).
    run_dir : path, default="."
        Run directory (the phantom is generated under it).
    n, voxel_size, seed, n_workers, progress
        See :func:`load_cohort` (``n`` applies to each cohort).

    Returns
    -------
    participants, exclusions : pandas.DataFrame
        As written. Participant IDs are unique: when two cohorts share an ID, those rows are prefixed
        with the cohort name (``IXI-sub-01``).
    """
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    if names is None:
        entries = [c for c in manifest.cohorts if c.enabled]
    else:
        names = [names] if isinstance(names, str) else list(names)
        entries = [manifest.cohort(nm) for nm in names]
        off = [e.name for e in entries if not e.enabled]
        if off:
            raise BrainsexError(f"{manifest.path}: cohort(s) {off} are disabled (enabled: false); set enabled: true "
                                "once their root points at your local copy")
    if not entries:
        raise BrainsexError(f"{manifest.path}: no cohort to load (none enabled, none named)")
    tables, excls = [], []
    for entry in entries:
        t, e = load_cohort(entry, manifest=manifest, run_dir=run_dir, n=n, voxel_size=voxel_size, seed=seed,
                           n_workers=n_workers, progress=progress)
        tables.append(t)
        excls.append(e)
    participants = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=COLUMNS)
    clash = participants["participant_id"].duplicated(keep=False)
    if clash.any():
        participants.loc[clash, "participant_id"] = (participants.loc[clash, "cohort"] + "-"
                                                     + participants.loc[clash, "participant_id"])
    exclusions = pd.concat(excls, ignore_index=True) if excls else pd.DataFrame(columns=EXCLUSION_COLUMNS)
    out = RunDir(run_dir).cohort
    write_table(participants[COLUMNS], out.participants)
    write_table(exclusions[EXCLUSION_COLUMNS], out.exclusions)
    if participants.empty:
        raise BrainsexError(no_subjects_message(exclusions, [e.name for e in entries]))
    return participants[COLUMNS], exclusions[EXCLUSION_COLUMNS]


def no_subjects_message(exclusions: pd.DataFrame, cohorts: Sequence[str] = (), top: int = 3) -> str:
    """One message for a cohort with no usable subject, naming the leading exclusion reasons.

    Parameters
    ----------
    exclusions : pandas.DataFrame
        The exclusions table (column ``reason``).
    cohorts : sequence of str
        Names of the cohorts that were loaded (for the message).
    top : int, default=3
        How many reasons to name.
    """
    names = ", ".join(cohorts) or "the cohort"
    if exclusions is None or exclusions.empty:
        return f"{names}: no subject found (no participants row matched an image)"
    # group reasons that differ only in a file name or value: keep the text before the first quote/colon
    key = exclusions["reason"].astype(str).map(lambda r: re.split(r"[:'(]", r, maxsplit=1)[0].strip() or r)
    counts = key.value_counts()
    lead = "; ".join(f"{reason} ({n})" for reason, n in counts.head(top).items())
    example = exclusions["reason"].astype(str).iloc[0]
    return (f"{names}: no usable subject ({len(exclusions)} excluded). Leading reasons: {lead}. "
            f"First one in full: {example}. See cohort/exclusions.tsv in the run directory.")


def fetch_ixi(root: str | os.PathLike, entry: CohortEntry | None = None, progressbar: bool = True) -> Path:
    """Download IXI's T1 images and demographics into ``root`` with pooch, checking their hashes.

    ``IXI.xls`` goes to ``root``; ``IXI-T1.tar`` (about 4.5 GB) is downloaded there and unpacked to
    ``root/IXI-T1/``. URLs and hashes come from the manifest entry's ``downloads`` when given, else
    from :data:`IXI_DOWNLOADS`; a URL may also be a local path or a ``file://`` URL (a mirror). Files
    already present with the right hash are not downloaded again, so an interrupted fetch resumes
    with the files it lacks. :func:`load_cohort` calls this for an ``ixi`` entry with
    ``download: true`` whose root lacks the demographics table; a root that holds them is read as
    it is (no download, no hash check: copies of ``IXI.xls`` in circulation differ from the
    published one).

    Parameters
    ----------
    root : path
        Folder to download into (the manifest entry's ``root``).
    entry : CohortEntry or None
        The manifest entry, for its ``downloads``.
    progressbar : bool, default=True
        Show pooch's progress bars (needs tqdm).

    Returns
    -------
    pathlib.Path
        ``root``.
    """
    import pooch

    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    given = entry.downloads if entry is not None else {}
    for key, default in IXI_DOWNLOADS.items():
        d = given.get(key)
        url = d.url if d else default["url"]
        known_hash = (d.known_hash if d and d.known_hash else default["known_hash"])
        fname = (d.fname if d and d.fname else default["fname"])
        processor = pooch.Untar(extract_dir="IXI-T1") if fname.endswith(".tar") else None
        downloader = None
        if url.startswith("file://") or "://" not in url:  # a mirror on disk: copied, then hash-checked by pooch
            downloader = _copy_local
            url = Path(url.removeprefix("file://")).expanduser().resolve().as_uri()
        pooch.retrieve(url, known_hash=known_hash, fname=fname, path=root, processor=processor,
                       progressbar=progressbar, downloader=downloader)
    return root


def _copy_local(url: str, output_file: Any, pooch_obj: Any) -> None:
    """A pooch downloader for ``file://`` URLs (a local mirror of the files)."""
    import shutil
    from urllib.parse import unquote, urlparse

    src = Path(unquote(urlparse(url).path))
    if not src.is_file():
        raise BrainsexError(f"{src}: local download source not found")
    if hasattr(output_file, "write"):
        with open(src, "rb") as fh:
            shutil.copyfileobj(fh, output_file)
    else:
        shutil.copyfile(src, output_file)


def table1(participants: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 1 for any participants table: one row per dataset, plus ``All``.

    Parameters
    ----------
    participants : pandas.DataFrame
        With columns ``dataset``, ``sex`` (F/M), ``age``, ``vendor`` and ``field`` (tesla).

    Returns
    -------
    pandas.DataFrame
        Index ``dataset``; columns N, Female, Male, Age (F) and Age (M) as ``mean ± sd (min–max)``,
        subjects per vendor present (GE, Philips, Siemens when the table has none; ``vendor unknown``
        for missing ones) and per field strength present (1.5 T, 3 T when none; ``field unknown`` when
        some are missing).
    """
    need = {"dataset", "sex", "age", "vendor", "field"}
    missing = need - set(participants.columns)
    if missing:
        raise BrainsexError(f"table1: participants table lacks columns {sorted(missing)}")

    def age(s: pd.Series) -> str:
        s = pd.to_numeric(s, errors="coerce").dropna()
        if s.empty:
            return ""
        sd = f"{s.std():.1f}" if len(s) > 1 else "–"
        return f"{s.mean():.1f} ± {sd} ({s.min():.0f}–{s.max():.0f})"

    vendors = sorted(participants["vendor"].dropna().astype(str).unique(), key=lambda v: (v == UNKNOWN, v))
    strengths = sorted(pd.to_numeric(participants["field"], errors="coerce").dropna().unique())
    any_unknown_field = bool(pd.to_numeric(participants["field"], errors="coerce").isna().any())

    def summarise(df: pd.DataFrame) -> dict[str, Any]:
        field = pd.to_numeric(df["field"], errors="coerce")
        row: dict[str, Any] = {
            "N": len(df), "Female": int((df["sex"] == "F").sum()), "Male": int((df["sex"] == "M").sum()),
            "Age (F)": age(df.loc[df["sex"] == "F", "age"]), "Age (M)": age(df.loc[df["sex"] == "M", "age"]),
        }
        for v in vendors or ["GE", "Philips", "Siemens"]:
            row[v if v != UNKNOWN else "vendor unknown"] = int((df["vendor"].astype(str) == v).sum())
        for f in strengths or [1.5, 3.0]:
            row[f"{f:g} T"] = int((field == f).sum())
        if any_unknown_field:
            row["field unknown"] = int(field.isna().sum())
        return row

    rows = {ds: summarise(g) for ds, g in participants.groupby("dataset", sort=True)}
    rows["All"] = summarise(participants)
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "dataset"
    return out


def table1_public(participants: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    """The paper's Table 1 (:func:`table1`) as a restricted cohort may publish it.

    Age ranges (the youngest and oldest subject) are dropped and an age summary over fewer than ``k``
    subjects of one sex is suppressed. Datasets of fewer than ``k`` subjects are pooled into one row
    ("other datasets (pooled)"); when the pool itself is under ``k``, the next smallest dataset joins
    it, so that the ``All`` row minus the shown rows cannot give a small group away. A pool that stays
    under ``k`` (too few subjects in all) keeps only its label and a note.

    Parameters
    ----------
    participants
        The participants table.
    k
        Minimum group size.
    """
    from brainsex.privacy import pool_small_groups, suppress_small_groups

    p = pool_small_groups(participants, "dataset", k)
    other = p.attrs.get("pooled_label")
    t = table1(p).reset_index()
    if other:  # the pooled row goes last, before All
        t = pd.concat([t[(t["dataset"] != other) & (t["dataset"] != "All")], t[t["dataset"] == other],
                       t[t["dataset"] == "All"]], ignore_index=True)
    small_age = pd.Series(False, index=t.index)
    for col, count in (("Age (F)", "Female"), ("Age (M)", "Male")):
        t[col] = t[col].astype(str).str.replace(r"\s*\([^)]*\)\s*$", "", regex=True)
        small = pd.to_numeric(t[count], errors="coerce") < int(k)
        t.loc[small, col] = None
        small_age |= small
    out = suppress_small_groups(t.rename(columns={"N": "n"}), k, keep=["dataset"]).rename(columns={"n": "N"})
    if "note" not in out.columns:
        out["note"] = ""
    age_note = f"age of a sex with fewer than {int(k)} subjects suppressed"
    out.loc[small_age & (out["note"] == ""), "note"] = age_note
    if not (out["note"] != "").any():
        out = out.drop(columns="note")
    return out


def public_exclusions(exclusions: pd.DataFrame, manifest: Manifest | str | os.PathLike) -> pd.DataFrame:
    """The exclusions table as it may be published: IDs only for shareable cohorts.

    Subjects of cohorts with ``shareable: false`` (or of cohorts the manifest does not know) are
    counted per reason instead of listed, so that no protected identifier reaches the book; their
    reasons are passed through :func:`brainsex.privacy.scrub_reason` (no ID, file name or path).

    Parameters
    ----------
    exclusions : pandas.DataFrame
        The exclusions table of :func:`load_cohorts` (``cohort``, ``participant_id``, ``reason``).
    manifest : Manifest or path
        The data manifest that says which cohorts are shareable.

    Returns
    -------
    pandas.DataFrame
        Columns cohort, participant_id (empty for counted rows), reason, n.
    """
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    shareable = {c.name: c.shareable for c in manifest.cohorts}
    cols = ["cohort", "participant_id", "reason", "n"]
    if exclusions.empty:
        return pd.DataFrame(columns=cols)
    from brainsex.privacy import scrub_reason

    is_public = exclusions["cohort"].map(lambda c: shareable.get(str(c), False)).astype(bool)
    listed = exclusions.loc[is_public, ["cohort", "participant_id", "reason"]].assign(n=1)
    closed = exclusions.loc[~is_public].copy()
    ids = closed["participant_id"].astype(str).tolist()
    # reasons of restricted cohorts lose IDs, file names and quoted values, then group together
    closed["reason"] = [scrub_reason(r, ids) for r in closed["reason"].astype(str)]
    counted = (closed.groupby(["cohort", "reason"], sort=True).size().rename("n").reset_index()
               .assign(participant_id=""))
    return pd.concat([listed, counted[cols]], ignore_index=True)[cols]
