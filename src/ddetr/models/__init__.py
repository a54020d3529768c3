"""Deformable DETR model, its training objective and post-processing."""

from ddetr.models.build import build, build_criterion
from ddetr.models.config import PRESETS, DetectorConfig, LossConfig, ModelConfig, preset
from ddetr.models.deformable_detr import DeformableDETR

__all__ = ["build", "build_criterion", "DeformableDETR", "DetectorConfig", "LossConfig", "ModelConfig", "PRESETS",
           "preset"]
