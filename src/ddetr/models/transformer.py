"""The deformable transformer: flatten the levels, encode, pick the queries (learned or two-stage), decode."""

from __future__ import annotations

import torch
from torch import nn

from ddetr.models.box_ops import apply_box_delta
from ddetr.models.config import ModelConfig
from ddetr.models.decoder import Decoder, DecoderLayer
from ddetr.models.deform_attn import MSDeformAttn
from ddetr.models.dense_attn import DenseAttention
from ddetr.models.encoder import Encoder, EncoderLayer, Shapes
from ddetr.models.two_stage import base_proposals, proposal_pos_embed, top_proposals

Queries = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # content (B, Q, C), position (B, Q, C), reference


class DeformableTransformer(nn.Module):
    """Level embeddings, encoder, decoder and the query sources (post-norm layers, official names and init).

    ``forward`` returns every decoder layer's output and box, and for two-stage the encoder's proposals
    (``pred_logits``/``pred_boxes`` of every pixel); the detector owns the heads and passes them in.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.d_model, self.two_stage, self.num_queries = d, cfg.two_stage, cfg.num_queries

        def attention(n_points: int) -> nn.Module:
            if cfg.dense_attention:
                return DenseAttention(d, cfg.nheads, cfg.dropout)
            return MSDeformAttn(d, cfg.num_feature_levels, cfg.nheads, n_points, cfg.attention_backend)

        self.encoder = Encoder([EncoderLayer(lambda: attention(cfg.enc_n_points), d, cfg.dim_feedforward,
                                             cfg.dropout) for _ in range(cfg.enc_layers)])
        self.decoder = Decoder([DecoderLayer(lambda: attention(cfg.dec_n_points), d, cfg.nheads, cfg.dim_feedforward,
                                             cfg.dropout) for _ in range(cfg.dec_layers)], cfg.with_box_refine)
        self.level_embed = nn.Parameter(torch.empty(cfg.num_feature_levels, d))
        if cfg.two_stage:
            self.enc_output = nn.Linear(d, d)
            self.enc_output_norm = nn.LayerNorm(d)
            self.pos_trans = nn.Linear(d * 2, d * 2)
            self.pos_trans_norm = nn.LayerNorm(d * 2)
        else:
            self.reference_points = nn.Linear(d, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official order: xavier on every matrix, then the deformable attention init, then the level table."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: list[torch.Tensor], masks: list[torch.Tensor], pos_embeds: list[torch.Tensor],
                query_embed: torch.Tensor | None, class_heads: nn.ModuleList, box_heads: nn.ModuleList,
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, torch.Tensor] | None]:
        """srcs and pos_embeds (B, C, H_l, W_l), masks (B, H_l, W_l) True on padding, one per level; query_embed
        (Q, 2C) position and content of the learned queries (None for two-stage)."""
        shapes = [(s.shape[-2], s.shape[-1]) for s in srcs]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl] for lvl, p in enumerate(pos_embeds)], 1)
        mask = torch.cat([m.flatten(1) for m in masks], 1)
        ratios = torch.stack([valid_ratios(m) for m in masks], 1)
        memory = self.encoder(src, pos, shapes, ratios, mask)

        enc_outputs = None
        if self.two_stage:
            (tgt, query_pos, reference), enc_outputs = self._two_stage_queries(memory, mask, shapes, class_heads[-1],
                                                                               box_heads[-1])
        else:
            tgt, query_pos, reference = self._learned_queries(query_embed, src.shape[0])
        hidden, boxes = self.decoder(tgt, query_pos, reference, memory, pos, shapes, ratios, mask, box_heads)
        return hidden, boxes, enc_outputs

    def _learned_queries(self, query_embed: torch.Tensor, batch: int) -> Queries:
        """One learned (position, content) pair per query; the reference point is a linear map of the position."""
        query_pos, tgt = query_embed.split(self.d_model, dim=1)
        query_pos = query_pos[None].expand(batch, -1, -1)
        return tgt[None].expand(batch, -1, -1), query_pos, self.reference_points(query_pos).sigmoid()

    def _two_stage_queries(self, memory: torch.Tensor, mask: torch.Tensor, shapes: Shapes, class_head: nn.Module,
                           box_head: nn.Module) -> tuple[Queries, dict[str, torch.Tensor]]:
        """The top proposals as queries and references, and every pixel's proposal (see `ddetr.models.two_stage`).

        Pixels without a proposal get zero memory and the box (1, 1, 1, 1) (the official code's +inf box logits).
        """
        props, invalid = base_proposals(mask, shapes)
        features = self.enc_output_norm(self.enc_output(memory.masked_fill(invalid, 0.0)))
        logits = class_head(features)
        boxes = apply_box_delta(box_head(features), props).masked_fill(invalid, 1.0)
        reference = top_proposals(logits, boxes, mask, self.num_queries)
        embed = self.pos_trans_norm(self.pos_trans(proposal_pos_embed(reference, self.d_model // 2)))
        query_pos, tgt = embed.split(self.d_model, dim=2)
        return (tgt, query_pos, reference), {"pred_logits": logits, "pred_boxes": boxes}


def valid_ratios(mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) padding mask -> (B, 2): fraction of valid columns and rows, as (x, y)."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)
