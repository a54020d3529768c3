"""Fused Triton kernels for multi-scale deformable attention (forward and backward), registered as "triton".

One program handles a block of queries of one (batch, head) pair and all D channels of that head, so the
location/weight loads and the bilinear coordinate math are done once per sample and shared by the D lanes;
corner rows are loaded as vectors and accumulated in fp32 whatever the storage dtype (fp32/bf16/fp16).
The backward pass recomputes each sample, scatters into grad_value with fp32 atomics and reduces the
location/weight gradients over D in registers. fp64 inputs fall back to the reference path.

Without Triton installed the backend registers as unavailable. CPU tensors are only accepted when
``TRITON_INTERPRET=1`` was set before this module was imported (the tests run the kernels in Triton's interpreter).
Block sizes keep BLOCK_Q * BLOCK_D <= 1024 fp32 lanes per program: with 4 warps this compiles for sm_90 without
register spills (checked with ptxas for D = 5 to 2048; larger blocks spill in the forward pass).
"""

from __future__ import annotations

import torch

from ddetr.ops.ms_deform_attn import Shapes, ms_deform_attn_reference, register_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # the backend then reports itself unavailable
    triton = None


def _jit(fn):
    """``triton.jit`` if Triton is installed (it reads TRITON_INTERPRET here), else the bare function."""
    return triton.jit(fn) if triton is not None else fn


_INTERPRET = triton is not None and bool(triton.knobs.runtime.interpret)


