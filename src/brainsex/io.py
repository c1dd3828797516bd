"""Small I/O helpers shared by every stage: atomic writes and run-directory layout.

Nothing here is specific to a stage; every writer in the package goes through :func:`atomic_path`
so that a crash never leaves a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "atomic_path",
    "write_text_atomic",
    "write_json_atomic",
    "write_table",
    "read_table",
    "sha256_file",
    "is_image",
    "as_array",
]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the file's suffixes (``.nii.gz``, ``.tsv``) so that libraries that pick a
    format from the extension still work.

    Parameters
    ----------
    path : path
        The final file (its folder is created).
    suffix : str, optional
        Suffix of the temporary name; default the suffixes of ``path``.

    Yields
    ------
    pathlib.Path
        The temporary path to write; removed if the block raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffixes = suffix if suffix is not None else "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=".tmp" + suffixes, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path.

    Parameters
    ----------
    path : path
        Destination.
    text : str
        Content.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (sorted keys; ``str`` for other types) atomically.

    Parameters
    ----------
    path : path
        Destination.
    obj : object
        JSON-serialisable content.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_table(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a table as CSV (``.csv``) or TSV (any other suffix) atomically, without the index.

    Parameters
    ----------
    df : pandas.DataFrame
        The table.
    path : path
        Destination.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    sep = "," if path.suffix == ".csv" else "\t"
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep=sep, index=False)
    return path


def read_table(path: str | os.PathLike, **kwargs: Any) -> pd.DataFrame:
    """Read a TSV/CSV table written by :func:`write_table` (or by a user), with a clear error.

    Parameters
    ----------
    path : path
        A ``.csv`` (comma-separated) or any other suffix (tab-separated).
    **kwargs
        Passed to :func:`pandas.read_csv`.

    Returns
    -------
    pandas.DataFrame
        The table.

    Raises
    ------
    BrainsexError
        When the file is missing or cannot be parsed.
    """
    from brainsex import BrainsexError

    path = Path(path)
    if not path.is_file():
        raise BrainsexError(f"{path}: table not found")
    sep = "," if path.suffix == ".csv" else "\t"
    try:
        return pd.read_csv(path, sep=sep, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise BrainsexError(f"{path}: cannot be read as a {'CSV' if sep == ',' else 'TSV'} table ({exc})") from exc


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes.

    Parameters
    ----------
    path : path
        The file.
    chunk : int, default=1048576
        Bytes read at a time.

    Returns
    -------
    str
        64 hex digits.
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def is_image(obj: Any) -> bool:
    """Whether ``obj`` is a spatial image (a nibabel image or anything with ``affine`` and ``get_fdata``).

    Parameters
    ----------
    obj : object
        Anything.
    """
    return hasattr(obj, "affine") and hasattr(obj, "get_fdata")


def as_array(obj: Any, name: str) -> np.ndarray:
    """The one door from an image-or-array argument to a numpy array.

    Parameters
    ----------
    obj : nibabel image, path, torch tensor or array-like
        A spatial image (its data as float32), a path to a NIfTI file (loaded with nibabel), a torch
        tensor (detached, on the CPU) or anything ``numpy.asarray`` accepts.
    name : str
        The argument's name, for the error message.

    Returns
    -------
    numpy.ndarray
    """
    import numpy as np

    from brainsex import BrainsexError

    if isinstance(obj, str | os.PathLike):
        import nibabel as nib

        try:
            obj = nib.load(str(obj))
        except (OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
            raise BrainsexError(f"{name}: {obj} cannot be read as an image ({exc})") from exc
    if is_image(obj):
        return np.asarray(obj.get_fdata(dtype=np.float32))
    if hasattr(obj, "detach"):
        return obj.detach().cpu().numpy()
    try:
        return np.asarray(obj)
    except Exception as exc:  # pragma: no cover - exotic input
        raise BrainsexError(f"{name}: cannot be read as an array ({exc})") from exc
