"""AdamW with the official three learning-rate groups, and the per-epoch step LR drop."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class OptimConfig:
    """Optimiser settings; defaults are the official Deformable DETR recipe."""

    lr: float = 2e-4
    lr_backbone: float = 2e-5
    lr_linear_proj_mult: float = 0.1
    weight_decay: float = 1e-4
    lr_drop: int = 40
    clip_max_norm: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.lr <= 1:  # AdamW moves each weight by about lr per step: above 1 it diverges at once
            raise ValueError(f"lr must be a number in (0, 1], got {self.lr!r}")
        if not 0 <= self.lr_backbone <= 1:  # 0: the backbone is not trained
            raise ValueError(f"lr_backbone must be a number in [0, 1], got {self.lr_backbone!r}")
        for name in ("lr_linear_proj_mult", "weight_decay", "clip_max_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if self.lr_drop < 1:
            raise ValueError(f"lr_drop must be >= 1 epoch, got {self.lr_drop!r}")


BACKBONE_NAMES = ("backbone.",)
LINEAR_PROJ_NAMES = ("reference_points", "sampling_offsets")


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Split trainable parameters into main / backbone / linear_proj groups by substring match on their names.

    A name matching both lists goes to the backbone group. All three groups are always returned (possibly empty)
    so that group indices stay the same across configurations and checkpoints.
    """
    groups = {
        "main": {"name": "main", "params": [], "lr": cfg.lr},
        "backbone": {"name": "backbone", "params": [], "lr": cfg.lr_backbone},
        "linear_proj": {"name": "linear_proj", "params": [], "lr": cfg.lr * cfg.lr_linear_proj_mult},
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if any(key in name for key in BACKBONE_NAMES):
            groups["backbone"]["params"].append(param)
        elif any(key in name for key in LINEAR_PROJ_NAMES):
            groups["linear_proj"]["params"].append(param)
        else:
            groups["main"]["params"].append(param)
    if not any(group["params"] for group in groups.values()):
        raise ValueError("param_groups: the model has no trainable parameters")
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay on every parameter, as official) over ``param_groups``."""
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, lr_drop: int,
                    gamma: float = 0.1) -> torch.optim.lr_scheduler.StepLR:
    """Multiply every group's lr by ``gamma`` every ``lr_drop`` epochs (call ``step()`` once per epoch)."""
    if lr_drop < 1:
        raise ValueError(f"build_scheduler: lr_drop must be >= 1 epoch, got {lr_drop}")
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=lr_drop, gamma=gamma)
