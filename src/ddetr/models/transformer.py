"""Deformable encoder and decoder (post-norm, as the official code), two-stage proposals, reference points."""

from __future__ import annotations

import math

import torch
from torch import nn

from ddetr.models.backbone import interleave_sin_cos
from ddetr.models.ms_deform_attn import MSDeformAttn

Shapes = list[tuple[int, int]]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with both terms clamped at eps, as the official code."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class _FFNLayer(nn.Module):
    """Adds the FFN (linear1 -> ReLU -> dropout -> linear2 -> dropout, residual) under the official names."""

    def _init_ffn(self, d_model: int, dim_feedforward: int, dropout: float) -> None:
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout_ffn1 = nn.Dropout(dropout)
        self.dropout_ffn2 = nn.Dropout(dropout)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout_ffn2(self.linear2(self.dropout_ffn1(torch.relu(self.linear1(x)))))


class EncoderLayer(_FFNLayer):
    """Multi-scale deformable self-attention over all levels' pixels, then an FFN; post-norm."""

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int, dim_feedforward: int,
                 dropout: float, dense: bool = False, backend: str = "auto") -> None:
        super().__init__()
        self.dense = dense
        self.self_attn = (nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True) if dense
                          else MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=backend))
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self._init_ffn(d_model, dim_feedforward, dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor, shapes: Shapes,
                level_start_index: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        q = src + pos
        if self.dense:
            attn = self.self_attn(q, q, src, key_padding_mask=padding_mask, need_weights=False)[0]
        else:
            attn = self.self_attn(q, reference_points, src, shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(attn))
        return self.norm2(self.ffn(src))


class DecoderLayer(_FFNLayer):
    """Query self-attention (standard MHA), deformable cross-attention into the memory, FFN; post-norm."""

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int, dim_feedforward: int,
                 dropout: float, dense: bool = False, backend: str = "auto") -> None:
        super().__init__()
        self.dense = dense
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.cross_attn = (nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True) if dense
                           else MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=backend))
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self._init_ffn(d_model, dim_feedforward, dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor, reference_points: torch.Tensor,
                memory: torch.Tensor, memory_pos: torch.Tensor, shapes: Shapes, level_start_index: torch.Tensor,
                padding_mask: torch.Tensor) -> torch.Tensor:
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, q, tgt, need_weights=False)[0]))
        q = tgt + query_pos
        if self.dense:
            attn = self.cross_attn(q, memory + memory_pos, memory, key_padding_mask=padding_mask,
                                   need_weights=False)[0]
        else:
            attn = self.cross_attn(q, reference_points, memory, shapes, level_start_index, padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attn))
        return self.norm3(self.ffn(tgt))


def valid_ratios(mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) padding mask -> (B, 2): fraction of valid columns and rows, as (x, y)."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


def encoder_reference_points(shapes: Shapes, ratios: torch.Tensor) -> torch.Tensor:
    """Pixel centres of every level normalised by the valid region, expanded to all levels: (B, S, L, 2)."""
    refs = []
    device = ratios.device
    for lvl, (h, w) in enumerate(shapes):
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32) + 0.5,
                                torch.arange(w, device=device, dtype=torch.float32) + 0.5, indexing="ij")
        ry = ys.reshape(-1)[None] / (ratios[:, None, lvl, 1] * h)
        rx = xs.reshape(-1)[None] / (ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack((rx, ry), -1))
    return torch.cat(refs, 1)[:, :, None] * ratios[:, None]


