# SPDX-License-Identifier: Apache-2.0
"""
Faster CPU paths for the layers of the collection's networks, with a switch back to plain PyTorch ops.

On a CPU, PyTorch's default (channels-first) memory layout and its generic backward kernels leave a lot of time on
the table for some layer types; measured with torch 2.13 on an AVX-512 CPU:

- 3D depthwise convolutions: the weight gradient in the channels-first layout runs a per-channel loop (10-30x
  slower than the forward); in ``channels_last_3d`` it is 3-6x faster, and computing it as one grouped convolution
  of the input with the output gradient (and the input gradient as a convolution of the output gradient with the
  flipped kernel) is 1.5-3.5x faster again (in 2D, PyTorch's channels-last kernels are the faster ones);
- 1x1 convolutions on channels-last tensors: a matrix product over the channel axis beats the convolution kernels;
- 2x2 stride-2 transposed convolutions: a matrix product and a reshape;
- stride-1 "same" convolutions whose (dilated) kernel reaches beyond a small input, like D-Net's 7-kernel with
  dilation 3 at its deepest levels: the taps that only ever see zero padding are cut from the kernel.

:class:`FastConv2d`/:class:`FastConv3d` and :class:`FastConvTranspose2d`/:class:`FastConvTranspose3d` are
``nn.Conv*``/``nn.ConvTranspose*`` with the same parameters and state-dict keys that take these paths where they
apply (stride, padding and kernel checked at construction, memory format at call time) and the plain
``nn.Conv*`` forward everywhere else. :func:`to_channels_last` puts a network's input into the channels-last
layout its layers then keep. The results equal the plain ops' up to float rounding; the largest differences come
from PyTorch's own channels-last BatchNorm, which computes the batch statistics in one float32 pass (about 1e-4
relative where a channel's mean is several times its spread, against 1e-7 channels-first).

``with plain_ops(): ...`` turns every fast path off (plain PyTorch ops, channels-first layout): the reference the
tests compare the fast paths with, and a way to rule them out when debugging. TorchScript always compiles the plain
ops, and tensors on other devices than the CPU always take them, except that under autocast 3D depthwise
convolutions run in float32 on every device (:func:`half_precision_depthwise` lifts that for measurements).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = [
    "FastConv2d",
    "FastConv3d",
    "FastConvTranspose2d",
    "FastConvTranspose3d",
    "as_fast_conv",
    "depthwise_conv",
    "fast_conv_type",
    "fast_conv_transpose_type",
    "fast_ops_enabled",
    "half_precision_depthwise",
    "plain_ops",
    "to_channels_last",
]

_FAST_OPS = True
_DEPTHWISE_FLOAT32 = True


def fast_ops_enabled(x: torch.Tensor) -> bool:
    """Whether the fast paths apply to ``x``: on unless :func:`plain_ops` turned them off, and on CPU tensors only
    (they are measured on CPUs; GPU libraries have their own kernels for these layers)."""
    return _FAST_OPS and x.device.type == "cpu"


@contextlib.contextmanager
def plain_ops() -> Iterator[None]:
    """Within the ``with`` block, the networks run plain PyTorch ops in the channels-first layout."""
    global _FAST_OPS
    previous, _FAST_OPS = _FAST_OPS, False
    try:
        yield
    finally:
        _FAST_OPS = previous


@contextlib.contextmanager
def half_precision_depthwise() -> Iterator[None]:
    """Within the ``with`` block, 3D depthwise convolutions follow autocast into half precision like any other
    convolution, instead of staying in float32 (for benchmarks that measure what the float32 rule saves)."""
    global _DEPTHWISE_FLOAT32
    previous, _DEPTHWISE_FLOAT32 = _DEPTHWISE_FLOAT32, False
    try:
        yield
    finally:
        _DEPTHWISE_FLOAT32 = previous


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W[, D]) in the channels-last memory layout, unless the fast paths are off."""
    if not fast_ops_enabled(x):
        return x
    if x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _is_channels_last(x: torch.Tensor) -> bool:
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], **kwargs) -> torch.Tensor:
    return (F.conv3d if x.dim() == 5 else F.conv2d)(x, weight, bias, **kwargs)