@_jit
def _gather(vbase, yi, xi, h, w, start, qmask, d, dmask, MD: tl.constexpr):
    """Load one bilinear corner (BLOCK_Q, BLOCK_D) in fp32, zeros outside the map; also return offsets, mask."""
    ok = qmask & (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    offs = ((start + yi * w + xi) * MD)[:, None] + d[None, :]
    mask = ok[:, None] & dmask[None, :]
    return tl.load(vbase + offs, mask=mask, other=0.0).to(tl.float32), offs, mask


@_jit
def _coords(loc_ptr, attn_ptr, idx, qmask, h, w):
    """Sample index -> (top-left corner y0, x0, fractions fy, fx, attention weight), all per query."""
    x = tl.load(loc_ptr + idx * 2, mask=qmask, other=0.0).to(tl.float32)
    y = tl.load(loc_ptr + idx * 2 + 1, mask=qmask, other=0.0).to(tl.float32)
    a = tl.load(attn_ptr + idx, mask=qmask, other=0.0).to(tl.float32)
    # Clamping keeps the int conversion in range; a clamped sample has all four corners outside anyway.
    px = tl.minimum(tl.maximum(x * w - 0.5, -2.0), w + 1.0)
    py = tl.minimum(tl.maximum(y * h - 0.5, -2.0), h + 1.0)
    x0f = tl.floor(px)
    y0f = tl.floor(py)
    return y0f.to(tl.int32), x0f.to(tl.int32), py - y0f, px - x0f, a


@_jit
def _fwd_kernel(value_ptr, loc_ptr, attn_ptr, out_ptr, shapes, starts, S, Lq,
                M: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
                BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[n, q, m, :] = sum over levels and points of attn * bilinear(value[n, level, m, :], loc)."""
    pid_q = tl.program_id(0)
    pid_nm = tl.program_id(1)
    n = pid_nm // M
    m = pid_nm % M
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = q < Lq
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    vbase = value_ptr + n.to(tl.int64) * S * M * D + m * D
    row = (n.to(tl.int64) * Lq + q) * M + m  # (query, head) row index into loc/attn/out
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for lvl in tl.static_range(L):
        h = shapes[2 * lvl]
        w = shapes[2 * lvl + 1]
        start = starts[lvl]
        for pt in range(P):
            idx = row * (L * P) + lvl * P + pt
            y0, x0, fy, fx, a = _coords(loc_ptr, attn_ptr, idx, qmask, h, w)
            v00, _, _ = _gather(vbase, y0, x0, h, w, start, qmask, d, dmask, M * D)
            v01, _, _ = _gather(vbase, y0, x0 + 1, h, w, start, qmask, d, dmask, M * D)
            v10, _, _ = _gather(vbase, y0 + 1, x0, h, w, start, qmask, d, dmask, M * D)
            v11, _, _ = _gather(vbase, y0 + 1, x0 + 1, h, w, start, qmask, d, dmask, M * D)
            top = v00 + fx[:, None] * (v01 - v00)
            bottom = v10 + fx[:, None] * (v11 - v10)
            acc += a[:, None] * (top + fy[:, None] * (bottom - top))
    out_offs = row[:, None] * D + d[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=qmask[:, None] & dmask[None, :])


@_jit
def _bwd_kernel(grad_out_ptr, value_ptr, loc_ptr, attn_ptr, grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
                shapes, starts, S, Lq,
                M: tl.constexpr, D: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
                BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """Recompute each sample; atomically scatter into grad_value (fp32), reduce loc/attn grads over D."""
    pid_q = tl.program_id(0)
    pid_nm = tl.program_id(1)
    n = pid_nm // M
    m = pid_nm % M
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = q < Lq
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    head = n.to(tl.int64) * S * M * D + m * D
    vbase = value_ptr + head
    gvbase = grad_value_ptr + head
    row = (n.to(tl.int64) * Lq + q) * M + m
    g = tl.load(grad_out_ptr + row[:, None] * D + d[None, :], mask=qmask[:, None] & dmask[None, :],
                other=0.0).to(tl.float32)
    for lvl in tl.static_range(L):
        h = shapes[2 * lvl]
        w = shapes[2 * lvl + 1]
        start = starts[lvl]
        for pt in range(P):
            idx = row * (L * P) + lvl * P + pt
            y0, x0, fy, fx, a = _coords(loc_ptr, attn_ptr, idx, qmask, h, w)
            v00, o00, k00 = _gather(vbase, y0, x0, h, w, start, qmask, d, dmask, M * D)
            v01, o01, k01 = _gather(vbase, y0, x0 + 1, h, w, start, qmask, d, dmask, M * D)
            v10, o10, k10 = _gather(vbase, y0 + 1, x0, h, w, start, qmask, d, dmask, M * D)
            v11, o11, k11 = _gather(vbase, y0 + 1, x0 + 1, h, w, start, qmask, d, dmask, M * D)
            fx2 = fx[:, None]
            fy2 = fy[:, None]
            ga = a[:, None] * g
            tl.atomic_add(gvbase + o00, ga * ((1.0 - fy2) * (1.0 - fx2)), mask=k00, sem="relaxed")
            tl.atomic_add(gvbase + o01, ga * ((1.0 - fy2) * fx2), mask=k01, sem="relaxed")
            tl.atomic_add(gvbase + o10, ga * (fy2 * (1.0 - fx2)), mask=k10, sem="relaxed")
            tl.atomic_add(gvbase + o11, ga * (fy2 * fx2), mask=k11, sem="relaxed")
            top = v00 + fx2 * (v01 - v00)
            bottom = v10 + fx2 * (v11 - v10)
            grad_a = tl.sum(g * (top + fy2 * (bottom - top)), axis=1)
            dfx = tl.sum(g * ((1.0 - fy2) * (v01 - v00) + fy2 * (v11 - v10)), axis=1)
            dfy = tl.sum(g * (bottom - top), axis=1)
            tl.store(grad_attn_ptr + idx, grad_a.to(grad_attn_ptr.dtype.element_ty), mask=qmask)
            tl.store(grad_loc_ptr + idx * 2, (a * w * dfx).to(grad_loc_ptr.dtype.element_ty), mask=qmask)
            tl.store(grad_loc_ptr + idx * 2 + 1, (a * h * dfy).to(grad_loc_ptr.dtype.element_ty), mask=qmask)


def _launch_args(value: torch.Tensor, shapes: list[int], loc: torch.Tensor):
    """Grid, runtime arguments (flat shapes, level starts, S, Lq) and constexprs shared by both kernels."""
    n, s, m, d = value.shape
    lq, n_levels, n_points = loc.shape[1], loc.shape[3], loc.shape[4]
    starts, acc = [], 0
    for lvl in range(n_levels):
        starts.append(acc)
        acc += shapes[2 * lvl] * shapes[2 * lvl + 1]
    block_d = triton.next_power_of_2(d)
    block_q = max(1, min(64, 1024 // block_d))
    grid = (triton.cdiv(lq, block_q), n * m)
    consts = dict(M=m, D=d, L=n_levels, P=n_points, BLOCK_Q=block_q, BLOCK_D=block_d, num_warps=4)
    return grid, (tuple(shapes), tuple(starts), s, lq), consts


@torch.library.custom_op("ddetr::ms_deform_attn_triton", mutates_args=())
def _forward_op(value: torch.Tensor, shapes: list[int], loc: torch.Tensor,
                attn: torch.Tensor) -> torch.Tensor:
    """Fused forward; ``shapes`` is the flat list [H0, W0, H1, W1, ...]."""
    value, loc, attn = value.contiguous(), loc.contiguous(), attn.contiguous()
    n, _, m, d = value.shape
    out = value.new_empty(n, loc.shape[1], m * d)
    if out.numel() == 0:
        return out.zero_()
    grid, runtime, consts = _launch_args(value, shapes, loc)
    _fwd_kernel[grid](value, loc, attn, out, *runtime, **consts)
    return out


@_forward_op.register_fake
def _(value: torch.Tensor, shapes: list[int], loc: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    return value.new_empty(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])


@torch.library.custom_op("ddetr::ms_deform_attn_triton_backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, value: torch.Tensor, shapes: list[int], loc: torch.Tensor,
                 attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the fused forward w.r.t. value, sampling locations and attention weights."""
    grad_out = grad_out.contiguous()
    value, loc, attn = value.contiguous(), loc.contiguous(), attn.contiguous()
    grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
    grad_loc = torch.zeros_like(loc)
    grad_attn = torch.zeros_like(attn)
    if grad_out.numel() > 0:
        grid, runtime, consts = _launch_args(value, shapes, loc)
        _bwd_kernel[grid](grad_out, value, loc, attn, grad_value, grad_loc, grad_attn, *runtime, **consts)
    return grad_value.to(value.dtype), grad_loc, grad_attn


@_backward_op.register_fake
def _(grad_out: torch.Tensor, value: torch.Tensor, shapes: list[int], loc: torch.Tensor,
      attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(value), torch.empty_like(loc), torch.empty_like(attn)


def _setup_context(ctx, inputs, output) -> None:
    value, shapes, loc, attn = inputs
    ctx.save_for_backward(value, loc, attn)
    ctx.shapes = shapes


def _backward(ctx, grad_out: torch.Tensor):
    value, loc, attn = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = _backward_op(grad_out, value, ctx.shapes, loc, attn)
    return grad_value, None, grad_loc, grad_attn


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def available(value: torch.Tensor) -> bool:
    """CUDA tensors with Triton installed; CPU tensors only under TRITON_INTERPRET=1 (tests)."""
    return triton is not None and (value.is_cuda or (_INTERPRET and value.device.type == "cpu"))


def impl(value: torch.Tensor, shapes: Shapes, loc: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Backend entry: fused kernels for fp32/bf16/fp16, the reference path for fp64."""
    if any(t.dtype == torch.float64 for t in (value, loc, attn)):
        return ms_deform_attn_reference(value, shapes, loc, attn)
    return _forward_op(value, [int(x) for hw in shapes for x in hw], loc, attn)


register_backend("triton", available, impl)
