"""The decoder and iterative bounding-box refinement (paper §4.2, A.4): each layer refines the previous one's boxes."""

from __future__ import annotations

import torch
from torch import nn

from ddetr.models.box_ops import apply_box_delta
from ddetr.models.deform_attn import MSDeformAttn, fast_inference, unprojected_value
from ddetr.models.encoder import AttentionFactory, FFNLayer, Shapes
from ddetr.ops.dropout import Dropout


class DecoderLayer(FFNLayer):
    """Query self-attention (standard attention), cross-attention into the memory around the reference, FFN."""

    def __init__(self, make_attn: AttentionFactory, d_model: int, n_heads: int, dim_feedforward: int,
                 dropout: float) -> None:
        super().__init__()
        # Official names: norm1/dropout1 belong to cross-attention and norm2/dropout2 to self-attention, because the
        # self-attention was added after the cross-attention's names existed.
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.cross_attn = make_attn()
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self._init_ffn(d_model, dim_feedforward, dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor, reference_points: torch.Tensor,
                memory: torch.Tensor, memory_pos: torch.Tensor, shapes: Shapes, padding_mask: torch.Tensor,
                unprojected: torch.Tensor | None = None) -> torch.Tensor:
        """``unprojected``: `unprojected_value(memory, padding_mask)`, given to sample the memory before projecting."""
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, q, tgt, need_weights=False)[0]))
        if unprojected is None:
            attn = self.cross_attn(tgt + query_pos, reference_points, memory, shapes, padding_mask,
                                   value_pos=memory_pos)
        else:
            attn = self.cross_attn(tgt + query_pos, reference_points, memory, shapes, padding_mask,
                                   unprojected_value=unprojected)
        tgt = self.norm1(tgt + self.dropout1(attn))
        return self.norm3(self.ffn(tgt))


class Decoder(nn.Module):
    """Runs the layers; each layer's box head turns its output into a box relative to the layer's reference.

    With ``refine`` (iterative refinement) that box, with the gradient stopped as in the paper, is the next layer's
    reference; without it every layer keeps the initial reference.
    """

    def __init__(self, layers: list[DecoderLayer], refine: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.refine = refine

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor, reference: torch.Tensor, memory: torch.Tensor,
                memory_pos: torch.Tensor, shapes: Shapes, ratios: torch.Tensor, padding_mask: torch.Tensor,
                box_heads: nn.ModuleList) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every layer's output (B, Q, C) and box (B, Q, 4; cxcywh in [0, 1]); ``reference`` (B, Q, 2 or 4) is
        normalised by the valid image region, ``box_heads[i]`` belongs to layer i."""
        hidden, boxes = [], []
        unprojected = unprojected_value(memory, padding_mask) if self._sample_before_projecting(tgt, memory) else None
        for layer, box_head in zip(self.layers, box_heads):
            scale = torch.cat([ratios, ratios], -1) if reference.shape[-1] == 4 else ratios
            tgt = layer(tgt, query_pos, reference[:, :, None] * scale[:, None], memory, memory_pos, shapes,
                        padding_mask, unprojected)
            box = apply_box_delta(box_head(tgt), reference)
            hidden.append(tgt)
            boxes.append(box)
            if self.refine:
                reference = box.detach()
        return hidden, boxes

    def _sample_before_projecting(self, tgt: torch.Tensor, memory: torch.Tensor) -> bool:
        """CPU inference where sampling the memory (C + 1 channels per corner of every query's samples) costs less
        than projecting every pixel (C^2 per pixel): 300 queries against 22k pixels at 800x1333."""
        attn = self.layers[0].cross_attn
        if not isinstance(attn, MSDeformAttn) or memory.device.type != "cpu":
            return False
        if not fast_inference(self, [layer.cross_attn.value_proj for layer in self.layers]):
            return False
        (_, lq, c), s = tgt.shape, memory.shape[1]
        return lq * (attn.n_heads * 4 * attn.n_levels * attn.n_points * (c + 1) + c * c) < s * c * c
