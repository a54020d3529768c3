"""COCO-format detection dataset with load-time validation and contiguous class labels."""

import json
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from .transforms import basic_transforms, make_target_boxes

log = logging.getLogger(__name__)

BOX_TOLERANCE = 1.0  # pixels a bbox may stick out of its image (rounding in many annotation tools)


class DatasetError(ValueError):
    """A problem in a dataset file or entry; the one-line message names the file and the entry."""


@dataclass
class _ImageRecord:
    """One validated image entry with its validated annotations (crowd ones included, for evaluation)."""

    id: int
    file_name: str
    width: int
    height: int
    ann_ids: list[int]
    bboxes: list[list[float]]  # COCO xywh
    category_ids: list[int]
    iscrowd: list[int]
    areas: list[float]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _missing(entry: dict, keys: tuple[str, ...]) -> str | None:
    """Error text naming the required keys absent from `entry`, or None."""
    absent = [k for k in keys if k not in entry]
    return f"missing key(s) {', '.join(repr(k) for k in absent)}" if absent else None


def _where(section: str, index: int, entry: Any) -> str:
    """Name an entry for error messages, e.g. 'annotations[12] (id=345)'."""
    has_id = isinstance(entry, dict) and "id" in entry
    return f"{section}[{index}]" + (f" (id={entry['id']!r})" if has_id else "")


