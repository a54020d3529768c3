"""COCO-format detection dataset: checked up front (see `coco_file` for the rules), contiguous class labels."""

import logging
import multiprocessing
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from .coco_file import CocoFile, DatasetError, ImageRecord
from .images import ImageError, open_rgb
from .transforms import basic_transforms, make_target_boxes

__all__ = ["CocoDetection", "DatasetError"]

log = logging.getLogger(__name__)


class CocoDetection(Dataset):
    """Images and boxes from a COCO-format JSON file, any category ids mapped to labels 0..C-1 in id order.

    Every image header and entry is checked when the dataset is built; a bad entry raises a one-line `DatasetError`,
    or with ``skip_bad=True`` is skipped and counted. An image that still fails to decode during training raises,
    or with ``skip_bad`` is replaced by the next one and counted across DataLoader workers (`skip_summary`).
    A dataset without images or without boxes to train on is an error unless ``allow_empty``.
    """

    def __init__(
        self,
        images_dir: str | Path,
        annotations_json: str | Path,
        transforms: Callable | None = None,
        skip_bad: bool = False,
        allow_empty: bool = False,
    ):
        self.images_dir = Path(images_dir)
        self.annotations_json = Path(annotations_json)
        self.transforms = transforms if transforms is not None else basic_transforms()
        self.skip_bad = skip_bad
        checked = CocoFile(self.annotations_json, self.images_dir, skip_bad)
        self.category_ids: list[int] = sorted(checked.categories)
        self.class_names: list[str] = [checked.categories[c] for c in self.category_ids]
        self.category_id_to_label: dict[int, int] = checked.label_of
        self._records: list[ImageRecord] = checked.records
        self._load_skipped = checked.skipped
        self.box_changes: Counter[str] = checked.box_changes
        # One flag per image, set by whichever process (DataLoader workers included) fails to decode it: shared
        # memory inherited by forked workers and passed along when spawned ones start.
        self._undecodable = multiprocessing.RawArray("b", len(self._records))
        summary = "; ".join(s for s in (checked.box_summary(), self.skip_summary()) if s)
        if summary:
            log.warning("%s: %s", self.annotations_json, summary)
        if not allow_empty:
            self._check_not_empty()

    def _check_not_empty(self) -> None:
        hint = "pass allow_empty=True (data.allow_empty) if that is intended"
        if not self._records:
            raise DatasetError(f"{self.annotations_json}: no images; {hint}")
        if not any(len(r.boxes) for r in self._records):
            raise DatasetError(f"{self.annotations_json}: no annotations: {len(self)} images but no boxes to "
                               f"train on; {hint}")

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    @property
    def skipped(self) -> Counter[str]:
        """Bad entries skipped at load time by kind, plus "undecodable images" met since (with skip_bad)."""
        counts = Counter(self._load_skipped)
        if n := sum(self._undecodable):
            counts["undecodable images"] = n
        return counts

    def skip_summary(self) -> str:
        """One line saying how many entries of each kind were skipped so far (empty when none); e.g. for epoch ends."""
        if not (counts := self.skipped):
            return ""
        return "skipped " + ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))

    def __len__(self) -> int:
        return len(self._records)

    @property
    def image_ids(self) -> list[int]:
        """COCO image ids in dataset order."""
        return [r.id for r in self._records]

    def _read_image(self, record: ImageRecord) -> Image.Image:
        """Decode an image file as RGB (`open_rgb`), checking its size against the annotation file."""
        path = self.images_dir / record.file_name
        try:
            image = open_rgb(path)
        except ImageError as e:
            raise DatasetError(f"{e} (image id {record.id})") from None
        if image.size != (record.width, record.height):  # the file changed since it was checked
            raise DatasetError(
                f"{path}: image is {image.width}x{image.height} but {self.annotations_json.name} "
                f"says {record.width}x{record.height} (image id {record.id})"
            )
        return image

    def target_boxes(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute xyxy boxes (clipped to the image) and contiguous labels of the trainable annotations."""
        record = self._records[index]
        return torch.tensor(record.boxes).reshape(-1, 4), torch.tensor(record.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        for attempt in range(len(self)):
            position = (index + attempt) % len(self)
            record = self._records[position]
            try:
                image = self._read_image(record)
            except DatasetError as e:
                if not self.skip_bad:
                    raise
                if not self._undecodable[position]:
                    log.warning("skipping undecodable image, using the next one instead: %s", e)
                self._undecodable[position] = 1
                continue
            boxes, labels = self.target_boxes(position)
            target = {"boxes": make_target_boxes(boxes, record.height, record.width), "labels": labels}
            image, target = self.transforms(image, target)
            target["image_id"] = record.id
            target["orig_size"] = torch.tensor([record.height, record.width], dtype=torch.int64)
            return image, target
        raise DatasetError(f"{self.annotations_json}: no readable image in the dataset")

    def to_coco_dict(self) -> dict[str, list]:
        """Evaluation ground truth: the kept images with all their well-formed annotations exactly as in the file."""
        images, annotations = [], []
        for r in self._records:
            images.append({"id": r.id, "file_name": r.file_name, "width": r.width, "height": r.height})
            for ann_id, bbox, cat, crowd, area in zip(r.ann_ids.tolist(), r.bboxes.tolist(), r.category_ids.tolist(),
                                                      r.iscrowd.tolist(), r.areas.tolist()):
                annotations.append(
                    {"id": ann_id, "image_id": r.id, "category_id": cat, "bbox": bbox, "area": area, "iscrowd": crowd}
                )
        categories = [{"id": c, "name": n} for c, n in zip(self.category_ids, self.class_names)]
        return {"images": images, "annotations": annotations, "categories": categories}