class _DepthwiseConv(torch.autograd.Function):
    """Depthwise convolution, stride 1, "same" zero padding, with both gradients computed as convolutions."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)  # under autocast: float32 inside
    def forward(ctx, x, weight, bias, padding, dilation):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.dilation, ctx.has_bias = padding, dilation, bias is not None
        return _conv(x, weight, bias, padding=padding, dilation=dilation, groups=x.shape[1])

    @staticmethod
    @once_differentiable
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        spatial = tuple(range(2, x.dim()))
        channels = x.shape[1]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # the transpose of a stride-1 "same" convolution is the convolution with the flipped kernel
            flipped = weight.flip(spatial)
            grad_x = _conv(grad, flipped, None, padding=ctx.padding, dilation=ctx.dilation, groups=channels)
        if ctx.needs_input_grad[1]:
            # weight[c, o] = sum_p x_pad[c, p + dilation * o] * grad[c, p]: a grouped convolution of the (zero
            # padded) input with the output gradient as kernel, strided by the dilation; one image at a time
            per_image = [
                _conv(xi, g.transpose(0, 1), None, padding=ctx.padding, stride=ctx.dilation, groups=channels)
                for xi, g in zip(x.split(1), grad.split(1))
            ]
            grad_weight = torch.stack(per_image).sum(0).transpose(0, 1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0,) + spatial)
        return grad_x, grad_weight, grad_bias, None, None


def depthwise_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: tuple, dilation: tuple
) -> torch.Tensor:
    """Depthwise conv (``groups = channels``, stride 1, ``padding = dilation * (kernel - 1) / 2``) of ``x``."""
    return _DepthwiseConv.apply(x, weight, bias, tuple(padding), tuple(dilation))


def _same_padding(conv: nn.modules.conv._ConvNd) -> bool:
    """Stride 1 and zero padding of half the (dilated) kernel on each side: the output has the input's size."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or any(s != 1 for s in conv.stride):
        return False
    return all(p * 2 == d * (k - 1) for p, d, k in zip(conv.padding, conv.dilation, conv.kernel_size))


def _conv_kind(conv: nn.modules.conv._ConvNd) -> str:
    """Which fast path a convolution's hyper-parameters allow: "depthwise", "pointwise" or "plain"."""
    unit_stride = all(s == 1 for s in conv.stride)
    if conv.padding_mode != "zeros" or not unit_stride or isinstance(conv.padding, str):
        return "plain"
    same = _same_padding(conv)
    if conv.groups == conv.in_channels == conv.out_channels and same:
        return "depthwise"
    if conv.groups == 1 and all(k == 1 for k in conv.kernel_size) and all(p == 0 for p in conv.padding):
        return "pointwise"
    return "plain"


