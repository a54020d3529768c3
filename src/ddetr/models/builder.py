"""Wire a model, its training criterion and its post-processor from one `DetectorConfig`."""

from __future__ import annotations

from torch import nn

from ddetr.models.config import DetectorConfig
from ddetr.models.criterion import SetCriterion
from ddetr.models.deformable_detr import DeformableDETR
from ddetr.models.matcher import HungarianMatcher
from ddetr.models.postprocess import PostProcess


def build_criterion(cfg: DetectorConfig) -> SetCriterion:
    """The set criterion with its Hungarian matcher, both from ``cfg.loss`` (`build` applies ``aux_loss``)."""
    return SetCriterion(cfg.model.num_classes, HungarianMatcher(cfg.loss), cfg.loss)


def build(cfg: DetectorConfig, backbone_weights: bool = True) -> tuple[DeformableDETR, nn.Module, PostProcess]:
    """(model, criterion, postprocessor): the training recipe, as DETR's `build`. Unlike `DeformableDETR(cfg.model)`
    (the architecture, randomly initialised), the backbone starts from ``model.pretrained_backbone`` (ImageNet by
    default; pass ``backbone_weights=False`` when a checkpoint replaces them anyway); aux losses follow ``loss``."""
    model = DeformableDETR(cfg.model)
    if backbone_weights:
        model.backbone.load_pretrained(cfg.model.pretrained_backbone)
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