def _load_json(path: Path) -> dict:
    """Read the annotation file, turning every failure into a one-line DatasetError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DatasetError(f"{path}: cannot read annotation file: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{path}: invalid JSON at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}"
        ) from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text at byte {e.start}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: top level must be an object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DatasetError(f"{path}: missing top-level key '{key}'")
        if not isinstance(data[key], list):
            raise DatasetError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")
    return data


class CocoDetection(Dataset):
    """Images and boxes from a COCO-format JSON file, any category ids mapped to labels 0..C-1 in id order.

    Crowd annotations are kept out of the targets (they still count in `to_coco_dict` for evaluation);
    images without annotations are kept. Every bad entry raises a one-line `DatasetError`, or with
    ``skip_bad=True`` is skipped, logged with `logging.warning` and counted in `self.skipped`.
    """

    def __init__(
        self,
        images_dir: str | Path,
        annotations_json: str | Path,
        transforms: Callable | None = None,
        skip_bad: bool = False,
    ):
        self.images_dir = Path(images_dir)
        self.annotations_json = Path(annotations_json)
        self.transforms = transforms if transforms is not None else basic_transforms()
        self.skip_bad = skip_bad
        self.skipped: Counter[str] = Counter()
        data = _load_json(self.annotations_json)
        categories = self._parse_categories(data["categories"])
        if not categories:
            raise DatasetError(f"{self.annotations_json}: no valid categories")
        self.category_ids: list[int] = sorted(categories)
        self.class_names: list[str] = [categories[c] for c in self.category_ids]
        self.category_id_to_label: dict[int, int] = {c: i for i, c in enumerate(self.category_ids)}
        self._skipped_image_ids: set[int] = set()  # so that their annotations are reported as such
        records = self._parse_images(data["images"])
        self._parse_annotations(data["annotations"], records)
        self._records = list(records.values())
        if self.skipped:
            log.warning("%s: %s", self.annotations_json, self.skip_summary())

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def label_to_category_id(self, label: int) -> int:
        """COCO category id of a contiguous label."""
        return self.category_ids[int(label)]

    def skip_summary(self) -> str:
        """One line saying how many entries of each kind were skipped (empty when none)."""
        if not self.skipped:
            return ""
        return "skipped " + ", ".join(f"{n} {kind}" for kind, n in sorted(self.skipped.items()))

    def _bad(self, kind: str, where: str, problem: str) -> None:
        """Raise for a bad entry, or with skip_bad log and count it."""
        message = f"{self.annotations_json}: {where}: {problem}"
        if not self.skip_bad:
            raise DatasetError(message)
        log.warning("skipping bad entry: %s", message)
        self.skipped[kind] += 1

    def _parse_categories(self, entries: list) -> dict[int, str]:
        categories: dict[int, str] = {}
        for i, entry in enumerate(entries):
            where = f"categories[{i}]"
            if not isinstance(entry, dict):
                problem = "entry is not an object"
            elif problem := _missing(entry, ("id", "name")):
                pass
            elif not _is_int(entry["id"]):
                problem = f"id must be an integer, got {entry['id']!r}"
            elif not isinstance(entry["name"], str):
                problem = f"name must be a string, got {entry['name']!r}"
            elif entry["id"] in categories:
                problem = f"duplicate category id {entry['id']}"
            if problem:
                self._bad("categories", where, problem)
                continue
            categories[entry["id"]] = entry["name"]
        return categories

    def _image_problem(self, entry: Any, records: dict[int, _ImageRecord]) -> str | None:
        if not isinstance(entry, dict):
            return "entry is not an object"
        if problem := _missing(entry, ("id", "file_name", "width", "height")):
            return problem
        if not _is_int(entry["id"]):
            return f"id must be an integer, got {entry['id']!r}"
        if entry["id"] in records:
            return f"duplicate image id {entry['id']}"
        if not isinstance(entry["file_name"], str) or not entry["file_name"]:
            return f"file_name must be a non-empty string, got {entry['file_name']!r}"
        for key in ("width", "height"):
            if not _is_int(entry[key]) or entry[key] <= 0:
                return f"{key} must be a positive integer, got {entry[key]!r}"
        path = self.images_dir / entry["file_name"]
        if not path.is_file():
            return f"image file not found: {path}"
        if self.skip_bad:  # read the header now, so that fewer bad images turn up only during training
            try:
                with Image.open(path) as im:
                    size = im.size
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                return f"cannot read image {path}: {e}"
            if size != (entry["width"], entry["height"]):
                return f"image {path} is {size[0]}x{size[1]}, not {entry['width']}x{entry['height']}"
        return None

    def _parse_images(self, entries: list) -> dict[int, _ImageRecord]:
        records: dict[int, _ImageRecord] = {}
        for i, entry in enumerate(entries):
            if problem := self._image_problem(entry, records):
                self._bad("images", _where("images", i, entry), problem)
                if isinstance(entry, dict) and _is_int(entry.get("id")) and entry["id"] not in records:
                    self._skipped_image_ids.add(entry["id"])
                continue
            records[entry["id"]] = _ImageRecord(
                entry["id"], entry["file_name"], entry["width"], entry["height"], [], [], [], [], []
            )
        return records

    def _annotation_problem(self, entry: Any, records: dict[int, _ImageRecord], seen: set[int]) -> str | None:
        if not isinstance(entry, dict):
            return "entry is not an object"
        if problem := _missing(entry, ("id", "image_id", "category_id", "bbox")):
            return problem
        if not _is_int(entry["id"]):
            return f"id must be an integer, got {entry['id']!r}"
        if entry["id"] in seen:
            return f"duplicate annotation id {entry['id']}"
        if _is_int(entry["image_id"]) and entry["image_id"] in self._skipped_image_ids:
            return f"belongs to skipped image id {entry['image_id']}"
        if not _is_int(entry["image_id"]) or entry["image_id"] not in records:
            return f"unknown image id {entry['image_id']!r}"
        if not _is_int(entry["category_id"]) or entry["category_id"] not in self.category_id_to_label:
            return f"unknown category id {entry['category_id']!r}"
        if entry.get("iscrowd", 0) not in (0, 1):
            return f"iscrowd must be 0 or 1, got {entry['iscrowd']!r}"
        if "area" in entry and (not _is_number(entry["area"]) or entry["area"] < 0):
            return f"area must be a non-negative number, got {entry['area']!r}"
        bbox = entry["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            return f"bbox must be [x, y, width, height] numbers, got {bbox!r}"
        x, y, w, h = bbox
        if w <= 0 or h <= 0:
            return f"bbox {bbox} has non-positive width or height"
        record = records[entry["image_id"]]
        tol = BOX_TOLERANCE
        inside = x >= -tol and y >= -tol and x + w <= record.width + tol and y + h <= record.height + tol
        overlap = min(x + w, record.width) > max(x, 0) and min(y + h, record.height) > max(y, 0)
        if not (inside and overlap):
            return (
                f"bbox {bbox} lies outside image id {record.id} ({record.width}x{record.height}) "
                f"by more than {tol:g} px"
            )
        return None

    def _parse_annotations(self, entries: list, records: dict[int, _ImageRecord]) -> None:
        seen: set[int] = set()
        for i, entry in enumerate(entries):
            where = _where("annotations", i, entry)
            if problem := self._annotation_problem(entry, records, seen):
                self._bad("annotations", where, problem)
                continue
            seen.add(entry["id"])
            record = records[entry["image_id"]]
            bbox = [float(v) for v in entry["bbox"]]
            record.ann_ids.append(entry["id"])
            record.bboxes.append(bbox)
            record.category_ids.append(entry["category_id"])
            record.iscrowd.append(int(entry.get("iscrowd", 0)))
            record.areas.append(float(entry.get("area", bbox[2] * bbox[3])))

    def __len__(self) -> int:
        return len(self._records)

    @property
    def image_ids(self) -> list[int]:
        """COCO image ids in dataset order."""
        return [r.id for r in self._records]

    def _read_image(self, record: _ImageRecord) -> Image.Image:
        """Decode an image file as RGB, checking its size against the annotation file."""
        path = self.images_dir / record.file_name
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise DatasetError(f"{path}: cannot read image (id {record.id}): {e}") from None
        if image.size != (record.width, record.height):
            raise DatasetError(
                f"{path}: image is {image.width}x{image.height} but {self.annotations_json.name} "
                f"says {record.width}x{record.height} (id {record.id})"
            )
        return image

    def target_boxes(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute xyxy boxes (clipped to the image) and contiguous labels of the non-crowd annotations."""
        record = self._records[index]
        keep = [i for i, crowd in enumerate(record.iscrowd) if not crowd]
        xywh = torch.tensor([record.bboxes[i] for i in keep], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, record.width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, record.height)
        labels = torch.tensor([self.category_id_to_label[record.category_ids[i]] for i in keep], dtype=torch.int64)
        return boxes, labels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        for attempt in range(len(self)):
            record = self._records[(index + attempt) % len(self)]
            try:
                image = self._read_image(record)
            except DatasetError as e:
                if not self.skip_bad:
                    raise
                log.warning("skipping unreadable image, using the next one instead: %s", e)
                self.skipped["unreadable images"] += 1
                continue
            boxes, labels = self.target_boxes((index + attempt) % len(self))
            target = {"boxes": make_target_boxes(boxes, record.height, record.width), "labels": labels}
            image, target = self.transforms(image, target)
            target["image_id"] = record.id
            target["orig_size"] = torch.tensor([record.height, record.width], dtype=torch.int64)
            return image, target
        raise DatasetError(f"{self.annotations_json}: no readable image in the dataset")

    def to_coco_dict(self) -> dict[str, list]:
        """The validated dataset (crowd annotations included) as a COCO dict, e.g. as evaluation ground truth."""
        images, annotations = [], []
        for r in self._records:
            images.append({"id": r.id, "file_name": r.file_name, "width": r.width, "height": r.height})
            for ann_id, bbox, cat, crowd, area in zip(r.ann_ids, r.bboxes, r.category_ids, r.iscrowd, r.areas):
                annotations.append(
                    {"id": ann_id, "image_id": r.id, "category_id": cat, "bbox": bbox, "area": area, "iscrowd": crowd}
                )
        categories = [{"id": c, "name": n} for c, n in zip(self.category_ids, self.class_names)]
        return {"images": images, "annotations": annotations, "categories": categories}

