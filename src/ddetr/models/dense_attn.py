"""Standard (dense) attention behind the deformable attention's call signature: the DETR-style baseline."""

from __future__ import annotations

import torch
from torch import nn


class DenseAttention(nn.MultiheadAttention):
    """Every query attends to every value; keys are value + value_pos. Reference points and shapes are ignored.

    A subclass, not a wrapper, so the parameters keep `nn.MultiheadAttention`'s names (``in_proj_weight``, ...).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__(d_model, n_heads, dropout=dropout, batch_first=True)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value: torch.Tensor,  # type: ignore[override]
                spatial_shapes: list[tuple[int, int]], padding_mask: torch.Tensor | None = None,
                value_pos: torch.Tensor | None = None) -> torch.Tensor:
        """query (N, Lq, C), value and value_pos (N, S, C), padding_mask (N, S) True on padding -> (N, Lq, C)."""
        key = value if value_pos is None else value + value_pos
        return super().forward(query, key, value, key_padding_mask=padding_mask, need_weights=False)[0]
