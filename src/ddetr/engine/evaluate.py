"""Run a detector over a dataset and score it with COCO AP (gathered across ranks when distributed)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ddetr.data.coco import CocoDetection
from ddetr.engine import distributed as dist
from ddetr.evaluation.coco_eval import evaluate_coco, to_coco_results


def coco_dataset(loader: DataLoader) -> CocoDetection:
    """The CocoDetection behind a loader (training wraps it in a SeededDataset)."""
    return getattr(loader.dataset, "dataset", loader.dataset)


@torch.no_grad()
def predict_dataset(model: nn.Module, postprocess: nn.Module, loader: DataLoader, device: torch.device,
                    amp_dtype: torch.dtype | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """COCO result dicts (xywh, original-image pixels, dataset category ids) for this rank's share of the data."""
    model.eval()
    dataset = coco_dataset(loader)
    results: list[dict[str, Any]] = []
    for images, masks, targets in tqdm(loader, desc="eval", disable=not (progress and dist.is_main()), leave=False):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(images.to(device), masks.to(device))
        outputs = {k: outputs[k].float() for k in ("pred_logits", "pred_boxes")}
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        detections = postprocess(outputs, sizes)
        detections = [{k: v.cpu() for k, v in d.items()} for d in detections]
        results += to_coco_results(detections, [int(t["image_id"]) for t in targets], dataset.category_ids)
    return results


def evaluate(model: nn.Module, postprocess: nn.Module, loader: DataLoader, device: torch.device,
             amp_dtype: torch.dtype | None = None, progress: bool = True,
             ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """COCO metrics (AP, AP50, AP75, APs, APm, APl, ...) on rank 0's gathered results, broadcast to all ranks."""
    results = predict_dataset(model, postprocess, loader, device, amp_dtype, progress)
    gathered = [r for part in dist.all_gather_objects(results) for r in part]
    metrics = evaluate_coco(coco_dataset(loader).to_coco_dict(), gathered) if dist.is_main() else {}
    metrics = dist.all_gather_objects(metrics)[0]
    return metrics, gathered
