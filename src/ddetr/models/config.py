"""Typed model configuration and the named presets of the paper's variants (official configs)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelConfig:
    """Everything that shapes the network; defaults are the official multi-scale Deformable DETR (R50, COCO ids)."""

    num_classes: int = 91
    backbone: str = "resnet50"  # torchvision resnet18 | resnet34 | resnet50 | resnet101, or timm:NAME (features_only)
    dilation: bool = False  # DC5: dilation instead of stride in the last stage (torchvision resnet50/101 only)
    frozen_batchnorm: bool = True  # FrozenBatchNorm2d (pretrained backbones); False trains BatchNorm (from scratch)
    train_backbone: bool = True  # C3-C5 stages trainable (stem and the stage before stay frozen when frozen_batchnorm)
    # Loaded by ddetr.models.build (not by DeformableDETR itself): imagenet = torchvision IMAGENET1K_V1 or timm's
    # default weights, from their caches ($TORCH_HOME/hub/checkpoints, Hugging Face hub), downloaded once if absent;
    # none (or null) = random init on purpose; else the path of a torchvision/timm state dict for this backbone.
    pretrained_backbone: str | None = "imagenet"
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
        is_timm = isinstance(self.backbone, str) and self.backbone.startswith("timm:") and len(self.backbone) > 5
        if not is_timm and self.backbone not in ("resnet18", "resnet34", "resnet50", "resnet101"):
            raise ValueError(f"unknown backbone {self.backbone!r}; choose resnet18/34/50/101 or timm:NAME")
        if self.dilation and self.backbone not in ("resnet50", "resnet101"):
            raise ValueError(f"dilation (DC5) needs torchvision resnet50/101, not {self.backbone}")
        if isinstance(self.pretrained_backbone, Path):
            self.pretrained_backbone = str(self.pretrained_backbone)
        weights = self.pretrained_backbone
        if weights is not None and (not isinstance(weights, str) or not weights.strip()):
            raise ValueError(f"pretrained_backbone {weights!r}: use imagenet, none (or null) or the path of a state "
                             "dict file")
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


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build a (nested) dataclass from a dict, refusing unknown keys by name and converting every value to its
    field's declared type (`convert`: YAML reads ``2e-4`` as text, JSON has no tuples); errors name the key."""
    prefix = f"{where}." if where else ""
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: expected a mapping of {cls.__name__} fields, got "
                         f"{type(data).__name__} {_show(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(prefix + k for k in unknown)}")
    kwargs = {key: convert(value, hints[key], prefix + key) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}" if where else str(exc)) from None


_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(ftype: Any) -> str:
    """How a declared type reads in an error message."""
    origin, args = typing.get_origin(ftype), typing.get_args(ftype)
    if origin in (typing.Union, types.UnionType):
        others = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(others) + (" or null" if type(None) in args else "")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0]).split(' ', 1)[-1]}s"
        return f"a list of {len(args)} {_type_name(args[0]).split(' ', 1)[-1]}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a text"}.get(
        ftype, getattr(ftype, "__name__", str(ftype)))


def convert(value: Any, ftype: Any, key: str) -> Any:
    """``value`` as the declared type ``ftype`` (int, float, bool, str, X | None, tuple[int, ...], tuple[int, int],
    nested dataclasses): numbers written as text are read, integral floats become ints, lists become tuples; anything
    else is one ValueError naming the key, the value and the expected type."""
    origin, args = typing.get_origin(ftype), typing.get_args(ftype)
    if dataclasses.is_dataclass(ftype):
        return from_dict(ftype, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if type(None) in args and str not in others and isinstance(value, str) and value.lower() in ("none", "null"):
            return None
        for option in others:
            try:
                return convert(value, option, key)
            except ValueError:
                continue
        raise ValueError(f"{key}: expected {_type_name(ftype)}, got {_show(value)}")
    try:
        converted = _convert_plain(value, ftype, origin, args, key)
    except (ValueError, TypeError, OverflowError):
        converted = _INVALID
    if converted is _INVALID:
        raise ValueError(f"{key}: expected {_type_name(ftype)}, got {_show(value)}")
    return converted


_INVALID = object()


def _convert_plain(value: Any, ftype: Any, origin: Any, args: tuple, key: str) -> Any:
    if ftype is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        return _BOOLS.get(value.strip().lower(), _INVALID) if isinstance(value, str) else _INVALID
    if ftype is int:
        if isinstance(value, str):
            text = value.strip()
            value = int(text) if text.lstrip("+-").isdigit() else float(text)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value if isinstance(value, int) and not isinstance(value, bool) else _INVALID
    if ftype is float:
        if isinstance(value, str):
            return float(value.strip())
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _INVALID
    if ftype is str:
        if isinstance(value, str):
            return value
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _INVALID
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return _INVALID
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            return _INVALID
        return tuple(convert(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, args)))
    return value  # Any and other annotations: as given


