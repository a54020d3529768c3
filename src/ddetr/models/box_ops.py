"""Box format conversion, generalized IoU (thin wrappers over torchvision.ops) and the box-refinement update."""

from __future__ import annotations

import torch
from torchvision.ops import box_convert
from torchvision.ops import generalized_box_iou as _generalized_box_iou


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(cx, cy, w, h) -> (x0, y0, x1, y1), any leading dims."""
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU (N, M) between two sets of xyxy boxes."""
    return _generalized_box_iou(boxes1, boxes2)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with both terms clamped at eps, as the official code."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def apply_box_delta(delta: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Box (cx, cy, w, h) in [0, 1] = sigmoid(delta + inverse_sigmoid(reference)), the paper's refinement step.

    ``delta`` (..., 4) is a box head's output; a 2-d ``reference`` (a point) places the centre only, so the size is
    sigmoid(delta) alone.
    """
    ref = inverse_sigmoid(reference)
    if reference.shape[-1] == 4:
        return (delta + ref).sigmoid()
    return torch.cat([delta[..., :2] + ref, delta[..., 2:]], -1).sigmoid()
