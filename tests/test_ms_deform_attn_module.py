"""The MSDeformAttn module: official init, reference rules, padding mask, recording, parity with independent code;
and the dense-attention baseline module behind the same call signature."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchvision.ops import deform_conv2d

from ddetr.models.deform_attn import AttentionSample, MSDeformAttn, initial_offset_bias, recording
from ddetr.models.dense_attn import DenseAttention
from ddetr.ops import ms_deform_attn

# The official init (official-reference.md §3.3): head h points along one of 8 compass directions, point k at
# (k + 1) pixels, the same for every level.
HEAD_DIRECTIONS = [(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)]
SHAPES = [(6, 8), (3, 4), (2, 2)]
WH = torch.tensor([[8.0, 6.0], [4.0, 3.0], [2.0, 2.0]])  # (W_l, H_l) of SHAPES, the offset normaliser


def expected_offset_bias(n_levels: int, n_points: int) -> torch.Tensor:
    """(M=8, L, P, 2) pixel offsets of the official init, written out from the direction table."""
    return torch.tensor([[[(dx * (k + 1), dy * (k + 1)) for k in range(n_points)] for _ in range(n_levels)]
                         for dx, dy in HEAD_DIRECTIONS], dtype=torch.float32)


def make_batch(d_model: int, n: int = 2, lq: int = 5, ref_dims: int = 2, seed: int = 0, dtype=torch.float32):
    """Random query, references in [0, 1] (box sizes in [0.1, 0.6]), flattened value and a padding mask."""
    gen = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in SHAPES)
    query = torch.randn(n, lq, d_model, generator=gen, dtype=dtype)
    ref = torch.rand(n, lq, len(SHAPES), ref_dims, generator=gen, dtype=dtype)
    if ref_dims == 4:
        ref[..., 2:] = 0.1 + 0.5 * ref[..., 2:]
    value = torch.randn(n, s, d_model, generator=gen, dtype=dtype)
    mask = torch.zeros(n, s, dtype=torch.bool)
    start = 0
    for h, w in SHAPES:  # sample i has its i+1 rightmost columns padded on every level (a narrower image)
        cols = torch.arange(h * w) % w
        for i in range(n):
            mask[i, start:start + h * w] = cols >= w - 1 - i
        start += h * w
    return query, ref, value, mask


def randomise(module: nn.Module, seed: int = 1) -> nn.Module:
    """Replace the special init by random weights so every projection matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return module


def sampled(attn: nn.Module, *args, **kwargs) -> tuple[torch.Tensor, AttentionSample]:
    """Call the module inside `recording`: its output and what it sampled."""
    with recording(attn) as records:
        out = attn(*args, **kwargs)
    return out, records[""]


def test_initial_offset_bias_is_the_official_pattern():
    attn = MSDeformAttn(d_model=64, n_levels=3, n_heads=8, n_points=4)
    expected = expected_offset_bias(3, 4)
    torch.testing.assert_close(attn.sampling_offsets.bias.detach().view(8, 3, 4, 2), expected)
    torch.testing.assert_close(initial_offset_bias(8, 3, 4).view(8, 3, 4, 2), expected)
    assert attn.sampling_offsets.weight.abs().max() == 0
    assert attn.attention_weights.weight.abs().max() == 0 and attn.attention_weights.bias.abs().max() == 0


def test_initial_locations_and_uniform_attention():
    """At init, location = ref + bias / (W_l, H_l) for any query, and attention is uniform 1 / (L * P)."""
    attn = MSDeformAttn(d_model=64, n_levels=3, n_heads=8, n_points=4)
    query, ref, value, _ = make_batch(64)
    out, sample = sampled(attn, query, ref, value, SHAPES)
    bias = expected_offset_bias(3, 4)  # (M, L, P, 2) pixels
    expected = ref[:, :, None, :, None, :] + bias[None, None] / WH[None, None, None, :, None]
    torch.testing.assert_close(sample.sampling_locations, expected)
    torch.testing.assert_close(sample.attention_weights, torch.full((2, 5, 8, 3, 4), 1 / 12))
    assert out.shape == (2, 5, 64)


def test_projections_are_xavier_uniform_with_zero_bias():
    attn = MSDeformAttn()  # d_model 256: 65,536 weights per projection
    bound = math.sqrt(6 / (256 + 256))
    for proj in (attn.value_proj, attn.output_proj):
        w = proj.weight.detach()
        assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
        assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.03
        assert proj.bias.abs().max() == 0
    assert not torch.equal(attn.value_proj.weight, attn.output_proj.weight)


def test_box_references_scale_offsets_by_half_the_box_over_points():
    """4-d references: location = ref_xy + offset / P * ref_wh * 0.5 (offsets from the query's linear)."""
    attn = randomise(MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=3))
    query, ref, value, _ = make_batch(32, ref_dims=4)
    _, sample = sampled(attn, query, ref, value, SHAPES)
    offsets = (query @ attn.sampling_offsets.weight.T + attn.sampling_offsets.bias).view(2, 5, 4, 3, 3, 2)
    expected = ref[:, :, None, :, None, :2] + offsets / 3 * ref[:, :, None, :, None, 2:] * 0.5
    torch.testing.assert_close(sample.sampling_locations, expected.detach())


