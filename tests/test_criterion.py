"""SetCriterion against independent loss computations from known matches."""

import pytest
import torch
import torch.distributed as dist
from torchvision.ops import generalized_box_iou, sigmoid_focal_loss

from ddetr.models.config import LossConfig
from ddetr.models.criterion import SetCriterion
from ddetr.models.matcher import HungarianMatcher

NUM_CLASSES = 4
LOSS = LossConfig()


class FixedMatcher:
    """Returns preset indices, so the losses can be checked without trusting the Hungarian matcher."""

    def __init__(self, indices):
        self.indices = indices

    def __call__(self, outputs, targets):
        return [(torch.as_tensor(r, dtype=torch.int64), torch.as_tensor(c, dtype=torch.int64)) for r, c in self.indices]


def _boxes(*shape, gen):
    centre = torch.rand(*shape, 2, generator=gen) * 0.6 + 0.2
    size = torch.rand(*shape, 2, generator=gen) * 0.3 + 0.05
    return torch.cat([centre, size], dim=-1)


def _layer(batch, queries, gen, grad=True):
    logits = torch.randn(batch, queries, NUM_CLASSES, generator=gen).requires_grad_(grad)
    boxes = _boxes(batch, queries, gen=gen).requires_grad_(grad)
    return {"pred_logits": logits, "pred_boxes": boxes}


def _targets(sizes, gen):
    return [{"labels": torch.randint(0, NUM_CLASSES, (n,), generator=gen), "boxes": _boxes(n, gen=gen)} for n in sizes]


def _xyxy(b):
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def _reference_losses(outputs, targets, indices, num_boxes, alpha=0.25, gamma=2.0):
    """Losses by explicit loops: focal over every query x class, L1 and 1 - GIoU over matched pairs."""
    logits, boxes = outputs["pred_logits"].detach().double(), outputs["pred_boxes"].detach().double()
    onehot = torch.zeros_like(logits)
    ce = l1 = giou = 0.0
    for b, (rows, cols) in enumerate(indices):
        for q, t in zip(rows.tolist(), cols.tolist()):
            onehot[b, q, targets[b]["labels"][t]] = 1.0
            src, tgt = boxes[b, q], targets[b]["boxes"][t].double()
            l1 += (src - tgt).abs().sum().item()
            giou += 1 - generalized_box_iou(_xyxy(src)[None], _xyxy(tgt)[None])[0, 0].item()
    p = logits.sigmoid()
    focal = -alpha * onehot * (1 - p) ** gamma * torch.log(p) - (1 - alpha) * (1 - onehot) * p**gamma * torch.log(1 - p)
    ce = focal.sum().item()
    return {"loss_ce": ce / num_boxes, "loss_bbox": l1 / num_boxes, "loss_giou": giou / num_boxes}, onehot


def test_losses_from_known_matches():
    gen = torch.Generator().manual_seed(0)
    outputs, targets = _layer(2, 5, gen), _targets([3, 2], gen)
    indices = [([4, 0, 2], [1, 2, 0]), ([1, 3], [0, 1])]
    losses = SetCriterion(NUM_CLASSES, FixedMatcher(indices), LOSS)(outputs, targets)
    expected, onehot = _reference_losses(outputs, targets, [(torch.tensor(r), torch.tensor(c)) for r, c in indices], 5)
    for key, value in expected.items():
        assert losses[key].item() == pytest.approx(value, rel=1e-5)
    tv_focal = sigmoid_focal_loss(outputs["pred_logits"].detach(), onehot.float(), reduction="sum") / 5
    assert losses["loss_ce"].item() == pytest.approx(tv_focal.item(), rel=1e-5)


