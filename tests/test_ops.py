"""The multi-scale deformable attention op, every available backend, against independent references.

References: a naive per-sample loop, autograd's numerical gradients, torchvision's deform_conv2d (the paper's
L=1, K=1 limit), scaled-dot-product attention (the every-pixel limit) and Hugging Face's grid_sample path.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import OpInputs
from torchvision.ops import deform_conv2d

import ddetr.ops
from ddetr.ops import ms_deform_attn


def naive_ms_deform_attn(inputs: OpInputs) -> torch.Tensor:
    """Eq. 2 sample by sample in float64: bilinear over 4 corners, zeros outside, pixel = loc * size - 0.5."""
    value = inputs.value.detach().cpu().double()
    locs = inputs.sampling_locations.detach().cpu().double().tolist()
    weights = inputs.attention_weights.detach().cpu().double().tolist()
    shapes = inputs.shapes
    starts = [sum(h * w for h, w in shapes[:i]) for i in range(len(shapes))]
    n_batch, _, n_heads, dim = value.shape
    n_query, n_points = len(locs[0]), len(locs[0][0][0][0])
    out = torch.zeros(n_batch, n_query, n_heads, dim, dtype=torch.float64)
    for n in range(n_batch):
        for q in range(n_query):
            for m in range(n_heads):
                for lvl, (h, w) in enumerate(shapes):
                    for p in range(n_points):
                        lx, ly = locs[n][q][m][lvl][p]
                        x, y = lx * w - 0.5, ly * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                            if 0 <= yy < h and 0 <= xx < w:
                                corner = (1 - abs(x - xx)) * (1 - abs(y - yy))
                                pixel = value[n, starts[lvl] + yy * w + xx, m]
                                out[n, q, m] += weights[n][q][m][lvl][p] * corner * pixel
    return out.reshape(n_batch, n_query, n_heads * dim)


def run(inputs: OpInputs, backend: str) -> torch.Tensor:
    return ms_deform_attn(*inputs.args(), backend=backend)


def grads(inputs: OpInputs, backend: str, grad_out: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of <op(inputs), grad_out> w.r.t. value, sampling locations and attention weights."""
    inputs = inputs.leaves()
    out = run(inputs, backend)
    out.backward(grad_out.to(out.dtype))
    return [t.grad for t in (inputs.value, inputs.sampling_locations, inputs.attention_weights)]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


SHAPE_CASES = [  # (n, lq, m, d, shapes, p)
    (2, 4, 2, 3, ((3, 4), (2, 3)), 2),
    (1, 3, 1, 1, ((1, 1),), 3),
    (2, 2, 3, 2, ((5, 1), (1, 4), (2, 2)), 3),
]


@pytest.mark.parametrize("case", SHAPE_CASES, ids=str)
def test_matches_naive_loop(device, backend, case, make_inputs):
    """Random points including ones outside the maps, exactly on borders and exactly on pixel centres."""
    n, lq, m, d, shapes, p = case
    inputs = make_inputs(n, lq, m, d, shapes, p, special=True, seed=1)
    out = run(inputs.to(device), backend)
    assert out.shape == (n, lq, m * d) and out.dtype == torch.float64
    torch.testing.assert_close(out.cpu(), naive_ms_deform_attn(inputs), atol=1e-10, rtol=0)


