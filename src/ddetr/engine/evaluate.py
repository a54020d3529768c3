"""Run a detector over a dataset and score it with COCO AP (gathered across ranks when distributed)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ddetr.data.coco import CocoDetection
from ddetr.engine import distributed as dist
from ddetr.evaluation.coco_eval import evaluate_coco, to_coco_results

log = logging.getLogger(__name__)


def coco_dataset(loader: DataLoader) -> CocoDetection:
    """The CocoDetection behind a loader (training wraps it in a SeededDataset)."""
    return getattr(loader.dataset, "dataset", loader.dataset)


@torch.no_grad()
def predict_dataset(model: nn.Module, postprocess: nn.Module, loader: DataLoader, device: torch.device,
                    category_ids: Sequence[int], amp_dtype: torch.dtype | None = None, progress: bool = True,
                    ) -> list[dict[str, Any]]:
    """COCO result dicts (xywh, original-image pixels) for this rank's share of the data; a label's category id is
    ``category_ids[label]``, the MODEL's mapping (never the dataset's category order)."""
    model.eval()
    results: list[dict[str, Any]] = []
    for images, masks, targets in tqdm(loader, desc="eval", disable=not (progress and dist.is_main()), leave=False):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(images.to(device), masks.to(device))
        outputs = {k: outputs[k].float() for k in ("pred_logits", "pred_boxes")}
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        detections = [{k: v.cpu() for k, v in d.items()} for d in postprocess(outputs, sizes)]
        results += to_coco_results(detections, [int(t["image_id"]) for t in targets], category_ids)
    return results


def match_categories(dataset: CocoDetection, category_ids: Sequence[int]) -> set[int]:
    """The category ids both the model and the dataset know; one warning names the dataset's categories that the
    model cannot predict (they score 0 AP) — matched by id, never by position."""
    known = set(category_ids)
    unknown = [f"{c} ({n})" for c, n in zip(dataset.category_ids, dataset.class_names) if c not in known]
    if unknown:
        log.warning("%s: the model has no class for %d of the dataset's %d categories: %s",
                    dataset.annotations_json, len(unknown), dataset.num_classes, ", ".join(unknown[:20])
                    + (" ..." if len(unknown) > 20 else ""))
    shared = known & set(dataset.category_ids)
    if not shared:
        raise ValueError(f"{dataset.annotations_json}: none of its category ids {dataset.category_ids[:10]} is among "
                         f"the model's ({sorted(known)[:10]} ...): is this the dataset the model was trained on?")
    return shared


def evaluate(model: nn.Module, postprocess: nn.Module, loader: DataLoader, device: torch.device,
             category_ids: Sequence[int], amp_dtype: torch.dtype | None = None, progress: bool = True,
             ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """COCO metrics (AP, AP50, AP75, APs, APm, APl, ...) on rank 0's gathered results, broadcast to all ranks.

    Results for categories the dataset does not have (e.g. the "N/A" slots of a COCO 91-logit head) are left out
    of the scoring (pycocotools would ignore them too) but kept in the returned results.
    """
    dataset = coco_dataset(loader)
    shared = match_categories(dataset, category_ids)
    results = predict_dataset(model, postprocess, loader, device, category_ids, amp_dtype, progress)
    gathered = [r for part in dist.all_gather_objects(results) for r in part]
    scored = [r for r in gathered if r["category_id"] in shared]
    metrics = evaluate_coco(dataset.to_coco_dict(), scored) if dist.is_main() else {}
    metrics = dist.all_gather_objects(metrics)[0]
    return metrics, gathered
