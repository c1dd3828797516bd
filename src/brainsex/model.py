"""The Simple Fully Convolutional Network (SFCN) sex classifier (paper section 2.3).

SFCN (Peng et al., 2021) as the paper adapted it: five blocks of a 3x3x3 convolution, batch normalisation,
2x max pooling and ReLU; a sixth block with a 1x1x1 convolution, batch normalisation and ReLU; a last block
of average pooling over the remaining grid (6x7x6 for the paper's 193x229x193 input), dropout (50 %) and a
1x1x1 convolution to a single output. The positive class is *male*: the network returns one logit per
scan and ``sigmoid(logit)`` is the probability of male. Training uses ``BCEWithLogitsLoss``, which is the
paper's sigmoid + binary cross-entropy computed in a numerically stable way.

Any input grid works: the average-pooling kernel is computed from ``in_shape``. On grids so coarse that
an axis has already shrunk to one voxel before the fifth pooling (e.g. the 8 mm grid 25x29x25), pooling
leaves that axis alone (kernel 1 along it) instead of shrinking it to zero; for every axis of at least
32 voxels the network is exactly the paper's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from brainsex import BrainsexError

__all__ = [
    "PAPER_CHANNELS",
    "PAPER_IN_SHAPE",
    "SFCN",
    "sfcn_pool_kernels",
    "sfcn_output_grid",
    "count_parameters",
    "count_macs",
]

#: Channel widths of the paper's SFCN (five 3x3x3 blocks, then the 1x1x1 block).
PAPER_CHANNELS: tuple[int, ...] = (32, 64, 128, 256, 256, 64)
#: The paper's input grid: MNI152 at 1 mm (section 2.2).
PAPER_IN_SHAPE: tuple[int, int, int] = (193, 229, 193)


def _check_shape(in_shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in in_shape)
    except (TypeError, ValueError) as exc:
        raise BrainsexError(f"in_shape must be three positive integers, got {in_shape!r}") from exc
    if len(shape) != 3 or min(shape) < 1:
        raise BrainsexError(f"in_shape must be three positive integers, got {in_shape!r}")
    return shape  # type: ignore[return-value]


def sfcn_pool_kernels(in_shape: Sequence[int], n_pools: int = 5) -> list[tuple[int, int, int]]:
    """Max-pooling kernels of the five SFCN blocks for an input grid.

    Each block halves (rounding down, as ``MaxPool3d(2)`` does) every axis that still has two or more
    voxels; an axis already down to one voxel gets kernel 1 along it.

    Parameters
    ----------
    in_shape
        Input grid, e.g. ``(193, 229, 193)``.
    n_pools
        Number of pooling blocks (5 in SFCN).

    Returns
    -------
    list of tuple
        One ``(kx, ky, kz)`` kernel (= stride) per block.
    """
    shape = list(_check_shape(in_shape))
    kernels = []
    for _ in range(n_pools):
        k = tuple(2 if s >= 2 else 1 for s in shape)
        shape = [s // kk for s, kk in zip(shape, k, strict=True)]
        kernels.append(k)
    return kernels  # type: ignore[return-value]


def sfcn_output_grid(in_shape: Sequence[int], n_pools: int = 5) -> tuple[int, int, int]:
    """The grid left after the five pooling blocks: the average-pooling kernel of the last block.

    ``(193, 229, 193)`` gives ``(6, 7, 6)`` (paper section 2.3); the 4 mm grid ``(49, 58, 49)`` and the
    8 mm grid ``(25, 29, 25)`` give ``(1, 1, 1)``.

    Parameters
    ----------
    in_shape : sequence of int
        Input grid (X, Y, Z).
    n_pools : int, default=5
        Number of pooling blocks.

    Returns
    -------
    tuple of int
        The grid after the pooling blocks.
    """
    shape = list(_check_shape(in_shape))
    for k in sfcn_pool_kernels(in_shape, n_pools):
        shape = [s // kk for s, kk in zip(shape, k, strict=True)]
    return tuple(shape)  # type: ignore[return-value]


class SFCN(nn.Module):
    """SFCN binary sex classifier (paper section 2.3; Peng et al., 2021).

    Parameters
    ----------
    channels
        Output channels of the five 3x3x3 blocks and of the 1x1x1 block (six numbers). The paper's are
        ``(32, 64, 128, 256, 256, 64)``; the CPU demo profile uses narrower ones.
    in_shape
        Spatial grid of the input volumes; sets the pooling kernels and the average-pooling window.
    dropout
        Dropout probability before the last convolution (0.5 in the paper).
    in_channels
        Image channels (1 for a T1-weighted scan).

    Notes
    -----
    ``forward`` takes a float tensor of shape ``(B, in_channels, *in_shape)`` and returns the male logits
    with shape ``(B,)`` (one number per scan, so Captum's attribution with ``target=None`` and
    ``BCEWithLogitsLoss`` against a ``(B,)`` label vector work directly). :meth:`predict_proba` returns
    ``sigmoid(logit)`` = P(male).
    """

    def __init__(
        self,
        channels: Sequence[int] = PAPER_CHANNELS,
        in_shape: Sequence[int] = PAPER_IN_SHAPE,
        dropout: float = 0.5,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != 6 or min(channels) < 1:
            raise BrainsexError(f"channels must be six positive integers (five 3x3x3 blocks + one 1x1x1), "
                                f"got {channels}")
        if not 0.0 <= float(dropout) < 1.0:
            raise BrainsexError(f"dropout must be in [0, 1), got {dropout}")
        self.channels = channels
        self.in_shape = _check_shape(in_shape)
        self.dropout_p = float(dropout)
        self.in_channels = int(in_channels)
        self.out_grid = sfcn_output_grid(self.in_shape)
        if min(self.out_grid) < 1:  # pragma: no cover - sfcn_pool_kernels never shrinks below 1
            raise BrainsexError(f"in_shape {self.in_shape} is too small for SFCN")

        layers: list[nn.Module] = []
        c_in = self.in_channels
        for c_out, k in zip(channels[:5], sfcn_pool_kernels(self.in_shape), strict=True):
            layers += [
                nn.Conv3d(c_in, c_out, kernel_size=3, padding=1),
                nn.BatchNorm3d(c_out),
                nn.MaxPool3d(kernel_size=k, stride=k),
                nn.ReLU(),
            ]
            c_in = c_out
        layers += [nn.Conv3d(c_in, channels[5], kernel_size=1, padding=0), nn.BatchNorm3d(channels[5]),
                   nn.ReLU()]
        self.feature_extractor = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.AvgPool3d(kernel_size=self.out_grid),
            nn.Dropout(self.dropout_p),
            nn.Conv3d(channels[5], 1, kernel_size=1, padding=0),
        )

    @property
    def config(self) -> dict:
        """The constructor arguments, as stored in checkpoints."""
        return {"channels": list(self.channels), "in_shape": list(self.in_shape), "dropout": self.dropout_p,
                "in_channels": self.in_channels}

    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`BrainsexError` if ``x`` is not ``(B, in_channels, *in_shape)``.

        Parameters
        ----------
        x : torch.Tensor
            A batch of scans.
        """
        expected = (self.in_channels, *self.in_shape)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise BrainsexError(
                f"SFCN input shape mismatch: expected (batch, {', '.join(map(str, expected))}) "
                f"but got {tuple(x.shape)}; the model was built for in_shape={self.in_shape}"
            )

    #: How many of the first 3x3x3 blocks run under activation checkpointing while gradients are
    #: computed (set by the training loop from :func:`brainsex.memory.plan_training`; not part of the
    #: architecture and not saved in checkpoints).
    checkpoint_blocks: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Male logits, shape ``(B,)``.

        With ``checkpoint_blocks > 0`` and gradients enabled, the first blocks keep only their inputs
        and are recomputed during the backward pass (:func:`torch.utils.checkpoint.checkpoint`): less
        memory, about a third more compute, the same result. The recomputation does not update batch
        normalisation's running statistics a second time.

        Parameters
        ----------
        x : torch.Tensor
            Scans, shape ``(B, in_channels, *in_shape)``.

        Returns
        -------
        torch.Tensor
            Logits of male, shape ``(B,)``.
        """
        self.check_input(x)
        k = int(self.checkpoint_blocks) if torch.is_grad_enabled() else 0
        if k <= 0:
            return self.classifier(self.feature_extractor(x)).flatten(1)[:, 0]
        from torch.utils.checkpoint import checkpoint

        layers = list(self.feature_extractor)
        for i in range(min(k, 5)):
            block = nn.Sequential(*layers[4 * i:4 * i + 4])
            x = checkpoint(_RunOnceStats(block), x, use_reentrant=False)
        for layer in layers[4 * min(k, 5):]:
            x = layer(x)
        return self.classifier(x).flatten(1)[:, 0]

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """P(male) = sigmoid(logit) for each scan, shape ``(B,)``, computed in eval mode without gradients.

        The module's train/eval mode is restored afterwards.

        Parameters
        ----------
        x : torch.Tensor
            Scans, shape ``(B, in_channels, *in_shape)``.

        Returns
        -------
        torch.Tensor
            Probabilities of male (float32), shape ``(B,)``.
        """
        was_training = self.training
        self.eval()
        try:
            return torch.sigmoid(self(x).float())
        finally:
            self.train(was_training)


class _RunOnceStats:
    """Run a block; on the checkpoint's recomputation, without updating batch-norm running statistics."""

    def __init__(self, block: nn.Sequential) -> None:
        self.block = block
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            return self.block(x)
        norms = [m for m in self.block if isinstance(m, nn.BatchNorm3d) and m.track_running_stats]
        saved = [[b.detach().clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in norms]
        try:  # the recomputation normalises with the same batch statistics; the running ones are put back
            return self.block(x)
        finally:
            with torch.no_grad():
                for m, (mean, var, n) in zip(norms, saved, strict=True):
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
                    m.num_batches_tracked.copy_(n)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of a model.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    trainable_only : bool, default=True
        Count only parameters with ``requires_grad``.

    Returns
    -------
    int
        Number of scalar parameters.
    """
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only))


def count_macs(channels: Sequence[int] = PAPER_CHANNELS, in_shape: Sequence[int] = PAPER_IN_SHAPE,
               in_channels: int = 1) -> int:
    """Multiply-accumulates of one forward pass of SFCN for one scan (convolutions only).

    Counts ``voxels x C_out x C_in x kernel volume`` for each convolution; batch norm, pooling and ReLU
    are negligible. The paper's model at 193x229x193 needs about 112 GMAC per scan.

    Parameters
    ----------
    channels : sequence of int, default=PAPER_CHANNELS
        Output channels of the six convolution blocks.
    in_shape : sequence of int, default=PAPER_IN_SHAPE
        Input grid.
    in_channels : int, default=1
        Input channels.

    Returns
    -------
    int
        Multiply-accumulates per scan.
    """
    channels = [int(c) for c in channels]
    shape = list(_check_shape(in_shape))
    macs = 0
    c_in = in_channels
    for c_out, k in zip(channels[:5], sfcn_pool_kernels(shape), strict=True):
        macs += shape[0] * shape[1] * shape[2] * c_out * c_in * 27
        shape = [s // kk for s, kk in zip(shape, k, strict=True)]
        c_in = c_out
    macs += shape[0] * shape[1] * shape[2] * channels[5] * c_in
    macs += channels[5]
    return int(macs)
