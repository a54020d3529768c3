"""Box format conversion and generalized IoU, thin wrappers over torchvision.ops."""

from __future__ import annotations

import torch
from torchvision.ops import box_convert
from torchvision.ops import generalized_box_iou as _generalized_box_iou


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(cx, cy, w, h) -> (x0, y0, x1, y1), any leading dims."""
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(x0, y0, x1, y1) -> (cx, cy, w, h), any leading dims."""
    return box_convert(boxes, in_fmt="xyxy", out_fmt="cxcywh")


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU (N, M) between two sets of xyxy boxes."""
    return _generalized_box_iou(boxes1, boxes2)
