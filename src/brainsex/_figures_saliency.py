"""Figures for the saliency, region and validity chapters (to be merged into ``brainsex.figures``).

- :func:`fig_slice_viewer`: an interactive three-plane viewer (axial, coronal, sagittal) of a map over
  a template, one slider per plane, optional region outlines (the paper's Figures 3, 6, 7 and 8 made
  browsable). Pure plotly: slider steps toggle the ``visible`` flag of precomputed slice traces, so the
  figure works offline without a kernel; volumes are downsampled and arrays are stored as typed
  (base64) arrays to keep the HTML small.
- :func:`fig_top_regions`: bar chart of the top-k regions by weighted saliency score (Figure 7).
- :func:`plot_map_static`: a nilearn static figure of a map over a template, axial cuts, optional
  region contours (Figures 3, 6, 7, 8 as in the paper).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from brainsex import BrainsexError
from brainsex.figures import PALETTE

__all__ = ["REGION_COLORS", "fig_slice_viewer", "fig_top_regions", "plot_map_static"]

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
    map_data
        The map (nibabel image or 3D array). Images are shown in RAS+ orientation; arrays are assumed
        to be RAS+ already (i: left -> right, j: posterior -> anterior, k: inferior -> superior).
    background
        Template / anatomical image or array (resampled to the map's grid when both are images).
    regions
        Optional integer label image/array (e.g. the atlas restricted to the top-10 regions, Figure 7)
        drawn as coloured outlines; ``region_names`` maps label id -> legend name.
    title
        Figure title.
    threshold
        Map values at or below it are transparent (None: show every value).
    vmax
        Top of the colour scale (default: the map's maximum).
    colorscale
        Plotly colour scale of the map (the paper uses blue -> red, "Jet").
    max_size
        The volume is downsampled so that its longest side has at most this many voxels.
    n_slices
        Slices per plane offered by each slider (evenly spaced where the volume is non-zero).
    height
        Figure height in pixels.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    from scipy import ndimage

    if max_size < 4 or n_slices < 1:
        raise BrainsexError(f"max_size={max_size}, n_slices={n_slices}: need max_size >= 4 and n_slices >= 1")
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

    top = float(vmax if vmax is not None else (m.max() if m.max() > 0 else 1.0))
    bottom = float(min(0.0, m.min()))
    shown = m.copy()
    if threshold is not None:
        shown[shown <= threshold] = np.nan
    if bg is not None:
        lo, hi = np.percentile(bg, [1, 99.5])
        bg_u8 = np.clip((bg - lo) / (hi - lo if hi > lo else 1.0) * 255, 0, 255).astype(np.uint8)
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
    if k_reg:
        colors = [REGION_COLORS[i % len(REGION_COLORS)] for i in range(k_reg)]
        reg_scale = [[0.0, "rgba(0,0,0,0)"], [0.5 / (k_reg + 0.5), "rgba(0,0,0,0)"]]
        for i, c in enumerate(colors):
            lo_, hi_ = (i + 0.5) / (k_reg + 0.5), min((i + 1.5) / (k_reg + 0.5), 1.0)
            reg_scale += [[lo_, c], [hi_, c]]

    extent = (np.abs(m) > 0) | (bg > 0 if bg is not None else False)
    fig = make_subplots(rows=1, cols=3, subplot_titles=[p for p, _ in _PLANES], horizontal_spacing=0.04)
    sliders = []
    for col, (plane, axis) in enumerate(_PLANES, start=1):
        other = tuple(a for a in range(3) if a != axis)
        nonempty = np.flatnonzero(extent.any(axis=other))
        lo_i, hi_i = (int(nonempty[0]), int(nonempty[-1])) if nonempty.size else (0, m.shape[axis] - 1)
        idx = np.unique(np.linspace(lo_i, hi_i, min(n_slices, hi_i - lo_i + 1)).round().astype(int))
        start = int(np.argmin(np.abs(idx - (lo_i + hi_i) / 2)))
        trace_ids = []
        per_slice = []
        for s_i, s in enumerate(idx):
            visible = s_i == start
            ids = []
            if bg is not None:
                fig.add_trace(go.Heatmap(z=_slice(bg_u8, axis, s), colorscale="gray", zmin=0, zmax=255,
                                         showscale=False, hoverinfo="skip", visible=visible), row=1, col=col)
                ids.append(len(fig.data) - 1)
            fig.add_trace(go.Heatmap(
                z=_slice(shown, axis, s).astype(np.float32), colorscale=colorscale, zmin=bottom, zmax=top,
                showscale=(col == 3), colorbar={"title": {"text": "value"}, "len": 0.8},  # one visible at a time
                hovertemplate=f"{plane} slice {s}<br>value %{{z:.3f}}<extra></extra>", visible=visible,
            ), row=1, col=col)
            ids.append(len(fig.data) - 1)
            if k_reg:
                fig.add_trace(go.Heatmap(z=_outline(_slice(reg, axis, s)).astype(np.uint8), colorscale=reg_scale,
                                         zmin=0, zmax=k_reg, showscale=False, hoverinfo="skip", visible=visible),
                              row=1, col=col)
                ids.append(len(fig.data) - 1)
            per_slice.append(ids)
            trace_ids += ids
        steps = []
        for s_i, s in enumerate(idx):
            vis = [tid in per_slice[s_i] for tid in trace_ids]
            steps.append({"method": "restyle", "label": str(int(s)), "args": [{"visible": vis}, trace_ids]})
        x0 = (col - 1) / 3
        sliders.append({"active": start, "steps": steps, "x": x0 + 0.01, "len": 1 / 3 - 0.03, "y": 0,
                        "yanchor": "top", "pad": {"t": 30}, "currentvalue": {"prefix": f"{plane} slice "},
                        "font": {"size": 9}})
        fig.update_xaxes(visible=False, constrain="domain", row=1, col=col)
        fig.update_yaxes(visible=False, scaleanchor=f"x{'' if col == 1 else col}", row=1, col=col)
    for i, r in enumerate(reg_ids):
        name = (region_names or {}).get(r, str(r))
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name, showlegend=True,
                                 marker={"color": REGION_COLORS[i % len(REGION_COLORS)], "size": 10, "symbol": "square"}))
    fig.update_layout(title=title, height=height, sliders=sliders, margin={"l": 10, "r": 10, "t": 60, "b": 90},
                      plot_bgcolor="black" if bg is not None else "white",
                      legend={"orientation": "h", "y": -0.45} if k_reg else None)
    return fig


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

    ``nilearn.plotting.plot_stat_map`` with axial cuts (``display_mode="z"``, ``cut_coords`` a number
    of cuts or their mm positions), colours from blue (0) to red (1). ``regions_img`` (a label image,
    e.g. the top-10 regions) adds one contour per label.

    Returns
    -------
    The nilearn display (``None`` when ``output_file`` is given: nilearn saves and closes it).
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
