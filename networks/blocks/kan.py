# SPDX-License-Identifier: Apache-2.0
"""Kolmogorov-Arnold layers: a B-spline KAN linear layer and a KAN convolution for 2D and 3D.

Every parameter of :class:`KANLinear` and :class:`KANConv` has ``kan`` in its name, so that optimizer parameter
groups can pick them out by name: U-KAN (arXiv 2406.02918) trains them with a higher learning rate.

Speed: while the knots of every input feature are evenly spaced (as they are until :meth:`KANLinear.update_grid`
moves them), only ``spline_order + 1`` bases are non-zero at any input, and they are polynomials of the input's
position within its knot interval. :func:`even_b_spline_bases` evaluates just those, with their derivatives in an
analytic backward, instead of the Cox-de Boor recursion over every knot interval (about 25 passes over a
``(tokens, features, bases)`` tensor, each recorded for autograd). :func:`b_spline_bases` stays the reference for
any knots (``networks.blocks.fast.plain_ops()`` selects it, as does TorchScript).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from monai.utils import ensure_tuple_rep
from torch import nn
from torch.autograd.function import once_differentiable

from networks.blocks.fast import fast_ops_enabled

__all__ = ["KANConv", "KANLinear", "b_spline_bases", "even_b_spline_bases", "make_uniform_grid"]


def make_uniform_grid(
    num_features: int, grid_size: int, spline_order: int, grid_range: Sequence[float] = (-1.0, 1.0)
) -> torch.Tensor:
    """Knots of ``grid_size`` equal intervals over ``grid_range``, extended by ``spline_order`` knots on each side.

    Returns a (num_features, grid_size + 2 * spline_order + 1) tensor, one row of knots per input feature.
    """
    low, high = float(grid_range[0]), float(grid_range[1])
    step = (high - low) / grid_size
    knots = low + step * torch.arange(-spline_order, grid_size + spline_order + 1, dtype=torch.float32)
    return knots.expand(num_features, -1).contiguous()


def b_spline_bases(x: torch.Tensor, grid: torch.Tensor, spline_order: int) -> torch.Tensor:
    """
    B-spline basis functions of every feature of ``x``, by the Cox-de Boor recursion.

    The recursion runs over the spline order only; each step is one broadcast over all inputs and features.

    Args:
        x: inputs of shape (..., F).
        grid: knots of shape (F, K), non-decreasing along K; feature f uses row f.
        spline_order: polynomial degree k of the splines (3: cubic).

    Returns:
        Basis values of shape (..., F, K - 1 - k). Outside [grid[:, k], grid[:, -k - 1]) the bases do not
        sum to one, and outside [grid[:, 0], grid[:, -1]) they are all zero.
    """
    x = x.unsqueeze(-1)
    # Degree 0: indicator of the half-open knot interval that holds x.
    bases = ((x >= grid[:, :-1]) & (x < grid[:, 1:])).to(x.dtype)
    for k in range(1, spline_order + 1):
        rising = (x - grid[:, : -(k + 1)]) / (grid[:, k:-1] - grid[:, : -(k + 1)])
        falling = (grid[:, k + 1 :] - x) / (grid[:, k + 1 :] - grid[:, 1:-k])
        bases = rising * bases[..., :-1] + falling * bases[..., 1:]
    return bases


def _local_bases(position: torch.Tensor, degree: int) -> list[torch.Tensor]:
    """
    The ``degree + 1`` B-spline bases of evenly spaced knots that are non-zero at a point ``position`` (0 to 1)
    of the way through its knot interval m: bases m - degree, ..., m, by the Cox-de Boor recursion in local
    coordinates (with knot spacing 1, basis i of degree d rises as (x - t_i) / d and falls as (t_{i+d+1} - x) / d).
    """
    values = [torch.ones_like(position)]
    for d in range(1, degree + 1):
        new = []
        for r in range(d + 1):
            value = None
            if r > 0:  # the rising part of basis m - d + r, from basis r - 1 of degree d - 1
                value = (position + (d - r)) * values[r - 1]
            if r < d:  # the falling part, from basis r of degree d - 1
                falling = ((r + 1) - position) * values[r]
                value = falling if value is None else value + falling
            new.append(value / d)
        values = new
    return values


class _EvenBSplineBases(torch.autograd.Function):
    """B-spline bases of evenly spaced knots; see :func:`even_b_spline_bases`."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)  # under autocast: float32 inside
    def forward(ctx, x, knot_start, knot_step, grid_size, spline_order):  # type: ignore[override]
        k = spline_order
        num_bases = grid_size + k
        scaled = (x - knot_start) / knot_step  # position in knot steps from the first knot
        # knot interval m holds bases m - k .. m; beyond the outer knots no basis is non-zero
        inside = (scaled >= 0) & (scaled < grid_size + 2 * k)
        interval = scaled.floor().clamp_(0, grid_size + 2 * k - 1)
        position = scaled - interval
        # per local basis r, its index m - k + r; near the ends some of these bases do not exist: they add zeros
        indices, valid = [], []
        for r in range(k + 1):
            index = interval - (k - r)
            indices.append(index.clamp(0, num_bases - 1).long().unsqueeze(-1))
            valid.append((inside & (index >= 0) & (index < num_bases)).to(x.dtype))
        bases = x.new_zeros(x.shape + (num_bases,))
        for r, value in enumerate(_local_bases(position, k)):
            bases.scatter_add_(-1, indices[r], (value * valid[r]).unsqueeze(-1))
        ctx.save_for_backward(position, knot_step, *indices, *valid)
        ctx.spline_order = k
        return bases

    @staticmethod
    @once_differentiable
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad):  # type: ignore[override]
        k = ctx.spline_order
        position, knot_step = ctx.saved_tensors[:2]
        indices, valid = ctx.saved_tensors[2 : 3 + k], ctx.saved_tensors[3 + k :]
        grad_x = torch.zeros_like(position)
        if k > 0:
            # d B_{m-k+r} / dx = (B^{k-1}_{r-1} - B^{k-1}_r) / step, lower-degree bases absent outside r = 0..k-1
            lower = _local_bases(position, k - 1)
            for r in range(k + 1):
                slope = (lower[r - 1] if r > 0 else 0) - (lower[r] if r < k else 0)
                grad_x += grad.gather(-1, indices[r]).squeeze(-1) * slope * valid[r]
            grad_x /= knot_step
        return grad_x, None, None, None, None


