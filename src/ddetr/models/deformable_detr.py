"""The Deformable DETR detector: backbone -> multi-scale projections -> deformable transformer -> heads."""

from __future__ import annotations

import torch
from torch import nn

from ddetr.models.backbone import Backbone, PositionEmbeddingSine, resize_mask
from ddetr.models.config import ModelConfig
from ddetr.models.convs import TapwiseConv2d
from ddetr.models.deform_attn import MSDeformAttn
from ddetr.models.heads import build_heads
from ddetr.models.transformer import DeformableTransformer

Output = dict[str, torch.Tensor | list | dict]


class DeformableDETR(nn.Module):
    """All five paper variants (and the dense-attention DETR baseline) from one `ModelConfig`.

    ``forward(images, masks=None)`` takes an ImageNet-normalised (B, 3, H, W) batch and an optional (B, H, W) padding
    mask (True on padding) and returns ``pred_logits`` (B, Q, C), ``pred_boxes`` (B, Q, 4; normalised cxcywh),
    ``aux_outputs`` (earlier decoder layers) and, for two-stage, ``enc_outputs`` (encoder proposals). This is the
    architecture only, randomly initialised; `ddetr.models.build` loads ``pretrained_backbone`` for training.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_dim
        self.backbone = Backbone(cfg.backbone, min(cfg.num_feature_levels, 3), cfg.dilation, cfg.frozen_batchnorm,
                                 cfg.train_backbone)
        self.position_embedding = PositionEmbeddingSine(d // 2)
        proj = [nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(32, d))
                for c in self.backbone.num_channels]
        in_ch = self.backbone.num_channels[-1]
        for _ in range(cfg.num_feature_levels - len(proj)):  # extra levels: 3x3 stride-2 convs, first on raw C5
            proj.append(nn.Sequential(TapwiseConv2d(in_ch, d, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, d)))
            in_ch = d
        self.input_proj = nn.ModuleList(proj)
        for conv, _ in self.input_proj:
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.zeros_(conv.bias)
        self.transformer = DeformableTransformer(cfg)
        if not cfg.two_stage:
            self.query_embed = nn.Embedding(cfg.num_queries, d * 2)
        self.class_embed, self.bbox_embed = build_heads(cfg)

    def use_channels_last(self) -> DeformableDETR:
        """Put the ResNet and the input projections in channels_last layout, oneDNN's native one (no reorder around
        each convolution; ~10% faster CPU training steps, 1.2-1.4x faster backbone inference); results change by float
        rounding only. timm backbones keep their own layout."""
        if not self.backbone.is_timm:
            self.backbone.body.to(memory_format=torch.channels_last)
            self.input_proj.to(memory_format=torch.channels_last)
        return self

    def train(self, mode: bool = True) -> DeformableDETR:
        if mode and getattr(self, "inference_only", False):
            raise RuntimeError("this model was prepared for inference (BatchNorm folded into the convolutions) and "
                               "cannot be trained; load or build a fresh one to train")
        return super().train(mode)

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> Output:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        if masks is None:
            masks = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        elif masks.shape != (images.shape[0], *images.shape[-2:]):
            expected = (images.shape[0], *images.shape[-2:])
            raise ValueError(f"masks must be (B, H, W) = {expected}, got {tuple(masks.shape)}")
        srcs, level_masks = self._multiscale_features(images, masks.bool())
        pos = [self.position_embedding(m).to(s.dtype) for s, m in zip(srcs, level_masks)]
        query_embed = None if self.cfg.two_stage else self.query_embed.weight
        hidden, boxes, enc_outputs = self.transformer(srcs, level_masks, pos, query_embed, self.class_embed,
                                                      self.bbox_embed)
        layers = [{"pred_logits": head(h), "pred_boxes": b} for head, h, b in zip(self.class_embed, hidden, boxes)]
        out: Output = {**layers[-1], "aux_outputs": layers[:-1]}
        if enc_outputs is not None:
            out["enc_outputs"] = enc_outputs
        return out

    def _multiscale_features(self, images: torch.Tensor, masks: torch.Tensor,
                             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The projected backbone levels and extra stride-2 levels, each with its padding mask."""
        feats = self.backbone(images, masks)
        srcs = [proj(f) for proj, (f, _) in zip(self.input_proj, feats)]
        level_masks = [m for _, m in feats]
        last = feats[-1][0]
        for proj in self.input_proj[len(feats):]:
            last = proj(last)
            srcs.append(last)
            level_masks.append(resize_mask(masks, last.shape[-2:]))
        return srcs, level_masks

    def attention_modules(self) -> list[tuple[str, MSDeformAttn]]:
        """Named deformable attention modules (encoder self- and decoder cross-attention), for inspection."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, MSDeformAttn)]
