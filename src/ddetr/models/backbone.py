"""ResNet backbone (C3-C5 or C5) with frozen BatchNorm, and the sine position encoding of Deformable DETR."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

_CHANNELS = {"resnet18": (128, 256, 512), "resnet34": (128, 256, 512),
             "resnet50": (512, 1024, 2048), "resnet101": (512, 1024, 2048)}


class Backbone(nn.Module):
    """torchvision ResNet without its classifier; returns the last ``num_outputs`` of C3, C4, C5 and their masks."""

    def __init__(self, name: str = "resnet50", num_outputs: int = 3, dilation: bool = False,
                 frozen_batchnorm: bool = True, train_backbone: bool = True,
                 pretrained_path: str | None = None) -> None:
        super().__init__()
        norm = FrozenBatchNorm2d if frozen_batchnorm else nn.BatchNorm2d
        kwargs = {"replace_stride_with_dilation": [False, False, True]} if dilation else {}
        body = getattr(torchvision.models, name)(weights=None, norm_layer=norm, **kwargs)
        if pretrained_path is not None:
            load_torchvision_weights(body, pretrained_path)
        del body.fc, body.avgpool
        self.body = body
        self.layer_names = ["layer2", "layer3", "layer4"][3 - num_outputs:]
        self.num_channels = list(_CHANNELS[name][3 - num_outputs:])
        self.strides = [8, 16, 32 if not dilation else 16][3 - num_outputs:]
        for pname, p in self.body.named_parameters():
            trainable = train_backbone and (pname.startswith(("layer2", "layer3", "layer4"))
                                            or not frozen_batchnorm)
            p.requires_grad_(trainable)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """images (B, 3, H, W), mask (B, H, W) True on padding -> [(feature, mask at its resolution), ...]."""
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(images))))
        outs = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(b, name)(x)
            if name in self.layer_names:
                outs.append((x, resize_mask(mask, x.shape[-2:])))
        return outs


def resize_mask(mask: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a (B, H, W) padding mask, as the official code does."""
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]


def load_torchvision_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local torchvision ResNet state dict (weights_only); classifier keys may be present and are ignored."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report any unreadable file in one line
        raise ValueError(f"{path}: cannot read backbone weights ({exc.__class__.__name__}: {exc})") from None
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{path}: not a matching torchvision ResNet "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


class PositionEmbeddingSine(nn.Module):
    """2-D sine/cosine encoding over non-padded pixels; y and x each get ``num_pos_feats`` channels.

    Deformable DETR normalises (cumsum - 0.5) / (last + eps) * 2*pi (the -0.5 offset differs from DETR).
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi) -> None:
        super().__init__()
        self.num_pos_feats, self.temperature, self.scale = num_pos_feats, temperature, scale

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask (B, H, W) True on padding -> (B, 2*num_pos_feats, H, W)."""
        not_mask = (~mask).float()
        y = not_mask.cumsum(1)
        x = not_mask.cumsum(2)
        eps = 1e-6
        y = (y - 0.5) / (y[:, -1:, :] + eps) * self.scale
        x = (x - 0.5) / (x[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = interleave_sin_cos(x[..., None] / dim_t)
        pos_y = interleave_sin_cos(y[..., None] / dim_t)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def interleave_sin_cos(t: torch.Tensor) -> torch.Tensor:
    """(..., F) -> (..., F): sin of even channels and cos of odd channels, interleaved."""
    return torch.stack((t[..., 0::2].sin(), t[..., 1::2].cos()), dim=-1).flatten(-2)
