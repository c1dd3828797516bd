"""Plotting helpers for the book. Computing lives in the other modules; this one only draws.

Interactive figures are plotly. In a book build (``BRAINSEX_BOOK_BUILD=1``, set by the build driver)
:func:`show` emits the figure as an HTML fragment without plotly.js, which the book serves once from
``_static/plotly.min.js``: no CDN, no require.js, so figures draw offline. Anywhere else (Jupyter,
Colab, VS Code) it defers to plotly's own renderer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from brainsex import BrainsexError
from brainsex._docs import fill_doc

__all__ = ["show", "show_table", "PALETTE", "SEX_COLORS", "REGION_COLORS", "STUDY_STEPS", "fig_study_design", "fig_cohort_status", "fig_learning_curves", "fig_roc", "fig_confusion", "fig_tiv_tertile_hist", "fig_prob_vs_tiv", "fig_kde_overlap", "fig_slice_viewer", "fig_top_regions", "plot_map_static", "fig_cohort_composition", "fig_age_by_dataset", "fig_tiv_by_sex", "fig_qc_mosaic", "fig_tiv_agreement", "fig_step_times", "fig_binned_histogram", "fig_binned_scatter", "fig_qc_summary", "fig_box_summary", "fig_tbm_coefficients", "fig_precision_at_k", "fig_size_experiments", "fig_model_reliance"]

#: Colour-blind safe (Okabe-Ito), readable on light and dark themes.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#999999"]
SEX_COLORS = {"F": "#CC79A7", "M": "#0072B2"}


def _in_book_build() -> bool:
    return os.environ.get("BRAINSEX_BOOK_BUILD") == "1"


@fill_doc
def show(fig: Any, alt: str | None = None, local_only: bool = False) -> None:
    """Display a plotly figure so that it works both in the offline book and in live notebooks.

    In a book build (``BRAINSEX_BOOK_BUILD=1``) the figure is displayed as an HTML fragment without
    plotly.js, wrapped in a ``<div role="img">`` with an ``aria-label``; anywhere else ``fig.show()``.

    Parameters
    ----------
    fig : plotly.graph_objects.Figure
        The figure.
    alt : str, optional
        A text description for screen readers (``aria-label`` of the figure's container; default: the
        figure's title, else "interactive figure"). Only used in a book build.
    local_only : bool, default=False
        %(local_only)s
        Only used in a book build.

    Returns
    -------
    None
        So that a call on a cell's last line does not display the figure twice.
    """
    from IPython.display import HTML, display

    if not _in_book_build():
        fig.show()
        return None
    height = fig.layout.height or 450
    html = fig.to_html(include_plotlyjs=False, full_html=False, config={"responsive": True},
                       default_height=f"{height}px")
    label = (alt or fig.layout.title.text or "interactive figure").replace('"', "'")
    display(HTML(f'<div class="brainsex-plotly" role="img" aria-label="{label}">{html}</div>'),
            metadata=_local_metadata(local_only))
    return None


def _local_metadata(local_only: bool) -> dict[str, Any] | None:
    from brainsex.privacy import LOCAL_ONLY_KEY

    return {LOCAL_ONLY_KEY: True} if local_only else None


@fill_doc
def show_table(df: pd.DataFrame, caption: str | None = None, max_rows: int = 200, local_only: bool = False,
               **style: Any) -> None:
    """Display a table as static HTML (sortable in the page, readable without JavaScript).

    A named index becomes a column; missing values are shown as ``n/a``.

    Parameters
    ----------
    df : pandas.DataFrame
        The table.
    caption : str, optional
        Shown in italics above the table.
    max_rows : int, default=200
        Rows shown at most; a line under the table says how many more the run directory holds.
    local_only : bool, default=False
        %(local_only)s
    **style
        Passed to :meth:`pandas.DataFrame.to_html` (e.g. ``float_format``, ``escape``).

    Returns
    -------
    None
        So that a call on a cell's last line displays nothing more.
    """
    from IPython.display import HTML, display

    if df.index.name is not None or any(n is not None for n in df.index.names):
        df = df.reset_index()  # a meaningful index (e.g. the dataset of Table 1) becomes a column
    shown = df.head(max_rows)
    # nullable dtypes (Float64, Int64, boolean) ignore ``na_rep``: show their missing values as n/a too
    shown = shown.astype({c: "object" for c in shown.columns if pd.api.types.is_extension_array_dtype(shown[c])})
    html = shown.to_html(index=False, classes="brainsex-table", border=0, na_rep="n/a", **style)
    cap = f"<p class='caption'><em>{caption}</em></p>" if caption else ""
    more = f"<p><em>{len(df) - max_rows} more rows in the run directory.</em></p>" if len(df) > max_rows else ""
    display(HTML(cap + html + more), metadata=_local_metadata(local_only))
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
    """The study design as a left-to-right flow of boxes (the paper's Figure 1, redrawn).

    Parameters
    ----------
    steps : list of (str, str, str), optional
        One box per step: its name, a detail text (its newlines become line breaks) and the chapter
        that runs it (shown under the box and on hover); default :data:`STUDY_STEPS`.

    Returns
    -------
    plotly.graph_objects.Figure
    """
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
    """Cohorts declared in the manifest: enabled or not, shareable or not.

    Parameters
    ----------
    table : pandas.DataFrame
        One row per cohort with ``cohort``, ``kind``, ``enabled`` and ``shareable``
        (:func:`brainsex.manifest.manifest_table`). Enabled cohorts are drawn green, the others grey.

    Returns
    -------
    plotly.graph_objects.Figure
    """
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


def fig_learning_curves(history: pd.DataFrame, best_epoch: int | None = None) -> Any:
    """Loss and accuracy per epoch for training and validation (from ``train/history.tsv``).

    Parameters
    ----------
    history : pandas.DataFrame
        One row per epoch with ``epoch``, ``train_loss``, ``train_acc``, ``val_loss`` and ``val_acc``
        (:data:`brainsex.train.HISTORY_COLUMNS`).
    best_epoch : int, optional
        Epoch of the kept checkpoint, drawn as a dotted vertical line in both panels.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss (binary cross-entropy)", "accuracy"))
    for col, name, color, dash in (("train", "training", PALETTE[0], "solid"), ("val", "validation", PALETTE[1], "dash")):
        fig.add_trace(go.Scatter(x=history["epoch"], y=history[f"{col}_loss"], name=name, mode="lines+markers",
                                 line={"color": color, "dash": dash}, legendgroup=col), row=1, col=1)
        fig.add_trace(go.Scatter(x=history["epoch"], y=history[f"{col}_acc"], name=name, mode="lines+markers",
                                 line={"color": color, "dash": dash}, legendgroup=col, showlegend=False),
                      row=1, col=2)
    if best_epoch is not None:
        for c in (1, 2):
            fig.add_vline(x=best_epoch, line={"color": "#999999", "dash": "dot"}, row=1, col=c)
    fig.update_xaxes(title_text="epoch")
    fig.update_layout(title="Learning curves (dotted line: the checkpoint kept by the selection rule)",
                      height=380, margin={"t": 70})
    return fig


# --- evaluation and TIV chapters (paper Figures 2, 4, 5) ---------------------------------------

_SEX_NAMES = {"F": "female", "M": "male"}


@fill_doc
def fig_roc(roc: pd.DataFrame | Mapping[str, pd.DataFrame], title: str = "ROC curve (male = positive class)") -> Any:
    """ROC curve(s) from :func:`brainsex.evaluate.roc_curve_table`.

    Parameters
    ----------
    roc : pandas.DataFrame or mapping of str to pandas.DataFrame
        One table, or ``{name: table}`` to compare models (e.g. the CNN and the TIV-only baseline). The
        AUC in each table's ``attrs["auc"]`` goes into the legend.
    title : str, default="ROC curve (male = positive class)"
        %(fig_title)s

    Returns
    -------
    plotly.graph_objects.Figure
    """
    import plotly.graph_objects as go

    tables = {"model": roc} if isinstance(roc, pd.DataFrame) else dict(roc)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance",
                             line={"color": "#999999", "dash": "dash"}, hoverinfo="skip"))
    for i, (name, t) in enumerate(tables.items()):
        auc = t.attrs.get("auc")
        label = f"{name} (AUC {auc:.3f})" if auc is not None else name
        thr = np.where(np.isfinite(t["threshold"]), t["threshold"], np.nan)
        fig.add_trace(go.Scatter(
            x=t["fpr"], y=t["tpr"], mode="lines", name=label, line={"color": PALETTE[i % len(PALETTE)], "width": 2},
            customdata=thr, line_shape="hv",
            hovertemplate="1 − female accuracy %{x:.3f}<br>male recall %{y:.3f}<br>threshold %{customdata:.3f}"
                          "<extra></extra>",
        ))
    fig.update_xaxes(title="False positive rate (women classified as men)", range=[0, 1], constrain="domain")
    fig.update_yaxes(title="True positive rate (men classified as men)", range=[0, 1.01], scaleanchor="x")
    fig.update_layout(title=title, height=480, legend={"x": 0.98, "y": 0.02, "xanchor": "right"})
    return fig


