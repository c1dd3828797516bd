"""``data_manifest.yaml``: the declared cohorts and reference images, validated with pydantic.

A researcher points the book at their own copies of CC-359, OASIS-3, ADNI, Cam-CAN or IXI by editing
this one file; the embedded default is the synthetic phantom. Every problem is reported as one message
naming the file, the key and what was expected.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from brainsex import BrainsexError

__all__ = ["Manifest", "CohortEntry", "ReferenceEntry", "load_manifest", "expand_env", "ManifestError", "manifest_table"]

COHORT_KINDS = ("synthetic", "ixi", "bids", "table")


class ManifestError(BrainsexError):
    """A malformed ``data_manifest.yaml``."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ColumnMap(_Strict):
    """Which column of the participants table holds each variable (``None``: not available)."""

    id: str = "participant_id"
    sex: str = "sex"
    age: str | None = "age"
    dataset: str | None = None
    vendor: str | None = None
    field: str | None = None
    tiv_ml: str | None = None
    session: str | None = None


class SexCoding(_Strict):
    """Values of the sex column that mean female and male (compared as lower-case strings)."""

    female: list[str] = Field(default_factory=lambda: ["f", "female"])
    male: list[str] = Field(default_factory=lambda: ["m", "male"])

    @field_validator("female", "male", mode="before")
    @classmethod
    def _as_strings(cls, v: Any) -> list[str]:
        if not isinstance(v, list | tuple):
            v = [v]
        return [str(x).strip().lower() for x in v]

    @model_validator(mode="after")
    def _disjoint(self) -> SexCoding:
        both = set(self.female) & set(self.male)
        if both:
            raise ValueError(f"codes {sorted(both)} are listed as both female and male")
        return self


class Download(_Strict):
    """A file fetched with pooch and checked against its hash."""

    url: str
    known_hash: str | None = None
    fname: str | None = None


class CohortEntry(_Strict):
    """One cohort. ``root`` may use ``${ENV_VAR}`` or ``${ENV_VAR:-default}``."""

    name: str
    kind: Literal["synthetic", "ixi", "bids", "table"]
    root: str
    shareable: bool
    enabled: bool = True
    participants: str | None = "participants.tsv"
    columns: ColumnMap = Field(default_factory=ColumnMap)
    sex_coding: SexCoding = Field(default_factory=SexCoding)
    image_pattern: str | None = None
    mask_pattern: str | None = None
    dataset: str | None = None
    vendor: str | None = None
    field: float | None = None
    license: str | None = None
    citation: str | None = None
    downloads: dict[str, Download] = Field(default_factory=dict)
    #: fetch the ``downloads`` with pooch when ``root`` lacks the participants table (kind ``ixi``); a
    #: root that already holds it is read as it is, without downloading or re-checking hashes
    download: bool = False
    synthetic: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _kind_needs(self) -> CohortEntry:
        if self.kind in ("bids", "table") and not self.image_pattern:
            raise ValueError(f"kind '{self.kind}' needs 'image_pattern' (e.g. 'sub-{{id}}/anat/sub-{{id}}_T1w.nii.gz')")
        if self.kind != "synthetic" and self.synthetic:
            raise ValueError("'synthetic' options are only allowed with kind 'synthetic'")
        return self


class ReferenceEntry(_Strict):
    """A reference image (template, mask or atlas): where it comes from, which version, its hash."""

    source: Literal["templateflow", "nilearn", "package", "url"]
    name: str
    version: str | None = None
    known_hash: str | None = None
    fallback: str | None = None
    description: str | None = None


