"""Named parameter profiles (``demo``, ``smoke``, ``paper``) and command-line overrides."""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

from brainsex import BrainsexError

__all__ = ["load_profiles", "resolve_profile", "parse_override"]


def load_profiles(kind: str = "book") -> dict[str, dict[str, Any]]:
    """The profiles of one kind shipped with the package, as ``{name: {"description": ..., "params": {...}}}``.

    Parameters
    ----------
    kind
        ``"book"`` (the default: the profiles ``brainsex build`` accepts) or ``"study"`` (the validity
        study's defaults, :func:`brainsex.validity.study`). A profile without ``kind`` is a book profile.
    """
    text = resources.files("brainsex").joinpath("profiles.yaml").read_text()
    profiles = yaml.safe_load(text)
    return {name: p for name, p in profiles.items() if p.get("kind", "book") == kind}


def parse_override(value: str) -> Any:
    """Parse a ``-p key value`` value as YAML: ``3`` -> 3, ``0.5`` -> 0.5, ``[1, 2]`` -> list, else a string.

    Parameters
    ----------
    value : str
        The value as typed.

    Returns
    -------
    object
        The parsed value (the string itself when it is not valid YAML).
    """
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def resolve_profile(
    name: str,
    overrides: dict[str, Any] | None = None,
    known: set[str] | None = None,
    kind: str = "book",
) -> dict[str, Any]:
    """Parameters of profile ``name`` with ``overrides`` applied.

    Parameters
    ----------
    name
        A profile from ``profiles.yaml``.
    overrides
        Values that replace the profile's (already parsed).
    known
        Parameter names that at least one notebook declares; an override outside this set and outside
        the profile is an error (a typo would otherwise be silently ignored).
    kind
        Which profiles to look in (see :func:`load_profiles`).
    """
    profiles = load_profiles(kind)
    if name not in profiles:
        raise BrainsexError(f"unknown profile '{name}'; known profiles: {', '.join(sorted(profiles))}")
    params = dict(profiles[name].get("params") or {})
    for key, value in (overrides or {}).items():
        allowed = set(params) | (known or set()) | {"profile", "run_dir"}
        if key not in allowed:
            raise BrainsexError(
                f"unknown parameter '{key}' for profile '{name}'; known parameters: {', '.join(sorted(allowed))}"
            )
        params[key] = value
    return params