def _crop_to_input(weight: torch.Tensor, padding: tuple, dilation: tuple, sizes: list[int]) -> tuple:
    """
    A stride-1 "same" convolution's kernel without the taps that only ever see zero padding, and its padding.
    Along an axis of size S, tap t (offset (t - center) * dilation) reaches the input only if |offset| < S: a
    7-kernel with dilation 3 has 5 useful taps on 8 voxels, 3 on 4 and 1 on 2. The result is exactly the same.
    """
    slices, new_padding = [slice(None), slice(None)], []
    for k, d, p, size in zip(weight.shape[2:], dilation, padding, sizes):
        center = (k - 1) // 2
        reach = min(center, (size - 1) // d)
        slices.append(slice(center - reach, center + reach + 1))
        new_padding.append(min(p, reach * d))
    return weight[tuple(slices)], tuple(new_padding)


def _float32_conv(conv, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The convolution in float32 with autocast off. Under autocast, 3D depthwise convolutions take this (as they do
    on the fast CPU path): they have no tensor-core work to gain from half precision, and D-Net's training under
    bfloat16 stalled on an H200 where its float32 step took 0.87 s, with these layers (cuDNN's half-precision
    kernels for large dilated depthwise 3D kernels) the first suspects; ``benchmarks/gpu_check.py`` times both."""
    bias = None if conv.bias is None else conv.bias.float()
    with torch.autocast(x.device.type, enabled=False):
        return conv._conv_forward(x.float(), weight.float(), bias)


def _fast_conv_forward(conv, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if not fast_ops_enabled(x):
        depthwise_3d = conv.kind == "depthwise" and x.dim() == 5
        # the meta device (shapes only: FLOP counts, the tests' shape checks) has no autocast to ask about
        autocast = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)
        if depthwise_3d and _DEPTHWISE_FLOAT32 and autocast:
            return _float32_conv(conv, x, weight)
        return conv._conv_forward(x, weight, conv.bias)
    padding, cropped = conv.padding, False
    # (a trace would record the sizes as constants: it keeps the whole kernel)
    if conv.same_padding and not torch.jit.is_tracing() and any(p >= s for p, s in zip(padding, x.shape[2:])):
        weight, padding = _crop_to_input(weight, padding, conv.dilation, list(x.shape[2:]))
        cropped = True
    if conv.kind == "depthwise" and x.dim() == 5:  # in 2D, PyTorch's own channels-last kernels are faster
        return depthwise_conv(x, weight, conv.bias, padding, conv.dilation)
    if conv.kind == "pointwise" and _is_channels_last(x):
        return F.linear(x.movedim(1, -1), weight.flatten(1), conv.bias).movedim(-1, 1)
    if cropped:
        y = _conv(x, weight, conv.bias, padding=padding, dilation=conv.dilation, groups=conv.groups)
    else:
        y = conv._conv_forward(x, weight, conv.bias)
    return _keep_layout(x, y)


def _keep_layout(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` channels-last if ``x`` is: a one-channel input counts as both layouts, and the convolution kernels then
    return channels-first, which would take the rest of a channels-last network off its layout."""
    return to_channels_last(y) if _is_channels_last(x) else y


class FastConv3d(nn.Conv3d):
    """``nn.Conv3d`` with the fast CPU paths of this module for depthwise and (on channels-last input) 1x1 convs."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kind = _conv_kind(self)
        self.same_padding = _same_padding(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fast_forward(x, self.weight)

    def fast_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The convolution of ``x`` with ``weight`` (this layer's or another of its shape) and this layer's bias."""
        if torch.jit.is_scripting():
            return self._conv_forward(x, weight, self.bias)
        return _fast_conv_forward(self, x, weight)


class FastConv2d(nn.Conv2d):
    """``nn.Conv2d`` with the fast CPU paths of this module for depthwise and (on channels-last input) 1x1 convs."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kind = _conv_kind(self)
        self.same_padding = _same_padding(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fast_forward(x, self.weight)

    def fast_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The convolution of ``x`` with ``weight`` (this layer's or another of its shape) and this layer's bias."""
        if torch.jit.is_scripting():
            return self._conv_forward(x, weight, self.bias)
        return _fast_conv_forward(self, x, weight)


def _fast_up_conv(conv, x: torch.Tensor) -> Optional[torch.Tensor]:
    """A transposed conv whose kernel equals its stride (no overlap) as a matrix product over channels."""
    if not (fast_ops_enabled(x) and conv.non_overlapping and _is_channels_last(x)):
        return None
    kernel = list(conv.kernel_size)
    dims = len(kernel)
    spatial = list(x.shape[2:])
    # (B * S, C_in) @ (C_in, C_out * prod(k)) + bias -> (B, *S, C_out, *k) -> each spatial axis next to its k
    rows = x.movedim(1, -1).reshape(-1, conv.in_channels)
    weight = conv.weight.flatten(1)
    if conv.bias is None:
        y = torch.mm(rows, weight)
    else:
        y = torch.addmm(conv.bias.repeat_interleave(weight.shape[1] // conv.out_channels), rows, weight)
    y = y.view([x.shape[0]] + spatial + [conv.out_channels] + kernel)
    order = [0]
    for i in range(dims):
        order += [1 + i, 2 + dims + i]
    y = y.permute(order + [1 + dims]).reshape([x.shape[0]] + [s * k for s, k in zip(spatial, kernel)] + [-1])
    return y.movedim(-1, 1)


def _non_overlapping(conv: nn.modules.conv._ConvTransposeNd) -> bool:
    return (
        tuple(conv.kernel_size) == tuple(conv.stride)
        and all(p == 0 for p in conv.padding)
        and all(p == 0 for p in conv.output_padding)
        and all(d == 1 for d in conv.dilation)
        and conv.groups == 1
    )


class FastConvTranspose3d(nn.ConvTranspose3d):
    """``nn.ConvTranspose3d``; with kernel == stride on channels-last input, a matrix product and a reshape."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.non_overlapping = _non_overlapping(self)

    def forward(self, x: torch.Tensor, output_size: Optional[list[int]] = None) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if output_size is None:
                y = _fast_up_conv(self, x)
                if y is not None:
                    return y
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, 3, self.dilation  # type: ignore[arg-type]
        )
        return F.conv_transpose3d(
            x, self.weight, self.bias, self.stride, self.padding, output_padding, self.groups, self.dilation
        )


class FastConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d``; with kernel == stride on channels-last input, a matrix product and a reshape."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.non_overlapping = _non_overlapping(self)

    def forward(self, x: torch.Tensor, output_size: Optional[list[int]] = None) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if output_size is None:
                y = _fast_up_conv(self, x)
                if y is not None:
                    return y
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation  # type: ignore[arg-type]
        )
        return F.conv_transpose2d(
            x, self.weight, self.bias, self.stride, self.padding, output_padding, self.groups, self.dilation
        )


def as_fast_conv(conv: nn.Module) -> nn.Module:
    """Turn an ``nn.Conv2d``/``nn.Conv3d`` (e.g. inside a MONAI block) into the fast class of its dimension, in place:
    same parameters and state-dict keys, nothing re-initialised. Other modules are returned unchanged."""
    fast_type = {nn.Conv2d: FastConv2d, nn.Conv3d: FastConv3d}.get(type(conv))
    if fast_type is not None:
        conv.__class__ = fast_type
        conv.kind = _conv_kind(conv)
        conv.same_padding = _same_padding(conv)
    return conv


def fast_conv_type(spatial_dims: int) -> type:
    """:class:`FastConv2d` or :class:`FastConv3d`, like MONAI's ``Conv[Conv.CONV, spatial_dims]``."""
    return {2: FastConv2d, 3: FastConv3d}[spatial_dims]


def fast_conv_transpose_type(spatial_dims: int) -> type:
    """:class:`FastConvTranspose2d` or :class:`FastConvTranspose3d`, like ``Conv[Conv.CONVTRANS, spatial_dims]``."""
    return {2: FastConvTranspose2d, 3: FastConvTranspose3d}[spatial_dims]
