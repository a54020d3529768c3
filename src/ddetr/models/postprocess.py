"""Turn raw model outputs into detections in pixel coordinates (official top-k over queries x classes, no NMS)."""

from __future__ import annotations

import torch
from torch import nn

from ddetr.models.box_ops import box_cxcywh_to_xyxy

Detections = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class PostProcess(nn.Module):
    """Top-k over all (query, class) sigmoid scores; one query may yield several labels, as in the official code.

    `topk` is the batched tensor core (traceable, used by the ONNX export and the attention figures); calling the
    module gives the per-image dicts, optionally thresholded.
    """

    def __init__(self, top_k: int = 100) -> None:
        super().__init__()
        if top_k < 1:
            raise ValueError(f"PostProcess: top_k must be >= 1, got {top_k}")
        self.top_k = top_k

    def topk(self, logits: torch.Tensor, boxes: torch.Tensor, target_sizes: torch.Tensor) -> Detections:
        """logits (B, Q, C), boxes (B, Q, 4; normalised cxcywh), target_sizes (B, 2) as (h, w) -> ``scores``,
        ``labels``, ``boxes`` (xyxy pixels) and ``queries`` (the query each came from), each (B, K[, 4]) for
        K = min(top_k, Q*C), best first."""
        batch, num_queries, num_classes = logits.shape
        if target_sizes.shape != (batch, 2):
            raise ValueError(f"PostProcess: target_sizes must have shape ({batch}, 2) as (h, w), "
                             f"got {tuple(target_sizes.shape)}")
        scores = logits.float().sigmoid().flatten(1)  # (B, Q*C)
        scores, flat_idx = scores.topk(min(self.top_k, num_queries * num_classes), dim=1)
        queries = torch.div(flat_idx, num_classes, rounding_mode="floor")
        xyxy = box_cxcywh_to_xyxy(boxes.float()).gather(1, queries.unsqueeze(-1).expand(-1, -1, 4))
        img_h, img_w = target_sizes.to(xyxy).unbind(1)
        xyxy = xyxy * torch.stack([img_w, img_h, img_w, img_h], dim=1)[:, None, :]
        return scores, flat_idx % num_classes, xyxy, queries

    @torch.no_grad()
    def forward(self, outputs: dict[str, torch.Tensor], target_sizes: torch.Tensor,
                threshold: float | None = None) -> list[dict[str, torch.Tensor]]:
        """Return per image ``scores``, ``labels`` and absolute xyxy ``boxes``; ``target_sizes`` is (B, 2) as (h, w).

        With ``threshold`` only detections scoring strictly above it are kept.
        """
        scores, labels, boxes, _ = self.topk(outputs["pred_logits"], outputs["pred_boxes"], target_sizes)
        results = []
        for s, l, b in zip(scores, labels, boxes):
            if threshold is not None:
                keep = s > threshold
                s, l, b = s[keep], l[keep], b[keep]
            results.append({"scores": s, "labels": l, "boxes": b})
        return results