def test_giou_loss_equals_torchvision_diagonal():
    gen = torch.Generator().manual_seed(1)
    outputs, targets = _layer(1, 4, gen), _targets([4], gen)
    indices = [([0, 1, 2, 3], [3, 2, 1, 0])]
    losses = SetCriterion(NUM_CLASSES, FixedMatcher(indices), LOSS)(outputs, targets)
    src = _xyxy(outputs["pred_boxes"][0].detach())
    tgt = _xyxy(targets[0]["boxes"][[3, 2, 1, 0]])
    expected = (1 - torch.diag(generalized_box_iou(src, tgt))).sum() / 4
    assert losses["loss_giou"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_hungarian_losses_aux_enc_and_weighted_total():
    gen = torch.Generator().manual_seed(2)
    targets = _targets([3, 0, 2], gen)
    outputs = _layer(3, 6, gen)
    outputs["aux_outputs"] = [_layer(3, 6, gen) for _ in range(2)]
    outputs["enc_outputs"] = _layer(3, 10, gen)
    weights = {"loss_ce": 1.5, "loss_bbox": 3.0, "loss_giou": 0.5}
    cfg = LossConfig(cls_loss_coef=1.5, bbox_loss_coef=3.0, giou_loss_coef=0.5)
    matcher = HungarianMatcher(cfg)
    losses = SetCriterion(NUM_CLASSES, matcher, cfg)(outputs, targets)

    suffixes = ["", "_0", "_1", "_enc"]
    expected_keys = {f"{name}{s}" for name in weights for s in suffixes} | {"loss", "class_error"}
    assert set(losses) == expected_keys

    binary = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
    layers = [outputs, *outputs["aux_outputs"], outputs["enc_outputs"]]
    total = 0.0
    for suffix, layer, tgts in zip(suffixes, layers, [targets] * 3 + [binary]):
        indices = matcher(layer, tgts)
        expected, _ = _reference_losses(layer, tgts, indices, num_boxes=5)
        for name, value in expected.items():
            assert losses[name + suffix].item() == pytest.approx(value, rel=1e-5), name + suffix
            total += weights[name] * value
    assert losses["loss"].item() == pytest.approx(total, rel=1e-5)


def test_gradients_reach_every_layer():
    gen = torch.Generator().manual_seed(3)
    outputs, targets = _layer(2, 5, gen), _targets([2, 3], gen)
    outputs["aux_outputs"] = [_layer(2, 5, gen)]
    outputs["enc_outputs"] = _layer(2, 8, gen)
    SetCriterion(NUM_CLASSES, HungarianMatcher(LOSS), LOSS)(outputs, targets)["loss"].backward()
    for layer in (outputs, outputs["aux_outputs"][0], outputs["enc_outputs"]):
        assert layer["pred_logits"].grad.abs().sum() > 0
        assert layer["pred_boxes"].grad.abs().sum() > 0


def test_no_targets_gives_background_only_loss():
    gen = torch.Generator().manual_seed(4)
    outputs, targets = _layer(2, 5, gen), _targets([0, 0], gen)
    losses = SetCriterion(NUM_CLASSES, HungarianMatcher(LOSS), LOSS)(outputs, targets)
    expected = sigmoid_focal_loss(outputs["pred_logits"].detach(), torch.zeros(2, 5, NUM_CLASSES), reduction="sum")
    assert losses["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-5)  # num_boxes clamped to 1
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    assert losses["class_error"].item() == 0
    losses["loss"].backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all() and outputs["pred_boxes"].grad is not None


def test_class_error():
    logits = torch.full((1, 4, NUM_CLASSES), -5.0)
    logits[0, 0, 1] = logits[0, 1, 2] = logits[0, 2, 3] = logits[0, 3, 0] = 5.0  # argmax per query: 1, 2, 3, 0
    outputs = {"pred_logits": logits, "pred_boxes": torch.full((1, 4, 4), 0.3)}
    targets = [{"labels": torch.tensor([1, 2, 0, 0]), "boxes": torch.full((4, 4), 0.3)}]
    losses = SetCriterion(NUM_CLASSES, FixedMatcher([([0, 1, 2, 3], [0, 1, 2, 3])]), LOSS)(outputs, targets)
    assert losses["class_error"].item() == pytest.approx(25.0)


def test_fp32_under_autocast():
    gen = torch.Generator().manual_seed(5)
    outputs, targets = _layer(2, 5, gen, grad=False), _targets([2, 1], gen)
    reference = SetCriterion(NUM_CLASSES, HungarianMatcher(LOSS), LOSS)(outputs, targets)
    low = {k: v.bfloat16() for k, v in outputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = SetCriterion(NUM_CLASSES, HungarianMatcher(LOSS), LOSS)(low, targets)
    assert all(v.dtype == torch.float32 for v in losses.values())
    assert losses["loss"].item() == pytest.approx(reference["loss"].item(), rel=2e-2)


def test_num_boxes_is_averaged_across_processes(monkeypatch):
    # Simulate 2 ranks where the other rank holds 7 boxes: num_boxes = (3 + 7) / 2 = 5.
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t: t.add_(7.0))
    gen = torch.Generator().manual_seed(6)
    outputs, targets = _layer(1, 4, gen), _targets([3], gen)
    indices = [([0, 1, 2], [0, 1, 2])]
    losses = SetCriterion(NUM_CLASSES, FixedMatcher(indices), LOSS)(outputs, targets)
    expected, _ = _reference_losses(outputs, targets, [(torch.tensor(r), torch.tensor(c)) for r, c in indices], 5)
    assert losses["loss_bbox"].item() == pytest.approx(expected["loss_bbox"], rel=1e-5)


def test_bad_config_and_class_count_raise():
    with pytest.raises(ValueError, match="all costs are 0"):
        HungarianMatcher(LossConfig(cost_class=0.0, cost_bbox=0.0, cost_giou=0.0))
    gen = torch.Generator().manual_seed(7)
    outputs, targets = _layer(1, 4, gen), _targets([1], gen)
    with pytest.raises(ValueError, match="has 4 classes, expected 3"):
        SetCriterion(3, HungarianMatcher(LOSS), LOSS)(outputs, targets)
