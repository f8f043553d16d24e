# SPDX-License-Identifier: Apache-2.0
"""CSAM: cross-slice attention (semantic, positional and slice attention) for 2.5D segmentation (arXiv 2311.04942)."""

from __future__ import annotations

import torch
from monai.networks.layers.factories import Conv
from torch import nn

__all__ = ["CSAM"]


class CSAM(nn.Module):
    """
    Cross-Slice Attention Module (CSAM) for 2.5D segmentation, after Hung et al., "CSAM: A 2.5D Cross-Slice
    Attention Module for Anisotropic Volumetric Medical Image Segmentation", WACV 2024 (arXiv 2311.04942).

    A 2D network processes the slices of a volume as its batch. CSAM reweights such a feature map with three
    attentions, applied in the paper's order:

    1. semantic (channel): max- and mean-pooling over the volume's slices and the in-plane axes give two
       per-channel descriptors; a shared MLP ``C -> C/reduction -> C`` maps each, the outputs are summed and a
       sigmoid gives one channel weight per channel of the volume;
    2. positional (spatial): max- and mean-pooling over slices and channels give a 2-channel in-plane map; a
       ``7x7`` convolution and a sigmoid give one in-plane weight map shared by all slices of the volume;
    3. slice: a scalar weight per slice (see below).

    Slice attention, and how it differs from the paper. The released code pools each slice to one scalar, and
    maps the vector of the S slices with an MLP ``S -> 4S -> S`` (``nn.Linear`` over the slice axis). That fixes S
    at construction. Here the weights never see S:

    - each slice is described by its per-channel mean and max over the in-plane axes (a C-vector per slice, richer
      than the paper's scalar), concatenated with the same pooling taken over the whole volume, so that each slice
      is judged against its volume, as the paper's fully-connected MLP allows;
    - the paper's two ``Linear`` layers over the slice axis become two 1D convolutions along the slice axis
      (``slice_encoder``: ``2C -> hidden``, ReLU; ``slice_mean``: ``hidden -> 1``), shared by all slices and applied
      to the mean- and max-descriptors with the hidden features summed, as the paper sums its two MLP branches.
      ``hidden = max(C // reduction, 4)``. With ``slice_kernel_size=k`` a slice's logit sees ``2k - 1``
      neighbouring slices directly and every slice of its volume through the volume descriptor. Zero padding at
      the ends of the volume makes any S >= 1 valid with the same weights.

    Uncertainty branch (``uncertainty=True``). As in the paper, the slice logits are drawn from a low-rank
    multivariate normal over the S slices, ``N(mean, F F^T + diag(d))`` with ``F`` of rank ``rank``; here ``mean``,
    ``log d`` and ``F`` (one ``rank``-row per slice) come from 1D convolutions along the slice axis instead of
    ``Linear(S -> S)`` layers. Unlike the released code:

    - sampling is reparameterised (``mean + F eps_r + sqrt(d) eps_s``), so the slice parameters get gradients
      (the released code calls ``.sample()``, which blocks them);
    - the sample is only drawn when ``sample`` is true (default: in training mode); otherwise the distribution's
      mean is used, so eval inference is deterministic. Callers pass ``sample=True`` for Monte-Carlo inference.

    Layout. ``forward(x, num_slices)`` takes ``x`` of shape ``(B * S, C, H, W)`` (``spatial_dims=2``; with
    ``spatial_dims=3``, ``(B * S, C, H, W, D)`` slabs) where consecutive groups of ``num_slices`` entries of the
    batch axis are the slices of one volume (the layout of ``x.reshape(B * S, ...)`` from ``(B, S, ...)``). Every
    pooling runs per volume, so slices of different volumes never mix. ``num_slices=None`` takes the whole batch
    as one volume (the paper's layout). The output has the shape of ``x``.

    Args:
        in_channels: number of feature channels C.
        spatial_dims: number of spatial dimensions of each slice's feature map (2 for slices).
        semantic: use the semantic (channel) attention.
        positional: use the positional (spatial) attention.
        slice_attention: use the slice attention.
        uncertainty: draw the slice logits from the low-rank normal (only used with ``slice_attention``).
        rank: rank of the covariance factor of the slice distribution (paper: 5).
        reduction: channel reduction of the semantic MLP and of the slice encoder (paper: 16 for the semantic MLP).
        positional_kernel_size: kernel size of the positional convolution (paper: 7).
        slice_kernel_size: odd kernel size of the 1D convolutions along the slice axis.
    """

    def __init__(
        self,
        in_channels: int,
        spatial_dims: int = 2,
        semantic: bool = True,
        positional: bool = True,
        slice_attention: bool = True,
        uncertainty: bool = True,
        rank: int = 5,
        reduction: int = 16,
        positional_kernel_size: int = 7,
        slice_kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be positive, got {in_channels}.")
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}.")
        if not (semantic or positional or slice_attention):
            raise ValueError("at least one of semantic, positional and slice_attention must be enabled.")
        if rank < 1:
            raise ValueError(f"rank must be positive, got {rank}.")
        if reduction < 1:
            raise ValueError(f"reduction must be positive, got {reduction}.")
        for name, k in (("positional_kernel_size", positional_kernel_size), ("slice_kernel_size", slice_kernel_size)):
            if k < 1 or k % 2 == 0:
                raise ValueError(f"{name} must be a positive odd integer, got {k}.")

        self.spatial_dims = spatial_dims
        self.rank = rank
        # axes of the (B, S, C, *spatial) view of the input (lists: TorchScript reduces over a list of dims)
        self._spatial_axes = list(range(3, 3 + spatial_dims))
        self._slice_and_spatial_axes = [1] + self._spatial_axes
        self._singleton_spatial = [1] * spatial_dims

        self.semantic_mlp = None
        if semantic:
            hidden = max(in_channels // reduction, 1)
            self.semantic_mlp = nn.Sequential(
                nn.Linear(in_channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, in_channels)
            )

        self.positional_conv = None
        if positional:
            self.positional_conv = Conv[Conv.CONV, spatial_dims](
                2, 1, kernel_size=positional_kernel_size, padding=positional_kernel_size // 2
            )

        self.slice_encoder = None
        self.slice_mean = None
        self.slice_log_diag = None
        self.slice_factor = None
        if slice_attention:
            hidden = max(in_channels // reduction, 4)
            pad = slice_kernel_size // 2
            self.slice_encoder = nn.Sequential(
                nn.Conv1d(2 * in_channels, hidden, slice_kernel_size, padding=pad), nn.ReLU(inplace=True)
            )
            self.slice_mean = nn.Conv1d(hidden, 1, slice_kernel_size, padding=pad)
            if uncertainty:
                self.slice_log_diag = nn.Conv1d(hidden, 1, slice_kernel_size, padding=pad)
                self.slice_factor = nn.Conv1d(hidden, rank, slice_kernel_size, padding=pad)

    @property
    def stochastic(self) -> bool:
        """Whether the module has the uncertainty branch (its output varies when sampling)."""
        return self.slice_factor is not None

    def forward(self, x: torch.Tensor, num_slices: int | None = None, sample: bool | None = None) -> torch.Tensor:
        """
        Args:
            x: ``(B * S, C, *spatial)`` features; each run of ``num_slices`` batch entries is one volume.
            num_slices: slices per volume S; ``None`` treats the whole batch as one volume.
            sample: draw the slice logits from their distribution; ``None`` samples in training mode only.
        """
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"CSAM expects a (B*S, C, *spatial) tensor with {self.spatial_dims} spatial dims, "
                f"got shape {list(x.shape)}."
            )
        total = x.shape[0]
        slices = total if num_slices is None else num_slices
        if slices < 1 or total % slices != 0:
            raise ValueError(f"num_slices ({slices}) must be positive and divide the batch size ({total}).")
        draw = self.training if sample is None else sample
        volumes = total // slices
        v = x.reshape([volumes, slices] + list(x.shape[1:]))

        semantic_mlp = self.semantic_mlp
        if semantic_mlp is not None:
            pooled = semantic_mlp(v.mean(dim=self._slice_and_spatial_axes)) + semantic_mlp(
                v.amax(dim=self._slice_and_spatial_axes)
            )
            v = v * torch.sigmoid(pooled).reshape([volumes, 1, pooled.shape[1]] + self._singleton_spatial)

        positional_conv = self.positional_conv
        if positional_conv is not None:
            pooled = torch.stack([v.amax(dim=[1, 2]), v.mean(dim=[1, 2])], dim=1)
            v = v * torch.sigmoid(positional_conv(pooled)).unsqueeze(1)

        slice_encoder = self.slice_encoder
        slice_mean = self.slice_mean
        if slice_encoder is not None and slice_mean is not None:
            # (B, C, S) per-slice descriptors next to their volume-wide counterparts
            avg = v.mean(dim=self._spatial_axes).transpose(1, 2)
            mx = v.amax(dim=self._spatial_axes).transpose(1, 2)
            hidden = slice_encoder(torch.cat([avg, avg.mean(dim=2, keepdim=True).expand_as(avg)], dim=1))
            hidden = hidden + slice_encoder(torch.cat([mx, mx.amax(dim=2, keepdim=True).expand_as(mx)], dim=1))
            logits = slice_mean(hidden)
            slice_log_diag = self.slice_log_diag
            slice_factor = self.slice_factor
            if draw and slice_log_diag is not None and slice_factor is not None:
                factor = slice_factor(hidden)
                shared_noise = torch.randn([volumes, self.rank, 1], dtype=logits.dtype, device=logits.device)
                logits = (
                    logits
                    + (factor * shared_noise).sum(dim=1, keepdim=True)
                    + torch.exp(0.5 * slice_log_diag(hidden)) * torch.randn_like(logits)
                )
            v = v * torch.sigmoid(logits).reshape([volumes, slices, 1] + self._singleton_spatial)

        return v.reshape(x.shape)