class Manifest(_Strict):
    """The whole manifest."""

    version: Literal[1] = 1
    cohorts: list[CohortEntry]
    references: dict[str, ReferenceEntry] = Field(default_factory=dict)
    path: Path | None = Field(default=None, exclude=True)

    @field_validator("cohorts")
    @classmethod
    def _unique_names(cls, cohorts: list[CohortEntry]) -> list[CohortEntry]:
        names = [c.name for c in cohorts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"cohort names must be unique; repeated: {dup}")
        return cohorts

    def cohort(self, name: str) -> CohortEntry:
        """The cohort called ``name`` (a clear error listing the known names otherwise).

        Parameters
        ----------
        name : str
            Cohort name.

        Returns
        -------
        CohortEntry
            Its entry.
        """
        for c in self.cohorts:
            if c.name == name:
                return c
        where = f"{self.path}: " if self.path else ""
        raise ManifestError(f"{where}no cohort named '{name}'; known cohorts: {[c.name for c in self.cohorts]}")

    def resolve_root(self, cohort: CohortEntry | str, base: str | os.PathLike | None = None) -> Path:
        """The cohort's ``root`` with environment variables expanded, relative to the manifest's folder.

        Parameters
        ----------
        cohort : CohortEntry or str
            The cohort or its name.
        base : path, optional
            Folder a relative root is resolved against instead (default: the manifest's folder, or the
            working folder for a manifest not read from a file).

        Returns
        -------
        pathlib.Path
            The root folder (``~`` expanded).
        """
        entry = self.cohort(cohort) if isinstance(cohort, str) else cohort
        root = Path(expand_env(entry.root, key=f"cohorts[{entry.name}].root", source=self.path)).expanduser()
        if not root.is_absolute():
            anchor = Path(base) if base is not None else (self.path.parent if self.path else Path.cwd())
            root = anchor / root
        return root


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: str, key: str = "value", source: str | os.PathLike | None = None) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; an unset variable without default is an error.

    Parameters
    ----------
    value : str
        Text with references to environment variables.
    key : str, default="value"
        The manifest key, for the error message.
    source : path, optional
        The manifest file, for the error message.

    Returns
    -------
    str
        The expanded text.

    Raises
    ------
    ManifestError
        For an unset variable without a default.
    """

    def repl(m: re.Match[str]) -> str:
        var, default = m.group(1), m.group(2)
        if var in os.environ:
            return os.environ[var]
        if default is not None:
            return default
        where = f"{source}: " if source else ""
        raise ManifestError(f"{where}{key} uses ${{{var}}} but the environment variable {var} is not set")

    return _ENV.sub(repl, value)


def _format_loc(loc: tuple[Any, ...], data: Any) -> str:
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            name = None
            if isinstance(node, list) and 0 <= item < len(node) and isinstance(node[item], dict):
                name = node[item].get("name")
            parts.append(f"[{item}]" + (f" ('{name}')" if name else ""))
            node = node[item] if isinstance(node, list) and 0 <= item < len(node) else None
        else:
            parts.append(("." if parts else "") + str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts) or "(top level)"


def load_manifest(path: str | os.PathLike = "data_manifest.yaml") -> Manifest:
    """Read and validate a manifest.

    Parameters
    ----------
    path : path, default="data_manifest.yaml"
        The manifest (YAML).

    Returns
    -------
    Manifest
        The validated manifest, with ``path`` set to the file's absolute path.

    Raises
    ------
    ManifestError
        With one message naming the file, the key and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ManifestError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a mapping with a 'cohorts' list at the top level")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        msgs = []
        for err in exc.errors():
            loc = _format_loc(tuple(err["loc"]), data)
            got = err.get("input")
            got_s = "" if err["type"] == "missing" or isinstance(got, dict | list) else f" (got {got!r})"
            msgs.append(f"{loc}: {err['msg']}{got_s}")
        raise ManifestError(f"{path}: " + "; ".join(msgs)) from None
    return manifest.model_copy(update={"path": path.resolve()})


def manifest_table(manifest: Manifest) -> pd.DataFrame:
    """One row per cohort: name, kind, enabled, shareable, licence, root (unexpanded).

    Parameters
    ----------
    manifest : Manifest
        A loaded manifest (:func:`load_manifest`).

    Returns
    -------
    pandas.DataFrame
        Columns ``cohort``, ``kind``, ``enabled``, ``shareable``, ``license``, ``root``.
    """
    return pd.DataFrame(
        [
            {"cohort": c.name, "kind": c.kind, "enabled": c.enabled, "shareable": c.shareable,
             "license": c.license or "see the dataset's terms", "root": c.root}
            for c in manifest.cohorts
        ]
    )