def even_b_spline_bases(
    x: torch.Tensor, knot_start: torch.Tensor, knot_step: torch.Tensor, grid_size: int, spline_order: int
) -> torch.Tensor:
    """
    :func:`b_spline_bases` for evenly spaced knots, knot j of feature f being ``knot_start[f] + j * knot_step[f]``
    (j = 0..grid_size + 2 * spline_order): (..., F) -> (..., F, grid_size + spline_order). Only the
    ``spline_order + 1`` bases that are non-zero at each input are evaluated, and the backward is analytic.
    """
    return _EvenBSplineBases.apply(x, knot_start, knot_step, grid_size, spline_order)


class _KnotsMixin(nn.Module):
    """
    Keeps ``knot_start`` and ``knot_step`` (per feature, not saved in the state dict) and ``even_knots`` in step
    with the ``grid`` buffer, for :func:`even_b_spline_bases`: call ``_register_knots()`` after registering
    ``grid``; loading a state dict or changing the dtype updates them, and so must every other change of the grid.
    """

    def _register_knots(self) -> None:
        features = self.grid.shape[0]
        self.register_buffer("knot_start", torch.zeros(features), persistent=False)
        self.register_buffer("knot_step", torch.ones(features), persistent=False)
        self.even_knots = False
        self._update_knots()
        self.register_load_state_dict_post_hook(_update_knots_after_load)

    @torch.jit.unused
    def _update_knots(self) -> None:
        grid = self.grid
        if grid.device.type == "meta":  # shapes only (e.g. FLOP counting): nothing to compare
            self.even_knots = False
            return
        steps = grid.diff(dim=1)
        step = (grid[:, -1] - grid[:, 0]) / steps.shape[1]
        # even up to the rounding of the grid's dtype: a float32 grid in a double module is not even in double
        tolerance = 64 * torch.finfo(grid.dtype).eps if grid.is_floating_point() else 0.0
        self.even_knots = bool(torch.allclose(steps, step.unsqueeze(1), rtol=tolerance, atol=0.0))
        if self.even_knots:
            self.knot_start.copy_(grid[:, 0])
            self.knot_step.copy_(step)

    def _bases(self, x: torch.Tensor) -> torch.Tensor:
        """B-spline bases of ``x`` (..., F): of evenly spaced knots fast, else by the Cox-de Boor recursion."""
        if self.even_knots and fast_ops_enabled(x):
            return even_b_spline_bases(x, self.knot_start, self.knot_step, self.grid_size, self.spline_order)
        return b_spline_bases(x, self.grid, self.spline_order)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._update_knots()  # a new dtype changes what counts as even
        return self