@pytest.mark.parametrize("lpmd", [(1, 1, 1, 1), (2, 2, 2, 3), (3, 2, 1, 4), (2, 4, 3, 2)], ids=str)
def test_gradcheck(device, backend, lpmd, make_inputs):
    """Analytic gradients of all three float inputs equal numerical ones (random points, some outside)."""
    n_levels, p, m, d = lpmd
    shapes = [(3, 4), (2, 3), (1, 2)][:n_levels]
    inputs = make_inputs(2, 3, m, d, shapes, p, seed=2, loc_range=(-0.1, 1.1)).to(device).leaves()

    def fn(value, loc, attn):
        return ms_deform_attn(value, inputs.spatial_shapes, inputs.level_start_index, loc, attn,
                              backend=backend)

    assert torch.autograd.gradcheck(
        fn, (inputs.value, inputs.sampling_locations, inputs.attention_weights), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("n", [1, 3, 5])
def test_any_batch_size(device, backend, n, make_inputs):
    """Batched output equals the naive loop; batched gradients equal those of each sample run alone."""
    inputs = make_inputs(n, 4, 2, 3, ((3, 4), (2, 3)), 2, seed=3)
    torch.testing.assert_close(run(inputs.to(device), backend).cpu(), naive_ms_deform_attn(inputs),
                               atol=1e-10, rtol=0)
    grad_out = torch.randn(n, 4, 6, dtype=torch.float64, device=device)
    batched = grads(inputs.to(device), backend, grad_out)
    for i in range(n):
        single = OpInputs(inputs.value[i:i + 1], inputs.spatial_shapes, inputs.level_start_index,
                          inputs.sampling_locations[i:i + 1], inputs.attention_weights[i:i + 1])
        for b, s in zip(batched, grads(single.to(device), backend, grad_out[i:i + 1])):
            torch.testing.assert_close(b[i:i + 1], s, atol=1e-10, rtol=0)


def test_non_contiguous_inputs(device, backend, make_inputs):
    """Transposed and strided views (and a transposed output gradient) match contiguous inputs."""
    base = make_inputs(2, 5, 2, 3, ((3, 4), (2, 3)), 2, seed=4).to(device)
    gen = torch.Generator().manual_seed(5)
    value = base.value.transpose(1, 2).contiguous().transpose(1, 2)  # (N, S, M, D) view of (N, M, S, D)
    wide = torch.rand(2, 5, 2, 2, 4, 2, generator=gen, dtype=torch.float64).to(device)
    wide[:, :, :, :, ::2] = base.sampling_locations
    loc = wide[:, :, :, :, ::2]
    attn = base.attention_weights.permute(0, 2, 1, 3, 4).contiguous().permute(0, 2, 1, 3, 4)
    assert not (value.is_contiguous() or loc.is_contiguous() or attn.is_contiguous())
    strided = OpInputs(value, base.spatial_shapes, base.level_start_index, loc, attn)
    torch.testing.assert_close(run(strided, backend).cpu(), naive_ms_deform_attn(base), atol=1e-10, rtol=0)
    grad_out = torch.randn(2, 6, 5, generator=gen, dtype=torch.float64).to(device).transpose(1, 2)
    expected = grads(base, backend, grad_out.contiguous())
    for g_strided, g_contig in zip(grads(strided, backend, grad_out), expected):
        torch.testing.assert_close(g_strided, g_contig, atol=1e-10, rtol=0)


def test_float32_matches_float64(device, backend, make_inputs):
    """float32 inputs give a float32 result within 1e-5 of float64 (and float32 gradients within 1e-4)."""
    inputs32 = make_inputs(2, 6, 2, 4, ((5, 6), (3, 3)), 3, dtype=torch.float32, seed=6).to(device)
    inputs64 = inputs32.to(dtype=torch.float64)
    out32 = run(inputs32, backend)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), run(inputs64, backend), atol=1e-5, rtol=0)
    grad_out = torch.randn(2, 6, 8, dtype=torch.float32, device=device)
    for g32, g64 in zip(grads(inputs32, backend, grad_out), grads(inputs64, backend, grad_out.double())):
        assert g32.dtype == torch.float32
        torch.testing.assert_close(g32.double(), g64, atol=1e-4, rtol=1e-4)