def test_padding_mask_hides_padded_values():
    """Changing value at padded positions does not change the output with the mask, and does without it."""
    attn = randomise(MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=3))
    query, ref, value, mask = make_batch(32)
    changed = torch.where(mask[..., None], torch.randn_like(value) * 10, value)
    with torch.no_grad():
        masked = attn(query, ref, value, SHAPES, padding_mask=mask)
        torch.testing.assert_close(attn(query, ref, changed, SHAPES, padding_mask=mask), masked,
                                   atol=0, rtol=0)
        assert not torch.allclose(attn(query, ref, changed, SHAPES), attn(query, ref, value, SHAPES))


def graph_nodes(t: torch.Tensor) -> set[str]:
    """Names of the autograd nodes behind ``t``."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo += [next_fn for next_fn, _ in node.next_functions]
    return names


def test_padding_fill_in_training_is_one_masked_fill_not_a_copy_of_slices():
    """With autograd the padded values are zeroed out of place: in place on the projection's output (a view) made
    the backward copy and zero-fill whole value maps (CopySlices); gradients still skip the padding."""
    attn = randomise(MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=3))
    query, ref, value, mask = make_batch(32)
    value.requires_grad_(True)
    out = attn(query, ref, value, SHAPES, padding_mask=mask)
    nodes = graph_nodes(out)
    assert "MaskedFillBackward0" in nodes and "CopySlices" not in nodes, nodes
    (grad,) = torch.autograd.grad(out.square().sum(), value)
    assert grad[mask].abs().max() == 0 and grad[~mask].abs().max() > 0
    # nothing padded (batch 1, or same-size images): no fill at all on CPU, the same result as filling nothing
    none = torch.zeros_like(mask)
    out = attn(query, ref, value, SHAPES, padding_mask=none)
    assert "MaskedFillBackward0" not in graph_nodes(out)
    torch.testing.assert_close(out, attn(query, ref, value, SHAPES), rtol=0, atol=0)


def test_recording_shapes_and_restore():
    """Inside `recording` a call is kept (detached) with its references and shapes; outside nothing is."""
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=3)
    query, ref, value, _ = make_batch(32, n=3, lq=7)
    out, sample = sampled(attn, query, ref, value, SHAPES)
    assert attn.recorder is None
    assert torch.equal(out, attn(query, ref, value, SHAPES))
    assert out.shape == (3, 7, 32)
    assert torch.equal(sample.reference_points, ref) and sample.spatial_shapes == SHAPES
    assert sample.sampling_locations.shape == (3, 7, 4, 3, 3, 2)
    assert sample.attention_weights.shape == (3, 7, 4, 3, 3)
    torch.testing.assert_close(sample.attention_weights.sum((-1, -2)), torch.ones(3, 7, 4))
    assert not sample.sampling_locations.requires_grad and not sample.attention_weights.requires_grad


def hand_written_msda(attn: MSDeformAttn, query, ref, value, mask) -> torch.Tensor:
    """The module's forward from its parameters: projections, softmax, reference rule, op, output proj."""
    n, lq, _ = query.shape
    m, n_levels, p, d = attn.n_heads, attn.n_levels, attn.n_points, attn.d_model // attn.n_heads
    v = value @ attn.value_proj.weight.T + attn.value_proj.bias
    v = torch.where(mask[..., None], torch.zeros_like(v), v).view(n, -1, m, d)
    offsets = query @ attn.sampling_offsets.weight.T + attn.sampling_offsets.bias
    offsets = offsets.view(n, lq, m, n_levels, p, 2)
    logits = query @ attn.attention_weights.weight.T + attn.attention_weights.bias
    weights = logits.view(n, lq, m, n_levels * p).softmax(-1).view(n, lq, m, n_levels, p)
    if ref.shape[-1] == 2:
        loc = ref[:, :, None, :, None] + offsets / WH.to(ref)[None, None, None, :, None]
    else:
        loc = ref[:, :, None, :, None, :2] + offsets / p * ref[:, :, None, :, None, 2:] * 0.5
    core = ms_deform_attn(v, SHAPES, None, loc, weights, backend="reference")
    return core @ attn.output_proj.weight.T + attn.output_proj.bias


