"""One on-disk cache for computed files, keyed by what they were computed from.

On the model of MONAI's ``PersistentDataset``: an entry's key is a hash of

- the *content* of its inputs (a file by its bytes, an array by its dtype, shape and bytes, a nibabel
  image by its data and affine; never by a path or a name),
- every parameter of the computation, and
- a code version (bump it when the computation changes).

A call with other settings or another image therefore gets another key and never the old result.
An entry is a folder ``<stem><kind>-<key[:16]>/`` holding the files and a marker ``entry.json``
(the full key, the version and each file's size). The files are written into a temporary folder, the
marker last, and the folder renamed into place: a crash mid-write leaves only a temporary folder,
which no lookup reads and the next store removes. Older entries of the same stem and kind are
removed when a new one is stored (the latest settings win; disk use stays one entry per subject).

Small in-memory arrays (template resamplings and the like) are better served by :func:`memory`, a
``joblib.Memory`` under the same root conventions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brainsex import BrainsexError

__all__ = ["MARKER", "fingerprint", "cache_key", "FileCache", "memory"]

#: Name of the marker file written last into every entry.
MARKER = "entry.json"


def _update(h: Any, obj: Any) -> None:
    """Feed ``obj`` into the hash ``h`` by content, with a type tag so that different types never collide."""
    import nibabel as nib

    if isinstance(obj, nib.spatialimages.SpatialImage):
        # by value (an int image and its float copy agree), and the affine at the float32 precision a
        # NIfTI header stores: an image and the same image saved and loaded again hash alike
        h.update(b"image:")
        _update(h, np.asarray(obj.dataobj, dtype=np.float64))
        _update(h, np.asarray(obj.affine, dtype=np.float32))
    elif isinstance(obj, np.ndarray | np.generic):
        arr = np.ascontiguousarray(obj)
        h.update(f"array:{arr.dtype.str}:{arr.shape}:".encode())
        h.update(arr.tobytes())
    elif hasattr(obj, "detach") and hasattr(obj, "cpu"):  # a torch tensor
        _update(h, obj.detach().cpu().numpy())
    elif isinstance(obj, Path | os.PathLike):
        p = Path(obj)
        if not p.is_file():
            raise BrainsexError(f"{p}: cannot fingerprint a missing file")
        h.update(b"file:")
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    elif isinstance(obj, Mapping):
        h.update(b"map:{")
        for key in sorted(obj, key=str):
            h.update(json.dumps(str(key)).encode() + b":")
            _update(h, obj[key])
            h.update(b",")
        h.update(b"}")
    elif isinstance(obj, list | tuple):
        h.update(b"seq:[")
        for item in obj:
            _update(h, item)
            h.update(b",")
        h.update(b"]")
    elif obj is None or isinstance(obj, bool | int | str):
        h.update(b"value:" + json.dumps(obj).encode())
    elif isinstance(obj, float):
        h.update(b"value:" + (repr(obj) if math.isfinite(obj) else str(obj)).encode())
    else:
        raise BrainsexError(f"cache: cannot fingerprint an object of type {type(obj).__name__}")


def fingerprint(obj: Any) -> str:
    """Hex SHA-256 of ``obj``'s content.

    Parameters
    ----------
    obj : object
        A :class:`pathlib.Path` (hashed by the file's bytes, not its name), a numpy array or scalar, a
        torch tensor, a nibabel image (data and affine), a mapping or sequence of these, or a plain
        value (None, bool, int, float, str; a ``str`` is a value, never read as a path).

    Returns
    -------
    str
        64 hex digits.
    """
    h = hashlib.sha256()
    _update(h, obj)
    return h.hexdigest()


def cache_key(inputs: Mapping[str, Any], params: Mapping[str, Any], version: str) -> str:
    """The key of a cache entry: :func:`fingerprint` of its inputs' content, its parameters and a code version.

    Parameters
    ----------
    inputs : mapping
        Name -> input (files as :class:`pathlib.Path`, images, arrays); hashed by content.
    params : mapping
        Every parameter that changes the result.
    version : str
        Version of the code computing the entry.

    Returns
    -------
    str
        64 hex digits.
    """
    return fingerprint({"inputs": dict(inputs), "params": dict(params), "version": str(version)})


@dataclass(frozen=True)
class FileCache:
    """Entries of one kind of computed files (e.g. ``"syn"`` warps) under one folder.

    Parameters
    ----------
    kind : str
        Name of the computation; part of every entry's folder name.
    version : str
        Code version, part of every key.
    """

    kind: str
    version: str

    def key(self, inputs: Mapping[str, Any], params: Mapping[str, Any]) -> str:
        """:func:`cache_key` of ``inputs`` and ``params`` with this cache's version.

        Parameters
        ----------
        inputs, params : mapping
            See :func:`cache_key`.
        """
        return cache_key(inputs, {"kind": self.kind, **dict(params)}, self.version)

    def entry_dir(self, stem: str | os.PathLike, key: str) -> Path:
        """The folder of the entry ``key`` for ``stem`` (a path prefix such as ``warps/sub-01_``).

        Parameters
        ----------
        stem : path
            Prefix of the entry's folder name (its parent folder is where entries live).
        key : str
            The entry's key (:meth:`key`).
        """
        stem = str(stem)
        return Path(f"{stem}{self.kind}-{key[:16]}")

    def load(self, stem: str | os.PathLike, key: str) -> dict[str, Path] | None:
        """The files of a complete entry, or None when there is none (or it does not verify).

        Parameters
        ----------
        stem : path
            As in :meth:`entry_dir`.
        key : str
            The entry's key.

        Returns
        -------
        dict or None
            File name -> path.
        """
        folder = self.entry_dir(stem, key)
        marker = folder / MARKER
        if not marker.is_file():
            return None
        try:
            content = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if content.get("key") != key or content.get("version") != self.version:
            return None
        files: dict[str, Path] = {}
        for name, size in content.get("files", {}).items():
            p = folder / name
            if not p.is_file() or p.stat().st_size != size:
                return None
            files[name] = p
        return files

    @contextlib.contextmanager
    def store(self, stem: str | os.PathLike, key: str, prune: bool = True) -> Iterator[Path]:
        """Yield a temporary folder to write an entry's files into; publish it only if the block succeeds.

        After the block the marker is written into the folder (last), and the folder renamed to
        :meth:`entry_dir`. On an exception nothing is published and the temporary folder is removed.

        Parameters
        ----------
        stem : path
            As in :meth:`entry_dir`.
        key : str
            The entry's key.
        prune : bool, default=True
            Remove this stem's other entries of this kind (and stray temporary folders) once stored.
        """
        final = self.entry_dir(stem, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        try:
            yield tmp
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            if not files:
                raise BrainsexError(f"{final}: the computation wrote no file into the cache entry")
            (tmp / MARKER).write_text(json.dumps({"key": key, "version": self.version, "kind": self.kind,
                                                  "files": files}, indent=2, sort_keys=True) + "\n")
            if final.exists():  # an entry with this key, complete or not: ours replaces it
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.replace(tmp, final)
            except OSError:
                if self.load(stem, key) is None:  # nobody else published a valid one meanwhile
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        if prune:
            self._prune(stem, keep=final)

    def _prune(self, stem: str | os.PathLike, keep: Path) -> None:
        parent, base = keep.parent, Path(str(stem)).name
        for p in parent.glob(f"{base}{self.kind}-*"):
            if p != keep and p.is_dir() and len(p.name) == len(keep.name):
                shutil.rmtree(p, ignore_errors=True)
        for p in parent.glob(f".{base}{self.kind}-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)

    def get_or_compute(self, stem: str | os.PathLike, inputs: Mapping[str, Any], params: Mapping[str, Any],
                       compute: Callable[[Path], None], names: Sequence[str] | None = None,
                       recompute: bool = False) -> dict[str, Path]:
        """The entry's files, computed by ``compute(folder)`` when no valid entry has this key.

        Parameters
        ----------
        stem : path
            As in :meth:`entry_dir`.
        inputs, params : mapping
            What the files are computed from (:func:`cache_key`).
        compute : callable
            Writes the files into the folder it is given.
        names : sequence of str, optional
            Files the entry must contain; an entry without one of them is recomputed.
        recompute : bool, default=False
            Ignore an existing entry.

        Returns
        -------
        dict
            File name -> path inside the entry's folder.
        """
        key = self.key(inputs, params)
        if not recompute:
            hit = self.load(stem, key)
            if hit is not None and all(n in hit for n in (names or ())):
                return hit
        with self.store(stem, key) as tmp:
            compute(tmp)
            missing = [n for n in (names or ()) if not (tmp / n).is_file()]
            if missing:
                raise BrainsexError(f"{self.entry_dir(stem, key)}: the computation did not write {missing}")
        out = self.load(stem, key)
        if out is None:  # pragma: no cover - the folder vanished between publish and read
            raise BrainsexError(f"{self.entry_dir(stem, key)}: cache entry unreadable right after writing it")
        return out


def memory(location: str | os.PathLike | None) -> Any:
    """A ``joblib.Memory`` for in-memory results (arrays), or a no-op one when ``location`` is None.

    ``joblib.Memory`` keys a call by the function's code and the hash of its arguments (arrays by their
    bytes), the same rule as :class:`FileCache`.

    Parameters
    ----------
    location : path or None
        Folder of the cache.
    """
    from joblib import Memory

    return Memory(None if location is None else str(location), verbose=0)
