"""Privacy guard: never publish subject-level data of a cohort whose terms forbid it.

Cohorts with ``shareable: false`` in the manifest (ADNI, OASIS-3, Cam-CAN, CC-359) may appear in the
book only as aggregates. The cohort chapter records every subject with its cohort's ``shareable`` flag
in ``<run_dir>/cohort/participants.tsv``; before a build is published, every HTML page is scanned for
the identifiers of non-shareable subjects, and the build is refused if one appears.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from brainsex import BrainsexError
from brainsex.run import RunDir

__all__ = ["PrivacyError", "protected_ids", "scan_html", "check_published_html"]


class PrivacyError(BrainsexError):
    """Subject-level data of a non-shareable cohort would be published."""


def protected_ids(run_dir: str | Path, manifest: str | Path | None = None) -> set[str]:
    """Participant IDs of non-shareable cohorts in ``<run_dir>/cohort/`` (participants and exclusions).

    A row counts as non-shareable when its ``shareable`` column says so, or when its ``cohort`` is marked
    ``shareable: false`` in ``manifest`` (used for the exclusions table, which has no ``shareable`` column).
    """
    folder = RunDir(run_dir).cohort
    closed: set[str] = set()
    if manifest is not None and Path(manifest).is_file():
        from brainsex.manifest import load_manifest

        closed = {c.name for c in load_manifest(manifest).cohorts if not c.shareable}
    ids: set[str] = set()
    for path in (folder.participants, folder.exclusions):
        if not path.is_file():
            continue
        table = pd.read_csv(path, sep="\t", dtype=str)
        if "participant_id" not in table.columns:
            continue
        mask = pd.Series(False, index=table.index)
        if "shareable" in table.columns:
            mask |= table["shareable"].str.lower().isin(["false", "0", "no"])
        if "cohort" in table.columns:
            mask |= table["cohort"].isin(closed)
        ids |= set(table.loc[mask, "participant_id"].dropna())
    return ids


def scan_html(html_dir: str | Path, ids: set[str]) -> dict[str, list[str]]:
    """Pages of ``html_dir`` that contain any of ``ids`` (as whole tokens): ``{page: [ids...]}``."""
    found: dict[str, list[str]] = {}
    if not ids:
        return found
    pattern = re.compile(r"(?<![A-Za-z0-9])(" + "|".join(re.escape(i) for i in sorted(ids, key=len, reverse=True))
                         + r")(?![A-Za-z0-9])")
    for page in sorted(Path(html_dir).rglob("*.html")):
        hits = sorted(set(pattern.findall(page.read_text(errors="ignore"))))
        if hits:
            found[str(page.relative_to(html_dir))] = hits
    return found


def check_published_html(run_dir: str | Path, html_dir: str | Path, manifest: str | Path | None = None) -> None:
    """Raise :class:`PrivacyError` if a page of ``html_dir`` shows an ID of a non-shareable subject."""
    found = scan_html(html_dir, protected_ids(run_dir, manifest))
    if found:
        pages = "; ".join(f"{p}: {', '.join(v[:3])}{' ...' if len(v) > 3 else ''}" for p, v in found.items())
        raise PrivacyError(
            f"refusing to publish: subject IDs of non-shareable cohorts appear in the book ({pages}). "
            "Show only aggregate tables and maps for cohorts with 'shareable: false'."
        )
