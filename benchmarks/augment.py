"""Batched rotation augmentation with ``torch.nn.functional.affine_grid`` (one kernel for a whole batch).

The book's loader rotates one scan at a time with MONAI ``RandRotated`` (paper section 2.5: half of the
training scans rotated by up to 15 degrees about each axis). On a GPU, or whenever the per-call overhead
matters, the same augmentation can be applied to a whole batch at once: draw one rotation per scan,
build the sampling grids with ``affine_grid`` and resample with ``grid_sample`` (bilinear, border
padding, as ``RandRotated`` is configured in :func:`brainsex.train.make_augmentation`). The benchmarks
use it for the GPU script and to show what a batched rotation would buy on the CPU.
"""

from __future__ import annotations

import math

__all__ = ["random_rotations", "rotate_batch"]


def random_rotations(n: int, max_deg: float = 15.0, prob: float = 0.5, generator=None, device="cpu"):
    """``n`` rotation matrices ``(n, 3, 3)``: with probability ``prob`` a rotation by angles drawn
    uniformly in ``[-max_deg, max_deg]`` about each of the three axes (``Rz @ Ry @ Rx``), else identity.

    The matrices act on ``(x, y, z)`` = (last, middle, first spatial axis) coordinates, the order
    ``affine_grid`` uses.
    """
    import torch

    r = math.radians(float(max_deg))
    ang = (torch.rand(n, 3, generator=generator, device=device) * 2 - 1) * r
    keep = torch.rand(n, generator=generator, device=device) < float(prob)
    ang = ang * keep[:, None]
    c, s = ang.cos(), ang.sin()
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1).view(n, 3, 3)
    ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1).view(n, 3, 3)
    rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1).view(n, 3, 3)
    return rz @ ry @ rx


def rotate_batch(x, max_deg: float = 15.0, prob: float = 0.5, generator=None, rotations=None):
    """Rotate each volume of a batch ``(B, C, D, H, W)`` about its centre (bilinear, border padding).

    Parameters
    ----------
    x
        Float tensor ``(B, C, D, H, W)`` on any device.
    max_deg, prob
        Largest angle about each axis and probability that a scan is rotated (15 and 0.5 in the paper).
    generator
        ``torch.Generator`` on ``x``'s device, for reproducible draws.
    rotations
        ``(B, 3, 3)`` matrices to use instead of random ones (see :func:`random_rotations`).

    Returns
    -------
    torch.Tensor
        The rotated batch, same shape, dtype and device. Rotations are in voxel units, so a non-cubic
        grid is rotated without shear (``affine_grid``'s normalised coordinates are rescaled per axis).
    """
    import torch
    import torch.nn.functional as F

    if x.ndim != 5:
        raise ValueError(f"rotate_batch expects (B, C, D, H, W), got shape {tuple(x.shape)}")
    b, _, d, h, w = x.shape
    rot = rotations if rotations is not None else random_rotations(b, max_deg, prob, generator, x.device)
    rot = rot.to(device=x.device, dtype=torch.float32)
    # normalised coordinate u = p / (N/2) with p in voxels from the centre: theta = S^-1 R S
    half = torch.tensor([w, h, d], dtype=torch.float32, device=x.device) / 2
    theta = rot * half[None, None, :] / half[None, :, None]
    theta = torch.cat([theta, torch.zeros(b, 3, 1, device=x.device)], dim=2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.to(x.dtype)
