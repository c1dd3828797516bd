"""Tests of brainsex.model: SFCN shape arithmetic, forward/backward, probabilities, bad input."""

from __future__ import annotations

import pytest
import torch

from brainsex import BrainsexError
from brainsex.model import (
    PAPER_CHANNELS,
    SFCN,
    count_macs,
    count_parameters,
    sfcn_output_grid,
    sfcn_pool_kernels,
)

torch.set_num_threads(1)
TINY = (2, 4, 4, 4, 4, 2)


@pytest.mark.parametrize(
    ("in_shape", "grid"),
    [
        ((193, 229, 193), (6, 7, 6)),   # the paper's 1 mm input (section 2.3)
        ((160, 192, 160), (5, 6, 5)),   # SFCN's original UK Biobank input (Peng et al., 2021)
        ((97, 115, 97), (3, 3, 3)),     # 2 mm
        ((49, 58, 49), (1, 1, 1)),      # 4 mm (demo)
        ((25, 29, 25), (1, 1, 1)),      # 8 mm (smoke): the 5th pooling leaves the 1-voxel axes alone
        ((16, 16, 16), (1, 1, 1)),
    ],
)
def test_output_grid(in_shape, grid):
    assert sfcn_output_grid(in_shape) == grid


def test_pool_kernels_never_shrink_to_zero():
    assert sfcn_pool_kernels((25, 29, 25))[-1] == (1, 1, 1)
    assert sfcn_pool_kernels((40, 20, 40))[-1] == (2, 1, 2)
    assert sfcn_pool_kernels((193, 229, 193)) == [(2, 2, 2)] * 5


def test_paper_model_size():
    model = SFCN()
    assert model.channels == PAPER_CHANNELS and model.in_shape == (193, 229, 193)
    assert model.classifier[0].kernel_size == (6, 7, 6)
    assert model.classifier[1].p == 0.5
    # 2,950,401 parameters; 112 GMAC per scan at 1 mm (issue 8's measured figure)
    assert count_parameters(model) == 2_950_401
    assert round(count_macs() / 1e9) == 112


def test_layer_order_matches_paper():
    model = SFCN(channels=TINY, in_shape=(16, 16, 16))
    kinds = [type(m).__name__ for m in model.feature_extractor]
    assert kinds == ["Conv3d", "BatchNorm3d", "MaxPool3d", "ReLU"] * 5 + ["Conv3d", "BatchNorm3d", "ReLU"]
    assert model.feature_extractor[0].kernel_size == (3, 3, 3) and model.feature_extractor[0].padding == (1, 1, 1)
    assert model.feature_extractor[20].kernel_size == (1, 1, 1)
    assert [type(m).__name__ for m in model.classifier] == ["AvgPool3d", "Dropout", "Conv3d"]
    assert model.classifier[2].out_channels == 1


@pytest.mark.parametrize("in_shape", [(25, 29, 25), (20, 24, 20), (33, 40, 33)])
def test_forward_backward_shapes(in_shape):
    torch.manual_seed(0)
    model = SFCN(channels=TINY, in_shape=in_shape)
    x = torch.randn(3, 1, *in_shape, requires_grad=True)
    logits = model(x)
    assert logits.shape == (3,)
    logits.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    p = model.predict_proba(x)
    assert p.shape == (3,) and bool(((p > 0) & (p < 1)).all())
    assert model.training  # predict_proba restores the mode
    model.eval()
    torch.testing.assert_close(p, torch.sigmoid(model(x)).detach())


def test_channels_last_same_result():
    torch.manual_seed(0)
    model = SFCN(channels=TINY, in_shape=(20, 24, 20)).eval()
    x = torch.randn(2, 1, 20, 24, 20)
    ref = model(x)
    model_cl = model.to(memory_format=torch.channels_last_3d)
    out = model_cl(x.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_shape_mismatch_names_expected_and_got():
    model = SFCN(channels=TINY, in_shape=(20, 24, 20))
    with pytest.raises(BrainsexError, match=r"expected \(batch, 1, 20, 24, 20\) but got \(2, 1, 20, 24, 21\)"):
        model(torch.zeros(2, 1, 20, 24, 21))
    with pytest.raises(BrainsexError, match="expected"):
        model(torch.zeros(1, 20, 24, 20))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"channels": (1, 2, 3)}, "six positive"), ({"in_shape": (20, 24)}, "three positive"),
     ({"in_shape": (20, 0, 20)}, "three positive"), ({"dropout": 1.0}, "dropout")],
)
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(BrainsexError, match=match):
        SFCN(**{"channels": TINY, "in_shape": (16, 16, 16), **kwargs})


def test_same_seed_same_weights():
    torch.manual_seed(3)
    a = SFCN(channels=TINY, in_shape=(16, 16, 16)).state_dict()
    torch.manual_seed(3)
    b = SFCN(channels=TINY, in_shape=(16, 16, 16)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
