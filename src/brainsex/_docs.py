"""Parameter descriptions shared by many docstrings, written once (nilearn's ``fill_doc`` pattern).

A docstring keeps each parameter's ``name : type, default=...`` line (so that ruff's pydocstyle rules
and the reader see every parameter next to its signature) and replaces a description used in several
places by a placeholder on its own line: under ``seed : int, default=0`` the description line reads
``%(seed_bootstrap)s``, indented like any description, and the function is decorated with
:func:`fill_doc`.

:func:`fill_doc` substitutes the text of :data:`DOCS`, indented like the placeholder, when the module
is imported; an unknown key raises at import time.
"""

from __future__ import annotations

import re
from typing import TypeVar

__all__ = ["DOCS", "fill_doc"]

T = TypeVar("T")

#: Shared descriptions, by placeholder key.
DOCS: dict[str, str] = {
    "prob_col": "Column of the predicted probability of male (another model's too, e.g. the TIV baseline).",
    "threshold": "A subject is predicted male when its probability of male is ``>= threshold`` (in [0, 1]).",
    "n_bootstrap": "Bootstrap resamples (subjects drawn with replacement); 0 skips the confidence intervals.",
    "seed_bootstrap": "Seed of the bootstrap resampling; the same seed gives the same intervals.",
    "ci": "Confidence level of the percentile intervals, e.g. 0.95 for the 2.5th and 97.5th percentiles.",
    "tiv_col": "Column holding the total intracranial volume in ml (``etiv_ml``: eTIV, paper section 2.3).",
    "progress": "Show a tqdm progress bar.",
    "tiv_female_male": "TIV (ml) of the women and of the men.",
    "kde_threshold": "Fraction of each density's maximum that bounds its interval (the paper: 0.2).",
    "bw_method": "Passed to :class:`scipy.stats.gaussian_kde` (``None``: Scott's rule).",
    "rtiv_low_high": "R_tiv's ends in ml (:func:`brainsex.tiv.kde_overlap_range`; the range is closed).",
    # brainsex.figures
    "fig_title": "Title of the figure (plotly accepts HTML tags such as ``<sub>``).",
    "local_only": (
        "Subject-level detail of a restricted cohort: kept in the executed notebook of the run directory,\n"
        "removed from the published book (:func:`brainsex.privacy.strip_local_outputs`)."
    ),
    "k_shown": (
        "The minimum group size the counts were suppressed with; only written in the figure's text (the\n"
        "suppression itself is done by :mod:`brainsex.privacy`)."
    ),
    # brainsex.run
    "participant_id": "The subject's id, with its ``sub-`` prefix (``sub-0001``).",
    "chapter": "The chapter's notebook stem (``02_training``).",
    "reference_source": (
        "Where the MNI152 template, mask and atlas come from: \"templateflow\" (TemplateFlow's\n"
        "MNI152NLin2009cSym and CerebrA), \"offline\" (nilearn's MNI152 and the Neuromorphometrics atlas\n"
        "relabelled to CerebrA names) or \"auto\" (templateflow when available, offline otherwise);\n"
        "see :func:`brainsex.templates.reference_info`."
    ),
}

_PLACEHOLDER = re.compile(r"^([ \t]*)%\((\w+)\)s[ \t]*$", flags=re.MULTILINE)


def fill_doc(obj: T) -> T:
    """Replace ``%(key)s`` lines of ``obj``'s docstring by the shared text :data:`DOCS` ``[key]``.

    Parameters
    ----------
    obj : function or class
        Anything with a ``__doc__``; its placeholders must stand alone on their lines.

    Returns
    -------
    function or class
        ``obj`` itself, its docstring filled in.

    Raises
    ------
    KeyError
        For a placeholder that :data:`DOCS` does not define.
    """
    doc = getattr(obj, "__doc__", None)
    if not doc:
        return obj

    def sub(match: re.Match[str]) -> str:
        indent, key = match.groups()
        if key not in DOCS:
            raise KeyError(f"{getattr(obj, '__qualname__', obj)}: unknown docstring placeholder %({key})s")
        return "\n".join(indent + line for line in DOCS[key].splitlines())

    obj.__doc__ = _PLACEHOLDER.sub(sub, doc)
    return obj