@fill_doc
def fig_confusion(table: pd.DataFrame, title: str = "Confusion matrix (test set)") -> Any:
    """Heatmap of :func:`brainsex.evaluate.confusion`: counts and the fraction of each true sex.

    Parameters
    ----------
    table : pandas.DataFrame
        Counts, true sex (``F``, ``M``) as rows and predicted sex as columns. Cells are coloured by
        their fraction of the row (of the true sex).
    title : str, default="Confusion matrix (test set)"
        %(fig_title)s

    Returns
    -------
    plotly.graph_objects.Figure
    """
    import plotly.graph_objects as go

    counts = table.to_numpy()
    rows = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)
    true_lbl = [f"{_SEX_NAMES.get(s, s)} ({s})" for s in table.index]
    pred_lbl = [f"{_SEX_NAMES.get(s, s)} ({s})" for s in table.columns]
    text = [[f"{c}<br>{f:.1%}" for c, f in zip(r, fr, strict=True)] for r, fr in zip(counts, frac, strict=True)]
    fig = go.Figure(go.Heatmap(
        z=frac, x=pred_lbl, y=true_lbl, text=text, texttemplate="%{text}", colorscale="Blues", zmin=0, zmax=1,
        colorbar={"title": {"text": "fraction of<br>true sex"}},
        hovertemplate="true %{y}, predicted %{x}: %{text}<extra></extra>",
    ))
    fig.update_xaxes(title="Predicted sex", side="bottom")
    fig.update_yaxes(title="True sex", autorange="reversed")
    fig.update_layout(title=title, height=380, width=480)
    return fig


@fill_doc
def fig_tiv_tertile_hist(
    assigned: pd.DataFrame,
    tiv_col: str = "etiv_ml",
    nbins: int = 30,
    title: str = "TIV distribution in three equal-count bins (paper Figure 2)",
) -> Any:
    """Histogram of TIV coloured by tertile, from :func:`brainsex.tiv.assign_tertiles`.

    Bars are stacked on common bins; hover gives the count of each tertile. Boundaries between tertiles
    are drawn as dotted lines.

    Parameters
    ----------
    assigned : pandas.DataFrame
        Output of :func:`brainsex.tiv.assign_tertiles`: ``tiv_col`` and the ordered categorical
        ``tertile``.
    tiv_col : str, default="etiv_ml"
        %(tiv_col)s
    nbins : int, default=30
        Number of equal-width bins between the smallest and the largest TIV.
    title : str, default="TIV distribution in three equal-count bins (paper Figure 2)"
        %(fig_title)s

    Returns
    -------
    plotly.graph_objects.Figure
    """
    import plotly.graph_objects as go
    from plotly.colors import sample_colorscale

    tiv = pd.to_numeric(assigned[tiv_col], errors="coerce")
    lo, hi = float(tiv.min()), float(tiv.max())
    size = (hi - lo) / max(int(nbins), 1) or 1.0
    cats = list(assigned["tertile"].cat.categories)
    # an ordered, colour-blind safe ramp (low to high TIV) that cannot be mistaken for the sex colours
    colors = sample_colorscale("Viridis", list(np.linspace(0.15, 0.85, len(cats)))) if len(cats) > 1 else ["#009E73"]
    fig = go.Figure()
    for i, cat in enumerate(cats):
        sel = (assigned["tertile"] == cat).to_numpy()
        fig.add_trace(go.Histogram(
            x=tiv[sel], name=f"{cat} ({int(sel.sum())})", marker_color=colors[i],
            xbins={"start": lo, "end": hi + size, "size": size},
            hovertemplate=f"{cat}<br>TIV %{{x}} ml<br>%{{y}} subjects<extra></extra>",
        ))
    for cat in cats[1:]:
        edge = float(tiv[(assigned["tertile"] == cat).to_numpy()].min())
        fig.add_vline(x=edge, line={"dash": "dot", "color": "#555555"})
    fig.update_layout(barmode="stack", title=title, height=420, legend={"title": {"text": "TIV bin (n)"},
                                                                         "traceorder": "normal"})
    fig.update_xaxes(title=f"TIV ({tiv_col}, ml)")
    fig.update_yaxes(title="Subjects")
    return fig


@fill_doc
def fig_prob_vs_tiv(
    predictions: pd.DataFrame,
    tiv_col: str = "etiv_ml",
    prob_col: str = "prob_male",
    threshold: float = 0.5,
    rtiv: tuple[float, float] | None = None,
    curves: Mapping[str, Any] | None = None,
    title: str = "Predicted probability of male against TIV (paper Figure 4)",
) -> Any:
    """Scatter of ``prob_col`` against TIV coloured by true sex, with marginal densities (Figure 4).

    Parameters
    ----------
    predictions : pandas.DataFrame
        The predictions table (``sex``, ``prob_col``, ``tiv_col``; ``participant_id`` shown on hover).
    tiv_col : str, default="etiv_ml"
        %(tiv_col)s
    prob_col : str, default="prob_male"
        %(prob_col)s
    threshold : float, default=0.5
        %(threshold)s
        Drawn as a dashed horizontal line.
    rtiv : (float, float), optional
        (low, high) of R_tiv in ml, shaded when given.
    curves : dict, optional
        Output of :func:`brainsex.tiv.kde_curves`; its KDEs are the top marginal. Without it the top marginal
        is a density-normalised histogram.
    title : str, default="Predicted probability of male against TIV (paper Figure 4)"
        %(fig_title)s

    Returns
    -------
    plotly.graph_objects.Figure
    """
    import plotly.graph_objects as go

    tiv = pd.to_numeric(predictions[tiv_col], errors="coerce")
    prob = pd.to_numeric(predictions[prob_col], errors="coerce")
    ids = predictions["participant_id"].astype(str) if "participant_id" in predictions.columns else predictions.index
    fig = go.Figure()
    for sex in ("F", "M"):
        sel = (predictions["sex"] == sex).to_numpy()
        color, name = SEX_COLORS[sex], _SEX_NAMES[sex]
        fig.add_trace(go.Scatter(
            x=tiv[sel], y=prob[sel], mode="markers", name=name, legendgroup=sex,
            marker={"color": color, "size": 7, "opacity": 0.75, "line": {"width": 0.5, "color": "white"}},
            text=np.asarray(ids)[sel], xaxis="x", yaxis="y",
            hovertemplate="%{text}<br>TIV %{x:.0f} ml<br>P(male) %{y:.3f}<extra>" + name + "</extra>",
        ))
        if curves is not None:
            fig.add_trace(go.Scatter(x=curves["grid"], y=curves[f"density_{'female' if sex == 'F' else 'male'}"],
                                     mode="lines", line={"color": color}, legendgroup=sex, showlegend=False,
                                     xaxis="x", yaxis="y2", hoverinfo="skip"))
        else:
            fig.add_trace(go.Histogram(x=tiv[sel], histnorm="probability density", marker_color=color,
                                       opacity=0.5, legendgroup=sex, showlegend=False, xaxis="x", yaxis="y2",
                                       hoverinfo="skip"))
        fig.add_trace(go.Histogram(y=prob[sel], histnorm="probability density", marker_color=color, opacity=0.5,
                                   ybins={"start": 0, "end": 1.0001, "size": 0.05}, legendgroup=sex,
                                   showlegend=False, xaxis="x2", yaxis="y", hoverinfo="skip"))
    fig.add_shape(type="line", xref="x domain", yref="y", x0=0, x1=1, y0=threshold, y1=threshold,
                  line={"dash": "dash", "color": "#333333"})
    fig.add_annotation(xref="x domain", yref="y", x=0.0, y=threshold, text=f"threshold {threshold:g}",
                       showarrow=False, xanchor="left", yanchor="bottom", font={"size": 10})
    if rtiv is not None:
        fig.add_shape(type="rect", xref="x", yref="y domain", x0=rtiv[0], x1=rtiv[1], y0=0, y1=1,
                      fillcolor="#009E73", opacity=0.12, line={"width": 0}, layer="below")
        fig.add_annotation(xref="x", yref="y domain", x=(rtiv[0] + rtiv[1]) / 2, y=0.99, showarrow=False,
                           text=f"R<sub>tiv</sub> {rtiv[0]:.0f}–{rtiv[1]:.0f} ml", yanchor="top",
                           font={"size": 10}, bgcolor="rgba(255,255,255,0.6)")
    finite = tiv[np.isfinite(tiv)]
    pad = 0.05 * float(finite.max() - finite.min()) if len(finite) else 0.0
    x_range = [float(finite.min()) - pad, float(finite.max()) + pad] if len(finite) else None
    fig.update_layout(
        title=title, height=560, barmode="overlay",
        xaxis={"domain": [0, 0.82], "title": {"text": f"TIV ({tiv_col}, ml)"}, "range": x_range},
        yaxis={"domain": [0, 0.78], "title": {"text": "Predicted probability of male"}, "range": [-0.02, 1.02]},
        xaxis2={"domain": [0.84, 1], "anchor": "y", "showticklabels": False, "title": {"text": "density"}},
        yaxis2={"domain": [0.80, 1], "anchor": "x", "showticklabels": False, "title": {"text": "density"}},
        legend={"title": {"text": "true sex"}},
    )
    return fig