# One final rounding alone costs up to 2^-9 (bf16) or 2^-11 (fp16) relative; half accumulation costs ~5x more.
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2.5e-3), (torch.float16, 1e-3)], ids=["bf16", "fp16"])
@pytest.mark.parametrize("half_all", [True, False], ids=["all-half", "value-half"])
def test_half_precision(device, backend, dtype, tol, half_all, make_inputs):
    """Half inputs give outputs/grads of the input dtype, close to float64 on the same (rounded) inputs."""
    inputs = make_inputs(2, 16, 2, 8, ((6, 7), (3, 4)), 3, seed=7, loc_range=(0.0, 1.0))
    inputs.attention_weights /= inputs.attention_weights.sum((-1, -2), keepdim=True)
    half = inputs.to(device, dtype)
    if not half_all:  # autocast-style: value in half, locations and weights in float32
        half.sampling_locations = inputs.sampling_locations.float().to(device)
        half.attention_weights = inputs.attention_weights.float().to(device)
    exact = half.to(dtype=torch.float64)
    out = run(half, backend)
    assert out.dtype == dtype
    expected = run(exact, "reference")
    assert rel_l2(out, expected) <= tol
    torch.testing.assert_close(out.double(), expected, atol=2e-2 if dtype == torch.bfloat16 else 3e-3, rtol=0)
    grad_out = torch.randn(2, 16, 16, device=device).to(dtype)
    got = grads(half, backend, grad_out)
    for g, t, e in zip(got, (half.value, half.sampling_locations, half.attention_weights),
                       grads(exact, "reference", grad_out.double())):
        assert g.dtype == t.dtype
        assert rel_l2(g, e) <= tol


def _bad(inputs: OpInputs, **changes) -> tuple[torch.Tensor, ...]:
    names = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")
    fields = dict(zip(names, inputs.args()))
    fields.update(changes)
    return tuple(fields.values())


