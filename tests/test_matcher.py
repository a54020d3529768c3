"""HungarianMatcher against brute-force search over all assignments with an independently computed cost."""

import itertools

import pytest
import torch
from torchvision.ops import generalized_box_iou

from ddetr.models.config import LossConfig
from ddetr.models.matcher import HungarianMatcher

MATCHER = HungarianMatcher(LossConfig())


def _random_boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    """Random normalised cxcywh boxes with positive size."""
    centre = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
    size = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
    return torch.cat([centre, size], dim=1)


def _xyxy(b: torch.Tensor) -> torch.Tensor:
    """cxcywh -> xyxy by hand (independent of the library's box_ops)."""
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def _reference_cost(logits, boxes, labels, tgt_boxes, wc=2.0, wb=5.0, wg=2.0, alpha=0.25, gamma=2.0):
    """(Q, n) cost from the official formula, with explicit loops for the class and L1 terms."""
    q, n = logits.shape[0], len(labels)
    cost = torch.zeros(q, n, dtype=torch.float64)
    giou = generalized_box_iou(_xyxy(boxes.double()), _xyxy(tgt_boxes.double()))
    for i in range(q):
        for j in range(n):
            p = torch.sigmoid(logits[i, labels[j]].double())
            pos = alpha * (1 - p) ** gamma * -torch.log(p + 1e-8)
            neg = (1 - alpha) * p**gamma * -torch.log(1 - p + 1e-8)
            l1 = (boxes[i].double() - tgt_boxes[j].double()).abs().sum()
            cost[i, j] = wc * (pos - neg) + wb * l1 - wg * giou[i, j]
    return cost


def _brute_force_min(cost: torch.Tensor) -> float:
    """Minimum total cost over all maximal one-to-one assignments between rows and columns."""
    q, n = cost.shape
    if n <= q:
        return min(sum(cost[perm[j], j].item() for j in range(n)) for perm in itertools.permutations(range(q), n))
    return min(sum(cost[i, perm[i]].item() for i in range(q)) for perm in itertools.permutations(range(n), q))


def _make_case(batch_sizes: list[int], num_queries: int, num_classes: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(batch_sizes), num_queries, num_classes, generator=gen) * 2
    boxes = torch.stack([_random_boxes(num_queries, gen) for _ in batch_sizes])
    targets = [{"labels": torch.randint(0, num_classes, (n,), generator=gen), "boxes": _random_boxes(n, gen)}
               for n in batch_sizes]
    return {"pred_logits": logits, "pred_boxes": boxes}, targets


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    num_queries = int(torch.randint(1, 7, (1,), generator=gen))
    sizes = [int(torch.randint(0, 5, (1,), generator=gen)) for _ in range(3)]
    outputs, targets = _make_case(sizes, num_queries, num_classes=5, seed=seed)
    indices = MATCHER(outputs, targets)
    assert len(indices) == len(targets)
    for b, ((rows, cols), tgt) in enumerate(zip(indices, targets)):
        assert rows.dtype == cols.dtype == torch.int64
        n = len(tgt["labels"])
        assert len(rows) == len(cols) == min(num_queries, n)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        if n == 0:
            continue
        cost = _reference_cost(outputs["pred_logits"][b], outputs["pred_boxes"][b], tgt["labels"], tgt["boxes"])
        total = cost[rows, cols].sum().item()
        assert total == pytest.approx(_brute_force_min(cost), abs=1e-4)


def test_custom_weights_change_the_objective():
    outputs, targets = _make_case([4], 6, num_classes=3, seed=7)
    cfg = LossConfig(cost_class=0.5, cost_bbox=1.0, cost_giou=3.0, focal_alpha=0.4, focal_gamma=1.0)
    matcher = HungarianMatcher(cfg)
    rows, cols = matcher(outputs, targets)[0]
    cost = _reference_cost(outputs["pred_logits"][0], outputs["pred_boxes"][0], targets[0]["labels"],
                           targets[0]["boxes"], wc=0.5, wb=1.0, wg=3.0, alpha=0.4, gamma=1.0)
    assert cost[rows, cols].sum().item() == pytest.approx(_brute_force_min(cost), abs=1e-4)


def test_obvious_assignment():
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]]])
    logits = torch.zeros(1, 3, 2)
    targets = [{"labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.8, 0.8, 0.1, 0.1], [0.2, 0.2, 0.1, 0.1]])}]
    rows, cols = MATCHER({"pred_logits": logits, "pred_boxes": boxes}, targets)[0]
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 2: 0}


def test_empty_targets():
    outputs, targets = _make_case([0, 0], 5, num_classes=4, seed=1)
    indices = MATCHER(outputs, targets)
    assert len(indices) == 2
    for rows, cols in indices:
        assert rows.numel() == cols.numel() == 0 and rows.dtype == cols.dtype == torch.int64


def test_half_precision_logits_are_costed_in_fp32():
    # sigmoid(-30) underflows to 0 in fp16, where log(0 + 1e-8) is -inf; fp32 costs must stay finite.
    outputs, targets = _make_case([3], 5, num_classes=4, seed=2)
    outputs["pred_logits"][0, :2] = -30.0
    expected = MATCHER(outputs, targets)[0]
    half = {"pred_logits": outputs["pred_logits"].half(), "pred_boxes": outputs["pred_boxes"].half()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows, cols = MATCHER(half, targets)[0]
    assert torch.equal(rows, expected[0]) and torch.equal(cols, expected[1])


@pytest.mark.parametrize("key", ["pred_logits", "pred_boxes"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_predictions_raise(key, bad):
    outputs, targets = _make_case([2, 1], 4, num_classes=3, seed=3)
    outputs[key][1, 2, 0] = bad
    with pytest.raises(ValueError, match="non-finite predictions reached the matcher"):
        MATCHER(outputs, targets)


def test_bad_labels_and_batch_raise():
    outputs, targets = _make_case([2], 4, num_classes=3, seed=4)
    targets[0]["labels"] = torch.tensor([0, 3])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        MATCHER(outputs, targets)
    with pytest.raises(ValueError, match="2 targets for a batch of 1"):
        MATCHER(outputs, targets * 2)