@fill_doc
def fig_kde_overlap(
    curves: Mapping[str, Any],
    tiv_female: Any = None,
    tiv_male: Any = None,
    title: str = "TIV densities by sex and the overlap range R<sub>tiv</sub> (paper Figure 5)",
) -> Any:
    """Both sexes' TIV KDEs, each sex's threshold line and the shaded R_tiv (Figure 5).

    Parameters
    ----------
    curves : dict
        Output of :func:`brainsex.tiv.kde_curves`; without an overlap (``curves["overlap"]`` false) a note
        says there is no R_tiv.
    tiv_female, tiv_male : array-like, optional
        %(tiv_female_male)s
        Drawn as a rug under the curves when given (the book leaves them out for a restricted cohort:
        they would put each subject's TIV in the page).
    title : str, default="TIV densities by sex and the overlap range R<sub>tiv</sub> (paper Figure 5)"
        %(fig_title)s

    Returns
    -------
    plotly.graph_objects.Figure
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    grid = np.asarray(curves["grid"])
    top = max(float(np.max(curves["density_female"])), float(np.max(curves["density_male"])))
    pct = f"{curves['threshold']:.0%}"
    for sex, key in (("F", "female"), ("M", "male")):
        color = SEX_COLORS[sex]
        lo, hi = curves[f"interval_{key}"]
        fig.add_trace(go.Scatter(
            x=grid, y=curves[f"density_{key}"], mode="lines", name=f"{key} (n={curves[f'n_{key}']})",
            line={"color": color, "width": 2}, legendgroup=sex,
            hovertemplate="TIV %{x:.0f} ml<br>density %{y:.2e}<extra>" + key + "</extra>",
        ))
        fig.add_trace(go.Scatter(
            x=[grid[0], grid[-1]], y=[curves[f"level_{key}"]] * 2, mode="lines", legendgroup=sex,
            name=f"{pct} of {key} maximum ({lo:.0f}–{hi:.0f} ml)", line={"color": color, "dash": "dash", "width": 1},
            hoverinfo="skip",
        ))
        raw = tiv_female if sex == "F" else tiv_male
        if raw is not None:
            raw = np.asarray(raw, dtype=float)
            fig.add_trace(go.Scatter(
                x=raw, y=np.full(raw.shape, -0.04 * top if sex == "F" else -0.08 * top), mode="markers",
                marker={"symbol": "line-ns-open", "color": color, "size": 8}, legendgroup=sex, showlegend=False,
                hovertemplate="TIV %{x:.0f} ml<extra>" + key + "</extra>",
            ))
    if curves.get("overlap"):
        low, high = curves["low"], curves["high"]
        fig.add_vrect(x0=low, x1=high, fillcolor="#009E73", opacity=0.15, line_width=0, layer="below",
                      annotation_text=f"R<sub>tiv</sub> = {low:,.0f}–{high:,.0f} ml", annotation_position="top")
    else:
        fig.add_annotation(xref="paper", yref="paper", x=0.5, y=1.0, showarrow=False,
                           text="the two intervals do not overlap: no R<sub>tiv</sub>")
    dens = np.maximum(np.asarray(curves["density_female"]), np.asarray(curves["density_male"]))
    shown = grid[dens >= 0.002 * top]
    pad = 0.03 * float(shown[-1] - shown[0])
    fig.update_xaxes(title="TIV (ml)", range=[float(shown[0]) - pad, float(shown[-1]) + pad])
    fig.update_yaxes(title="Density (per ml)")
    fig.update_layout(title=title, height=500,
                      legend={"orientation": "h", "x": 0.5, "xanchor": "center", "y": -0.2, "yanchor": "top"})
    return fig


# --- saliency and region chapters (paper Figures 3, 6, 7, 8) ----------------------------------

_PLANES = (("axial", 2), ("coronal", 1), ("sagittal", 0))
#: Region colours: the house palette, then Paul Tol's muted colours, so that ten regions stay distinct.
REGION_COLORS = list(PALETTE) + ["#332288", "#882255", "#44AA99", "#117733", "#AA4499", "#DDCC77"]


def _load(obj: Any, name: str) -> tuple[np.ndarray, Any]:
    """Array (and image, or None) from an array or a nibabel image."""
    if obj is None:
        return None, None
    if hasattr(obj, "affine") and hasattr(obj, "get_fdata"):
        return np.asarray(obj.get_fdata(dtype=np.float32)), obj
    arr = np.asarray(obj)
    if arr.ndim != 3:
        raise BrainsexError(f"{name}: expected a 3D volume, got shape {arr.shape}")
    return arr, None


def _to_map_grid(map_data: Any, other: Any, name: str, nearest: bool) -> Any:
    """Put ``other`` on the map's grid: resample when both are images, else require equal shapes."""
    if other is None:
        return None
    is_img = hasattr(other, "affine") and hasattr(other, "get_fdata")
    map_is_img = hasattr(map_data, "affine") and hasattr(map_data, "get_fdata")
    if is_img and map_is_img:
        same = other.shape[:3] == map_data.shape[:3] and np.allclose(other.affine, map_data.affine, atol=1e-5)
        if not same:
            from nilearn.image import resample_to_img

            other = resample_to_img(other, map_data, interpolation="nearest" if nearest else "continuous",
                                    force_resample=True, copy_header=True)
        return other
    arr, _ = _load(other, name)
    if arr.shape[:3] != tuple(map_data.shape[:3]):
        raise BrainsexError(f"{name}: shape {arr.shape} differs from the map's {tuple(map_data.shape)}; "
                            "pass nibabel images to resample")
    if map_is_img:  # same grid as the map: give it the map's affine so both are reoriented alike
        import nibabel as nib

        return nib.Nifti1Image(arr, map_data.affine)
    return arr


