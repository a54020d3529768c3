"""Deformable DETR model, its training objective and post-processing."""

from ddetr.models.config import PRESETS, DetectorConfig, LossConfig, ModelConfig, preset
from ddetr.models.deformable_detr import DeformableDETR

__all__ = ["DeformableDETR", "DetectorConfig", "LossConfig", "ModelConfig", "PRESETS", "preset"]
