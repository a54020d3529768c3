"""Parameter counts of the paper presets against Hugging Face's DeformableDetrForObjectDetection."""

from __future__ import annotations

import pytest
import torch
import torchvision
import transformers
from torch import nn

from ddetr.models import DeformableDETR, preset

# Our preset -> the DeformableDetrConfig flags of the matching SenseTime hub checkpoint (peers.md §1.7).
HF_FLAGS = {
    "deformable-detr": {},
    "deformable-detr-single-scale": {"num_feature_levels": 1},
    "deformable-detr-single-scale-dc5": {"num_feature_levels": 1, "dilation": True},
    "deformable-detr-refine": {"with_box_refine": True},
    "deformable-detr-two-stage": {"with_box_refine": True, "two_stage": True},
}
# Published sizes (official README / HF model cards), in millions.
PUBLISHED_M = {"deformable-detr": 40, "deformable-detr-single-scale": 34,
               "deformable-detr-single-scale-dc5": 34, "deformable-detr-refine": 41,
               "deformable-detr-two-stage": 41}


def unique_count(model: nn.Module, trainable_only: bool = False) -> int:
    """Elements of distinct parameter tensors (a module reused in several places counts once)."""
    params = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    return sum({id(p): p.numel() for p in params}.values())


def hf_model(flags: dict) -> nn.Module:
    """HF's model on the meta device (shapes only: no memory, no download), heads shared as officially.

    The default config builds a timm resnet50 with ``use_pretrained_backbone=False``, i.e. random weights.
    Head sharing: the official code reuses one class head and one box head for all decoder layers without
    refinement (HF's default ``tie_word_embeddings=True`` does the same) and gives every layer its own deep
    copy with refinement. HF's default ties ``class_embed.1..5`` to ``class_embed.0`` even with refinement (a
    known HF deviation, peers.md §1.6; 5 class heads = 116,935 parameters fewer: 40,732,725 instead of
    40,849,660), so refine variants are built untied. Untied, HF keeps a second copy of the per-layer heads
    under ``model.decoder`` (the official decoder holds references to the detector's heads instead), so those
    are aliased back to the detector's heads before counting.
    """
    refine = flags.get("with_box_refine", False)
    cfg = transformers.DeformableDetrConfig(num_labels=91, tie_word_embeddings=not refine, **flags)
    assert cfg.backbone_config.use_pretrained_backbone is False and cfg.backbone_config.backbone == "resnet50"
    with torch.device("meta"):
        model = transformers.DeformableDetrForObjectDetection(cfg)
    if refine:
        model.model.decoder.bbox_embed = model.bbox_embed
        if flags.get("two_stage", False):
            model.model.decoder.class_embed = model.class_embed
    return model


@pytest.mark.parametrize("name", list(HF_FLAGS))
def test_parameter_count_matches_hf(name: str) -> None:
    with torch.device("meta"):
        ours = DeformableDETR(preset(name).model)
    theirs = hf_model(HF_FLAGS[name])
    assert unique_count(ours) == unique_count(theirs)
    assert round(unique_count(ours) / 1e6) == PUBLISHED_M[name]
    # Backbone alone (torchvision vs timm ResNet-50, no classifier; frozen BN has buffers, not parameters).
    assert unique_count(ours.backbone) == unique_count(theirs.model.backbone)
    # Head layout: per-layer copies only with refinement, plus one proposal head pair for two-stage.
    flags = HF_FLAGS[name]
    n_heads = 6 + flags.get("two_stage", False)
    assert len(ours.class_embed) == len(ours.bbox_embed) == n_heads
    distinct = len({id(h) for h in ours.class_embed})
    assert distinct == (n_heads if flags.get("with_box_refine") else 1)


@pytest.mark.parametrize("name", list(HF_FLAGS))
def test_frozen_backbone_parameters(name: str) -> None:
    """Official: stem and layer1 frozen, layer2-4 trained; the rest of the detector is trainable.

    (HF v5.23 trains the stem and layer1 too: its freeze checks ``"resnet" in model_type``, but the default
    backbone's model_type is ``timm_backbone``; so this is checked against torchvision's own ResNet-50.)
    """
    with torch.device("meta"):
        ours = DeformableDETR(preset(name).model)
        reference = torchvision.models.resnet50()
    frozen_names = ("conv1.", "bn1.", "layer1.")
    frozen = sum(p.numel() for n, p in reference.named_parameters()
                 if n.startswith(frozen_names) and "bn" not in n and "downsample.1" not in n)
    assert unique_count(ours) - unique_count(ours, trainable_only=True) == frozen
    for pname, p in ours.named_parameters():
        frozen_param = pname.startswith(tuple("backbone.body." + f for f in frozen_names))
        assert p.requires_grad != frozen_param, pname