def _canonical(obj: Any) -> np.ndarray | None:
    """Data in RAS+ orientation (nibabel's closest canonical) when ``obj`` is an image."""
    if obj is None:
        return None
    if hasattr(obj, "affine") and hasattr(obj, "get_fdata"):
        import nibabel as nib

        obj = nib.as_closest_canonical(obj)
        data = np.asarray(obj.get_fdata(dtype=np.float32))
        return data[..., 0] if data.ndim == 4 else data
    return np.asarray(obj)


def _slice(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A 2D slice oriented for display (rows bottom-up: superior / anterior up, right to the right)."""
    return np.take(vol, index, axis=axis).T


def _outline(labels2d: np.ndarray) -> np.ndarray:
    """Keep only the boundary voxels of each label in a 2D label slice (4-neighbourhood)."""
    lab = labels2d
    pad = np.pad(lab, 1, mode="edge")
    inner = ((pad[1:-1, :-2] == lab) & (pad[1:-1, 2:] == lab) & (pad[:-2, 1:-1] == lab) & (pad[2:, 1:-1] == lab))
    return np.where((lab > 0) & ~inner, lab, 0)


def _viewer_volumes(map_data: Any, background: Any, regions: Any,
                    max_size: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The viewer's map, background and regions on one RAS+ grid, at most ``max_size`` voxels a side."""
    from scipy import ndimage

    if not (hasattr(map_data, "affine") and hasattr(map_data, "get_fdata")):
        map_data = np.asarray(map_data)
    bg_obj = _to_map_grid(map_data, background, "background", nearest=False)
    reg_obj = _to_map_grid(map_data, regions, "regions", nearest=True)
    m = _canonical(map_data).astype(np.float32)
    if m.ndim != 3:
        raise BrainsexError(f"map_data: expected a 3D map, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise BrainsexError("map_data: contains NaN or infinite values")
    bg = _canonical(bg_obj)
    reg = _canonical(reg_obj)

    factor = min(1.0, max_size / max(m.shape))
    if factor < 1.0:
        m = ndimage.zoom(m, factor, order=1)
        bg = ndimage.zoom(bg.astype(np.float32), factor, order=1) if bg is not None else None
        reg = ndimage.zoom(np.rint(reg).astype(np.int32), factor, order=0) if reg is not None else None
    return m, bg, reg


def _viewer_regions(reg: np.ndarray | None, region_names: Mapping[int, str] | None
                    ) -> tuple[np.ndarray | None, list[int], list[list[Any]] | None]:
    """Region labels renumbered 1..K in legend order, their ids and a discrete colour scale (None: none)."""
    # region ids -> 1..K for a discrete colour scale
    reg_ids: list[int] = []
    if reg is not None:
        reg = np.rint(reg).astype(np.int64)
        present = [int(v) for v in np.unique(reg) if v != 0]
        reg_ids = [int(k) for k in region_names if int(k) in present] if region_names else present
        reg_ids += [r for r in present if r not in reg_ids]
        dense = np.zeros(reg.shape, dtype=np.uint8)
        for i, r in enumerate(reg_ids):
            dense[reg == r] = i + 1
        reg = dense
    k_reg = len(reg_ids)
    reg_scale = None
    if k_reg:
        colors = [REGION_COLORS[i % len(REGION_COLORS)] for i in range(k_reg)]
        reg_scale = [[0.0, "rgba(0,0,0,0)"], [0.5 / (k_reg + 0.5), "rgba(0,0,0,0)"]]
        for i, c in enumerate(colors):
            lo_, hi_ = (i + 0.5) / (k_reg + 0.5), min((i + 1.5) / (k_reg + 0.5), 1.0)
            reg_scale += [[lo_, c], [hi_, c]]
    return reg, reg_ids, reg_scale


def _viewer_plane(fig: Any, col: int, plane: str, axis: int, extent: np.ndarray, n_slices: int,
                  layers: dict[str, Any]) -> dict[str, Any]:
    """Add one plane's slice traces (one slice visible) to :func:`fig_slice_viewer`'s figure; its slider."""
    import plotly.graph_objects as go

    bg_u8, shown, reg, k_reg = layers["bg_u8"], layers["shown"], layers["reg"], layers["k_reg"]
    other = tuple(a for a in range(3) if a != axis)
    nonempty = np.flatnonzero(extent.any(axis=other))
    lo_i, hi_i = (int(nonempty[0]), int(nonempty[-1])) if nonempty.size else (0, shown.shape[axis] - 1)
    idx = np.unique(np.linspace(lo_i, hi_i, min(n_slices, hi_i - lo_i + 1)).round().astype(int))
    start = int(np.argmin(np.abs(idx - (lo_i + hi_i) / 2)))
    trace_ids = []
    per_slice = []
    for s_i, s in enumerate(idx):
        visible = s_i == start
        ids = []
        if bg_u8 is not None:
            fig.add_trace(go.Heatmap(z=_slice(bg_u8, axis, s), colorscale="gray", zmin=0, zmax=255,
                                     showscale=False, hoverinfo="skip", visible=visible), row=1, col=col)
            ids.append(len(fig.data) - 1)
        fig.add_trace(go.Heatmap(
            z=_slice(shown, axis, s).astype(np.float32), colorscale=layers["colorscale"],
            zmin=layers["bottom"], zmax=layers["top"],
            showscale=(col == 3), colorbar={"title": {"text": "value"}, "len": 0.8},  # one visible at a time
            hovertemplate=f"{plane} slice {s}<br>value %{{z:.3f}}<extra></extra>", visible=visible,
        ), row=1, col=col)
        ids.append(len(fig.data) - 1)
        if k_reg:
            fig.add_trace(go.Heatmap(z=_outline(_slice(reg, axis, s)).astype(np.uint8),
                                     colorscale=layers["reg_scale"], zmin=0, zmax=k_reg, showscale=False,
                                     hoverinfo="skip", visible=visible),
                          row=1, col=col)
            ids.append(len(fig.data) - 1)
        per_slice.append(ids)
        trace_ids += ids
    steps = []
    for s_i, s in enumerate(idx):
        vis = [tid in per_slice[s_i] for tid in trace_ids]
        steps.append({"method": "restyle", "label": str(int(s)), "args": [{"visible": vis}, trace_ids]})
    x0 = (col - 1) / 3
    fig.update_xaxes(visible=False, constrain="domain", row=1, col=col)
    fig.update_yaxes(visible=False, scaleanchor=f"x{'' if col == 1 else col}", row=1, col=col)
    return {"active": start, "steps": steps, "x": x0 + 0.01, "len": 1 / 3 - 0.03, "y": 0,
            "yanchor": "top", "pad": {"t": 30}, "currentvalue": {"prefix": f"{plane} slice "},
            "font": {"size": 9}}


@fill_doc
def fig_slice_viewer(
    map_data: Any,
    background: Any = None,
    regions: Any = None,
    region_names: Mapping[int, str] | None = None,
    title: str = "Average saliency map",
    threshold: float | None = 0.1,
    vmax: float | None = None,
    colorscale: str = "Jet",
    max_size: int = 48,
    n_slices: int = 20,
    height: int = 430,
) -> Any:
    """Interactive three-plane viewer of a map over a background, one slider per plane.

    Parameters
    ----------
    map_data : nibabel.Nifti1Image or numpy.ndarray
        The map (a 3D image or array, finite values). Images are shown in RAS+ orientation; arrays are
        assumed to be RAS+ already (i: left -> right, j: posterior -> anterior, k: inferior -> superior).
    background : nibabel.Nifti1Image or numpy.ndarray, optional
        Template / anatomical image or array (resampled to the map's grid when both are images, else of
        the map's shape), drawn in grey under the map.
    regions : nibabel.Nifti1Image or numpy.ndarray, optional
        Integer label image/array (e.g. the atlas restricted to the top-10 regions, Figure 7), drawn as
        coloured outlines (resampled by nearest neighbour when both are images).
    region_names : mapping of int to str, optional
        Label id -> legend name; its order is the order of the legend (and of the colours), labels it
        lacks come after under their number.
    title : str, default="Average saliency map"
        %(fig_title)s
    threshold : float or None, default=0.1
        Map values at or below it are transparent (None: show every value).
    vmax : float, optional
        Top of the colour scale (default: the map's maximum, or 1 when the map has no positive value).
    colorscale : str, default="Jet"
        Plotly colour scale of the map (the paper uses blue -> red, "Jet").
    max_size : int, default=48
        The volume is downsampled so that its longest side has at most this many voxels (at least 4).
    n_slices : int, default=20
        Slices per plane offered by each slider (evenly spaced where the map or the background is non-zero).
    height : int, default=430
        Figure height in pixels.

    Returns
    -------
    plotly.graph_objects.Figure

    Raises
    ------
    BrainsexError
        For ``max_size < 4`` or ``n_slices < 1``, a map that is not 3D or has non-finite values, or an
        array background or regions whose shape differs from the map's.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if max_size < 4 or n_slices < 1:
        raise BrainsexError(f"max_size={max_size}, n_slices={n_slices}: need max_size >= 4 and n_slices >= 1")
    m, bg, reg = _viewer_volumes(map_data, background, regions, max_size)

    top = float(vmax if vmax is not None else (m.max() if m.max() > 0 else 1.0))
    bottom = float(min(0.0, m.min()))
    shown = m.copy()
    if threshold is not None:
        shown[shown <= threshold] = np.nan
    bg_u8 = None
    if bg is not None:
        lo, hi = np.percentile(bg, [1, 99.5])
        bg_u8 = np.clip((bg - lo) / (hi - lo if hi > lo else 1.0) * 255, 0, 255).astype(np.uint8)
    reg, reg_ids, reg_scale = _viewer_regions(reg, region_names)
    k_reg = len(reg_ids)
    layers = {"bg_u8": bg_u8, "shown": shown, "reg": reg, "k_reg": k_reg, "reg_scale": reg_scale,
              "colorscale": colorscale, "bottom": bottom, "top": top}

    extent = (np.abs(m) > 0) | (bg > 0 if bg is not None else False)
    fig = make_subplots(rows=1, cols=3, subplot_titles=[p for p, _ in _PLANES], horizontal_spacing=0.04)
    sliders = [_viewer_plane(fig, col, plane, axis, extent, n_slices, layers)
               for col, (plane, axis) in enumerate(_PLANES, start=1)]
    for i, r in enumerate(reg_ids):
        name = (region_names or {}).get(r, str(r))
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name, showlegend=True,
                                 marker={"color": REGION_COLORS[i % len(REGION_COLORS)], "size": 10, "symbol": "square"}))
    fig.update_layout(title=title, height=height, sliders=sliders, margin={"l": 10, "r": 10, "t": 60, "b": 90},
                      plot_bgcolor="black" if bg is not None else "white",
                      legend={"orientation": "h", "y": -0.45} if k_reg else None)
    return fig


@fill_doc
def fig_top_regions(
    scores: pd.DataFrame,
    k: int = 10,
    value: str = "weighted_score",
    highlight: Iterable[int] | None = None,
    title: str | None = None,
) -> Any:
    """Horizontal bar chart of the ``k`` best regions of a :func:`brainsex.atlas.region_scores` table.

    Bars are labelled with the score as a percentage (as in the paper's Figure 7); ``highlight`` (e.g.
    the planted regions of the phantom) colours those labels differently.

    Parameters
    ----------
    scores : pandas.DataFrame
        A region scores table with ``label``, ``name`` and ``value`` (``hemisphere`` is added to a name
        that lacks it; ``saliency_score``, ``mean_saliency_norm`` and ``n_voxels`` are shown on hover).
    k : int, default=10
        Regions shown (at least 1), the best at the top.
    value : str, default="weighted_score"
        The column that ranks the regions and sets the bars' length.
    highlight : iterable of int, optional
        Atlas labels whose bars are drawn in another colour.
    title : str, optional
        %(fig_title)s
        Default: "Top <k> regions by <value>".

    Returns
    -------
    plotly.graph_objects.Figure

    Raises
    ------
    BrainsexError
        When ``scores`` is not a table with those columns, or ``k < 1``.
    """
    import plotly.graph_objects as go

    need = {"label", "name", value}
    if not isinstance(scores, pd.DataFrame) or need - set(scores.columns):
        raise BrainsexError(f"scores: expected a region_scores table with columns {sorted(need)}")
    if k < 1:
        raise BrainsexError(f"k={k}: must be >= 1")
    top = scores.sort_values(value, ascending=False, kind="mergesort").head(k).iloc[::-1]
    hl = set(int(h) for h in highlight) if highlight is not None else set()
    colors = [PALETTE[5] if int(lab) in hl else PALETTE[0] for lab in top["label"]]
    names = [f"{n} ({h})" if "hemisphere" in top.columns and isinstance(h, str) and h and h not in str(n) else str(n)
             for n, h in zip(top["name"], top.get("hemisphere", pd.Series([""] * len(top))), strict=True)]
    extra = []
    for _, row in top.iterrows():
        parts = [f"{c}: {row[c]:.3f}" for c in ("saliency_score", "mean_saliency_norm", "n_voxels")
                 if c in top.columns and pd.notna(row[c])]
        extra.append("<br>".join(parts))
    fig = go.Figure(go.Bar(
        x=top[value], y=names, orientation="h", marker_color=colors,
        text=[f"{v:.0%}" for v in top[value]], textposition="auto",
        hovertext=[f"{n}<br>{value}: {v:.3f}<br>{e}" for n, v, e in zip(names, top[value], extra, strict=True)],
        hoverinfo="text",
    ))
    fig.update_layout(title=title or f"Top {len(top)} regions by {value.replace('_', ' ')}",
                      xaxis_title=value.replace("_", " "), height=max(260, 28 * len(top) + 110),
                      margin={"l": 10, "r": 10, "t": 50, "b": 40})
    return fig


def plot_map_static(
    map_img: Any,
    bg_img: Any = None,
    title: str | None = None,
    cut_coords: int | Sequence[float] = 6,
    display_mode: str = "z",
    threshold: float | None = 0.1,
    vmax: float | None = None,
    cmap: str = "jet",
    regions_img: Any = None,
    region_colors: Sequence[str] | None = None,
    output_file: Any = None,
    **kwargs: Any,
) -> Any:
    """Static nilearn figure of a map over a template (paper Figures 3, 6, 7, 8).

    :func:`nilearn.plotting.plot_stat_map` with axial cuts by default, a colour bar and no symmetric
    colour scale. ``regions_img`` (a label image, e.g. the top-10 regions) adds one contour per label.

    Parameters
    ----------
    map_img : nibabel.Nifti1Image or str
        The map, an image or the path of a NIfTI file.
    bg_img : nibabel.Nifti1Image or str, optional
        The background; default: nilearn's own (its MNI152 template).
    title : str, optional
        Title written on the figure.
    cut_coords : int or sequence of float, default=6
        A number of cuts or their positions in mm (``plot_stat_map``'s ``cut_coords``).
    display_mode : str, default="z"
        Direction of the cuts (``"z"``: axial; ``plot_stat_map``'s ``display_mode``).
    threshold : float or None, default=0.1
        Values whose absolute value is below it are transparent (None: no threshold).
    vmax : float, optional
        Top of the colour scale (default: the map's largest absolute value).
    cmap : str, default="jet"
        Matplotlib colour map (blue for low, red for high, as in the paper).
    regions_img : nibabel.Nifti1Image, optional
        Integer label image; each non-zero label gets a contour.
    region_colors : sequence of str, optional
        Contour colours in the order of the sorted labels, reused cyclically (default
        :data:`REGION_COLORS`).
    output_file : str or path-like, optional
        Save the figure there and close it.
    **kwargs
        Passed to :func:`nilearn.plotting.plot_stat_map`.

    Returns
    -------
    nilearn display or None
        The nilearn slicer of ``display_mode`` (``ZSlicer`` by default); ``None`` when ``output_file``
        is given (the figure is saved and closed).

    Raises
    ------
    BrainsexError
        When ``map_img`` is neither an image nor a path.
    """
    from nilearn import plotting
    from nilearn.image import math_img

    if not (hasattr(map_img, "affine") or isinstance(map_img, str)):
        raise BrainsexError("map_img: expected a nibabel image or a NIfTI path")
    kw = {"bg_img": bg_img} if bg_img is not None else {}
    display = plotting.plot_stat_map(
        map_img, display_mode=display_mode, cut_coords=cut_coords, threshold=threshold, vmax=vmax, cmap=cmap,
        symmetric_cbar=False, title=title, colorbar=True, draw_cross=False, annotate=True,
        output_file=None, **kw, **kwargs)
    if regions_img is not None:
        data = np.rint(np.asarray(regions_img.dataobj)).astype(int)
        ids = [int(v) for v in np.unique(data) if v != 0]
        colors = list(region_colors) if region_colors else REGION_COLORS
        for i, r in enumerate(ids):
            display.add_contours(math_img(f"img == {r}", img=regions_img), levels=[0.5],
                                 colors=[colors[i % len(colors)]], linewidths=1.2)
    if output_file is not None:
        display.savefig(str(output_file))
        display.close()
        return None
    return display


# --- cohort chapter (paper Table 1) -------------------------------------------------------------


def fig_cohort_composition(participants: pd.DataFrame) -> Any:
    """Subjects per dataset by sex, vendor and field strength (the paper's Table 1 as bars).

    Parameters
    ----------
    participants : pandas.DataFrame
        One row per subject with ``dataset``, ``sex``, ``vendor`` and ``field`` (tesla; missing:
        "unknown").

    Returns
    -------
    plotly.graph_objects.Figure
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    p = participants.copy()
    p["field_label"] = p["field"].map(lambda f: f"{float(f):g} T" if pd.notna(f) else "unknown")
    fig = make_subplots(rows=1, cols=3, subplot_titles=("sex", "vendor", "field strength"), shared_yaxes=True)
    panels = (("sex", {"F": SEX_COLORS["F"], "M": SEX_COLORS["M"]}), ("vendor", None), ("field_label", None))
    for col_i, (col, colors) in enumerate(panels, start=1):
        counts = p.groupby(["dataset", col]).size().unstack(fill_value=0)
        for j, level in enumerate(counts.columns):
            color = (colors or {}).get(level, PALETTE[(j + 2 * col_i) % len(PALETTE)])
            fig.add_trace(go.Bar(y=counts.index.astype(str), x=counts[level], name=f"{level}", orientation="h",
                                 marker_color=color, legendgroup=col, legendgrouptitle_text=col.split("_")[0]),
                          row=1, col=col_i)
    fig.update_layout(barmode="stack", title="Subjects per dataset", height=360, margin={"t": 70})
    fig.update_xaxes(title_text="subjects")
    return fig


def fig_age_by_dataset(participants: pd.DataFrame) -> Any:
    """Age distributions per dataset and sex (box plots, outliers drawn as points).

    Parameters
    ----------
    participants : pandas.DataFrame
        One row per subject with ``dataset``, ``sex`` (``F``, ``M``) and ``age`` (years).

    Returns
    -------
    plotly.graph_objects.Figure
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    for sex, name in (("F", "female"), ("M", "male")):
        s = participants[participants["sex"] == sex]
        fig.add_trace(go.Box(x=s["dataset"], y=s["age"], name=name, marker_color=SEX_COLORS[sex],
                             boxpoints="outliers"))
    fig.update_layout(boxmode="group", title="Age by dataset and sex", yaxis_title="age (years)", height=380)
    return fig


@fill_doc
def fig_tiv_by_sex(participants: pd.DataFrame, tiv_col: str = "tiv_ml", title: str | None = None) -> Any:
    """Overlaid histograms of TIV by sex (up to 40 bins each).

    Parameters
    ----------
    participants : pandas.DataFrame
        One row per subject with ``sex`` (``F``, ``M``) and ``tiv_col``.
    tiv_col : str, default="tiv_ml"
        Column of the TIV in ml (``tiv_ml``: a phantom's true TIV).
    title : str, optional
        %(fig_title)s
        Default: "Total intracranial volume by sex".

    Returns
    -------
    plotly.graph_objects.Figure
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    for sex, name in (("F", "female"), ("M", "male")):
        fig.add_trace(go.Histogram(x=participants.loc[participants["sex"] == sex, tiv_col], name=name,
                                   marker_color=SEX_COLORS[sex], opacity=0.6, nbinsx=40))
    fig.update_layout(barmode="overlay", title=title or "Total intracranial volume by sex",
                      xaxis_title="TIV (ml)", yaxis_title="subjects", height=360)
    return fig


# --- preprocessing chapter (QC) -------------------------------------------------------------------


@fill_doc
def fig_qc_mosaic(
    slices: Sequence[np.ndarray],
    names: Sequence[str],
    flagged: Sequence[bool] | None = None,
    ncols: int = 8,
    title: str = "Registered brains, mid-axial slice (red titles: flagged by low similarity)",
) -> Any:
    """A mosaic of 2D slices (one per subject) as small heatmaps; flagged subjects get red titles.

    Parameters
    ----------
    slices : sequence of numpy.ndarray
        One 2D slice per subject, x by y (:func:`brainsex.preprocess.qc_mosaic_slices`).
    names : sequence of str
        The subjects' titles, one per slice.
    flagged : sequence of bool, optional
        Per slice, whether its title is drawn red (default: none).
    ncols : int, default=8
        Slices per row.
    title : str, default="Registered brains, mid-axial slice (red titles: flagged by low similarity)"
        %(fig_title)s

    Returns
    -------
    plotly.graph_objects.Figure

    Raises
    ------
    BrainsexError
        When ``slices`` is empty.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n = len(slices)
    if n == 0:
        raise BrainsexError("fig_qc_mosaic: no slices to show")
    flagged = list(flagged) if flagged is not None else [False] * n
    nrows = int(np.ceil(n / ncols))
    titles = [f"<span style='color:{'#D55E00' if f else '#444'}'>{nm}</span>" for nm, f in
              zip(names, flagged, strict=True)]
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=titles, horizontal_spacing=0.01,
                        vertical_spacing=0.06 / max(nrows, 1) + 0.02)
    for i, sl in enumerate(slices):
        r, c = divmod(i, ncols)
        fig.add_trace(go.Heatmap(z=np.asarray(sl, dtype=np.float32).T, colorscale="Gray", showscale=False,
                                 hoverinfo="skip"), row=r + 1, col=c + 1)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, scaleanchor="x")
    fig.update_annotations(font_size=9)
    fig.update_layout(title=title, height=140 * nrows + 80, margin={"l": 5, "r": 5, "t": 70, "b": 5})
    return fig


def fig_tiv_agreement(table: pd.DataFrame, x: str = "tiv_ml", y: str = "etiv_ml",
                      x_title: str = "true TIV (ml)", y_title: str = "estimated TIV (ml)") -> Any:
    """Scatter of one TIV estimate against another, coloured by sex, with the identity line.

    Parameters
    ----------
    table : pandas.DataFrame
        One row per subject with ``x``, ``y`` and ``sex`` (``F``, ``M``); ``participant_id`` is shown on
        hover when present.
    x, y : str, default="tiv_ml", "etiv_ml"
        Columns on the horizontal and the vertical axis.
    x_title, y_title : str, default="true TIV (ml)", "estimated TIV (ml)"
        Axis titles (the figure's title is "<y_title> against <x_title>").

    Returns
    -------
    plotly.graph_objects.Figure
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    both = table[[x, y]].dropna()
    if len(both):
        lo, hi = float(both.min().min()), float(both.max().max())
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="identity",
                                 line={"color": "#999999", "dash": "dash"}, hoverinfo="skip"))
    for sex, name in (("F", "female"), ("M", "male")):
        s = table[table["sex"] == sex]
        fig.add_trace(go.Scatter(x=s[x], y=s[y], mode="markers", name=name, text=s.get("participant_id"),
                                 marker={"color": SEX_COLORS[sex], "size": 6, "opacity": 0.7}))
    fig.update_layout(title=f"{y_title} against {x_title}", xaxis_title=x_title, yaxis_title=y_title, height=420)
    return fig


def fig_step_times(qc: pd.DataFrame, steps: Sequence[str] = ("t_load_s", "t_strip_s", "t_rigid_s", "t_zscore_s",
                                                            "t_etiv_s", "t_write_s")) -> Any:
    """Median seconds per preprocessing step (bars) over the subjects that ran.

    Parameters
    ----------
    qc : pandas.DataFrame
        ``qc.tsv`` rows (:attr:`brainsex.run.PreprocessDir.qc`) of the subjects to summarise.
    steps : sequence of str, default=("t_load_s", "t_strip_s", "t_rigid_s", "t_zscore_s", "t_etiv_s", "t_write_s")
        Step-time columns (``t_<step>_s``), in the order of the bars; those ``qc`` lacks are left out.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    import plotly.graph_objects as go

    cols = [s for s in steps if s in qc.columns]
    med = qc[cols].median(numeric_only=True)
    fig = go.Figure(go.Bar(x=[c[2:-2] for c in med.index], y=med.to_numpy(), marker_color=PALETTE[0],
                           text=[f"{v:.2f} s" for v in med.to_numpy()], textposition="outside"))
    fig.update_layout(title="Median time per preprocessing step and subject", yaxis_title="seconds", height=340)
    return fig


@fill_doc
def fig_tbm_coefficients(coef: pd.DataFrame, names: Sequence[str] | pd.Series | None = None,
                         title: str = "Male − female difference in mean log-Jacobian of each planted region") -> Any:
    """Grouped bars: each planted region's TIV-adjusted sex difference, one bar per morphometry version.

    Parameters
    ----------
    coef : pandas.DataFrame
        Planted regions (rows) x versions (columns), as :attr:`brainsex.validity.PositiveControl.coef`.
    names : sequence of str or pandas.Series, optional
        Region names in the order of ``coef``'s rows (default: the index).
    title : str, default="Male − female difference in mean log-Jacobian of each planted region"
        %(fig_title)s

    Returns
    -------
    plotly.graph_objects.Figure
    """
    import plotly.graph_objects as go

    x = [str(n) for n in (names if names is not None else coef.index)]
    fig = go.Figure([go.Bar(x=x, y=coef[c], name=str(c)) for c in coef.columns])
    fig.update_layout(barmode="group", title=title, yaxis_title="coefficient of male (TIV-adjusted)", height=460,
                      margin={"l": 10, "r": 10, "t": 50, "b": 120}, legend={"orientation": "h", "y": -0.45})
    return fig


# --- aggregate views for restricted cohorts (see brainsex.privacy) ---------------------------------


@fill_doc
def fig_binned_histogram(groups: Mapping[str, pd.DataFrame], title: str, x_title: str,
                         colors: Mapping[str, str] | None = None, k: int | None = None) -> Any:
    """Histogram bars drawn from pre-binned counts (:func:`brainsex.privacy.binned_counts`), one trace per group.

    The page carries only the counts, never the subjects' values; suppressed bins (1 to ``k - 1``
    subjects) are drawn as hatched grey placeholders and named in the legend.

    Parameters
    ----------
    groups : mapping of str to pandas.DataFrame
        Group name -> binned counts (``left``, ``right``, ``center``, ``n``, ``suppressed``), drawn
        overlaid.
    title, x_title : str
        Figure and x-axis titles.
    colors : mapping of str to str, optional
        Group name -> colour (default: :data:`PALETTE` in order).
    k : int, optional
        %(k_shown)s

    Returns
    -------
    plotly.graph_objects.Figure
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    any_suppressed = False
    for i, (name, b) in enumerate(groups.items()):
        color = (colors or {}).get(name, PALETTE[i % len(PALETTE)])
        width = (b["right"] - b["left"]).to_numpy()
        fig.add_trace(go.Bar(x=b["center"], y=b["n"], width=width, name=str(name), marker_color=color, opacity=0.6,
                             hovertemplate=f"{name}<br>%{{x:.0f}}: %{{y}} subjects<extra></extra>"))
        sup = b[b["suppressed"]]
        if len(sup):
            any_suppressed = True
            fig.add_trace(go.Bar(x=sup["center"], y=[1] * len(sup), width=(sup["right"] - sup["left"]).to_numpy(),
                                 name=f"{name}: suppressed (< {k} subjects)", marker_color="#BBBBBB",
                                 marker_pattern_shape="/", hoverinfo="skip"))
    fig.update_layout(barmode="overlay", title=title, xaxis_title=x_title, yaxis_title="subjects", height=380)
    if any_suppressed:
        fig.add_annotation(xref="paper", yref="paper", x=0, y=1.08, showarrow=False, xanchor="left",
                           text=f"grey bins: fewer than {k} subjects, count suppressed", font={"size": 10})
    return fig


@fill_doc
def fig_binned_scatter(binned: Mapping[str, Any], x_title: str, y_title: str, title: str, k: int | None = None,
                       identity: bool = False, hline: float | None = None) -> Any:
    """The public form of a scatter plot: subjects counted per cell (:func:`brainsex.privacy.binned_counts_2d`).

    Cells with 1 to ``k - 1`` subjects are blank; the title says how many subjects they hold.

    Parameters
    ----------
    binned : dict
        Output of :func:`brainsex.privacy.binned_counts_2d` (``x_edges``, ``y_edges``, ``counts``,
        ``n_suppressed``).
    x_title, y_title, title : str
        Axis and figure titles.
    k : int, optional
        %(k_shown)s
    identity : bool, default=False
        Draw the line y = x.
    hline : float, optional
        Draw a dashed horizontal line there (a decision threshold).

    Returns
    -------
    plotly.graph_objects.Figure
    """
    import plotly.graph_objects as go

    xe, ye = np.asarray(binned["x_edges"]), np.asarray(binned["y_edges"])
    fig = go.Figure(go.Heatmap(x=(xe[:-1] + xe[1:]) / 2, y=(ye[:-1] + ye[1:]) / 2,
                               z=np.asarray(binned["counts"]).T, colorscale="Blues", colorbar={"title": "subjects"},
                               hovertemplate="%{x:.0f}, %{y:.2f}: %{z} subjects<extra></extra>"))
    if identity:
        lo, hi = float(min(xe[0], ye[0])), float(max(xe[-1], ye[-1]))
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="identity",
                                 line={"color": "#999999", "dash": "dash"}, hoverinfo="skip"))
    if hline is not None:
        fig.add_hline(y=hline, line={"dash": "dash", "color": "#333333"})
    note = (f" ({binned['n_suppressed']} subjects in cells of fewer than {k}: blank)"
            if binned.get("n_suppressed") else "")
    fig.update_layout(title=f"{title}{note}", xaxis_title=x_title, yaxis_title=y_title, height=440)
    return fig


@fill_doc
def fig_qc_summary(mean: np.ndarray | None, sd: np.ndarray | None, n: int, note: str = "",
                   title: str = "Registered brains, mid-axial slice: mean and standard deviation") -> Any:
    """Mean and SD of the registered brains side by side (the QC view of a restricted cohort).

    Parameters
    ----------
    mean, sd : numpy.ndarray or None
        2D arrays (x by y) from :func:`brainsex.privacy.qc_aggregate`; ``None`` when suppressed.
    n : int
        Number of subjects averaged (in the left panel's title).
    note : str, default=""
        Shown instead of the images when they are suppressed (default: "suppressed").
    title : str, default="Registered brains, mid-axial slice: mean and standard deviation"
        %(fig_title)s

    Returns
    -------
    plotly.graph_objects.Figure
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"mean (n = {n})", "standard deviation"),
                        horizontal_spacing=0.08)
    if mean is None or sd is None:
        fig.add_annotation(xref="paper", yref="paper", x=0.5, y=0.5, text=note or "suppressed", showarrow=False)
    else:
        fig.add_trace(go.Heatmap(z=np.asarray(mean).T, colorscale="Gray", colorbar={"x": 0.45, "title": "mean"},
                                 hoverinfo="skip"), row=1, col=1)
        fig.add_trace(go.Heatmap(z=np.asarray(sd).T, colorscale="Viridis", colorbar={"title": "SD"},
                                 hoverinfo="skip"), row=1, col=2)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, scaleanchor="x")
    fig.update_layout(title=title, height=420)
    return fig


def fig_box_summary(stats: pd.DataFrame, x: str, title: str, y_title: str) -> Any:
    """Box plots drawn from quantiles only (no subject's value), one box per row of ``stats``.

    Parameters
    ----------
    stats : pandas.DataFrame
        Columns ``x``, ``sex``, ``q10``, ``q25``, ``median``, ``q75``, ``q90``, ``n`` (rows with a
        missing ``median`` are suppressed groups and left out). The whiskers end at ``q10`` and ``q90``.
    x : str
        The grouping column drawn on the x axis.
    title, y_title : str
        Figure and y-axis titles.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    for sex, name in (("F", "female"), ("M", "male")):
        s = stats[(stats["sex"] == sex) & stats["median"].notna()]
        fig.add_trace(go.Box(x=s[x].astype(str), q1=s["q25"], median=s["median"], q3=s["q75"], lowerfence=s["q10"],
                             upperfence=s["q90"], name=name, marker_color=SEX_COLORS[sex], boxpoints=False))
    fig.update_layout(boxmode="group", title=title, yaxis_title=y_title, height=380)
    return fig


@fill_doc
def fig_precision_at_k(table: pd.DataFrame, k: int = 10, alpha: float = 0.05,
                       title: str | None = None) -> Any:
    """Horizontal bars: precision@k of every ranking, with its chance level as a tick.

    Parameters
    ----------
    table : pandas.DataFrame
        One row per ranking with ``label``, ``observed``, ``chance`` and ``p_value`` (the
        ``precision_at_k`` rows of :func:`brainsex.validity.report_long`, as the validity chapter makes them).
    k : int, default=10
        The k of precision@k (for the titles).
    alpha : float, default=0.05
        Rankings with ``p_value < alpha`` are drawn dark, the others light.
    title : str, optional
        %(fig_title)s
        Default: says what is drawn.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_bar(x=table["observed"], y=table["label"], orientation="h", name="observed",
                marker_color=np.where(table["p_value"] < alpha, "#1f77b4", "#aec7e8"))
    fig.add_scatter(x=table["chance"], y=table["label"], mode="markers", name="chance level",
                    marker={"symbol": "line-ns-open", "size": 18, "color": "black", "line": {"width": 3}})
    fig.update_layout(
        title=title or f"Precision@{k}: planted regions among the {k} top-ranked (dark: p < {alpha:g})",
        xaxis={"title": f"precision@{k}", "range": [0, 1.02]}, yaxis={"autorange": "reversed"},
        height=140 + 32 * len(table), margin={"l": 10, "r": 10, "t": 50, "b": 40})
    return fig


def fig_model_reliance(table: pd.DataFrame, title: str | None = None) -> Any:
    """Horizontal bars: the model's mean logit change per counterfactual factor, with bootstrap CIs.

    Parameters
    ----------
    table : pandas.DataFrame
        ``factor``, ``region``, ``delta_logit``, ``ci_low``, ``ci_high``, ``n_scans``
        (:func:`brainsex.reliance.model_reliance`'s table). One bar per row, labelled by the region for
        the one-region rows and by the factor otherwise; colours by kind (head size, planted
        regions, age, everything together).
    title : str, optional
        Figure title (default: says what is drawn and the sign convention).
    """
    import plotly.graph_objects as go

    need = {"factor", "region", "delta_logit", "ci_low", "ci_high", "n_scans"}
    if not need <= set(table.columns):
        raise BrainsexError(f"fig_model_reliance: the table lacks {sorted(need - set(table.columns))}")
    region = table["region"].fillna("").astype(str)
    labels = np.where(region != "", "region: " + region, table["factor"].astype(str))

    def kind(factor: str) -> str:
        f = factor.lower()
        return ("age" if f.startswith("age") else "size" if "size" in f else
                "everything" if "differences" in f else "regions")

    colours = {"size": "#d62728", "regions": "#1f77b4", "age": "#2ca02c", "everything": "#7f7f7f"}
    kinds = [kind(f) for f in table["factor"].astype(str)]
    d = table["delta_logit"].to_numpy(float)
    fig = go.Figure()
    fig.add_bar(x=d, y=labels, orientation="h", marker_color=[colours[k] for k in kinds],
                error_x={"type": "data", "symmetric": False, "array": table["ci_high"].to_numpy(float) - d,
                         "arrayminus": d - table["ci_low"].to_numpy(float)},
                hovertext=[f"n = {n} scans" for n in table["n_scans"]], showlegend=False)
    fig.add_vline(x=0, line_color="black", line_width=1)
    n = int(table["n_scans"].max()) if len(table) else 0
    fig.update_layout(
        title=title or f"Change of the model's logit when one factor is switched ({n} test scans; "
                       "positive: towards the other sex)",
        xaxis={"title": "mean change of the logit (95 % bootstrap CI)"}, yaxis={"autorange": "reversed"},
        height=140 + 26 * len(table), margin={"l": 10, "r": 10, "t": 50, "b": 40})
    return fig


#: Display names of the phantoms of :func:`brainsex.validity.size_experiments`.
SIZE_PHANTOM_NAMES = {"default": "run's phantom (size + regions)", "size_only": "size only",
                      "regions_only": "regions only"}


def fig_size_experiments(table: pd.DataFrame, metric: str = "balanced_accuracy", chance: float = 0.5,
                         title: str | None = None) -> Any:
    """Grouped bars with 95 % CIs: one metric of each phantom's model, overall and inside R_tiv.

    Parameters
    ----------
    table
        The size-experiments table (:func:`brainsex.validity.size_experiments`: ``phantom``,
        ``subset``, ``metric``, ``value``, ``ci_low``, ``ci_high``, ``n``).
    metric
        The metric drawn (``balanced_accuracy`` or ``accuracy``).
    chance
        Chance level of the metric, drawn as a dashed line.
    title
        Figure title (default: says what is drawn).
    """
    import plotly.graph_objects as go

    rows = table[table["metric"] == metric]
    if rows.empty:
        raise BrainsexError(f"fig_size_experiments: no {metric!r} rows in the table")
    phantoms = list(dict.fromkeys(rows["phantom"]))
    names = [SIZE_PHANTOM_NAMES.get(p, p) for p in phantoms]
    fig = go.Figure()
    for i, (subset, label) in enumerate((("all", "all test subjects"), ("inside_rtiv", "inside R_tiv"))):
        part = rows[rows["subset"] == subset].set_index("phantom").reindex(phantoms)
        if part["value"].isna().all():
            continue
        value = part["value"].to_numpy(dtype=float)
        fig.add_bar(x=names, y=value, name=label, marker_color=PALETTE[i],
                    error_y={"type": "data", "symmetric": False,
                             "array": part["ci_high"].to_numpy(dtype=float) - value,
                             "arrayminus": value - part["ci_low"].to_numpy(dtype=float)},
                    customdata=part["n"].to_numpy(), hovertemplate="%{y:.2f} (n = %{customdata})<extra></extra>")
    fig.add_hline(y=chance, line_dash="dash", line_color="black", annotation_text=f"chance ({chance:.2f})")
    fig.update_layout(title=title or f"{metric.replace('_', ' ').capitalize()} of the same model trained on each "
                      "phantom (95 % CI)", barmode="group", yaxis={"title": metric.replace("_", " "), "range": [0, 1.02]},
                      height=420, margin={"l": 10, "r": 10, "t": 50, "b": 40})
    return fig


def show_note(text: str) -> None:
    """Display a MyST note box in place of a table or figure that this run cannot make.

    Parameters
    ----------
    text : str
        What is missing and why (e.g. too few subjects), in the reader's words.
    """
    from IPython.display import Markdown, display

    display(Markdown(f"```{{note}}\n{text}\n```"))
