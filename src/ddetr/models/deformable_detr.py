"""The Deformable DETR detector: backbone -> multi-scale projections -> deformable transformer -> heads."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ddetr.models.backbone import Backbone, PositionEmbeddingSine, resize_mask
from ddetr.models.config import ModelConfig
from ddetr.models.ms_deform_attn import MSDeformAttn
from ddetr.models.transformer import (
    DeformableTransformer,
    encoder_proposals,
    inverse_sigmoid,
    proposal_pos_embed,
    valid_ratios,
)

Output = dict[str, torch.Tensor | list | dict]


class MLP(nn.Module):
    """A stack of linear layers with ReLU between them (the 3-layer box head)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else torch.relu(layer(x))
        return x


class DeformableDETR(nn.Module):
    """All five paper variants (and the dense-attention DETR baseline) from one `ModelConfig`.

    ``forward(images, masks=None)`` takes an ImageNet-normalised (B, 3, H, W) batch and an optional (B, H, W) padding
    mask (True on padding) and returns ``pred_logits`` (B, Q, C), ``pred_boxes`` (B, Q, 4; normalised cxcywh),
    ``aux_outputs`` (earlier decoder layers) and, for two-stage, ``enc_outputs`` (encoder proposals).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_dim
        self.backbone = Backbone(cfg.backbone, min(cfg.num_feature_levels, 3), cfg.dilation, cfg.frozen_batchnorm,
                                 cfg.train_backbone, cfg.pretrained_backbone)
        self.position_embedding = PositionEmbeddingSine(d // 2)
        proj = [nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(32, d))
                for c in self.backbone.num_channels]
        in_ch = self.backbone.num_channels[-1]
        for _ in range(cfg.num_feature_levels - len(proj)):  # extra levels: 3x3 stride-2 convs, first on raw C5
            proj.append(nn.Sequential(nn.Conv2d(in_ch, d, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, d)))
            in_ch = d
        self.input_proj = nn.ModuleList(proj)
        for conv, _ in self.input_proj:
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.zeros_(conv.bias)
        self.transformer = DeformableTransformer(
            d, cfg.nheads, cfg.enc_layers, cfg.dec_layers, cfg.dim_feedforward, cfg.dropout, cfg.num_feature_levels,
            cfg.enc_n_points, cfg.dec_n_points, cfg.two_stage, cfg.dense_attention, cfg.attention_backend)
        if not cfg.two_stage:
            self.query_embed = nn.Embedding(cfg.num_queries, d * 2)
        self.class_embed, self.bbox_embed = self._build_heads(cfg)

    def _build_heads(self, cfg: ModelConfig) -> tuple[nn.ModuleList, nn.ModuleList]:
        """Class (prior 0.01) and box heads; one copy per decoder layer with refinement, else one shared module.

        Two-stage adds a last pair that scores the encoder proposals (independent even without refinement).
        """
        d = cfg.hidden_dim
        class_head = nn.Linear(d, cfg.num_classes)
        nn.init.constant_(class_head.bias, -math.log((1 - 0.01) / 0.01))
        box_head = MLP(d, d, 4, 3)
        nn.init.zeros_(box_head.layers[-1].weight)
        nn.init.zeros_(box_head.layers[-1].bias)
        n = cfg.dec_layers
        if cfg.with_box_refine:
            classes = [copy.deepcopy(class_head) for _ in range(n)]
            boxes = [copy.deepcopy(box_head) for _ in range(n)]
            nn.init.constant_(boxes[0].layers[-1].bias[2:], -2.0)
        else:
            nn.init.constant_(box_head.layers[-1].bias[2:], -2.0)
            classes, boxes = [class_head] * n, [box_head] * n
        if cfg.two_stage:
            classes.append(copy.deepcopy(class_head))
            boxes.append(copy.deepcopy(box_head))
            for b in boxes:
                nn.init.zeros_(b.layers[-1].bias[2:])
        return nn.ModuleList(classes), nn.ModuleList(boxes)

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> Output:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        if masks is None:
            masks = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        elif masks.shape != (images.shape[0], *images.shape[-2:]):
            expected = (images.shape[0], *images.shape[-2:])
            raise ValueError(f"masks must be (B, H, W) = {expected}, got {tuple(masks.shape)}")
        srcs, level_masks = self._multiscale_features(images, masks.bool())
        return self._transformer_and_heads(srcs, level_masks)

    def _multiscale_features(self, images: torch.Tensor, masks: torch.Tensor,
                             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        feats = self.backbone(images, masks)
        srcs = [proj(f) for proj, (f, _) in zip(self.input_proj, feats)]
        level_masks = [m for _, m in feats]
        last = feats[-1][0]
        for proj in self.input_proj[len(feats):]:
            last = proj(last)
            srcs.append(last)
            level_masks.append(resize_mask(masks, last.shape[-2:]))
        return srcs, level_masks

    def _transformer_and_heads(self, srcs: list[torch.Tensor], level_masks: list[torch.Tensor]) -> Output:
        t = self.transformer
        shapes = [(s.shape[-2], s.shape[-1]) for s in srcs]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos = torch.cat([(self.position_embedding(m).to(s.dtype).flatten(2).transpose(1, 2) + t.level_embed[lvl])
                         for lvl, (s, m) in enumerate(zip(srcs, level_masks))], 1)
        mask = torch.cat([m.flatten(1) for m in level_masks], 1)
        sizes = torch.tensor([h * w for h, w in shapes], device=src.device)
        level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
        ratios = torch.stack([valid_ratios(m) for m in level_masks], 1)
        memory = t.encoder(src, pos, shapes, level_start_index, ratios, mask)

        out: Output = {}
        bs = src.shape[0]
        if t.two_stage:
            enc_memory, proposals = encoder_proposals(memory, mask, shapes)
            enc_memory = t.enc_output_norm(t.enc_output(enc_memory))
            enc_logits = self.class_embed[-1](enc_memory)
            enc_boxes_unact = self.bbox_embed[-1](enc_memory) + proposals
            k = min(self.cfg.num_queries, enc_logits.shape[1])
            scores = enc_logits[..., 0].masked_fill(mask, float("-inf"))  # official channel 0; never padding
            topk = torch.topk(scores, k, dim=1)[1]
            boxes_unact = torch.gather(enc_boxes_unact, 1, topk[..., None].expand(-1, -1, 4)).detach()
            reference_points = boxes_unact.sigmoid()
            query_pos, tgt = t.pos_trans_norm(t.pos_trans(proposal_pos_embed(boxes_unact, t.d_model // 2))).split(
                t.d_model, dim=2)
            out["enc_outputs"] = {"pred_logits": enc_logits, "pred_boxes": enc_boxes_unact.sigmoid()}
        else:
            query_pos, tgt = self.query_embed.weight.split(t.d_model, dim=1)
            query_pos = query_pos[None].expand(bs, -1, -1)
            tgt = tgt[None].expand(bs, -1, -1)
            reference_points = t.reference_points(query_pos).sigmoid()

        box_heads = self.bbox_embed if self.cfg.with_box_refine else None
        hidden, references, deltas = t.decoder(tgt, query_pos, reference_points, memory, pos, shapes, level_start_index,
                                       ratios, mask, box_heads)
        layers = []
        for i, (h, ref) in enumerate(zip(hidden, references)):
            delta = deltas[i] if deltas else self.bbox_embed[i](h)
            ref = inverse_sigmoid(ref)
            boxes = delta + ref if ref.shape[-1] == 4 else torch.cat([delta[..., :2] + ref, delta[..., 2:]], -1)
            layers.append({"pred_logits": self.class_embed[i](h), "pred_boxes": boxes.sigmoid()})
        out.update(layers[-1])
        out["aux_outputs"] = layers[:-1]
        return out

    def attention_modules(self) -> list[tuple[str, MSDeformAttn]]:
        """Named deformable attention modules (encoder self- and decoder cross-attention), for inspection."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, MSDeformAttn)]
