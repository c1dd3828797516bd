"""Smoke tests of the saliency/region figures (they build, offline, with modest size)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from brainsex import BrainsexError  # noqa: E402
from brainsex.figures import fig_slice_viewer, fig_top_regions, plot_map_static  # noqa: E402


def _volumes(shape=(40, 48, 40)):
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt((grid ** 2).sum(0))
    brain = (r < 0.9).astype(np.float32) * (1 - r)
    m = np.exp(-((grid[0] - 0.3) ** 2 + grid[1] ** 2 + grid[2] ** 2) / 0.05).astype(np.float32)
    regions = np.zeros(shape, dtype=np.int32)
    regions[(r < 0.3) & (grid[0] > 0)] = 7
    regions[(r < 0.3) & (grid[0] <= 0)] = 3
    aff = np.diag([4.0, 4.0, 4.0, 1.0])
    aff[:3, 3] = -2.0 * (np.array(shape) - 1)  # centred on the origin
    return nib.Nifti1Image(m, aff), nib.Nifti1Image(brain, aff), nib.Nifti1Image(regions, aff)


def test_slice_viewer_builds_offline_and_small():
    map_img, bg_img, reg_img = _volumes()
    fig = fig_slice_viewer(map_img, bg_img, regions=reg_img, region_names={7: "Right X", 3: "Left Y"},
                           max_size=32, n_slices=10)
    assert len(fig.layout.sliders) == 3
    for slider in fig.layout.sliders:
        assert 1 < len(slider.steps) <= 10 and slider.steps[0].method == "restyle"
        vis, ids = slider.steps[0].args
        assert sum(vis["visible"]) == 3 and len(ids) == len(vis["visible"])  # bg + map + outline per slice
    visible = [t for t in fig.data if t.visible is not False and t.type == "heatmap"]
    assert len(visible) == 9  # one slice per plane shown at start
    assert [t.name for t in fig.data if t.type == "scatter"] == ["Right X", "Left Y"]
    html = fig.to_html(include_plotlyjs=False, full_html=False)
    assert len(html) < 1_500_000
    # arrays of the same grid work as well; without a background there is one trace less per slice
    fig2 = fig_slice_viewer(np.asarray(map_img.dataobj), max_size=16, n_slices=4, threshold=None)
    assert len(fig2.data) <= 12
    with pytest.raises(BrainsexError, match="shape"):
        fig_slice_viewer(np.zeros((5, 5, 5)), background=np.zeros((4, 4, 4)))


def test_top_regions_bar():
    scores = pd.DataFrame({"label": [1, 2, 3, 4], "name": ["a", "b", "c", "d"],
                           "hemisphere": ["left", "right", "left", "right"],
                           "weighted_score": [0.1, 0.5, 0.3, 0.0], "saliency_score": [0.2, 0.6, 0.4, 0.0],
                           "mean_saliency_norm": [0.5, 0.8, 0.7, 0.0], "n_voxels": [10, 20, 30, 40]})
    fig = fig_top_regions(scores, k=3, highlight=[2])
    bar = fig.data[0]
    assert list(bar.y) == ["a (left)", "c (left)", "b (right)"]  # best at the top
    assert list(bar.x) == [0.1, 0.3, 0.5] and bar.text[-1] == "50%"
    assert len(set(bar.marker.color)) == 2
    with pytest.raises(BrainsexError, match="columns"):
        fig_top_regions(scores.drop(columns="weighted_score"))


def test_plot_map_static(tmp_path):
    map_img, bg_img, reg_img = _volumes((20, 24, 20))
    display = plot_map_static(map_img, bg_img, title="mean map", cut_coords=3, regions_img=reg_img)
    # three axial cuts, each with one contour per region label (3 and 7), a colour bar and the title
    assert len(display.axes) == 3 and all(np.isfinite(display.cut_coords))
    assert all(len(ax.ax.collections) == 2 for ax in display.axes.values())
    assert display._cbar is not None
    texts = [t.get_text() for ax in display.frame_axes.figure.axes for t in ax.texts]
    assert "mean map" in texts and sum(t.startswith("z=") for t in texts) == 3
    display.close()
    plain = plot_map_static(map_img, bg_img, cut_coords=2)
    assert len(plain.axes) == 2 and all(len(ax.ax.collections) == 0 for ax in plain.axes.values())  # no regions
    plain.close()
    out = tmp_path / "fig.png"
    plot_map_static(map_img, bg_img, title="mean map", cut_coords=[-10, 0, 10], output_file=out)
    assert out.stat().st_size > 1000


def test_tbm_coefficients_one_trace_per_version():
    from brainsex.figures import fig_tbm_coefficients

    coef = pd.DataFrame({"perfect": [0.1, -0.05], "registered": [0.04, -0.01]}, index=pd.Index([36, 27], name="label"))
    fig = fig_tbm_coefficients(coef, ["Right Entorhinal", "Right Pallidum"])
    assert [t.name for t in fig.data] == ["perfect", "registered"]
    assert list(fig.data[1].y) == [0.04, -0.01] and list(fig.data[0].x) == ["Right Entorhinal", "Right Pallidum"]
    assert [str(x) for x in fig_tbm_coefficients(coef).data[0].x] == ["36", "27"]


def test_precision_at_k_bars_and_chance_ticks():
    from brainsex.figures import fig_precision_at_k

    t = pd.DataFrame({"label": ["truth map · effect", "saliency · weighted_score"], "observed": [0.9, 0.1],
                      "chance": [0.12, 0.12], "p_value": [0.001, 0.6]})
    fig = fig_precision_at_k(t, k=10)
    bars, ticks = fig.data
    assert list(bars.y) == list(t["label"]) and list(bars.x) == [0.9, 0.1] and list(ticks.x) == [0.12, 0.12]
    assert list(bars.marker.color) == ["#1f77b4", "#aec7e8"]  # dark: p < 0.05
    assert "Precision@10" in fig.layout.title.text and fig.layout.height == 140 + 32 * 2


def test_model_reliance_bars_with_cis():
    from brainsex.figures import fig_model_reliance

    t = pd.DataFrame({"factor": ["planted regions (all)", "planted region", "head size", "age +10 y"],
                      "region": ["", "Right Pallidum", "", ""], "delta_logit": [0.1, 0.0, 1.2, -0.2],
                      "ci_low": [0.0, -0.1, 0.9, -0.4], "ci_high": [0.2, 0.1, 1.5, 0.0], "n_scans": 16})
    fig = fig_model_reliance(t)
    bars = fig.data[0]
    assert list(bars.y) == ["planted regions (all)", "region: Right Pallidum", "head size", "age +10 y"]
    assert list(bars.x) == [0.1, 0.0, 1.2, -0.2]
    assert list(bars.error_x.array) == pytest.approx([0.1, 0.1, 0.3, 0.2])
    assert list(bars.error_x.arrayminus) == pytest.approx([0.1, 0.1, 0.3, 0.2])
    assert bars.marker.color[2] != bars.marker.color[0] != bars.marker.color[3]  # size, regions, age differ
    assert "16 test scans" in fig.layout.title.text
    with pytest.raises(BrainsexError, match="lacks"):
        fig_model_reliance(t.drop(columns=["ci_low"]))


def test_size_experiment_bars_with_cis_and_chance():
    from brainsex.figures import fig_size_experiments

    rows = []
    for phantom, base in (("default", 0.9), ("size_only", 0.8), ("regions_only", 0.7)):
        for subset, drop in (("all", 0.0), ("inside_rtiv", 0.2)):
            for metric in ("accuracy", "balanced_accuracy"):
                val = base - drop - (0.01 if metric == "accuracy" else 0.0)
                rows.append((phantom, subset, metric, val, val - 0.1, val + 0.05, 32 if subset == "all" else 12))
    t = pd.DataFrame(rows, columns=["phantom", "subset", "metric", "value", "ci_low", "ci_high", "n"])
    fig = fig_size_experiments(t, chance=0.5)
    allbar, inside = fig.data
    assert list(allbar.x) == ["run's phantom (size + regions)", "size only", "regions only"]
    assert list(allbar.y) == pytest.approx([0.9, 0.8, 0.7]) and list(inside.y) == pytest.approx([0.7, 0.6, 0.5])
    assert list(allbar.error_y.array) == pytest.approx([0.05] * 3)
    assert list(allbar.error_y.arrayminus) == pytest.approx([0.1] * 3)
    assert list(inside.customdata) == [12, 12, 12]
    assert fig.layout.shapes[0].y0 == 0.5 and "Balanced accuracy" in fig.layout.title.text
    acc = fig_size_experiments(t, metric="accuracy", chance=0.55)
    assert list(acc.data[0].y) == pytest.approx([0.89, 0.79, 0.69]) and acc.layout.shapes[0].y0 == 0.55
    with pytest.raises(BrainsexError, match="auc"):
        fig_size_experiments(t, metric="auc")