@pytest.mark.parametrize("ref_dims", [2, 4])
def test_module_equals_composition_of_projections_and_op(device, backend, ref_dims):
    attn = randomise(MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=3).double())
    query, ref, value, mask = make_batch(32, ref_dims=ref_dims, dtype=torch.float64)
    with torch.no_grad():
        expected = hand_written_msda(attn, query, ref, value, mask)
        attn.backend = backend
        out = attn.to(device)(query.to(device), ref.to(device), value.to(device), SHAPES, mask.to(device))
    torch.testing.assert_close(out.cpu(), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("ref_dims", [2, 4])
def test_module_matches_hugging_face(device, backend, ref_dims):
    """Same weights in transformers' DeformableDetrMultiscaleDeformableAttention: same output (fp32)."""
    from transformers.models.deformable_detr.configuration_deformable_detr import DeformableDetrConfig
    from transformers.models.deformable_detr.modeling_deformable_detr import (
        DeformableDetrMultiscaleDeformableAttention,
    )

    ours = randomise(MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=3, backend=backend))
    config = DeformableDetrConfig(d_model=32, num_feature_levels=3)
    hf = DeformableDetrMultiscaleDeformableAttention(config, num_heads=4, n_points=3)
    hf.load_state_dict(ours.state_dict())
    query, ref, value, mask = make_batch(32, ref_dims=ref_dims)
    shapes_t = torch.tensor(SHAPES)
    starts = torch.tensor([0, 48, 60])
    with torch.no_grad():
        expected, hf_weights = hf(query, attention_mask=~mask, encoder_hidden_states=value,
                                  reference_points=ref, spatial_shapes=shapes_t, spatial_shapes_list=SHAPES,
                                  level_start_index=starts)
        out, sample = sampled(ours.to(device), query.to(device), ref.to(device), value.to(device), SHAPES,
                              mask.to(device))
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(sample.attention_weights.cpu(), hf_weights, atol=1e-6, rtol=0)


def test_single_level_single_point_module_is_deformable_conv():
    """Paper §4.1: with L=1, K=1 and W' = identity the module is a 1x1 deformable conv whose weight is W."""
    n, h, w, c, m = 2, 4, 5, 8, 2
    attn = randomise(MSDeformAttn(d_model=c, n_levels=1, n_heads=m, n_points=1).double())
    with torch.no_grad():
        attn.value_proj.weight.copy_(torch.eye(c))
        attn.value_proj.bias.zero_()
    gen = torch.Generator().manual_seed(3)
    query = torch.randn(n, h * w, c, generator=gen, dtype=torch.float64)
    value = torch.randn(n, h * w, c, generator=gen, dtype=torch.float64)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
    centres = torch.stack([(cols.flatten() + 0.5) / w, (rows.flatten() + 0.5) / h], -1)
    ref = centres.view(1, h * w, 1, 2).expand(n, -1, -1, -1)
    with torch.no_grad():
        out = attn(query, ref, value, [(h, w)])
        offsets = attn.sampling_offsets(query).view(n, h, w, m, 2).flip(-1)  # (dx, dy) -> (dy, dx)
        expected = deform_conv2d(value.view(n, h, w, c).permute(0, 3, 1, 2),
                                 offsets.reshape(n, h, w, 2 * m).permute(0, 3, 1, 2),
                                 attn.output_proj.weight.view(c, c, 1, 1), attn.output_proj.bias)
    torch.testing.assert_close(out, expected.permute(0, 2, 3, 1).reshape(n, h * w, c), atol=1e-10, rtol=0)


def test_bad_module_inputs_raise():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=30, n_heads=8)
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=3)
    query, ref, value, _ = make_batch(32)
    with pytest.raises(ValueError, match="expects 3 levels"):
        attn(query, ref[:, :, :2], value[:, :60], SHAPES[:2])
    with pytest.raises(ValueError, match="2 or 4 coordinates"):
        attn(query, torch.rand(2, 5, 3, 3), value, SHAPES)


def test_dense_attention_is_standard_attention_with_positional_keys():
    """DenseAttention = softmax((q Wq)(k Wk)^T / sqrt(d)) (v Wv) per head, then Wo, with k = value + value_pos;
    padded values get no weight; reference points and shapes play no part. Written out by hand."""
    n, lq, c, m = 2, 5, 32, 4
    attn = randomise(DenseAttention(c, m, dropout=0.0)).double().eval()
    query, ref, value, mask = make_batch(c, n=n, lq=lq, dtype=torch.float64)
    pos = torch.randn(value.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        out = attn(query, ref, value, SHAPES, mask, value_pos=pos)
        assert torch.equal(out, attn(query, ref.flip(1), value, SHAPES[::-1], mask, value_pos=pos))
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
        d = c // m

        def heads(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return (x @ w.T + b).view(n, -1, m, d).transpose(1, 2)

        q, k, v = heads(query, w_q, b_q), heads(value + pos, w_k, b_k), heads(value, w_v, b_v)
        logits = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(mask[:, None, None], float("-inf"))
        expected = (logits.softmax(-1) @ v).transpose(1, 2).reshape(n, lq, c)
        expected = expected @ attn.out_proj.weight.T + attn.out_proj.bias
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)
    assert isinstance(attn, nn.MultiheadAttention) and "in_proj_weight" in attn.state_dict()
