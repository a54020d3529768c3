"""The Deformable DETR model: shapes, gradients, padding invariance, heads, initialisation, configs, bf16."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import yaml
from torch import nn

from ddetr.models import PRESETS, DeformableDETR, DetectorConfig, build, preset
from ddetr.models.config import load_config, save_config
from ddetr.models.deform_attn import MSDeformAttn

NUM_CLASSES = 7
# Shrinks the transformer (never the variant flags) so every preset runs in well under a second;
# ResNet-18 stands in for ResNet-50 except where a preset needs a bottleneck ResNet (DC5).
SMALL = {"hidden_dim": 64, "nheads": 8, "enc_layers": 1, "dec_layers": 3, "dim_feedforward": 96,
         "num_queries": 12, "num_classes": NUM_CLASSES, "pretrained_backbone": "none"}


def small(name: str, **overrides) -> DetectorConfig:
    backbone = {"backbone": "resnet18"} if not PRESETS[name].model.dilation else {}
    return preset(name, **{**SMALL, **backbone, **overrides})


def targets_for(batch: int) -> list[dict[str, torch.Tensor]]:
    """One or two boxes (normalised cxcywh) per image."""
    boxes = [torch.tensor([[0.3, 0.4, 0.2, 0.3]]), torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.7, 0.2, 0.1, 0.1]])]
    return [{"labels": torch.arange(len(boxes[i % 2])) + 1, "boxes": boxes[i % 2]} for i in range(batch)]


def randomise_box_heads(model: DeformableDETR, std: float = 0.3) -> None:
    """The box heads' last layer starts at zero; random values make the boxes depend on the input."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for head in model.bbox_embed:
            head.layers[-1].weight.copy_(torch.randn(head.layers[-1].weight.shape, generator=gen) * std)


def level_sizes(name: str, h: int, w: int) -> list[tuple[int, int]]:
    """Feature map sizes per level, from the strides alone (ceil division by 8/16/32/64, or 16 for DC5)."""
    m = PRESETS[name].model
    if m.num_feature_levels == 1:
        strides = [16 if m.dilation else 32]
    else:
        strides = [8, 16, 32, 64][:m.num_feature_levels]
    return [(math.ceil(h / s), math.ceil(w / s)) for s in strides]


@pytest.mark.parametrize("name", list(PRESETS))
def test_shapes_and_gradients(name: str) -> None:
    """Train-mode forward + loss + backward on a padded batch: each trainable parameter gets a finite grad."""
    torch.manual_seed(0)
    cfg = small(name)
    model, criterion, _ = build(cfg)
    m = cfg.model
    images = torch.randn(2, 3, 64, 96)
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[1, 48:] = True
    masks[1, :, 64:] = True
    out = model(images, masks)

    q = m.num_queries
    assert out["pred_logits"].shape == (2, q, NUM_CLASSES)
    assert out["pred_boxes"].shape == (2, q, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert len(out["aux_outputs"]) == m.dec_layers - 1
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, q, NUM_CLASSES) and aux["pred_boxes"].shape == (2, q, 4)
    assert ("enc_outputs" in out) == m.two_stage
    if m.two_stage:
        tokens = sum(h * w for h, w in level_sizes(name, 64, 96))
        assert out["enc_outputs"]["pred_logits"].shape == (2, tokens, NUM_CLASSES)
        assert out["enc_outputs"]["pred_boxes"].shape == (2, tokens, 4)

    loss = criterion(out, targets_for(2))["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    frozen_prefixes = ("backbone.body.conv1.", "backbone.body.layer1.") if m.frozen_batchnorm else ()
    for pname, p in model.named_parameters():
        if pname.startswith(frozen_prefixes) or not m.train_backbone and pname.startswith("backbone."):
            assert not p.requires_grad and p.grad is None, pname
        else:
            assert p.requires_grad and p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", ["deformable-detr", "deformable-detr-single-scale", "deformable-detr-refine",
                                  "deformable-detr-two-stage", "detr-baseline"])