def _is_text(ftype: Any) -> bool:
    return ftype is str or typing.get_origin(ftype) in (typing.Union, types.UnionType) and str in typing.get_args(ftype)


def set_field(cfg: Any, dotted: str, text: str) -> None:
    """Apply a ``--set key.sub=value`` override, converted to the field's declared type (YAML syntax: ``2e-4``,
    ``true``, ``[64, 96]``, ``null``; text fields take the text as written). Run `validate` after the last one."""
    where = f"--set {dotted}={text}"
    *path, last = dotted.split(".")
    target = cfg
    for part in path:
        if not dataclasses.is_dataclass(target) or not hasattr(target, part):
            raise ValueError(f"{where}: {type(target).__name__} has no field {part!r}")
        target = getattr(target, part)
    if not dataclasses.is_dataclass(target) or last not in {f.name for f in dataclasses.fields(target)}:
        raise ValueError(f"{where}: {type(target).__name__} has no field {last!r}")
    ftype = typing.get_type_hints(type(target))[last]
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    if _is_text(ftype) and value is not None:
        value = text.strip()
    try:
        value = convert(value, ftype, dotted)
    except ValueError as exc:
        raise ValueError(f"--set {exc}") from None
    setattr(target, last, value)


def validate(cfg: Any, where: str = "") -> None:
    """Re-run the checks (``__post_init__``) of a config and every dataclass inside it, e.g. after `set_field`;
    one ValueError naming the section."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, f"{where}.{f.name}" if where else f.name)
    if hasattr(cfg, "__post_init__"):
        try:
            cfg.__post_init__()
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}: {exc}" if where else str(exc)) from None


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a dataclass config as YAML (.yaml/.yml) or JSON (anything else)."""
    path = Path(path)
    data = dataclasses.asdict(cfg)
    text = yaml.safe_dump(data, sort_keys=False) if path.suffix in (".yaml", ".yml") else json.dumps(data, indent=2)
    path.write_text(text)


def load_config(path: str | Path, cls: type = DetectorConfig) -> Any:
    """Read a YAML or JSON config written by `save_config` (or by hand)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid YAML/JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    try:
        return from_dict(cls, data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _preset(**model: Any) -> DetectorConfig:
    return DetectorConfig(model=ModelConfig(**model))


# The small from-scratch CPU model of `ddetr demo`; the demo-* presets differ from it only in the paper's switches.
_DEMO = dict(num_classes=6, backbone="resnet18", pretrained_backbone="none", frozen_batchnorm=False, hidden_dim=128,
             nheads=8, enc_layers=2, dec_layers=3, dim_feedforward=512, dropout=0.0, num_queries=50)

# The official configs/*.sh, flag for flag, plus the demo model and its variants (the paper's Tables 1-2 in small).
PRESETS: dict[str, DetectorConfig] = {
    "deformable-detr": _preset(),
    "deformable-detr-single-scale": _preset(num_feature_levels=1),
    "deformable-detr-single-scale-dc5": _preset(num_feature_levels=1, dilation=True),
    "deformable-detr-refine": _preset(with_box_refine=True),
    "deformable-detr-two-stage": _preset(with_box_refine=True, two_stage=True),
    "detr-baseline": _preset(num_feature_levels=1, dense_attention=True),
    "demo": _preset(**_DEMO, num_feature_levels=3, with_box_refine=True),
    "demo-detr": _preset(**_DEMO, num_feature_levels=1, dense_attention=True),
    "demo-single-scale": _preset(**_DEMO, num_feature_levels=1),
    "demo-multi-scale": _preset(**_DEMO, num_feature_levels=3),
    "demo-two-stage": _preset(**_DEMO, num_feature_levels=3, with_box_refine=True, two_stage=True),
}


def preset(name: str, **overrides: Any) -> DetectorConfig:
    """A fresh copy of a named preset, with optional ModelConfig field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    cfg = DetectorConfig.from_dict(PRESETS[name].to_dict())
    if overrides:
        cfg.model = dataclasses.replace(cfg.model, **overrides)
    return cfg
