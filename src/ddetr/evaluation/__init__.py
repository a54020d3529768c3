"""COCO evaluation."""

from .coco_eval import METRIC_NAMES, evaluate_coco, format_table, load_ground_truth, to_coco_results

__all__ = ["METRIC_NAMES", "evaluate_coco", "format_table", "load_ground_truth", "to_coco_results"]