def encoder_proposals(memory: torch.Tensor, padding_mask: torch.Tensor, shapes: Shapes,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-stage: a 0.05*2^l box at every valid pixel (logit space, inf where invalid) and the masked memory."""
    n = memory.shape[0]
    proposals = []
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        m = padding_mask[:, start:start + h * w].view(n, h, w)
        valid_h = (~m[:, :, 0]).sum(1)
        valid_w = (~m[:, 0, :]).sum(1)
        ys, xs = torch.meshgrid(torch.arange(h, device=memory.device, dtype=torch.float32),
                                torch.arange(w, device=memory.device, dtype=torch.float32), indexing="ij")
        grid = torch.stack([xs, ys], -1)[None]
        scale = torch.stack([valid_w, valid_h], -1).view(n, 1, 1, 2).float()
        grid = (grid + 0.5) / scale
        wh = torch.full_like(grid, 0.05 * (2.0 ** lvl))
        proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
        start = start + h * w
    props = torch.cat(proposals, 1)
    valid = ((props > 0.01) & (props < 0.99)).all(-1, keepdim=True)
    props = torch.log(props / (1 - props))
    invalid = padding_mask[..., None] | ~valid
    props = props.masked_fill(invalid, float("inf"))
    return memory.masked_fill(invalid, 0.0), props


def proposal_pos_embed(boxes_unact: torch.Tensor, num_feats: int = 128, temperature: float = 10000.0,
                       ) -> torch.Tensor:
    """Sine embedding of sigmoid(box logits): (B, Q, 4) -> (B, Q, 4*num_feats), scale 2*pi."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes_unact.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = boxes_unact.sigmoid() * (2 * math.pi)
    return interleave_sin_cos(pos[..., None] / dim_t).flatten(2)


class Encoder(nn.Module):
    def __init__(self, layers: list[EncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, shapes: Shapes, level_start_index: torch.Tensor,
                ratios: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        reference_points = encoder_reference_points(shapes, ratios)
        for layer in self.layers:
            src = layer(src, pos, reference_points, shapes, level_start_index, padding_mask)
        return src


class Decoder(nn.Module):
    def __init__(self, layers: list[DecoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor, reference_points: torch.Tensor,
                memory: torch.Tensor, memory_pos: torch.Tensor, shapes: Shapes, level_start_index: torch.Tensor,
                ratios: torch.Tensor, padding_mask: torch.Tensor, box_heads: nn.ModuleList | None = None,
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Every layer's output, the reference it used, and (with box_heads, i.e. refinement) its box delta.

        With refinement the next reference is this layer's box with the gradient stopped, as in the paper.
        """
        hidden, references, deltas = [], [], []
        for i, layer in enumerate(self.layers):
            scale = torch.cat([ratios, ratios], -1) if reference_points.shape[-1] == 4 else ratios
            tgt = layer(tgt, query_pos, reference_points[:, :, None] * scale[:, None], memory, memory_pos, shapes,
                        level_start_index, padding_mask)
            hidden.append(tgt)
            references.append(reference_points)
            if box_heads is not None:
                delta = box_heads[i](tgt)
                deltas.append(delta)
                if reference_points.shape[-1] == 4:
                    new = delta + inverse_sigmoid(reference_points)
                else:
                    new = torch.cat([delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1)
                reference_points = new.sigmoid().detach()
        return hidden, references, deltas


class DeformableTransformer(nn.Module):
    """Level embeddings, the encoder, the decoder, and the query sources (learned table or two-stage proposals)."""

    def __init__(self, d_model: int = 256, nheads: int = 8, enc_layers: int = 6, dec_layers: int = 6,
                 dim_feedforward: int = 1024, dropout: float = 0.1, n_levels: int = 4, enc_n_points: int = 4,
                 dec_n_points: int = 4, two_stage: bool = False, dense: bool = False, backend: str = "auto") -> None:
        super().__init__()
        self.d_model, self.two_stage = d_model, two_stage
        args = (d_model, n_levels, nheads)
        self.encoder = Encoder([EncoderLayer(*args, enc_n_points, dim_feedforward, dropout, dense, backend)
                                for _ in range(enc_layers)])
        self.decoder = Decoder([DecoderLayer(*args, dec_n_points, dim_feedforward, dropout, dense, backend)
                                for _ in range(dec_layers)])
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
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
