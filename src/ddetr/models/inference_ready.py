"""Inference-only rewrites of a detector that change its results by float rounding only (issue #14).

- BatchNorm folded into the convolution before it: the frozen (or eval-mode) affine normalisation becomes the
  convolution's weight scale and bias, so each ResNet block reads and writes its activations two times fewer.
- The ResNet and the input projections in channels_last layout: oneDNN's native layout on CPU, so no reorder
  of the activations around every convolution, and the flattened levels come out already token-major.

`prepare_for_inference` applies both in place and marks the model inference-only: `train()` then raises, since
training a folded network would silently train without its normalisation.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from ddetr.models.deformable_detr import DeformableDETR

Norm = FrozenBatchNorm2d | nn.BatchNorm2d


def fold_batchnorm(conv: nn.Conv2d, norm: Norm) -> None:
    """Make ``conv`` compute ``norm(conv(x))`` with ``norm``'s running statistics; ``norm`` is then unused."""
    weight = norm.weight if norm.weight is not None else torch.ones_like(norm.running_mean)
    bias = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_mean)
    with torch.no_grad():
        scale = weight / torch.sqrt(norm.running_var + norm.eps)
        shift = bias - norm.running_mean * scale
        if conv.bias is not None:
            shift = shift + conv.bias * scale
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
        conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)


def _foldable(norm: nn.Module) -> bool:
    """Frozen BatchNorm always; a trainable one only with running statistics (eval mode uses them)."""
    return isinstance(norm, FrozenBatchNorm2d) or (isinstance(norm, nn.BatchNorm2d)
                                                   and norm.running_mean is not None)


def fold_resnet_batchnorm(body: nn.Module) -> int:
    """Fold every (convN, bnN) pair and every downsample (conv, bn) of a torchvision ResNet; returns the count."""
    folded = 0
    for module in list(body.modules()):
        for i in range(1, 4):
            conv, norm = getattr(module, f"conv{i}", None), getattr(module, f"bn{i}", None)
            if isinstance(conv, nn.Conv2d) and norm is not None and _foldable(norm):
                fold_batchnorm(conv, norm)
                setattr(module, f"bn{i}", nn.Identity())
                folded += 1
        downsample = getattr(module, "downsample", None)
        if isinstance(downsample, nn.Sequential) and len(downsample) == 2 and _foldable(downsample[1]):
            fold_batchnorm(downsample[0], downsample[1])
            downsample[1] = nn.Identity()
            folded += 1
    return folded


def prepare_for_inference(model: DeformableDETR) -> DeformableDETR:
    """Fold the ResNet's BatchNorm and switch its convolutions to channels_last, in place; returns ``model``, in
    eval mode and inference-only. timm backbones keep their own layers (their norms are not always foldable)."""
    model.eval()
    if not model.backbone.is_timm:
        fold_resnet_batchnorm(model.backbone.body)
    model.use_channels_last()
    for p in model.parameters():
        p.requires_grad_(False)
    model.inference_only = True
    return model
