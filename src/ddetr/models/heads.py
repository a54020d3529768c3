"""Prediction heads (official code): a sigmoid class head with prior 0.01 and a 3-layer box MLP per decoder layer."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ddetr.models.config import ModelConfig


class MLP(nn.Module):
    """A stack of linear layers with ReLU between them (the 3-layer box head)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else torch.relu(layer(x))
        return x


def build_heads(cfg: ModelConfig) -> tuple[nn.ModuleList, nn.ModuleList]:
    """Class and box heads, one pair per decoder layer: copies with refinement, else one shared pair.

    The box head predicts a delta to its layer's reference (`ddetr.models.box_ops.apply_box_delta`); its last layer
    starts at zero. Two-stage adds a last pair that scores the encoder proposals (independent even without
    refinement).
    """
    d = cfg.hidden_dim
    class_head = nn.Linear(d, cfg.num_classes)
    nn.init.constant_(class_head.bias, -math.log((1 - 0.01) / 0.01))
    box_head = MLP(d, d, 4, 3)
    nn.init.zeros_(box_head.layers[-1].weight)
    nn.init.zeros_(box_head.layers[-1].bias)
    n = cfg.dec_layers
    if cfg.with_box_refine:
        classes = [copy.deepcopy(class_head) for _ in range(n)]
        boxes = [copy.deepcopy(box_head) for _ in range(n)]
        nn.init.constant_(boxes[0].layers[-1].bias[2:], -2.0)
    else:
        nn.init.constant_(box_head.layers[-1].bias[2:], -2.0)
        classes, boxes = [class_head] * n, [box_head] * n
    if cfg.two_stage:
        classes.append(copy.deepcopy(class_head))
        boxes.append(copy.deepcopy(box_head))
        for b in boxes:
            nn.init.zeros_(b.layers[-1].bias[2:])
    return nn.ModuleList(classes), nn.ModuleList(boxes)
