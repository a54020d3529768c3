"""Typed model configuration and the named presets of the paper's variants (official configs)."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelConfig:
    """Everything that shapes the network; defaults are the official multi-scale Deformable DETR (R50, COCO ids)."""

    num_classes: int = 91
    backbone: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101
    dilation: bool = False  # DC5: dilation instead of stride in layer4
    frozen_batchnorm: bool = True  # FrozenBatchNorm2d (pretrained backbones); False trains BatchNorm (from scratch)
    train_backbone: bool = True  # layer2-4 trainable (stem and layer1 stay frozen when frozen_batchnorm)
    pretrained_backbone: str | None = None  # local torchvision ResNet weights file; never downloaded
    num_feature_levels: int = 4  # 1 = single scale (C5 only)
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    num_queries: int = 300
    enc_n_points: int = 4
    dec_n_points: int = 4
    with_box_refine: bool = False
    two_stage: bool = False
    dense_attention: bool = False  # DETR-style baseline: standard attention instead of deformable (single scale)
    attention_backend: str = "auto"  # MSDeformAttn backend: auto | reference | cpu | triton

    def __post_init__(self) -> None:
        if self.backbone not in ("resnet18", "resnet34", "resnet50", "resnet101"):
            raise ValueError(f"unknown backbone {self.backbone!r}; choose resnet18/34/50/101")
        if self.dilation and self.backbone in ("resnet18", "resnet34"):
            raise ValueError(f"dilation (DC5) needs a bottleneck ResNet (50/101), not {self.backbone}")
        if self.num_feature_levels < 1:
            raise ValueError("num_feature_levels must be >= 1")
        if self.hidden_dim % self.nheads:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be divisible by nheads {self.nheads}")
        if self.hidden_dim % 32 and self.num_feature_levels:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be a multiple of 32 (GroupNorm(32) projections)")
        if self.dense_attention and (self.with_box_refine or self.two_stage):
            raise ValueError("dense_attention is the DETR-style baseline; it has no box refinement or two-stage")


@dataclass
class LossConfig:
    """Matcher costs and loss weights (official: 2/5/2 both), focal loss parameters, aux losses on/off."""

    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    aux_loss: bool = True


@dataclass
class DetectorConfig:
    """Model + loss + post-processing: what `ddetr.models.build` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    top_k: int = 100  # detections kept per image by the post-processor

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorConfig:
        return from_dict(cls, data)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a (nested) dataclass from a dict, refusing unknown keys by name; lists become tuples where typed so."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    kwargs = {}
    for key, value in data.items():
        ftype = hints[key]
        if dataclasses.is_dataclass(ftype):
            value = from_dict(ftype, value)
        elif typing.get_origin(ftype) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def set_field(cfg: Any, dotted: str, text: str) -> None:
    """Apply a ``--set key.sub=value`` override; the value is parsed as YAML (numbers, bools, lists, null)."""
    *path, last = dotted.split(".")
    target = cfg
    for part in path:
        if not hasattr(target, part):
            raise ValueError(f"--set {dotted}: {type(target).__name__} has no field {part!r}")
        target = getattr(target, part)
    if not dataclasses.is_dataclass(target) or last not in {f.name for f in dataclasses.fields(target)}:
        raise ValueError(f"--set {dotted}: {type(target).__name__} has no field {last!r}")
    value = yaml.safe_load(text)
    current = getattr(target, last)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    setattr(target, last, value)
    if hasattr(target, "__post_init__"):
        target.__post_init__()


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a dataclass config as YAML (.yaml/.yml) or JSON (anything else)."""
    path = Path(path)
    data = dataclasses.asdict(cfg)
    text = yaml.safe_dump(data, sort_keys=False) if path.suffix in (".yaml", ".yml") else json.dumps(data, indent=2)
    path.write_text(text)


def load_config(path: str | Path, cls: type = DetectorConfig) -> Any:
    """Read a YAML or JSON config written by `save_config` (or by hand)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML/JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return from_dict(cls, data)


def _preset(**model: Any) -> DetectorConfig:
    return DetectorConfig(model=ModelConfig(**model))


# The official configs/*.sh, flag for flag, plus the small from-scratch CPU demo model.
PRESETS: dict[str, DetectorConfig] = {
    "deformable-detr": _preset(),
    "deformable-detr-single-scale": _preset(num_feature_levels=1),
    "deformable-detr-single-scale-dc5": _preset(num_feature_levels=1, dilation=True),
    "deformable-detr-refine": _preset(with_box_refine=True),
    "deformable-detr-two-stage": _preset(with_box_refine=True, two_stage=True),
    "detr-baseline": _preset(num_feature_levels=1, dense_attention=True),
    "demo": _preset(
        num_classes=6, backbone="resnet18", frozen_batchnorm=False, num_feature_levels=3, hidden_dim=128,
        nheads=8, enc_layers=2, dec_layers=3, dim_feedforward=512, dropout=0.0, num_queries=50,
        with_box_refine=True,
    ),
}


def preset(name: str, **overrides: Any) -> DetectorConfig:
    """A fresh copy of a named preset, with optional ModelConfig field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    cfg = DetectorConfig.from_dict(PRESETS[name].to_dict())
    if overrides:
        cfg.model = dataclasses.replace(cfg.model, **overrides)
    return cfg
