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

__all__ = ["show", "show_table", "PALETTE", "SEX_COLORS", "fig_study_design", "fig_cohort_status"]

#: Colour-blind safe (Okabe-Ito), readable on light and dark themes.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#999999"]
SEX_COLORS = {"F": "#CC79A7", "M": "#0072B2"}


def _in_book_build() -> bool:
    return os.environ.get("BRAINSEX_BOOK_BUILD") == "1"


def show(fig: Any, alt: str | None = None) -> None:
    """Display a plotly figure so that it works both in the offline book and in live notebooks.

    Parameters
    ----------
    fig
        A ``plotly.graph_objects.Figure``.
    alt
        A text description for screen readers (``aria-label`` of the figure's container).

    Returns ``None`` so that a call on a cell's last line does not display the figure twice.
    """
    from IPython.display import HTML, display

    if not _in_book_build():
        fig.show()
        return None
    height = fig.layout.height or 450
    html = fig.to_html(include_plotlyjs=False, full_html=False, config={"responsive": True},
                       default_height=f"{height}px")
    label = (alt or fig.layout.title.text or "interactive figure").replace('"', "'")
    display(HTML(f'<div class="brainsex-plotly" role="img" aria-label="{label}">{html}</div>'))
    return None


def show_table(df: pd.DataFrame, caption: str | None = None, max_rows: int = 200, **style: Any) -> None:
    """Display a table as static HTML (sortable in the page, readable without JavaScript)."""
    from IPython.display import HTML, display

    shown = df.head(max_rows)
    html = shown.to_html(index=False, classes="brainsex-table", border=0, na_rep="n/a", **style)
    cap = f"<p class='caption'><em>{caption}</em></p>" if caption else ""
    more = f"<p><em>{len(df) - max_rows} more rows in the run directory.</em></p>" if len(df) > max_rows else ""
    display(HTML(cap + html + more))
    return None


#: The analysis as the paper runs it (its Figure 1), and the chapter of this book for each step.
STUDY_STEPS = [
    ("Cohorts", "CC-359, OASIS-3, ADNI, Cam-CAN\nor the synthetic phantom", "00_cohort"),
    ("Preprocessing", "skull strip, rigid MNI registration,\nz-score, TIV", "01_preprocessing"),
    ("Split", "stratified 80/10/10 by\nsex, vendor, field", "02_training"),
    ("SFCN", "3D CNN, sigmoid output\n(male = positive)", "02_training"),
    ("Evaluation", "metrics by dataset, vendor,\nfield, age", "03_evaluation"),
    ("TIV analysis", "tertiles, KDE overlap range", "04_tiv"),
    ("Saliency", "class saliency (Captum),\naveraged in MNI space", "05_saliency"),
    ("Regions", "CerebrA weighted\nsaliency scores", "06_regions"),
]


def fig_study_design(steps: list[tuple[str, str, str]] | None = None) -> Any:
    """The study design as a left-to-right flow of boxes (the paper's Figure 1, redrawn)."""
    import plotly.graph_objects as go

    steps = steps or STUDY_STEPS
    fig = go.Figure()
    n = len(steps)
    for i, (name, detail, _chapter) in enumerate(steps):
        x0, x1 = i * 1.25, i * 1.25 + 1.0
        color = PALETTE[i % len(PALETTE)]
        fig.add_shape(type="rect", x0=x0, x1=x1, y0=0, y1=1, line={"color": color, "width": 2},
                      fillcolor=color, opacity=0.18)
        fig.add_annotation(x=(x0 + x1) / 2, y=0.72, text=f"<b>{name}</b>", showarrow=False, font={"size": 13})
        fig.add_annotation(x=(x0 + x1) / 2, y=0.38, text=detail.replace("\n", "<br>"), showarrow=False,
                           font={"size": 10})
        if i < n - 1:
            fig.add_annotation(x=x1 + 0.23, y=0.5, ax=x1 + 0.02, ay=0.5, xref="x", yref="y", axref="x",
                               ayref="y", showarrow=True, arrowhead=3, arrowwidth=2, text="")
    # invisible markers carry hover text (and give the figure data points to draw)
    fig.add_trace(go.Scatter(
        x=[i * 1.25 + 0.5 for i in range(n)], y=[0.12] * n, mode="markers+text",
        marker={"size": 9, "color": [PALETTE[i % len(PALETTE)] for i in range(n)]},
        text=[s[2] for s in steps], textposition="bottom center", textfont={"size": 9},
        hovertext=[f"{s[0]}: chapter {s[2]}" for s in steps], hoverinfo="text", showlegend=False,
    ))
    fig.update_xaxes(visible=False, range=[-0.1, n * 1.25 - 0.15])
    fig.update_yaxes(visible=False, range=[-0.25, 1.05])
    fig.update_layout(title="Study design: from scans to a sex-differences map", height=300,
                      margin={"l": 10, "r": 10, "t": 50, "b": 10}, plot_bgcolor="rgba(0,0,0,0)")
    return fig


def fig_cohort_status(table: pd.DataFrame) -> Any:
    """Cohorts declared in the manifest: enabled or not, shareable or not."""
    import plotly.graph_objects as go

    colors = ["#009E73" if e else "#999999" for e in table["enabled"]]
    fig = go.Figure(go.Bar(
        x=table["cohort"], y=[1] * len(table), marker_color=colors,
        text=[("shareable" if s else "aggregates only") for s in table["shareable"]], textposition="inside",
        hovertext=[f"{c} ({k}): {'enabled' if e else 'disabled'}" for c, k, e in
                   zip(table["cohort"], table["kind"], table["enabled"], strict=True)],
        hoverinfo="text",
    ))
    fig.update_yaxes(visible=False)
    fig.update_layout(title="Cohorts in data_manifest.yaml (green: enabled in this manifest)", height=260,
                      margin={"l": 10, "r": 10, "t": 50, "b": 30})
    return fig
