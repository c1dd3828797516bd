"""Plotting helpers for the book. Computing lives in the other modules; this one only draws.

Interactive figures are plotly. In a book build (``BRAINSEX_BOOK_BUILD=1``, set by the build driver)
:func:`show` emits the figure as an HTML fragment without plotly.js, which the book serves once from
``_static/plotly.min.js``: no CDN, no require.js, so figures draw offline. Anywhere else (Jupyter,
Colab, VS Code) it defers to plotly's own renderer.
"""

from __future__ import annotations

import os
from typing import Any

import pandas as pd

__all__ = ["show", "show_table", "PALETTE", "SEX_COLORS"]

#: Colour-blind safe (Okabe-Ito), readable on light and dark themes.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#999999"]
SEX_COLORS = {"F": "#CC79A7", "M": "#0072B2"}


def _in_book_build() -> bool:
    return os.environ.get("BRAINSEX_BOOK_BUILD") == "1"


def show(fig: Any, alt: str | None = None) -> Any:
    """Display a plotly figure so that it works both in the offline book and in live notebooks.

    Parameters
    ----------
    fig
        A ``plotly.graph_objects.Figure``.
    alt
        A text description for screen readers (``aria-label`` of the figure's container).

    Returns
    -------
    The IPython display object in a book build, else ``None`` (plotly renders the figure itself).
    """
    from IPython.display import HTML, display

    if not _in_book_build():
        fig.show()
        return None
    html = fig.to_html(include_plotlyjs=False, full_html=False, config={"responsive": True})
    label = (alt or fig.layout.title.text or "interactive figure").replace('"', "'")
    obj = HTML(f'<div class="brainsex-plotly" role="img" aria-label="{label}">{html}</div>')
    display(obj)
    return obj


def show_table(df: pd.DataFrame, caption: str | None = None, max_rows: int = 200, **style: Any) -> Any:
    """Display a table as static HTML (sortable in the page, readable without JavaScript)."""
    from IPython.display import HTML, display

    shown = df.head(max_rows)
    html = shown.to_html(index=False, classes="brainsex-table", border=0, na_rep="n/a", **style)
    cap = f"<p class='caption'><em>{caption}</em></p>" if caption else ""
    more = f"<p><em>{len(df) - max_rows} more rows in the run directory.</em></p>" if len(df) > max_rows else ""
    obj = HTML(cap + html + more)
    display(obj)
    return obj