def test_padding_invariance_after_the_backbone(name: str) -> None:
    """Given the same features on its valid region, an image alone and padded in a batch gives equal outputs.

    The full model is not padding invariant, here as in the official code: every CNN layer zero-pads at the
    image border, but inside a padded batch the backbone sees computed (non-zero) activations beyond the
    border, and the input projections' GroupNorm takes statistics over the whole padded canvas. So the
    projected features of the alone run are pasted into the batch (random values on the padding, which the
    mask must hide) and everything after the projections (encoder, decoder, heads, proposals) is compared.
    The boxes are normalised by the valid (unpadded) image size, not by the canvas: the raw values agree,
    while rescaling them to the canvas by the valid ratio would not.
    """
    torch.manual_seed(0)
    model = DeformableDETR(small(name, dropout=0.0).model).eval()
    randomise_box_heads(model)
    image = torch.randn(1, 3, 64, 128)
    canvas = torch.randn(2, 3, 128, 192)
    canvas[0, :, :64, :128] = image[0]
    masks = torch.zeros(2, 128, 192, dtype=torch.bool)
    masks[0, 64:] = True
    masks[0, :, 128:] = True

    alone_features: list[torch.Tensor] = []
    gen = torch.Generator().manual_seed(2)

    def record(module, args, output):
        alone_features.append(output)

    def paste(level):
        def hook(module, args, output):
            src = alone_features[level][0]
            output = output.clone()
            output[0] = torch.randn(output[0].shape, generator=gen) * 3
            output[0, :, :src.shape[1], :src.shape[2]] = src
            return output
        return hook

    with torch.no_grad():
        handles = [proj.register_forward_hook(record) for proj in model.input_proj]
        alone = model(image)
        for h in handles:
            h.remove()
        handles = [proj.register_forward_hook(paste(i)) for i, proj in enumerate(model.input_proj)]
        batched = model(canvas, masks)
        for h in handles:
            h.remove()

    for a, b in [(alone, batched), *zip(alone["aux_outputs"], batched["aux_outputs"])]:
        torch.testing.assert_close(b["pred_logits"][0], a["pred_logits"][0], atol=1e-4, rtol=0)
        torch.testing.assert_close(b["pred_boxes"][0], a["pred_boxes"][0], atol=1e-4, rtol=0)
    valid_ratio = torch.tensor([128 / 192, 64 / 128, 128 / 192, 64 / 128])
    assert (batched["pred_boxes"][0] - alone["pred_boxes"][0] * valid_ratio).abs().max() > 0.05


@pytest.mark.parametrize("refine", [False, True])
@pytest.mark.parametrize("two_stage", [False, True])
def test_head_sharing(refine: bool, two_stage: bool) -> None:
    """Per-layer heads with refinement, one shared pair without; two-stage adds its own proposal pair."""
    model = DeformableDETR(small("deformable-detr", with_box_refine=refine, two_stage=two_stage).model)
    n = model.cfg.dec_layers
    assert len(model.class_embed) == len(model.bbox_embed) == n + two_stage
    for heads in (model.class_embed, model.bbox_embed):
        decoder_heads = list(heads)[:n]
        if refine:
            assert len({id(h) for h in decoder_heads}) == n
            params = [p for h in decoder_heads for p in h.parameters()]
            assert len({id(p) for p in params}) == len(params)
        else:
            assert all(h is heads[0] for h in decoder_heads)
        if two_stage:
            assert all(heads[-1] is not h for h in decoder_heads)
    assert hasattr(model, "query_embed") != two_stage


