"""Named parameter profiles (``demo``, ``smoke``, ``paper``) and command-line overrides."""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

from brainsex import BrainsexError

__all__ = ["load_profiles", "resolve_profile", "parse_override"]


def load_profiles() -> dict[str, dict[str, Any]]:
    """All profiles shipped with the package, as ``{name: {"description": ..., "params": {...}}}``."""
    text = resources.files("brainsex").joinpath("profiles.yaml").read_text()
    return yaml.safe_load(text)


def parse_override(value: str) -> Any:
    """Parse a ``-p key value`` value as YAML: ``3`` -> 3, ``0.5`` -> 0.5, ``[1, 2]`` -> list, else a string."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def resolve_profile(
    name: str,
    overrides: dict[str, Any] | None = None,
    known: set[str] | None = None,
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
    """
    profiles = load_profiles()
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
