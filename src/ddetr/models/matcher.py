"""Hungarian matching between predicted queries and ground-truth boxes (focal class cost + L1 + GIoU)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ddetr.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from ddetr.models.config import LossConfig


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising cost_class*C_cls + cost_bbox*L1 - cost_giou*GIoU.

    The class cost is the focal-loss difference at the target class (official Deformable DETR), computed in fp32
    even under autocast so that half-precision logits cannot push NaN or inf into scipy.
    """

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        if cfg.cost_class == 0 and cfg.cost_bbox == 0 and cfg.cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0, the matching would be arbitrary")
        self.cost_class, self.cost_bbox, self.cost_giou = cfg.cost_class, cfg.cost_bbox, cfg.cost_giou
        self.focal_alpha, self.focal_gamma = cfg.focal_alpha, cfg.focal_gamma

    @torch.no_grad()
    def forward(self, outputs: dict[str, torch.Tensor],
                targets: list[dict[str, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Return, per image, (query indices, target indices) of the matched pairs as int64 CPU tensors."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        batch, num_queries, num_classes = logits.shape
        if len(targets) != batch:
            raise ValueError(f"HungarianMatcher: {len(targets)} targets for a batch of {batch} predictions")
        sizes = [len(t["boxes"]) for t in targets]
        tgt_labels = torch.cat([t["labels"] for t in targets]).to(logits.device)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(logits.device, torch.float32)
        if len(tgt_labels) != sum(sizes):
            raise ValueError("HungarianMatcher: each target needs as many labels as boxes")
        _check_inputs(logits, boxes, tgt_labels, num_classes)
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [(empty, empty) for _ in targets]

        # Per-image cost blocks (no wasted cross-image pairs), moved to the CPU in one transfer.
        with torch.autocast(device_type=logits.device.type, enabled=False):
            costs = [self._cost(logits[i], boxes[i], labels, tgt)
                     for i, (labels, tgt) in enumerate(zip(tgt_labels.split(sizes), tgt_boxes.split(sizes)))]
        flat = torch.cat([c.flatten() for c in costs]).cpu()
        if not torch.isfinite(flat).all():
            raise ValueError("HungarianMatcher: non-finite matching cost from finite predictions "
                             "(degenerate or non-finite target boxes?)")
        indices = []
        for cost, n in zip(flat.split([num_queries * n for n in sizes]), sizes):
            rows, cols = linear_sum_assignment(cost.view(num_queries, n).numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices

    def _cost(self, logits: torch.Tensor, boxes: torch.Tensor, tgt_labels: torch.Tensor,
              tgt_boxes: torch.Tensor) -> torch.Tensor:
        """(Q, n) fp32 cost of assigning each of one image's queries to each of its targets."""
        p = logits[:, tgt_labels].float().sigmoid()  # probability of each target's class
        pos = self.focal_alpha * (1 - p) ** self.focal_gamma * -(p + 1e-8).log()
        neg = (1 - self.focal_alpha) * p**self.focal_gamma * -(1 - p + 1e-8).log()
        boxes = boxes.float()
        cost_l1 = torch.cdist(boxes, tgt_boxes, p=1)
        giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        return self.cost_class * (pos - neg) + self.cost_bbox * cost_l1 - self.cost_giou * giou


def _check_inputs(logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    """Raise a clear error for NaN/inf predictions or out-of-range labels before they reach indexing or scipy."""
    ok = torch.isfinite(logits).all() & torch.isfinite(boxes).all()
    if len(labels):
        ok &= (labels.min() >= 0) & (labels.max() < num_classes)
    if bool(ok):  # one device sync for all checks
        return
    bad_logits = int((~torch.isfinite(logits)).sum())
    bad_boxes = int((~torch.isfinite(boxes)).sum())
    if bad_logits or bad_boxes:
        raise ValueError(f"non-finite predictions reached the matcher: {bad_logits} values in pred_logits "
                         f"and {bad_boxes} in pred_boxes are NaN or inf")
    raise ValueError(f"HungarianMatcher: target labels must be in [0, {num_classes}), "
                     f"got min {int(labels.min())} max {int(labels.max())}")