@pytest.mark.parametrize("refine", [False, True])
def test_two_stage_trains_with_and_without_refinement(refine: bool) -> None:
    """Two-stage without refinement (crashes in the official code, issue #182) trains here too."""
    torch.manual_seed(0)
    model, criterion, _ = build(small("deformable-detr-two-stage", with_box_refine=refine))
    out = model(torch.randn(2, 3, 64, 64))
    assert out["enc_outputs"]["pred_logits"].shape == (2, 8 * 8 + 4 * 4 + 2 * 2 + 1, NUM_CLASSES)
    losses = criterion(out, targets_for(2))
    assert "loss_ce_enc" in losses
    losses["loss"].backward()
    # The proposal heads learn from the encoder loss only (the selected boxes are detached); the box head's
    # hidden layers get exactly zero gradient while its last layer is still zero, so only that one is checked.
    for module in (model.class_embed[-1], model.bbox_embed[-1].layers[-1], model.transformer.enc_output,
                   model.transformer.pos_trans):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_two_stage_never_selects_padding() -> None:
    """Two-stage queries come from real proposals, never from padded pixels.

    Padded pixels have no proposal (+inf box logits) and their memory is zeroed, so they all share one class
    score. Whenever that score beats the valid pixels' (3 of 20 random initialisations of this small model do
    so), the top-k fills with copies of the padding and the image loses those queries to (1, 1, 1, 1) boxes;
    its detections then depend on what it is batched with. Here the score is made the highest possible (a
    LayerNorm output aligned with the channel-0 class weights), and every selected reference must still be a
    proposal: a box of side 0.05 * 2^level inside the image. The box heads start at zero, so layer 0's boxes
    are exactly those references.
    """
    torch.manual_seed(0)
    model = DeformableDETR(small("deformable-detr-two-stage", dropout=0.0).model).eval()
    with torch.no_grad():
        model.transformer.enc_output.bias.copy_(model.class_embed[-1].weight[0])
    images = torch.randn(2, 3, 128, 192)
    masks = torch.zeros(2, 128, 192, dtype=torch.bool)
    masks[0, 64:] = True
    masks[0, :, 128:] = True
    with torch.no_grad():
        boxes = model(images, masks)["aux_outputs"][0]["pred_boxes"]
    sides = torch.tensor([0.05, 0.1, 0.2, 0.4])
    for image_boxes in boxes:
        assert (image_boxes[:, :2] < 0.99).all(), "a query was taken from a padded pixel"
        assert ((image_boxes[:, 2:, None] - sides).abs().min(-1).values < 1e-4).all()


def xavier_bound(weight: torch.Tensor) -> float:
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
    return math.sqrt(6.0 / (fan_in + fan_out))


def assert_xavier(weight: torch.Tensor) -> None:
    """Uniform(-b, b) with b = sqrt(6 / (fan_in + fan_out)): all inside, and the extremes close to b."""
    bound = xavier_bound(weight)
    assert weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound


# The official 8-head direction pattern of the sampling-offset bias (official-reference §3.3).
HEAD_DIRECTIONS = [(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)]


@pytest.mark.parametrize("name", ["deformable-detr", "deformable-detr-refine", "deformable-detr-two-stage"])
def test_initial_values(name: str) -> None:
    torch.manual_seed(0)
    model = DeformableDETR(small(name).model)
    m, t = model.cfg, model.transformer
    prior_bias = -math.log((1 - 0.01) / 0.01)
    assert abs(prior_bias + 4.59512) < 1e-5
    for head in model.class_embed:
        torch.testing.assert_close(head.bias, torch.full((NUM_CLASSES,), prior_bias))
    for i, head in enumerate(model.bbox_embed):
        last = head.layers[-1]
        assert (last.weight == 0).all()
        # One shared head without refinement; with it only copy 0 gets -2; two-stage resets all to 0.
        wh = -2.0 if (i == 0 or not m.with_box_refine) and not m.two_stage else 0.0
        assert last.bias.tolist() == [0.0, 0.0, wh, wh], i

    assert t.level_embed.shape == (m.num_feature_levels, m.hidden_dim)
    assert abs(t.level_embed.mean()) < 0.15 and 0.85 < t.level_embed.std() < 1.15  # N(0, 1)
    for proj in model.input_proj:
        conv, norm = proj
        assert_xavier(conv.weight)
        assert (conv.bias == 0).all() and isinstance(norm, nn.GroupNorm) and norm.num_groups == 32
    if m.two_stage:
        assert_xavier(t.enc_output.weight)
        assert_xavier(t.pos_trans.weight)
    else:
        assert_xavier(t.reference_points.weight)
        assert (t.reference_points.bias == 0).all()
        assert model.query_embed.weight.shape == (m.num_queries, 2 * m.hidden_dim)
    layer = t.encoder.layers[0]
    assert_xavier(layer.linear1.weight)
    assert_xavier(t.decoder.layers[0].self_attn.in_proj_weight)

    attns = [mod for mod in model.modules() if isinstance(mod, MSDeformAttn)]
    assert len(attns) == m.enc_layers + m.dec_layers
    points = range(1, m.enc_n_points + 1)
    expected = torch.tensor([[[[dx * k, dy * k] for k in points] for _ in range(m.num_feature_levels)]
                             for dx, dy in HEAD_DIRECTIONS], dtype=torch.float)
    for attn in attns:
        torch.testing.assert_close(attn.sampling_offsets.bias.view(expected.shape), expected)
        assert (attn.sampling_offsets.weight == 0).all()
        assert (attn.attention_weights.weight == 0).all() and (attn.attention_weights.bias == 0).all()
        for proj in (attn.value_proj, attn.output_proj):
            assert_xavier(proj.weight)
            assert (proj.bias == 0).all()


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_round_trip(name: str, suffix: str, tmp_path) -> None:
    cfg = preset(name)
    path = tmp_path / f"cfg{suffix}"
    save_config(cfg, path)
    text = path.read_text()
    parsed = yaml.safe_load(text) if suffix == ".yaml" else json.loads(text)
    assert parsed == dataclasses.asdict(cfg)
    assert load_config(path) == cfg