def _update_knots_after_load(module: _KnotsMixin, incompatible_keys) -> None:
    module._update_knots()


class KANLinear(_KnotsMixin):
    """
    Kolmogorov-Arnold linear layer (Liu et al., arXiv 2404.19756), in the efficient formulation U-KAN uses:

        y = W_base @ SiLU(x) + (W_spline * s) @ B(x)

    where B(x) holds, for each input feature, the ``grid_size + spline_order`` B-spline bases on that feature's
    knots, W_spline (out, in, grid_size + spline_order) the spline coefficients of every input-output edge and
    s (out, in) a per-edge spline scale. There is no bias. Parameters: ``in * out * (grid_size + spline_order + 2)``,
    10x a Linear layer at the defaults.

    Initialisation follows U-KAN's ``KANLinear``: both weight matrices get Kaiming-uniform values (``a = sqrt(5)``
    times ``scale_base`` / ``scale_spline``); the spline coefficients start as small uniform noise of width
    ``scale_noise / grid_size``, so a fresh layer is close to its SiLU base branch.

    Args:
        in_features: size of the last input dimension.
        out_features: size of the last output dimension.
        grid_size: number of grid intervals over ``grid_range``.
        spline_order: B-spline degree (3: cubic).
        scale_noise: width of the initial spline-coefficient noise, times ``grid_size``.
        scale_base: gain of the base-weight initialisation.
        scale_spline: gain of the spline-scale initialisation.
        grid_eps: in :meth:`update_grid`, weight of a uniform grid against the data quantiles (1: uniform).
        grid_range: initial interval covered by the grid; inputs beyond it (by more than ``spline_order`` grid
            steps) only reach the base branch.

    Input (..., in_features), output (..., out_features).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        grid_size: int = 5,
        spline_order: int = 3,
        scale_noise: float = 0.1,
        scale_base: float = 1.0,
        scale_spline: float = 1.0,
        grid_eps: float = 0.02,
        grid_range: Sequence[float] = (-1.0, 1.0),
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}.")
        if grid_size < 1 or spline_order < 0:
            raise ValueError(f"need grid_size >= 1 and spline_order >= 0, got {grid_size}, {spline_order}.")
        if len(grid_range) != 2 or not grid_range[0] < grid_range[1]:
            raise ValueError(f"grid_range must be (low, high) with low < high, got {grid_range}.")
        self.in_features = in_features
        self.out_features = out_features
        self.grid_size = grid_size
        self.spline_order = spline_order
        self.grid_eps = grid_eps
        self.register_buffer("grid", make_uniform_grid(in_features, grid_size, spline_order, grid_range))
        self._register_knots()
        self.kan_base_weight = nn.Parameter(torch.empty(out_features, in_features))
        self.kan_spline_weight = nn.Parameter(torch.empty(out_features, in_features, grid_size + spline_order))
        self.kan_spline_scaler = nn.Parameter(torch.empty(out_features, in_features))
        self.base_act = nn.SiLU()
        self.reset_parameters(scale_noise, scale_base, scale_spline)

    def reset_parameters(self, scale_noise: float = 0.1, scale_base: float = 1.0, scale_spline: float = 1.0) -> None:
        nn.init.kaiming_uniform_(self.kan_base_weight, a=math.sqrt(5) * scale_base)
        nn.init.kaiming_uniform_(self.kan_spline_scaler, a=math.sqrt(5) * scale_spline)
        with torch.no_grad():
            self.kan_spline_weight.uniform_(-0.5, 0.5).mul_(scale_noise / self.grid_size)

    def scaled_spline_weight(self) -> torch.Tensor:
        return self.kan_spline_weight * self.kan_spline_scaler.unsqueeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected the last input dimension to be {self.in_features}, got {x.shape[-1]}.")
        if torch.jit.is_scripting():
            bases = b_spline_bases(x, self.grid, self.spline_order)
        else:
            bases = self._bases(x)
        bases = bases.flatten(-2)
        spline_weight = self.scaled_spline_weight().flatten(1)
        return F.linear(self.base_act(x), self.kan_base_weight) + F.linear(bases, spline_weight)

    @torch.no_grad()
    def update_grid(self, x: torch.Tensor, margin: float = 0.01) -> None:
        """
        Move each input feature's knots to the distribution of ``x`` and refit the spline coefficients so that
        the layer's output on ``x`` stays (approximately, in the least-squares sense) the same.

        The new knots blend the data quantiles with a uniform grid over [min - margin, max + margin]
        (``grid_eps`` sets the blend) and are extended by ``spline_order`` uniform steps on each side.
        ``x`` has shape (..., in_features); memory grows as N * in_features * out_features for N inputs, so pass a
        sample of a few thousand inputs at most. Unlike efficient-kan, the refit targets the unscaled
        coefficients: the per-edge spline scale is applied again in ``forward`` and is left as it is.
        """
        x = x.reshape(-1, self.in_features).float()
        num_samples = x.shape[0]
        old_bases = b_spline_bases(x, self.grid.float(), self.spline_order)
        edge_outputs = torch.einsum("nic,oic->nio", old_bases, self.kan_spline_weight.float())

        x_sorted = torch.sort(x, dim=0).values
        quantile_idx = torch.linspace(0, num_samples - 1, self.grid_size + 1, device=x.device).long()
        adaptive = x_sorted[quantile_idx]
        step = (x_sorted[-1] - x_sorted[0] + 2 * margin) / self.grid_size
        intervals = torch.arange(self.grid_size + 1, dtype=x.dtype, device=x.device).unsqueeze(1)
        uniform = x_sorted[0] - margin + intervals * step
        knots = self.grid_eps * uniform + (1 - self.grid_eps) * adaptive
        extension = torch.arange(1, self.spline_order + 1, dtype=x.dtype, device=x.device).unsqueeze(1) * step
        knots = torch.cat([knots[:1] - extension.flip(0), knots, knots[-1:] + extension], dim=0)

        new_grid = knots.t().contiguous()
        new_bases = b_spline_bases(x, new_grid, self.spline_order).transpose(0, 1)
        # Per feature: least squares over the samples; pinv also covers rank-deficient bases and runs on any device.
        coefficients = torch.linalg.pinv(new_bases) @ edge_outputs.transpose(0, 1)
        self.grid.copy_(new_grid)
        self.kan_spline_weight.copy_(coefficients.permute(2, 0, 1))
        self._update_knots()

    def regularization_loss(self, regularize_activation: float = 1.0, regularize_entropy: float = 1.0) -> torch.Tensor:
        """
        The KAN sparsity regulariser in efficient-kan's weight-based form: the L1 norm of the per-edge mean
        absolute spline coefficient, plus the entropy of those magnitudes normalised to sum to one.
        """
        edge_l1 = self.kan_spline_weight.abs().mean(-1)
        activation = edge_l1.sum()
        p = edge_l1 / activation
        entropy = -torch.special.xlogy(p, p).sum()
        return regularize_activation * activation + regularize_entropy * entropy

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, grid_size={self.grid_size}, "
            f"spline_order={self.spline_order}"
        )


class KANConv(_KnotsMixin):
    """
    KAN convolution for 2D and 3D: every (output channel, input channel, kernel offset) edge carries its own
    learnable function ``w_base * SiLU(x) + sum_j c_j B_j(x)`` of the input value, and a conv output sums these
    functions over its receptive field, i.e. a :class:`KANLinear` applied to every unfolded patch.

    Instead of unfolding patches, the input is expanded once: each input channel becomes its
    ``grid_size + spline_order`` B-spline basis channels (on that channel's knots, channel-major order), and a
    plain convolution over the expanded channels applies all spline coefficients ``c_j``; a second plain
    convolution over SiLU(x) is the base branch:

        y = Conv_base(SiLU(x)) + Conv_spline(B(x))

    Away from padded borders this equals the patch-wise KAN exactly (the knots are shared across kernel offsets),
    at the cost of one convolution with ``grid_size + spline_order`` times the input channels, and it supports
    stride, padding, dilation and groups (with ``groups == in_channels``: a depthwise KAN conv). There is no
    separate spline scale as in :class:`KANLinear`: with free per-edge coefficients it would be a redundant
    factor. The base conv keeps PyTorch's default initialisation, scaled by ``scale_base``; the spline
    coefficients start as small noise (width ``scale_noise / grid_size``), as in :class:`KANLinear`.

    Parameters: ``out * in / groups * prod(kernel_size) * (grid_size + spline_order + 1)`` plus ``out`` for the bias.

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        in_channels: number of input channels.
        out_channels: number of output channels.
        kernel_size: convolution kernel size, one int or one per spatial dimension.
        stride: convolution stride.
        padding: zero padding of the input; padded positions contribute nothing to either branch, as zero padding
            does for a plain convolution.
        dilation: convolution dilation.
        groups: convolution groups; must divide ``in_channels`` and ``out_channels``.
        bias: whether the base branch has a bias.
        grid_size: number of grid intervals over ``grid_range``.
        spline_order: B-spline degree (3: cubic).
        scale_noise: width of the initial spline-coefficient noise, times ``grid_size``.
        scale_base: gain applied to the base conv's initial weights.
        grid_range: interval covered by the grid.

    Input (B, in_channels, H, W[, D]), output (B, out_channels, H', W'[, D']).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int] | int = 3,
        stride: Sequence[int] | int = 1,
        padding: Sequence[int] | int = 0,
        dilation: Sequence[int] | int = 1,
        groups: int = 1,
        bias: bool = True,
        grid_size: int = 5,
        spline_order: int = 3,
        scale_noise: float = 0.1,
        scale_base: float = 1.0,
        grid_range: Sequence[float] = (-1.0, 1.0),
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}.")
        if grid_size < 1 or spline_order < 0:
            raise ValueError(f"need grid_size >= 1 and spline_order >= 0, got {grid_size}, {spline_order}.")
        if len(grid_range) != 2 or not grid_range[0] < grid_range[1]:
            raise ValueError(f"grid_range must be (low, high) with low < high, got {grid_range}.")
        self.in_channels = in_channels
        self.spline_order = spline_order
        self.num_bases = grid_size + spline_order
        conv_type = Conv[Conv.CONV, spatial_dims]
        conv_args = {
            "kernel_size": ensure_tuple_rep(kernel_size, spatial_dims),
            "stride": ensure_tuple_rep(stride, spatial_dims),
            "padding": ensure_tuple_rep(padding, spatial_dims),
            "dilation": ensure_tuple_rep(dilation, spatial_dims),
            "groups": groups,
        }
        self.register_buffer("grid", make_uniform_grid(in_channels, grid_size, spline_order, grid_range))
        self._register_knots()
        self.grid_size = grid_size
        self.base_act = nn.SiLU()
        self.kan_base_conv = conv_type(in_channels, out_channels, bias=bias, **conv_args)
        self.kan_spline_conv = conv_type(in_channels * self.num_bases, out_channels, bias=False, **conv_args)
        with torch.no_grad():
            self.kan_base_conv.weight.mul_(scale_base)
            self.kan_spline_conv.weight.uniform_(-0.5, 0.5).mul_(scale_noise / grid_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape[1]}.")
        if torch.jit.is_scripting():
            bases = b_spline_bases(x.movedim(1, -1), self.grid, self.spline_order)
        else:
            bases = self._bases(x.movedim(1, -1))
        bases = bases.flatten(-2).movedim(-1, 1)
        return self.kan_base_conv(self.base_act(x)) + self.kan_spline_conv(bases)
