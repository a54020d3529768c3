"""Training convolutions on CPU whose weight gradient is computed as one GEMM per kernel tap.

oneDNN's weight gradient of a 3x3 convolution runs at 20-60 GFLOP/s stride 1 and 13-22 stride 2 on a 2-core AVX2
EPYC (its forward and input gradient at 100-150): ResNet-50's 3x3s at 800x1333 took 90-365 ms each for the weight
gradient alone. Laid out on the zero-padded pixel grid, the input seen by tap (i, j) is the same matrix shifted by
i * dilation grid rows plus j * dilation pixels (strided: within one of the stride x stride phase grids), so the
tap's gradient is one (out, pixels) x (pixels, in) GEMM on views of one padded copy (an im2col buffer would be
k * k copies). In channels_last (pixels, channels) matrices 1.4-3.9x faster than oneDNN at ResNet-50's shapes;
in NCHW (channels, pixels), where oneDNN's own is 2-4x faster than in channels_last, 0.8-1.9x."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# Pixels per GEMM: every tap runs on one chunk of the grids while it is in cache (the taps' inputs overlap). At 64
# channels, batch 8 of 64x64 (the demo's C2): 42 -> 30 ms against whole-grid GEMMs; 128-512 channels: the same.
_CHUNK = 4096


def _phase_grids(x: torch.Tensor, pad: int, stride: int, rows: int, cols: int, pixels_first: bool) -> torch.Tensor:
    """(N, C, H, W) zero-padded by pad on each side and split into its stride x stride phases (pixels with the same
    row and column remainders), each N x rows x cols, as a (pixels, C) matrix: stored pixel-major if pixels_first
    (channels last), else channel-major (a transposed view; copying NCHW into NHWC would transpose every pixel)."""
    n, c, h, w = x.shape
    if pixels_first:  # N, rows, cols, C
        grid = x.new_zeros(n, rows * stride, cols * stride, c)
        grid[:, pad:pad + h, pad:pad + w] = x.permute(0, 2, 3, 1)
        if stride > 1:
            grid = grid.view(n, rows, stride, cols, stride, c).permute(2, 4, 0, 1, 3, 5).contiguous()
        return grid.view(-1, c)
    grid = x.new_zeros(c, n, rows * stride, cols * stride)
    grid[:, :, pad:pad + h, pad:pad + w] = x.transpose(0, 1)
    if stride > 1:
        grid = grid.view(c, n, rows, stride, cols, stride).permute(0, 3, 5, 1, 2, 4).contiguous()
    return grid.view(c, -1).t()


def conv_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, kernel_size: int, stride: int = 1,
                     dilation: int = 1) -> torch.Tensor:
    """Gradient of an ungrouped convolution with padding dilation * (k - 1) / 2 with respect to its (O, C, k, k)
    weight; grad_out (N, O, Ho, Wo), x (N, C, H, W). Channels-last x gives a channels-last result, else NCHW.

    With stride s the padded input is split into s * s phase grids of equal size: tap (i, j) reads phase
    (i * dilation % s, j * dilation % s) shifted by (i * dilation // s, j * dilation // s) pixels."""
    n, c, h, w = x.shape
    o, ho, wo = grad_out.shape[1:]
    pad = dilation * (kernel_size - 1) // 2
    rows, cols = -(-(h + 2 * pad) // stride), -(-(w + 2 * pad) // stride)  # of one phase grid
    pixels_first = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    xs = _phase_grids(x, pad, stride, rows, cols, pixels_first)
    # The output pixel (y, x) sits at (y, x) of a grid of the same shape, zeros elsewhere.
    gs = _phase_grids(grad_out, 0, 1, rows, cols, pixels_first)
    pixels = (n - 1) * rows * cols + (ho - 1) * cols + wo  # through the last output pixel
    per_phase = n * rows * cols
    out = x.new_zeros(o, kernel_size, kernel_size, c)
    taps = []  # (where the tap's input starts in xs, its (O, C) gradient)
    for i in range(kernel_size):
        for j in range(kernel_size):
            (di, pi), (dj, pj) = divmod(i * dilation, stride), divmod(j * dilation, stride)
            taps.append(((pi * stride + pj) * per_phase + di * cols + dj, out[:, i, j]))
    for a in range(0, pixels, _CHUNK):
        b = min(a + _CHUNK, pixels)
        g_chunk = gs[a:b].t()
        for start, grad in taps:
            grad.addmm_(g_chunk, xs[start + a:start + b])
    out = out.permute(0, 3, 1, 2)  # (O, C, k, k) in channels-last strides
    return out if pixels_first else out.contiguous()


class _TapwiseConv2d(torch.autograd.Function):
    """F.conv2d forward and input gradient (oneDNN); weight gradient by `conv_weight_grad`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                stride: int, dilation: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.dilation = stride, dilation
        return F.conv2d(x, weight, bias, stride, dilation * (weight.shape[-1] - 1) // 2, dilation)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        s, d, k = ctx.stride, ctx.dilation, weight.shape[-1]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, [s, s], [d * (k - 1) // 2] * 2, [d, d], False, [0, 0], 1,
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = conv_weight_grad(grad_out, x, k, s, d)
        if ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


def tapwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
                   dilation: int = 1) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, dilation * (k - 1) // 2, dilation) for a square odd kernel and one group,
    with the weight gradient taken tap by tap (CPU training; see the module docstring)."""
    return _TapwiseConv2d.apply(x, weight, bias, stride, dilation)
