"""Softmax over the attention's last dimension (a head's L x P sampling weights), fast also when it is short.

PyTorch's CPU softmax vectorises along the last dimension and falls back to a scalar loop below the vector width
(16 fp32 lanes with AVX-512, 8 with AVX2): on an AVX-512 CPU, over 4-12 values (the single-scale and demo models: 1
or 3 levels x 4 points) it is 5-6x slower than over 16, in the forward and in the backward. Below that width this
computes it with whole-tensor ops instead, in fp32 for lower precision inputs (as PyTorch's own kernel accumulates),
with its own two-op backward. On AVX2 only rows of 4 gain (3x); from 8 on PyTorch's kernel is faster there.
"""

from __future__ import annotations

from functools import cache

import torch

from ddetr.ops.ms_deform_attn import capturing


@cache
def short_rows() -> int:
    """Rows shorter than this take `_ShortSoftmax`: the fp32 lanes of the vector unit PyTorch's kernel runs on (only
    the two x86 widths were measured; other CPUs keep PyTorch's kernel)."""
    return {"AVX512": 16, "AVX2": 8}.get(torch.backends.cpu.get_cpu_capability(), 0)


class _ShortSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        y = x.float() if x.dtype not in (torch.float32, torch.float64) else x
        y = y - y.amax(-1, keepdim=True)
        y.exp_()
        y.div_(y.sum(-1, keepdim=True))
        ctx.save_for_backward(y)
        ctx.input_dtype = x.dtype
        return y.to(dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (y,) = ctx.saved_tensors
        gy = grad.to(y.dtype) * y
        return gy.sub_(y * gy.sum(-1, keepdim=True)).to(ctx.input_dtype), None


def softmax(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x.softmax(-1, dtype=dtype)``; on CPU below `short_rows()` values per row by `_ShortSoftmax` (equal to
    rounding). Graph capture (tracing, export, compile) always records PyTorch's op."""
    if capturing() or x.device.type != "cpu" or x.shape[-1] >= short_rows() or not x.is_floating_point():
        return x.softmax(-1, dtype=dtype)
    return _ShortSoftmax.apply(x, dtype or x.dtype)
