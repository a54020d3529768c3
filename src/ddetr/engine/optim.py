"""AdamW with the official three learning-rate groups, and the per-epoch step LR drop."""

from __future__ import annotations

import torch
from torch import nn

from ddetr.engine.config import OptimConfig

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
    """AdamW (decoupled weight decay on every parameter, as official) over ``param_groups``.

    PyTorch's fused AdamW on CPU and CUDA: the same update to float rounding, one pass over each tensor (measured on
    2 CPU cores: 82 -> 25 ms per step for `deformable-detr`'s 40 M parameters, 40 -> 12 ms for `demo`). A run resumed
    from a checkpoint of an unfused optimizer keeps that one: `load_state_dict` restores the saved group flags.
    """
    groups = param_groups(model, cfg)
    fused = all(p.device.type in ("cpu", "cuda") for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, lr_drop: int,
                    gamma: float = 0.1) -> torch.optim.lr_scheduler.StepLR:
    """Multiply every group's lr by ``gamma`` every ``lr_drop`` epochs (call ``step()`` once per epoch)."""
    if lr_drop < 1:
        raise ValueError(f"build_scheduler: lr_drop must be >= 1 epoch, got {lr_drop}")
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=lr_drop, gamma=gamma)