def test_unknown_or_invalid_config_raises(tmp_path) -> None:
    good = preset("deformable-detr").to_dict()
    for key_path in (("bogus",), ("model", "bogus"), ("loss", "bogus")):
        data = json.loads(json.dumps(good))
        target = data
        for key in key_path[:-1]:
            target = target[key]
        target[key_path[-1]] = 1
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ValueError, match="bogus"):
            load_config(path)
    with pytest.raises((TypeError, ValueError), match="bogus"):
        preset("deformable-detr", bogus=1)
    with pytest.raises(ValueError, match="nope"):
        preset("nope")
    invalid = [{"backbone": "vgg16"}, {"hidden_dim": 80, "nheads": 8},
               {"backbone": "resnet18", "dilation": True}, {"dense_attention": True, "with_box_refine": True}]
    for bad in invalid:
        with pytest.raises(ValueError):
            preset("deformable-detr", **bad)


def test_forward_rejects_bad_inputs() -> None:
    model = DeformableDETR(small("deformable-detr-single-scale").model)
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="masks"):
        model(torch.randn(1, 3, 64, 64), torch.zeros(1, 32, 64, dtype=torch.bool))


@pytest.mark.parametrize("name", ["deformable-detr", "demo", "deformable-detr-two-stage"])
def test_bf16_autocast_close_to_fp32(name: str) -> None:
    """CPU bf16 autocast runs the whole model and stays close to fp32.

    bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2 %) on every matmul/conv input. Measured
    maximum errors over three seeds: 0.028 on logits (fp32 spread ~0.6) and 0.014 on boxes; the tolerances
    (0.1, 0.04) leave ~3x margin, while a real failure (a wrong cast, NaN, overflow in the sampling) gives
    O(1) errors.
    Two-stage picks its queries by a discrete top-k, so rounding can swap proposals and reorder the queries;
    there the encoder outputs (every pixel's proposal, before the selection) are compared instead.
    """
    torch.manual_seed(0)
    model = DeformableDETR(small(name).model).eval()
    randomise_box_heads(model)
    images = torch.randn(2, 3, 64, 96)
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[1, :, 64:] = True
    with torch.no_grad():
        ref = model(images, masks)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images, masks)
    assert low["pred_logits"].dtype == torch.bfloat16
    assert torch.isfinite(low["pred_logits"]).all() and torch.isfinite(low["pred_boxes"]).all()
    if model.cfg.two_stage:
        ref, low = ref["enc_outputs"], low["enc_outputs"]
    logit_err = (low["pred_logits"].float() - ref["pred_logits"]).abs().max()
    box_err = (low["pred_boxes"].float() - ref["pred_boxes"]).abs().max()
    assert 0 < logit_err < 0.1 and box_err < 0.04
    assert ref["pred_logits"].std() > 0.3 and ref["pred_boxes"].std() > 0.05  # the comparison is not vacuous


def test_dense_attention_baseline_trains() -> None:
    """The DETR-style baseline uses standard attention only and fits one batch within a few steps."""
    torch.manual_seed(0)
    model, criterion, _ = build(small("detr-baseline", dropout=0.0))
    assert not any(isinstance(mod, MSDeformAttn) for mod in model.modules())
    assert isinstance(model.transformer.encoder.layers[0].self_attn, nn.MultiheadAttention)
    images, targets = torch.randn(2, 3, 64, 64), targets_for(2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(8):
        loss = criterion(model(images), targets)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses
