"""Gradient parity with Hugging Face transformers' DeformableDetrForObjectDetection, and stop-gradient checks.

Forward parity (test_interop_hf.py) cannot see a missing ``.detach()``: the refined reference boxes handed from
one decoder layer to the next, and the two-stage proposals that seed the decoder, have the same values with or
without a stop-gradient. Their gradients differ, so this file compares the parameter gradients of ddetr's
`DeformableDETR` and transformers' model holding the same weights (written by ``save_hf``, read by
``from_pretrained``) under the same loss, for box refinement and for two-stage (with refinement).

The loss. Each library computes its own: ddetr's criterion (`build_criterion`, its ``loss``) and transformers'
loss (``labels=`` passed to the model: its own matcher, focal, L1 and GIoU terms, aux layers included). The two
totals cannot be made identical by configuration, because transformers 5.23
(``DeformableDetrForObjectDetectionLoss``) hard-codes the class-loss weight to 1 (ddetr, as the official code,
uses 2) and computes no two-stage encoder loss. The HF side is therefore HF's own ``loss`` plus exactly what it
omits, both built from HF's own pieces: a second unit of each layer's ``loss_ce`` from its ``loss_dict``, and for
two-stage the encoder-proposal loss (class-agnostic targets, weights 2/5/2, as the official code) computed by
transformers' own ``DeformableDetrImageLoss`` with its ``DeformableDetrHungarianMatcher``. Matching costs are
2/5/2 and focal alpha 0.25 in both. The HF total is asserted to be HF's 1/5/2-weighted sum of its loss_dict (so
the premise is checked), every unweighted term is compared by name, and the totals are compared.

The comparison covers every parameter that receives a gradient in either model, under ddetr's names
(``ddetr.interop.hf.hf_to_ours``; HF's separate q/k/v projections are concatenated as ddetr's fused
``in_proj``; HF's second copies of the heads, ``model.decoder.{class,bbox}_embed``, are summed into the head they
copy, since ddetr uses one module for both roles). Backbone: ddetr freezes the stem and layer1 (official), while
transformers 5.23 trains every timm-backbone parameter (its freeze looks for "resnet" in the backbone
model_type, which is "timm_backbone"); those are made trainable in ddetr for this test so that they are compared
too.

Precision: both models run in float64, but some of each computes in float32 by design (ddetr's criterion and
matcher, its encoder reference points and proposal grid; HF's proposal position embedding), so gradients agree
to about 1e-6, not 1e-12. Tolerance 1e-4, absolute on every gradient element and also relative to each
parameter's largest gradient (the smallest gradients are ~1e-6, where an absolute bound alone would say nothing).
Dropout is 0 and both models are in train mode.

Two-stage and padding: ddetr never picks padded pixels as proposals, HF may (test_interop_hf.py). With the
weights here HF's top-k of the padded image stays on valid pixels; that is asserted, so the comparison is exact
rather than lucky.

The last two tests are cheaper and need no HF: they state, per the paper's stop-gradients, which head parameters
must get no gradient at all from a given loss.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from conftest import perturb_
from transformers import DeformableDetrForObjectDetection
from transformers.loss.loss_deformable_detr import DeformableDetrHungarianMatcher, DeformableDetrImageLoss

from ddetr.interop import save_hf
from ddetr.interop.hf import hf_to_ours
from ddetr.models.builder import build_criterion
from ddetr.models.config import DetectorConfig, LossConfig, preset
from ddetr.models.deformable_detr import DeformableDETR

TOL = 1e-4
NUM_CLASSES, QUERIES, DEC_LAYERS = 5, 8, 3
VARIANTS = {"refine": "deformable-detr-refine", "refine-two-stage": "deformable-detr-two-stage"}
LOSS = LossConfig(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, cls_loss_coef=2.0, bbox_loss_coef=5.0,
                  giou_loss_coef=2.0, focal_alpha=0.25, focal_gamma=2.0, aux_loss=True)
# transformers' names for the same settings (its class-loss weight is fixed at 1, see the module docstring).
HF_LOSS = dict(class_cost=2, bbox_cost=5, giou_cost=2, bbox_loss_coefficient=5, giou_loss_coefficient=2,
               focal_alpha=0.25, auxiliary_loss=True)
HF_ALIASES = ("model.decoder.class_embed.", "model.decoder.bbox_embed.")
FROZEN_IN_DDETR = ("backbone.body.conv1.", "backbone.body.layer1.")


def small_config(variant: str) -> DetectorConfig:
    cfg = preset(VARIANTS[variant], backbone="resnet18", hidden_dim=64, enc_layers=2, dec_layers=DEC_LAYERS,
                 dim_feedforward=96, num_queries=QUERIES, num_classes=NUM_CLASSES, dropout=0.0, enc_n_points=3,
                 dec_n_points=2)
    return dataclasses.replace(cfg, loss=LOSS)


def batch() -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    """float64 images (a 64x96 one and a 48x64 one zero-padded to 64x96; mask True on padding) and targets."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, 96, generator=gen, dtype=torch.float64)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, 48:] = True
    mask[1, :, 64:] = True
    x[1][:, mask[1]] = 0
    boxes = [torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.4], [0.5, 0.5, 0.6, 0.5]], dtype=torch.float64),
             torch.tensor([[0.4, 0.3, 0.3, 0.2], [0.6, 0.7, 0.2, 0.3]], dtype=torch.float64)]
    labels = [torch.tensor([1, 3, 0]), torch.tensor([4, 1])]
    return x, mask, [{"labels": lab, "boxes": box} for lab, box in zip(labels, boxes)]


def hf_loss(hf: DeformableDetrForObjectDetection, out, targets) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """HF's own total and terms, completed to ddetr's configuration (see the module docstring)."""
    terms = dict(out.loss_dict)
    hf_weights = {"loss_ce": 1.0, "loss_bbox": HF_LOSS["bbox_loss_coefficient"],
                  "loss_giou": HF_LOSS["giou_loss_coefficient"]}
    reweighted = sum(hf_weights[re.sub(r"_\d+$", "", k)] * v for k, v in terms.items() if k.startswith("loss_"))
    assert abs(out.loss.item() - reweighted.item()) <= 1e-12 * max(1.0, abs(out.loss.item())), \
        "transformers no longer weights its Deformable DETR loss terms 1/5/2"
    total = out.loss + sum(v for k, v in terms.items() if k.startswith("loss_ce"))  # class weight 1 -> 2
    if hf.config.two_stage:
        matcher = DeformableDetrHungarianMatcher(class_cost=HF_LOSS["class_cost"], bbox_cost=HF_LOSS["bbox_cost"],
                                                 giou_cost=HF_LOSS["giou_cost"])
        enc_loss = DeformableDetrImageLoss(matcher, hf.config.num_labels, HF_LOSS["focal_alpha"], ["labels", "boxes"])
        binary = [{"class_labels": torch.zeros_like(t["class_labels"]), "boxes": t["boxes"]} for t in targets]
        enc = enc_loss({"logits": out.enc_outputs_class, "pred_boxes": out.enc_outputs_coord_logits.sigmoid()},
                       binary)
        terms.update({k + "_enc": v for k, v in enc.items()})
        total = total + (LOSS.cls_loss_coef * enc["loss_ce"] + LOSS.bbox_loss_coef * enc["loss_bbox"]
                         + LOSS.giou_loss_coef * enc["loss_giou"])
    return total, terms


def hf_grads_in_our_names(hf: DeformableDetrForObjectDetection) -> dict[str, torch.Tensor]:
    """Every trainable HF parameter's gradient (zero where it got none) under ddetr's parameter names."""
    grads: dict[str, torch.Tensor] = {}
    for name, p in hf.named_parameters():
        if not p.requires_grad:
            continue
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if name.startswith(HF_ALIASES):
            name = name[len("model.decoder."):]
        grads[name] = grads[name] + g if name in grads else g
    mapped, unknown = hf_to_ours(grads)
    assert not unknown, unknown
    return mapped


@dataclasses.dataclass
class Result:
    variant: str
    ours_losses: dict[str, torch.Tensor]
    hf_total: torch.Tensor
    hf_terms: dict[str, torch.Tensor]
    ours_grads: dict[str, torch.Tensor]
    hf_grads: dict[str, torch.Tensor]
    hf_frozen: list[str]


@pytest.fixture(scope="module", params=list(VARIANTS))
def result(request, tmp_path_factory) -> Result:
    """One forward + loss + backward of each model on the same weights, batch and targets."""
    cfg = small_config(request.param)
    torch.manual_seed(0)
    model = DeformableDETR(cfg.model)
    perturb_(model, seed=3)
    folder = tmp_path_factory.mktemp(f"grad-{request.param}")
    save_hf(model, cfg, folder)
    hf, info = DeformableDetrForObjectDetection.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    for key, value in HF_LOSS.items():
        setattr(hf.config, key, value)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(FROZEN_IN_DDETR) for n in frozen), frozen
    for p in model.parameters():
        p.requires_grad_(True)
    model.double().train()
    hf.double().train()

    x, mask, targets = batch()
    out = model(x, mask)
    hf_targets = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    hout = hf(pixel_values=x, pixel_mask=(~mask).long(), labels=hf_targets)
    # Same forward (so the matchings can agree), and for two-stage no padded pixel among HF's proposals.
    assert (out["pred_logits"] - hout.logits).abs().max() <= TOL
    assert (out["pred_boxes"] - hout.pred_boxes).abs().max() <= TOL
    if cfg.model.two_stage:  # padded pixels have infinite proposal boxes, in HF as in ddetr
        topk = torch.topk(hout.enc_outputs_class[..., 0], QUERIES, dim=1)[1]
        chosen = hout.enc_outputs_coord_logits.gather(1, topk[..., None].expand(-1, -1, 4))
        assert torch.isfinite(chosen).all(), "HF picked padded pixels as proposals: change the seed"

    ours_losses = build_criterion(cfg)(out, targets)
    hf_total, hf_terms = hf_loss(hf, hout, hf_targets)
    ours_losses["loss"].backward()
    hf_total.backward()
    ours_grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    hf_frozen = [n for n, p in hf.named_parameters() if not p.requires_grad]
    return Result(request.param, ours_losses, hf_total, hf_terms, ours_grads, hf_grads_in_our_names(hf), hf_frozen)


def test_losses_match_transformers(result: Result) -> None:
    ours, theirs = result.ours_losses, result.hf_terms
    names = sorted(k for k in ours if k.startswith("loss_"))
    expected = {f"{t}{s}" for t in ("loss_ce", "loss_bbox", "loss_giou")
                for s in ["", *(f"_{i}" for i in range(DEC_LAYERS - 1))]
                + (["_enc"] if result.variant == "refine-two-stage" else [])}
    assert set(names) == expected and expected <= set(theirs)
    for name in names:
        assert abs(ours[name].item() - theirs[name].item()) <= TOL, (name, ours[name].item(), theirs[name].item())
    assert abs(ours["loss"].item() - result.hf_total.item()) <= TOL * max(1.0, abs(result.hf_total.item()))


def test_gradients_match_transformers(result: Result) -> None:
    """Every parameter's gradient, under ddetr's names; the worst absolute and relative errors are printed."""
    ours, theirs = result.ours_grads, result.hf_grads
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    # HF freezes nothing in its timm backbone here (see the module docstring); the comparison covers everything.
    assert not result.hf_frozen, result.hf_frozen
    worst_abs, worst_rel, failures = (0.0, ""), (0.0, ""), []
    for name, g in ours.items():
        h = theirs[name]
        assert g.shape == h.shape, name
        scale = h.abs().max().item()
        assert scale > 0, f"{name}: no gradient in HF, the comparison would be vacuous"
        err = (g - h).abs().max().item()
        worst_abs = max(worst_abs, (err, name))
        worst_rel = max(worst_rel, (err / scale, name))
        if err > TOL or err > TOL * scale:
            failures.append(f"{name}: max |diff| {err:.3g}, max |grad| {scale:.3g}")
    print(f"\n{result.variant}: {len(ours)} parameters, max abs grad diff {worst_abs[0]:.3g} ({worst_abs[1]}), "
          f"max relative {worst_rel[0]:.3g} ({worst_rel[1]})")
    assert not failures, f"{len(failures)} of {len(ours)} gradients differ:\n" + "\n".join(failures[:20])


# --- Stop-gradients of the paper, without HF ---------------------------------------------------------------


def _model_and_output(variant: str):
    cfg = small_config(variant)
    torch.manual_seed(0)
    model = DeformableDETR(cfg.model).train()
    perturb_(model, seed=5)
    x, mask, _ = batch()
    return model, model(x.float(), mask)


def _box_loss(layer: dict) -> torch.Tensor:
    """A generic differentiable function of one layer's boxes and logits."""
    w = torch.linspace(-1.0, 1.0, layer["pred_boxes"].numel()).view_as(layer["pred_boxes"])
    return (layer["pred_boxes"] * w).sum() + layer["pred_logits"].sigmoid().sum()


def _grads(loss: torch.Tensor, module: torch.nn.Module) -> list[torch.Tensor | None]:
    return torch.autograd.grad(loss, list(module.parameters()), retain_graph=True, allow_unused=True)


def _no_gradient(grads: list[torch.Tensor | None]) -> bool:
    return all(g is None or not g.any() for g in grads)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_refined_reference_boxes_carry_no_gradient(variant: str) -> None:
    """Box head j (j < last) must get no gradient from a loss on the last decoder layer's outputs alone.

    With refinement, head j's only consumers are layer j's own boxes and the reference box of layer j+1. The
    paper (appendix A.4) back-propagates only through each layer's delta and blocks the gradient at
    sigmoid^-1 of the previous layer's box, i.e. that reference is detached. So the last layer's outputs depend on
    head j only through a detached tensor: d(last-layer loss)/d(head j) must be exactly zero (no graph edge at
    all). Each head does get a gradient from its own layer's loss, so the check is not vacuous.
    """
    model, out = _model_and_output(variant)
    last = _box_loss(out)
    for j in range(DEC_LAYERS - 1):
        head = model.bbox_embed[j]
        assert _no_gradient(_grads(last, head)), f"bbox_embed[{j}] gets a gradient through a later layer"
        own = _grads(_box_loss(out["aux_outputs"][j]), head)
        assert all(g is not None and g.abs().max() > 0 for g in own), f"bbox_embed[{j}] gets no gradient at all"


def test_two_stage_proposals_carry_no_gradient() -> None:
    """The encoder-proposal branch must get no gradient from the decoder's losses, only from its own loss.

    Two-stage: the encoder scores every pixel (class_embed[-1]) and regresses a box there (bbox_embed[-1] on
    enc_output/enc_output_norm of the memory). The decoder is seeded with the top-k boxes, detached (the paper's
    queries are initialised from the proposals; the official code stops their gradient), and the scores only
    choose which pixels (top-k, not differentiable). So the decoder's outputs, all layers, depend on that branch
    through nothing differentiable: its gradient from a loss on them must be exactly zero, while the encoder
    loss does reach it.
    """
    model, out = _model_and_output("refine-two-stage")
    t = model.transformer
    branch = torch.nn.ModuleList([model.class_embed[-1], model.bbox_embed[-1], t.enc_output, t.enc_output_norm])
    decoder_loss = _box_loss(out) + sum(_box_loss(aux) for aux in out["aux_outputs"])
    assert _no_gradient(_grads(decoder_loss, branch)), "the decoder's loss reaches the encoder-proposal branch"
    own = _grads(_box_loss(out["enc_outputs"]), branch)
    assert all(g is not None and g.abs().max() > 0 for g in own)
