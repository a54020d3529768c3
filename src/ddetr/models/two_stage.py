"""Two-stage Deformable DETR (paper §4.2, A.4): every encoder pixel proposes a box; the best become the queries.

The steps, in `DeformableTransformer._two_stage_queries` (which holds the layers under their official names
``enc_output``/``pos_trans``): a base box per pixel (`base_proposals`), refined and scored by the detector's last
box and class heads on the projected memory, the top k taken with the gradient stopped (`top_proposals`), and their
sine embedding (`proposal_pos_embed`) projected into each query's position and content.
"""

from __future__ import annotations

import math

import torch

from ddetr.models.backbone import interleave_sin_cos
from ddetr.models.encoder import Shapes


def base_proposals(padding_mask: torch.Tensor, shapes: Shapes) -> tuple[torch.Tensor, torch.Tensor]:
    """A 0.05*2^l box centred on every pixel of level l, normalised by the valid region: (B, S, 4) cxcywh, and
    (B, S, 1) True where there is no proposal (padding, or a box reaching within 0.01 of the border)."""
    n = padding_mask.shape[0]
    proposals = []
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        m = padding_mask[:, start:start + h * w].view(n, h, w)
        valid_h = (~m[:, :, 0]).sum(1)
        valid_w = (~m[:, 0, :]).sum(1)
        ys, xs = torch.meshgrid(torch.arange(h, device=m.device, dtype=torch.float32),
                                torch.arange(w, device=m.device, dtype=torch.float32), indexing="ij")
        grid = torch.stack([xs, ys], -1)[None]
        scale = torch.stack([valid_w, valid_h], -1).view(n, 1, 1, 2).float()
        grid = (grid + 0.5) / scale
        wh = torch.full_like(grid, 0.05 * (2.0 ** lvl))
        proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
        start = start + h * w
    props = torch.cat(proposals, 1)
    valid = ((props > 0.01) & (props < 0.99)).all(-1, keepdim=True)
    return props, padding_mask[..., None] | ~valid


def top_proposals(logits: torch.Tensor, boxes: torch.Tensor, padding_mask: torch.Tensor, k: int) -> torch.Tensor:
    """The k boxes whose class-0 logit (the official choice) is highest, never on padding; gradient stopped."""
    scores = logits[..., 0].masked_fill(padding_mask, float("-inf"))
    index = torch.topk(scores, min(k, scores.shape[1]), dim=1)[1]
    return torch.gather(boxes, 1, index[..., None].expand(-1, -1, 4)).detach()


def proposal_pos_embed(boxes: torch.Tensor, num_feats: int = 128, temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding of boxes in [0, 1]: (B, Q, 4) -> (B, Q, 4*num_feats), scale 2*pi."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = boxes * (2 * math.pi)
    return interleave_sin_cos(pos[..., None] / dim_t).flatten(2)