def test_inconsistent_inputs_raise(device, backend, make_inputs):
    """Every inconsistency is a ValueError naming the problem, for every backend."""
    x = make_inputs().to(device)  # value (2, 18, 2, 3), shapes (3, 4), (2, 3), loc (2, 3, 2, 2, 2, 2)
    cases = [
        (dict(spatial_shapes=torch.tensor([[3, 4], [2, 2]])), "cover 16 positions but value has S=18"),
        (dict(spatial_shapes=torch.tensor([[3, 4, 1], [2, 3, 1]])), "spatial_shapes must have shape"),
        (dict(spatial_shapes=torch.tensor([[3, 4], [1, 3], [1, 3]])), "levels"),
        (dict(sampling_locations=x.sampling_locations[:, :, :1],
              attention_weights=x.attention_weights[:, :, :1]), "do not match value"),
        (dict(sampling_locations=x.sampling_locations[:1], attention_weights=x.attention_weights[:1]),
         "do not match value"),
        (dict(value=x.value.flatten(2)), "value must be"),
        (dict(sampling_locations=x.sampling_locations[..., 0, :]), "sampling_locations must be"),
        (dict(sampling_locations=torch.cat([x.sampling_locations, x.sampling_locations[..., :1]], -1)),
         "sampling_locations must be"),
        (dict(attention_weights=x.attention_weights[..., 0]), "attention_weights must be"),
        (dict(attention_weights=x.attention_weights[..., :1]), "disagree"),
        (dict(level_start_index=torch.tensor([0, 6])), "level_start_index"),
        (dict(value=x.value.long()), "floating-point"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message):
            ms_deform_attn(*_bad(x, **changes), backend=backend)


def test_unknown_or_unavailable_backend_raises(make_inputs):
    x = make_inputs()
    with pytest.raises(ValueError, match="unknown backend 'no-such-backend'"):
        ms_deform_attn(*x.args(), backend="no-such-backend")
    usable = ddetr.ops.available_backends(x.value)
    assert "reference" in usable
    for name in ddetr.ops.available_backends(None):
        if name not in usable:
            with pytest.raises(ValueError, match="cannot run on cpu"):
                ms_deform_attn(*x.args(), backend=name)


@pytest.mark.parametrize("modulated", [False, True], ids=["weight-1", "mask"])
def test_single_level_single_point_is_deformable_conv(device, backend, modulated, make_inputs):
    """Paper §4.1: L=1, K=1 equals a 1x1 deformable convolution, one offset group per head (query = pixel)."""
    n, h, w, m, d = 2, 4, 5, 2, 3
    inputs = make_inputs(n, h * w, m, d, ((h, w),), 1, seed=8)
    if not modulated:
        inputs.attention_weights = torch.ones_like(inputs.attention_weights)
    image = inputs.value.reshape(n, h, w, m * d).permute(0, 3, 1, 2)
    loc = inputs.sampling_locations[:, :, :, 0, 0].reshape(n, h, w, m, 2)
    rows = torch.arange(h, dtype=torch.float64).view(1, h, 1, 1)
    cols = torch.arange(w, dtype=torch.float64).view(1, 1, w, 1)
    dy = loc[..., 1] * h - 0.5 - rows  # deform_conv2d samples pixel (i + dy, j + dx), offsets as (dy, dx)
    dx = loc[..., 0] * w - 0.5 - cols
    offset = torch.stack([dy, dx], -1).reshape(n, h, w, 2 * m).permute(0, 3, 1, 2)
    weights = inputs.attention_weights[:, :, :, 0, 0].reshape(n, h, w, m).permute(0, 3, 1, 2)
    mask = weights if modulated else None
    identity = torch.eye(m * d, dtype=torch.float64).view(m * d, m * d, 1, 1)
    expected = deform_conv2d(image, offset, identity, mask=mask).permute(0, 2, 3, 1).reshape(n, h * w, m * d)
    torch.testing.assert_close(run(inputs.to(device), backend).cpu(), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("shapes", [((3, 4),), ((3, 4), (2, 2), (1, 3))], ids=["1-level", "3-levels"])
def test_points_on_every_pixel_is_full_attention(device, backend, shapes):
    """Points on every pixel centre weighted by softmax(q.k/sqrt(D)) equal standard multi-head attention."""
    n, lq, m, d = 2, 5, 2, 4
    sizes = [h * w for h, w in shapes]
    s, p = sum(sizes), max(sizes)
    gen = torch.Generator().manual_seed(9)
    value = torch.randn(n, s, m, d, generator=gen, dtype=torch.float64)
    query = torch.randn(n, m, lq, d, generator=gen, dtype=torch.float64)
    key = torch.randn(n, m, s, d, generator=gen, dtype=torch.float64)
    probs = (query @ key.transpose(-1, -2) / math.sqrt(d)).softmax(-1).permute(0, 2, 1, 3)  # (N, Lq, M, S)
    loc = torch.full((n, lq, m, len(shapes), p, 2), 2.0, dtype=torch.float64)  # unused points lie outside
    attn = torch.zeros(n, lq, m, len(shapes), p, dtype=torch.float64)
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        k = torch.arange(h * w)
        loc[:, :, :, lvl, :h * w, 0] = ((k % w).double() + 0.5) / w
        loc[:, :, :, lvl, :h * w, 1] = ((k // w).double() + 0.5) / h
        attn[:, :, :, lvl, :h * w] = probs[..., start:start + h * w]
        start += h * w
    starts = torch.tensor([sum(sizes[:i]) for i in range(len(sizes))])
    inputs = OpInputs(value, torch.tensor(shapes), starts, loc, attn)
    expected = F.scaled_dot_product_attention(query, key, value.transpose(1, 2))
    expected = expected.transpose(1, 2).reshape(n, lq, m * d)
    torch.testing.assert_close(run(inputs.to(device), backend).cpu(), expected, atol=1e-10, rtol=0)


def test_matches_hugging_face(device, backend, make_inputs):
    """fp32 output (<= 1e-5) and gradients (<= 1e-4) equal transformers' MultiScaleDeformableAttention."""
    from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention

    inputs = make_inputs(2, 7, 4, 8, ((8, 9), (4, 5), (2, 3), (1, 2)), 4, dtype=torch.float32, seed=10)
    hf = MultiScaleDeformableAttention()
    hf_in = inputs.leaves()
    expected = hf(hf_in.value, hf_in.spatial_shapes, hf_in.shapes, hf_in.level_start_index,
                  hf_in.sampling_locations, hf_in.attention_weights, 64)
    grad_out = torch.randn_like(expected)
    (expected * grad_out).sum().backward()
    ours = inputs.to(device).leaves()
    out = run(ours, backend)
    (out * grad_out.to(device)).sum().backward()
    torch.testing.assert_close(out.detach().cpu(), expected.detach(), atol=1e-5, rtol=0)
    for name in ("value", "sampling_locations", "attention_weights"):
        torch.testing.assert_close(getattr(ours, name).grad.cpu(), getattr(hf_in, name).grad,
                                   atol=1e-4, rtol=1e-4)
