"""Deformable DETR model, its training objective and post-processing."""

from ddetr.models.config import DetectorConfig, LossConfig, ModelConfig, PRESETS, preset
from ddetr.models.deformable_detr import DeformableDETR

__all__ = ["DeformableDETR", "DetectorConfig", "LossConfig", "ModelConfig", "PRESETS", "preset"]
