"""COCO box AP with pycocotools, quiet by default, plus result-format helpers."""

import contextlib
import copy
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# Names of COCOeval.stats entries, in order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _quiet(verbose: bool):
    """Context that swallows pycocotools' prints unless verbose."""
    return contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())


def _coco_from_dict(data: dict, verbose: bool) -> COCO:
    """Index a COCO dict without the file round trip."""
    coco = COCO()
    coco.dataset = data
    with _quiet(verbose):
        coco.createIndex()
    return coco


def load_ground_truth(gt: str | Path | dict | COCO, verbose: bool = False) -> COCO:
    """A COCO object from a path, a dict or a COCO object; missing 'area'/'iscrowd' get box area / 0."""
    if isinstance(gt, COCO):
        if all("area" in a and "iscrowd" in a for a in gt.dataset.get("annotations", [])):
            return gt
        data = copy.deepcopy(gt.dataset)
    elif isinstance(gt, dict):
        data = copy.deepcopy(gt)
    else:
        with open(gt, encoding="utf-8") as f:
            data = json.load(f)
    for ann in data.get("annotations", []):
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        ann.setdefault("iscrowd", 0)
    return _coco_from_dict(data, verbose)


def _detections(coco_gt: COCO, results: Sequence[Mapping[str, Any]]) -> COCO:
    """Index result dicts as a COCO object, checking image and category ids against the ground truth."""
    annotations = []
    for i, r in enumerate(results):
        if r["image_id"] not in coco_gt.imgs:
            raise ValueError(f"results[{i}]: image_id {r['image_id']!r} is not in the ground truth")
        if r["category_id"] not in coco_gt.cats:
            raise ValueError(f"results[{i}]: category_id {r['category_id']!r} is not in the ground truth")
        x, y, w, h = (float(v) for v in r["bbox"])
        annotations.append({
            "id": i + 1, "image_id": r["image_id"], "category_id": r["category_id"],
            "bbox": [x, y, w, h], "area": w * h, "score": float(r["score"]), "iscrowd": 0,
        })
    data = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
            "annotations": annotations}
    return _coco_from_dict(data, verbose=False)


def evaluate_coco(
    gt: str | Path | dict | COCO, results: Sequence[Mapping[str, Any]], verbose: bool = False
) -> dict[str, float]:
    """COCO box metrics (fractions in [0, 1]) for result dicts with image_id, category_id, bbox (xywh), score.

    Metrics without ground truth in their range (e.g. APl when nothing is large) are NaN, not pycocotools' -1.
    Empty results give 0 wherever ground truth exists.
    """
    coco_gt = load_ground_truth(gt, verbose)
    coco_dt = _detections(coco_gt, results)
    evaluator = COCOeval(coco_gt, coco_dt, "bbox")
    with _quiet(verbose):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(v) if v >= 0 else math.nan for name, v in zip(METRIC_NAMES, evaluator.stats)}


def format_table(metrics: Mapping[str, float]) -> str:
    """Markdown table of the metrics in percent with one decimal ('-' where undefined)."""
    names = [n for n in METRIC_NAMES if n in metrics] + [n for n in metrics if n not in METRIC_NAMES]
    cells = ["-" if math.isnan(metrics[n]) else f"{100 * metrics[n]:.1f}" for n in names]
    widths = [max(len(n), len(c)) for n, c in zip(names, cells)]
    header = "| " + " | ".join(n.rjust(w) for n, w in zip(names, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    row = "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([header, rule, row])


def to_coco_results(
    detections: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int],
    label_to_category_id: Sequence[int] | Mapping[int, int],
) -> list[dict[str, Any]]:
    """Per-image detections (absolute xyxy `boxes`, `scores`, contiguous `labels`) to COCO xywh result dicts."""
    if len(detections) != len(image_ids):
        raise ValueError(f"to_coco_results: {len(detections)} detections for {len(image_ids)} image ids")
    results = []
    for det, image_id in zip(detections, image_ids):
        boxes = torch.as_tensor(det["boxes"], dtype=torch.float64).reshape(-1, 4)
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = torch.as_tensor(det["scores"]).reshape(-1).tolist()
        labels = torch.as_tensor(det["labels"]).reshape(-1).tolist()
        if not len(xywh) == len(scores) == len(labels):
            raise ValueError(
                f"to_coco_results: image {image_id}: {len(xywh)} boxes, {len(scores)} scores, {len(labels)} labels"
            )
        for box, score, label in zip(xywh, scores, labels):
            results.append({
                "image_id": int(image_id),
                "category_id": int(label_to_category_id[int(label)]),
                "bbox": box,
                "score": float(score),
            })
    return results
