"""COCO evaluation against hand-computed AP values, and the result-format helpers."""

import json
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from torchvision.ops import box_iou

from ddetr.evaluation import METRIC_NAMES, evaluate_coco, format_table, to_coco_results

# Widths chosen so that a shift of 3/13 of the width gives IoU (w - d) / (w + d) = 10/16 = 0.625 exactly.
WIDTHS = (26, 52, 104, 208)


def make_gt(with_defaults: bool = True) -> dict:
    """Four images with boxes of several sizes in two categories (ids 3 and 8)."""
    images, annotations = [], []
    for i in range(4):
        images.append({"id": 10 + i, "file_name": f"{i}.jpg", "width": 640, "height": 480})
        for k, w in enumerate(WIDTHS):
            h = 20 + 30 * k
            ann = {"id": len(annotations) + 1, "image_id": 10 + i, "category_id": (3, 8)[(i + k) % 2],
                   "bbox": [10 + 5 * i, 15 + 100 * k, w, h]}
            if with_defaults:
                ann |= {"area": w * h, "iscrowd": 0}
            annotations.append(ann)
    return {"images": images, "annotations": annotations, "categories": [{"id": 3, "name": "a"},
                                                                         {"id": 8, "name": "b"}]}


def results_from(gt: dict, shift_fraction: float = 0.0, score=lambda i: 0.9) -> list[dict]:
    out = []
    for i, a in enumerate(gt["annotations"]):
        x, y, w, h = a["bbox"]
        out.append({"image_id": a["image_id"], "category_id": a["category_id"],
                    "bbox": [x + w * shift_fraction, y, w, h], "score": score(i)})
    return out


def iou_of_shift(w: float, h: float, d: float) -> float:
    """IoU of a box with itself shifted by d, computed by torchvision."""
    a = torch.tensor([[0.0, 0.0, w, h]], dtype=torch.float64)
    return float(box_iou(a, a + torch.tensor([d, 0.0, d, 0.0], dtype=torch.float64)))


def test_perfect_predictions_give_one(tmp_path):
    gt = make_gt()
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    m = evaluate_coco(path, results_from(gt))
    assert list(m) == list(METRIC_NAMES)
    areas = [a["area"] for a in gt["annotations"]]
    assert min(areas) < 32 ** 2 and any(32 ** 2 <= a < 96 ** 2 for a in areas) and max(areas) >= 96 ** 2
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR10", "AR100", "ARs", "ARm", "ARl"):
        assert m[name] == pytest.approx(1.0), name
    # AR1: one detection per image and category; each image has 2 boxes per category
    assert m["AR1"] == pytest.approx(0.5)


def test_shifted_boxes_give_hand_computed_ap():
    gt = make_gt()
    for w in WIDTHS:
        assert iou_of_shift(w, 50, 3 * w / 13) == 0.625
    m = evaluate_coco(gt, results_from(gt, shift_fraction=3 / 13))
    thresholds = np.arange(10) * 0.05 + 0.5  # 0.50, 0.55, ..., 0.95
    matched = (thresholds <= 0.625).sum()  # every box is a true positive at these thresholds, nothing at the rest
    assert matched == 3
    assert m["AP50"] == pytest.approx(1.0) and m["AP75"] == 0.0
    assert m["AP"] == pytest.approx(matched / 10)  # = 0.3
    assert m["AR100"] == pytest.approx(0.3)


def test_half_shifted_lower_scored_uses_101_point_interpolation():
    # Per category: half the boxes exact with high scores, half shifted (IoU 0.625) with low scores.
    gt = make_gt()
    results = results_from(gt, score=lambda i: 0.9)
    for i, r in enumerate(results):
        if (i // 2) % 2:  # two of every four boxes, one of each category
            r["bbox"][0] += r["bbox"][2] * 3 / 13
            r["score"] = 0.4
    counts = {c: sum((i // 2) % 2 for i, a in enumerate(gt["annotations"]) if a["category_id"] == c) for c in (3, 8)}
    assert counts == {3: 4, 8: 4}  # half of each category's 8 boxes are shifted
    m = evaluate_coco(gt, results)
    # IoU thresholds <= 0.625: all boxes match, precision 1 at every recall -> AP 1.
    # Above: recall stops at 0.5 with precision 1, so 101-point AP = (# recall points <= 0.5) / 101 = 51 / 101.
    recall_points = (np.arange(101) / 100 <= 0.5).sum()
    assert recall_points == 51
    assert m["AP"] == pytest.approx((3 * 1.0 + 7 * recall_points / 101) / 10)
    assert m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(recall_points / 101)


def test_empty_results_missing_defaults_and_undefined_ranges(capsys):
    gt = make_gt(with_defaults=False)  # no area / iscrowd: filled with box area and 0
    m = evaluate_coco(gt, [])
    assert all(m[name] == 0.0 for name in METRIC_NAMES)
    assert "area" not in gt["annotations"][0]  # the caller's dict is not modified
    small = {**gt, "annotations": [a for a in gt["annotations"] if a["bbox"][2] == 26]}
    m = evaluate_coco(small, results_from(small))
    assert m["AP"] == pytest.approx(1.0) and m["APs"] == pytest.approx(1.0)
    assert math.isnan(m["APm"]) and math.isnan(m["APl"])  # no ground truth of that size
    assert capsys.readouterr().out == ""  # quiet unless verbose
    coco = COCO()
    coco.dataset = make_gt()
    coco.createIndex()
    evaluate_coco(coco, results_from(make_gt()), verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def test_results_with_unknown_ids_are_rejected():
    gt = make_gt()
    with pytest.raises(ValueError, match=r"results\[0\]: image_id 99 is not in the ground truth"):
        evaluate_coco(gt, [{"image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(ValueError, match=r"results\[0\]: category_id 4 is not in the ground truth"):
        evaluate_coco(gt, [{"image_id": 10, "category_id": 4, "bbox": [0, 0, 1, 1], "score": 1.0}])


def test_format_table():
    metrics = dict.fromkeys(METRIC_NAMES, 0.5) | {"AP": 0.4567, "APl": math.nan}
    lines = format_table(metrics).splitlines()
    assert len(lines) == 3
    header, values = ([c.strip() for c in line.strip("|").split("|")] for line in (lines[0], lines[2]))
    assert header == list(METRIC_NAMES)
    assert values[0] == "45.7" and values[1] == "50.0" and values[header.index("APl")] == "-"


@pytest.mark.parametrize("mapping", [[5, 9, 12], {0: 5, 1: 9, 2: 12}])
def test_to_coco_results(mapping):
    detections = [
        {"boxes": torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 1.5, 2.5]]),
         "scores": torch.tensor([0.9, 0.25]), "labels": torch.tensor([2, 0])},
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    results = to_coco_results(detections, [7, 8], mapping)
    assert results == [
        {"image_id": 7, "category_id": 12, "bbox": [10.0, 20.0, 40.0, 60.0], "score": pytest.approx(0.9)},
        {"image_id": 7, "category_id": 5, "bbox": [0.0, 0.0, 1.5, 2.5], "score": 0.25},
    ]
    json.dumps(results)  # plain Python types
    with pytest.raises(ValueError, match="2 detections for 1 image ids"):
        to_coco_results(detections, [7], mapping)
