"""The multi-scale deformable attention module (paper Eq. 2-3, §4.1): projections, offsets, weights, their init.

`recording` is the one way to look inside: within it every module keeps what its last call sampled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ddetr.ops import ms_deform_attn
from ddetr.ops.linear import Linear, compute_dtype, linear
from ddetr.ops.ms_deform_attn import capturing
from ddetr.ops.softmax import softmax

Shapes = list[tuple[int, int]]


@dataclass
class AttentionSample:
    """What one attention call looked at: normalised (x, y) locations and softmaxed weights, for inspection."""

    sampling_locations: torch.Tensor  # (N, Lq, M, L, P, 2)
    attention_weights: torch.Tensor  # (N, Lq, M, L, P)
    reference_points: torch.Tensor  # (N, Lq, L, 2) as (x, y) or (N, Lq, L, 4) as (cx, cy, w, h)
    spatial_shapes: Shapes  # (H, W) of each level


class MSDeformAttn(nn.Module):
    """Each query attends to ``n_points`` learned locations per head and level around its reference point.

    Parameter names follow the official implementation so its checkpoints map one to one.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 backend: str = "auto") -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.backend = backend
        self.recorder: Callable[[AttentionSample], None] | None = None  # set by `recording`
        self.sampling_offsets = Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = Linear(d_model, d_model)
        self.output_proj = Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: offsets point in 8 head directions at 1..K pixels, uniform attention, xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(initial_offset_bias(self.n_heads, self.n_levels, self.n_points))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value: torch.Tensor,
                spatial_shapes: Shapes, padding_mask: torch.Tensor | None = None,
                value_pos: torch.Tensor | None = None, unprojected_value: torch.Tensor | None = None,
                ) -> torch.Tensor:
        """query (N, Lq, C); reference_points (N, Lq, L, 2) as (x, y) or (N, Lq, L, 4) as (cx, cy, w, h), in [0, 1];
        value (N, S, C) flattened levels; padding_mask (N, S) True on padding. Returns (N, Lq, C).

        ``value_pos`` is ignored: it is there for the call signature shared with `DenseAttention`, whose keys need
        it; here the sampling locations carry the position. ``unprojected_value``: `unprojected_value(value,
        padding_mask)`, to sample before projecting (`sample_unprojected`; the decoder's inference path).
        """
        if unprojected_value is not None:
            sampled = self.sample_unprojected(query, reference_points, unprojected_value, spatial_shapes)
        else:
            sampled = self.sample(query, reference_points, value, spatial_shapes, padding_mask)
        return self.output_proj(sampled)

    def sample(self, query: torch.Tensor, reference_points: torch.Tensor, value: torch.Tensor,
               spatial_shapes: Shapes, padding_mask: torch.Tensor | None = None, by_weights: bool = False,
               ) -> torch.Tensor:
        """The attention before ``output_proj``: the heads' weighted samples, concatenated, (N, Lq, C).

        ``reference_points`` may also come from `expand_reference_points`, which layers sharing them compute once.
        ``by_weights``: apply the projections through their weights (`ddetr.ops.linear`) instead of calling the
        modules; for inference paths that have checked, with `fast_inference`, that no hook expects those calls.
        """
        n = query.shape[0]
        if by_weights:  # cast once for the three projections (autocast would cast for each)
            query, value = query.to(compute_dtype(query)), value.to(compute_dtype(value))
        locations, weights = self._locations_and_weights(query, reference_points, spatial_shapes, by_weights)
        v = self._project(self.value_proj, value, by_weights)
        # On CPU a fill with nothing to fill is skipped (in training it costs two full copies of value per layer);
        # GPUs (the check would sync) and graph capture (it would freeze the branch into the graph) always fill.
        if padding_mask is not None and (capturing() or v.device.type != "cpu" or bool(padding_mask.any())):
            # in place only without autograd: the projection's output is a view (F.linear's too), and an in-place op
            # on a view makes the backward copy and zero-fill the whole base (0.3 s of a profiled 800x1333 fp32 step)
            v = v.masked_fill(padding_mask[..., None], 0.0) if v.requires_grad else v.masked_fill_(
                padding_mask[..., None], 0.0)
        v = v.view(n, value.shape[1], self.n_heads, self.d_model // self.n_heads)
        return ms_deform_attn(v, spatial_shapes, None, locations, weights, backend=self.backend)

    def sample_unprojected(self, query: torch.Tensor, reference_points: torch.Tensor, memory: torch.Tensor,
                           spatial_shapes: Shapes) -> torch.Tensor:
        """`sample` for few queries: samples the memory itself and projects the samples. ``memory`` (N, S, C + 1)
        is `unprojected_value`'s: features zeroed on padding, then a channel that is 1 on valid pixels.

        value_proj is linear, so W (sum w x) + b (sum w valid) = sum w (W x + b) with padding zeroed, at
        Lq M L P 4 gathers of C + 1 channels instead of S C^2 multiply-adds (at 800x1333: 40 M instead of 1.5 G
        per decoder layer). Equal up to rounding.
        """
        n, lq, _ = query.shape
        m, d, lv, p = self.n_heads, self.d_model // self.n_heads, self.n_levels, self.n_points
        locations, weights = self._locations_and_weights(query, reference_points, spatial_shapes)
        sampled = ms_deform_attn(memory[:, :, None], spatial_shapes, None, locations.view(n, lq * m, 1, lv, p, 2),
                                 weights.view(n, lq * m, 1, lv, p), backend=self.backend).view(n, lq, m, -1)
        out = torch.einsum("nqmc,mdc->nqmd", sampled[..., :-1], self.value_proj.weight.view(m, d, -1))
        return (out + sampled[..., -1:] * self.value_proj.bias.view(m, d)).reshape(n, lq, m * d)

    @staticmethod
    def _project(proj: nn.Linear, x: torch.Tensor, by_weights: bool) -> torch.Tensor:
        return linear(x, proj.weight, proj.bias) if by_weights else proj(x)

    def _locations_and_weights(self, query: torch.Tensor, reference_points: torch.Tensor, spatial_shapes: Shapes,
                               by_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampling locations (N, Lq, M, L, P, 2) and softmaxed weights (N, Lq, M, L, P); recorded if asked."""
        n, lq, _ = query.shape
        m, lv, p = self.n_heads, self.n_levels, self.n_points
        if len(spatial_shapes) != lv:
            raise ValueError(f"module expects {lv} levels, got spatial_shapes for {len(spatial_shapes)}")
        offsets = self._project(self.sampling_offsets, query, by_weights).view(n, lq, m, lv, p, 2)
        logits = self._project(self.attention_weights, query, by_weights).view(n, lq, m, lv * p)
        if by_weights and logits.dtype != reference_points.dtype:
            # bf16 projections: locations and weights in the references' fp32 (mixed-dtype ops are 2-4x slower)
            offsets = offsets.to(reference_points.dtype)
            weights = softmax(logits, reference_points.dtype).view(n, lq, m, lv, p)
        else:
            weights = softmax(logits).view(n, lq, m, lv, p)
        if reference_points.dim() == 6 or reference_points.shape[-1] == 2:
            wh = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=offsets.dtype, device=offsets.device) \
                if not isinstance(spatial_shapes[0][0], torch.Tensor) else \
                torch.stack([torch.stack([w, h]) for h, w in spatial_shapes]).to(offsets)
            if reference_points.dim() == 6:  # expanded: ref + offsets / (W, H) in one vectorised pass
                scale = wh.reciprocal()[None, :, None, :].expand(m, lv, p, 2).reshape(-1)
                locations = torch.addcmul(reference_points.view(n, lq, -1), offsets.view(n, lq, -1), scale)
                locations = locations.view(offsets.shape)
                reference_points = reference_points[:, :, 0, :, 0, :]
            else:
                locations = torch.addcmul(reference_points[:, :, None, :, None, :], offsets,
                                          wh.reciprocal()[None, None, None, :, None, :])
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / p * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {tuple(reference_points.shape)}")
        if self.recorder is not None:
            self.recorder(AttentionSample(locations.detach(), weights.detach(), reference_points.detach(),
                                          [(int(h), int(w)) for h, w in spatial_shapes]))
        return locations, weights

    def expand_reference_points(self, reference_points: torch.Tensor) -> torch.Tensor:
        """(N, Lq, L, 2) -> (N, Lq, M, L, P, 2), contiguous, so that adding the offsets is one vectorised pass."""
        n, lq, lv, _ = reference_points.shape
        return reference_points[:, :, None, :, None, :].expand(n, lq, self.n_heads, lv, self.n_points, 2).contiguous()


def unprojected_value(memory: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """(N, S, C) memory, (N, S) padding -> (N, S, C + 1) for `MSDeformAttn.sample_unprojected`: the features with
    padding zeroed and a last channel that is 1 on valid pixels (it carries the bias through the sampling)."""
    valid = (~padding_mask)[..., None].to(memory.dtype)
    return torch.cat([memory * valid, valid], -1)


def fast_inference(module: nn.Module, bypassed: list[nn.Module]) -> bool:
    """Inference without autograd, tracing or export, where paths that keep no activations for a backward may run.

    ``bypassed``: the modules such a path uses through their weights instead of calling them; a forward hook on any
    of them (or a global one) keeps the path as written, so that every hook sees its call.
    """
    if module.training or torch.is_grad_enabled():
        return False
    if capturing():
        return False
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for b in bypassed for m in b.modules())


def initial_offset_bias(n_heads: int, n_levels: int, n_points: int) -> torch.Tensor:
    """Head h points along angle 2*pi*h/M, scaled so the larger component is 1, times (k+1) for point k."""
    theta = torch.arange(n_heads, dtype=torch.float64) * (2.0 * math.pi / n_heads)
    grid = torch.stack([theta.cos(), theta.sin()], -1)
    grid = grid / grid.abs().max(-1, keepdim=True).values
    grid = grid.view(n_heads, 1, 1, 2).repeat(1, n_levels, n_points, 1)
    grid = grid * torch.arange(1, n_points + 1, dtype=torch.float64).view(1, 1, n_points, 1)
    return grid.flatten().float()


@contextmanager
def recording(model: nn.Module) -> Iterator[dict[str, AttentionSample]]:
    """Within the block every MSDeformAttn in ``model`` stores its last call in the yielded dict, by module name.

    The modules' previous recorders come back on exit, also when the block raises.
    """
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, MSDeformAttn)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no deformable attention modules to record "
                         "(the dense-attention baseline has none)")
    records: dict[str, AttentionSample] = {}
    previous = [m.recorder for _, m in modules]
    try:
        for name, m in modules:
            m.recorder = partial(records.__setitem__, name)
        yield records
    finally:
        for (_, m), recorder in zip(modules, previous):
            m.recorder = recorder
