"""Saliency maps (Captum), occlusion, normalisation, averaging, Spearman and NIfTI output."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from brainsex import BrainsexError
from brainsex.saliency import (
    average_maps,
    group_average,
    minmax_normalise,
    occlusion_by_region,
    saliency_maps,
    save_map,
    spearman_maps,
)

torch.set_num_threads(1)


class TinyNet(nn.Module):
    """Conv -> BatchNorm -> ReLU -> Dropout -> pool -> one logit (like SFCN, in miniature)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm3d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 8, 1)

    def forward(self, x):
        h = self.drop(torch.relu(self.bn(self.conv(x))))
        h = nn.functional.adaptive_avg_pool3d(h, 2).flatten(1)
        return self.fc(h)  # (N, 1)


class MaskedLinear(nn.Module):
    """logit = sum of the input over the voxels of ``mask`` (one region matters, linearly)."""

    def __init__(self, mask: np.ndarray):
        super().__init__()
        self.register_buffer("w", torch.from_numpy(mask.astype(np.float32)))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return (x[:, 0] * self.w).sum(dim=(1, 2, 3)) + self.bias  # (N,)


@pytest.fixture
def vols():
    return np.random.default_rng(0).normal(size=(5, 8, 8, 8)).astype(np.float32)


def _grad(model, x):
    model.eval()
    t = torch.from_numpy(x[:, None]).requires_grad_(True)
    model(t).sum().backward()
    return t.grad[:, 0].numpy()


def test_saliency_shape_abs_and_matches_autograd(vols):
    net = TinyNet()
    net.train()
    maps = saliency_maps(net, vols, batch_size=2)
    assert maps.shape == vols.shape and maps.dtype == np.float32
    assert (maps >= 0).all() and maps.max() > 0
    np.testing.assert_allclose(maps, np.abs(_grad(TinyNet(), vols)), rtol=1e-5, atol=1e-7)
    assert net.training, "the model's training mode is restored"
    # a channel axis in the input is kept in the output
    assert saliency_maps(net, vols[:, None]).shape == (5, 1, 8, 8, 8)


def test_signed_and_female_maps(vols):
    net = TinyNet()
    signed = saliency_maps(net, vols, signed=True)
    absolute = saliency_maps(net, vols)
    assert (signed < 0).any() and (signed > 0).any()
    assert not np.allclose(signed, absolute)
    np.testing.assert_allclose(np.abs(signed), absolute, rtol=1e-6)
    # one sigmoid output: the female map is the same quantity (abs) or the negative (signed)
    np.testing.assert_allclose(saliency_maps(net, vols, target="female"), absolute, rtol=1e-6)
    np.testing.assert_allclose(saliency_maps(net, vols, signed=True, target="female"), -signed, rtol=1e-6)


@pytest.mark.parametrize("method,kw", [("saliency", {}), ("integrated_gradients", {"n_steps": 8})])
def test_batching_gives_the_same_maps(vols, method, kw):
    net = TinyNet()
    one = saliency_maps(net, vols, method=method, batch_size=1, **kw)
    many = saliency_maps(net, vols, method=method, batch_size=3, **kw)
    np.testing.assert_allclose(one, many, rtol=1e-4, atol=1e-6)


def test_lazy_sequence_of_images(vols):
    net = TinyNet()
    imgs = [nib.Nifti1Image(v, np.eye(4)) for v in vols]
    np.testing.assert_allclose(saliency_maps(net, imgs, batch_size=2), saliency_maps(net, vols), rtol=1e-5, atol=1e-8)


def test_integrated_gradients_completeness(vols):
    """Signed IG from a zero baseline sums to logit(x) - logit(0) (Sundararajan et al., 2017)."""
    net = TinyNet().eval()
    ig = saliency_maps(net, vols[:2], method="integrated_gradients", signed=True, n_steps=64)
    with torch.no_grad():
        gap = (net(torch.from_numpy(vols[:2, None])) - net(torch.zeros(2, 1, 8, 8, 8)))[:, 0].numpy()
    np.testing.assert_allclose(ig.reshape(2, -1).sum(1), gap, rtol=0.02, atol=1e-3)
    assert (saliency_maps(net, vols[:2], method="integrated_gradients", n_steps=8) >= 0).all()


def test_smoothgrad(vols):
    net = TinyNet()
    a = saliency_maps(net, vols[:2], method="smoothgrad", nt_samples=4, seed=1)
    b = saliency_maps(net, vols[:2], method="smoothgrad", nt_samples=4, seed=1)
    plain = saliency_maps(net, vols[:2])
    assert a.shape == plain.shape and (a >= 0).all()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, plain)


def test_bad_arguments(vols):
    net = TinyNet()
    with pytest.raises(BrainsexError, match="method"):
        saliency_maps(net, vols, method="gradcam")
    with pytest.raises(BrainsexError, match="unknown option"):
        saliency_maps(net, vols, n_steps=3)
    with pytest.raises(BrainsexError, match="target"):
        saliency_maps(net, vols, target="other")
    with pytest.raises(BrainsexError, match="outputs per sample"):
        saliency_maps(nn.Sequential(nn.Flatten(), nn.Linear(512, 2)), vols[:, None])
    bad = vols.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(BrainsexError, match="NaN"):
        saliency_maps(net, bad)


