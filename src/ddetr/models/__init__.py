"""Deformable DETR model, its training objective and post-processing (torch is imported on first use)."""

from __future__ import annotations

import importlib
from typing import Any

from ddetr.models.config import PRESETS, DetectorConfig, LossConfig, ModelConfig, preset

__all__ = ["build", "build_criterion", "DeformableDETR", "DetectorConfig", "LossConfig", "ModelConfig", "PRESETS",
           "preset"]


def __getattr__(name: str) -> Any:
    """`ddetr.models.config` (presets, configs) stays importable without torch, e.g. for `ddetr --help`."""
    if name in ("build", "build_criterion"):
        return getattr(importlib.import_module("ddetr.models.builder"), name)
    if name == "DeformableDETR":
        from ddetr.models.deformable_detr import DeformableDETR

        return DeformableDETR
    raise AttributeError(f"module 'ddetr.models' has no attribute {name!r}")
