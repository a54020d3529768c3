"""Set-prediction losses of Deformable DETR: sigmoid focal classification, L1 and GIoU on matched boxes."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from ddetr.models.box_ops import box_cxcywh_to_xyxy
from ddetr.models.config import LossConfig
from ddetr.models.matcher import HungarianMatcher


class SetCriterion(nn.Module):
    """Matches every decoder layer (and the two-stage encoder output) to the targets and sums the weighted losses.

    Returns unweighted ``loss_ce``/``loss_bbox``/``loss_giou`` per layer (suffix ``_{i}`` for aux layer i, ``_enc``
    for the encoder), the log-only ``class_error`` and ``loss``, the weighted total to backpropagate.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, cfg: LossConfig) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.loss_weights = {"loss_ce": cfg.cls_loss_coef, "loss_bbox": cfg.bbox_loss_coef,
                             "loss_giou": cfg.giou_loss_coef}
        self.focal_alpha, self.focal_gamma = cfg.focal_alpha, cfg.focal_gamma

    def forward(self, outputs: dict, targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Compute all losses in fp32 (autocast off) and their weighted sum under the key ``loss``."""
        layers = [("", outputs, targets)]
        layers += [(f"_{i}", aux, targets) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        if "enc_outputs" in outputs:
            # The encoder proposes class-agnostic boxes: every target becomes class 0 (official two-stage).
            binary = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            layers.append(("_enc", outputs["enc_outputs"], binary))

        logits = outputs["pred_logits"]
        losses: dict[str, torch.Tensor] = {}
        with torch.autocast(device_type=logits.device.type, enabled=False):
            num_boxes = self._num_boxes(targets, logits.device)
            total = logits.new_zeros((), dtype=torch.float32)
            for suffix, layer_outputs, layer_targets in layers:
                layer_losses, class_error = self._layer_losses(layer_outputs, layer_targets, num_boxes, suffix)
                if suffix == "":
                    losses["class_error"] = class_error
                for name, value in layer_losses.items():
                    losses[name + suffix] = value
                    total = total + self.loss_weights[name] * value
        losses["loss"] = total
        return losses

    def _layer_losses(self, outputs: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]],
                      num_boxes: torch.Tensor, suffix: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Match one layer's predictions to the targets; return its three unweighted losses and class error."""
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"SetCriterion: pred_logits{suffix} has {logits.shape[-1]} classes, "
                             f"expected {self.num_classes}")
        indices = self.matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(logits.device)
        query_idx = torch.cat([src for src, _ in indices]).to(logits.device)
        tgt_labels = torch.cat([t["labels"][tgt.to(t["labels"].device)] for t, (_, tgt) in zip(targets, indices)])
        tgt_boxes = torch.cat([t["boxes"][tgt.to(t["boxes"].device)] for t, (_, tgt) in zip(targets, indices)])
        tgt_labels, tgt_boxes = tgt_labels.to(logits.device), tgt_boxes.to(logits.device, torch.float32)

        # Focal loss over every query x class; unmatched queries have all-zero targets.
        onehot = torch.zeros_like(logits)
        onehot[batch_idx, query_idx, tgt_labels] = 1.0
        loss_ce = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma, reduction="sum") / num_boxes

        src_boxes = boxes[batch_idx, query_idx]
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes
        loss_giou = generalized_box_iou_loss(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes),
                                             reduction="sum") / num_boxes
        losses = {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
        return losses, _class_error(logits[batch_idx, query_idx].detach(), tgt_labels)

    @staticmethod
    def _num_boxes(targets: list[dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
        """Average number of target boxes per process (all-reduced under DDP), at least 1, as a 0-d tensor."""
        num = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num)
            num = num / dist.get_world_size()
        return num.clamp(min=1.0)


def _class_error(matched_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 error in percent over matched queries (0 when nothing is matched); for logging only."""
    if len(labels) == 0:
        return matched_logits.new_zeros(())
    correct = (matched_logits.argmax(-1) == labels).float().mean()
    return 100.0 * (1.0 - correct)
