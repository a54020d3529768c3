"""Wire a model, its training criterion and its post-processor from one `DetectorConfig`."""

from __future__ import annotations

from torch import nn

from ddetr.models.config import DetectorConfig
from ddetr.models.criterion import SetCriterion
from ddetr.models.deformable_detr import DeformableDETR
from ddetr.models.matcher import HungarianMatcher
from ddetr.models.postprocess import PostProcess


def build_criterion(cfg: DetectorConfig) -> SetCriterion:
    loss = cfg.loss
    matcher = HungarianMatcher(loss.cost_class, loss.cost_bbox, loss.cost_giou, loss.focal_alpha, loss.focal_gamma)
    weights = {"loss_ce": loss.cls_loss_coef, "loss_bbox": loss.bbox_loss_coef, "loss_giou": loss.giou_loss_coef}
    return SetCriterion(cfg.model.num_classes, matcher, weights, loss.focal_alpha, loss.focal_gamma)


def build(cfg: DetectorConfig) -> tuple[DeformableDETR, nn.Module, PostProcess]:
    """(model, criterion, postprocessor), as DETR's `build`; aux losses are dropped when ``loss.aux_loss`` is off."""
    model = DeformableDETR(cfg.model)
    criterion = build_criterion(cfg)
    if not cfg.loss.aux_loss:
        criterion = _NoAux(criterion)
    return model, criterion, PostProcess(cfg.top_k)


class _NoAux(nn.Module):
    """Criterion wrapper that ignores the earlier decoder layers' outputs."""

    def __init__(self, criterion: SetCriterion) -> None:
        super().__init__()
        self.criterion = criterion

    def forward(self, outputs: dict, targets: list[dict]) -> dict:
        return self.criterion({k: v for k, v in outputs.items() if k != "aux_outputs"}, targets)