def test_occlusion_finds_the_region_that_matters():
    atlas = np.zeros((6, 6, 6), dtype=np.int32)
    atlas[:2], atlas[2:4], atlas[4:] = 1, 2, 3
    atlas[0, 0, 0] = 0
    model = MaskedLinear(atlas == 2)
    vol = np.random.default_rng(1).uniform(0.5, 1.5, size=(6, 6, 6)).astype(np.float32)
    labels = pd.DataFrame({"label": [1, 2, 3, 4], "name": ["a", "b", "c", "absent"]})
    res = occlusion_by_region(model, vol, atlas, labels, batch_size=2)
    assert res["label"].iloc[0] == 2 and res["name"].iloc[0] == "b"
    row = res.set_index("label")
    assert row.loc[2, "delta_logit"] == pytest.approx(vol[atlas == 2].sum(), rel=1e-5)
    assert row.loc[1, "delta_logit"] == pytest.approx(0, abs=1e-5)
    assert row.loc[4, "n_voxels"] == 0 and row.loc[1, "n_voxels"] == 71
    np.testing.assert_allclose(res["logit"] - res["logit_occluded"], res["delta_logit"], atol=1e-6)
    one_by_one = occlusion_by_region(model, vol, atlas, labels, batch_size=1)
    pd.testing.assert_frame_equal(res, one_by_one)
    # baseline matters: occluding with the region's own value changes nothing
    res1 = occlusion_by_region(model, np.ones_like(vol), atlas, None, baseline=1.0)
    assert res1["abs_delta"].max() == pytest.approx(0, abs=1e-5)
    with pytest.raises(BrainsexError, match="grid"):
        occlusion_by_region(model, vol, atlas[:5])


def test_minmax_normalise_edge_cases():
    m = np.array([[[2.0, 4.0], [6.0, 10.0]]])
    out = minmax_normalise(m)
    np.testing.assert_allclose(out, [[[0, 0.25], [0.5, 1.0]]])
    assert out.dtype == np.float32
    with pytest.raises(BrainsexError, match="constant"):
        minmax_normalise(np.zeros((3, 3, 3)))
    with pytest.raises(BrainsexError, match="constant"):
        minmax_normalise(np.full((2, 2, 2), 0.7))
    z = minmax_normalise(np.zeros((3, 3, 3)), constant="zeros")
    assert not np.isnan(z).any() and (z == 0).all()
    with pytest.raises(BrainsexError, match="NaN"):
        minmax_normalise(np.array([1.0, np.nan, 2.0]))
    mask = np.array([[[True, True], [True, False]]])
    np.testing.assert_allclose(minmax_normalise(m, mask=mask), [[[0, 0.5], [1.0, 0]]])
    with pytest.raises(BrainsexError, match="mask"):
        minmax_normalise(m, mask=np.zeros_like(mask))


def test_average_and_group_average():
    maps = np.stack([np.full((2, 2, 2), v, dtype=np.float32) for v in (0.0, 1.0, 2.0, 4.0)])
    np.testing.assert_allclose(average_maps(maps), np.full((2, 2, 2), 1.75))
    mask = np.zeros((2, 2, 2), bool)
    mask[0] = True
    avg = average_maps(list(maps), mask=mask)
    assert avg[0].min() == pytest.approx(1.75) and avg[1].max() == 0
    groups = pd.Series(["M", "F", "M", None], index=[10, 11, 12, 13])
    out = group_average(maps, groups)
    assert list(out) == ["F", "M"]
    np.testing.assert_allclose(out["M"], 1.0)
    np.testing.assert_allclose(out["F"], 1.0)
    tert = group_average(maps, ["T1 F", "T1 F", "T3 M", "T3 M"])
    np.testing.assert_allclose(tert["T3 M"], 3.0)
    with pytest.raises(BrainsexError, match="keys"):
        group_average(maps, ["M", "F"])
    with pytest.raises(BrainsexError, match="shapes"):
        average_maps([np.zeros((2, 2, 2)), np.zeros((3, 2, 2))])


def test_spearman_maps():
    rng = np.random.default_rng(0)
    a = rng.uniform(size=(5, 5, 5))
    mask = np.zeros(a.shape, bool)
    mask[1:4, 1:4, 1:4] = True
    b = np.exp(3 * a)  # monotone transform: rank correlation 1
    b[~mask] = -a[~mask]  # reversed outside the mask, which must be ignored
    rho, p = spearman_maps(a, b, mask)
    assert rho == pytest.approx(1.0) and p < 1e-10
    rho, _ = spearman_maps(a, -a, mask)
    assert rho == pytest.approx(-1.0)
    # hand-checked: ranks (1,2,3,4) vs (1,3,2,4): rho = 1 - 6*2/(4*15) = 0.8
    x = np.array([1.0, 2, 3, 4]).reshape(1, 2, 2)
    y = np.array([10.0, 30, 20, 40]).reshape(1, 2, 2)
    rho, _ = spearman_maps(x, y, np.ones(x.shape, bool))
    assert rho == pytest.approx(0.8)
    with pytest.raises(BrainsexError, match="constant"):
        spearman_maps(a, np.ones_like(a), mask)
    with pytest.raises(BrainsexError, match="shapes"):
        spearman_maps(a, a[:4], mask)


def test_save_map(tmp_path):
    data = np.random.default_rng(0).uniform(size=(4, 5, 6))
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    path = save_map(data, aff, tmp_path / "sub" / "mean.nii.gz")
    img = nib.load(path)
    np.testing.assert_allclose(img.get_fdata(), data, rtol=1e-6)
    np.testing.assert_allclose(img.affine, aff)
    assert sorted(p.name for p in path.parent.iterdir()) == ["mean.nii.gz"]
    with pytest.raises(BrainsexError, match="nii"):
        save_map(data, aff, tmp_path / "x.png")
    with pytest.raises(BrainsexError, match="affine"):
        save_map(data, np.eye(3), tmp_path / "y.nii.gz")
