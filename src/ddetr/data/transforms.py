"""Joint image + box transforms: the Deformable DETR augmentation recipe on torchvision.transforms.v2."""

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resized_size(height: int, width: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """Output (h, w) when the shorter side becomes `size` and the longer side stays <= `max_size` (official rule)."""
    short, long = min(height, width), max(height, width)
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


class RandomShortSideResize(v2.Transform):
    """Resize so the shorter side is a random choice of `scales`, capping the longer side at `max_size`."""

    def __init__(self, scales: Sequence[int], max_size: int | None = None):
        super().__init__()
        if not scales or any(int(s) <= 0 for s in scales):
            raise ValueError(f"scales must be a non-empty list of positive sizes, got {list(scales)}")
        self.scales = [int(s) for s in scales]
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        scale = self.scales[int(torch.randint(len(self.scales), ()))]
        return {"size": list(resized_size(height, width, scale, self.max_size))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, params["size"], antialias=True)


class RandomSizeCrop(v2.Transform):
    """Crop a random window whose height and width are uniform in [min_size, max_size], clipped to the image."""

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(f"crop size range must satisfy 0 < min <= max, got ({min_size}, {max_size})")
        self.min_size = min_size
        self.max_size = max_size

    def _side(self, length: int) -> int:
        """Random crop side for an image side of `length` pixels."""
        high = min(length, self.max_size)
        low = min(self.min_size, high)
        return int(torch.randint(low, high + 1, ()))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_h, crop_w = self._side(height), self._side(width)
        top = int(torch.randint(height - crop_h + 1, ()))
        left = int(torch.randint(width - crop_w + 1, ()))
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


class ToModelFormat:
    """Final step: drop degenerate boxes, turn the image into a plain tensor and boxes into normalised cxcywh.

    Boxes squeezed to zero width or height by a crop are removed together with their labels (that is the
    augmentation, not data loss); how many is recorded in ``target["dropped_boxes"]``.
    """

    def __call__(self, image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        height, width = image.shape[-2:]
        boxes = target["boxes"].as_subclass(torch.Tensor).reshape(-1, 4)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes = boxes[keep]
        target = dict(target)
        target["dropped_boxes"] = int((~keep).sum()) + int(target.get("dropped_boxes", 0))
        target["labels"] = target["labels"][keep]
        cxcywh = torch.stack(
            [(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2,
             boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], dim=-1
        )
        target["boxes"] = cxcywh / torch.tensor([width, height, width, height], dtype=cxcywh.dtype)
        target["size"] = torch.tensor([height, width], dtype=torch.int64)
        return image.as_subclass(torch.Tensor), target


def _finish() -> list:
    """Steps shared by every pipeline: float conversion, ImageNet normalisation, model box format."""
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD), ToModelFormat()]


def train_transforms(scales: Sequence[int], max_size: int, crop_scales: Sequence[int], crop_size: tuple[int, int],
                     crop: bool) -> v2.Compose:
    """Paper augmentation: flip, then either multi-scale resize or resize -> random crop -> multi-scale resize.

    ``crop=False`` keeps only the flip and the multi-scale resize. The paper's sizes are `DataConfig`'s defaults.
    """
    if not crop:
        return v2.Compose([v2.ToImage(), v2.RandomHorizontalFlip(0.5), RandomShortSideResize(scales, max_size),
                           *_finish()])
    return v2.Compose([
        v2.ToImage(),
        v2.RandomHorizontalFlip(0.5),
        v2.RandomChoice([
            RandomShortSideResize(scales, max_size),
            v2.Compose([
                RandomShortSideResize(crop_scales),
                RandomSizeCrop(*crop_size),
                RandomShortSideResize(scales, max_size),
            ]),
        ]),
        *_finish(),
    ])


def val_transforms(size: int, max_size: int) -> v2.Compose:
    """Evaluation transform: shorter side to `size`, longer side at most `max_size`."""
    return v2.Compose([v2.ToImage(), RandomShortSideResize([size], max_size), *_finish()])


def basic_transforms() -> v2.Compose:
    """No resizing: only normalisation and box conversion (for inspection and tests)."""
    return v2.Compose([v2.ToImage(), *_finish()])


def make_target_boxes(boxes_xyxy: torch.Tensor, height: int, width: int) -> tv_tensors.BoundingBoxes:
    """Wrap absolute xyxy boxes so that v2 transforms move them with the image."""
    return tv_tensors.BoundingBoxes(boxes_xyxy.reshape(-1, 4), format="XYXY", canvas_size=(height, width))
