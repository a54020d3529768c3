"""Reading and checking a COCO annotation file against its image files, with the official code's box rules.

Errors (one line naming the file and the entry; with ``skip_bad`` skipped and counted instead): an entry that is not
an object or lacks a key; a non-integer or duplicate id; an unknown image or category id; ``iscrowd`` not 0/1; an
``area`` that is not a non-negative number; a ``bbox`` that is not 4 finite numbers or has a negative width or height;
an image entry whose width/height is not a positive integer, whose file is missing, unreadable, of an unsupported mode
or of another size than the entry says. Not errors (the COCO data as shipped): non-crowd boxes of zero width or height
and boxes entirely outside their image are dropped from the training targets, boxes partly outside are clipped to the
image (counted, summarised in one line); crowd boxes are kept out of the targets; images without boxes are kept.
The evaluation ground truth keeps every well-formed annotation of the kept images exactly as in the file (zero-size
and outside boxes included: pycocotools on the original file counts them as missed objects too).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .images import ImageError, read_headers

log = logging.getLogger(__name__)
_WORKER_MESSAGE = re.compile(r"(?:[\w.]+\.)?DatasetError: (.*)")


class DatasetError(ValueError):
    """A problem in a dataset file or entry; the one-line message names the file and the entry.

    Re-raised by a DataLoader worker, the message is still that one line (torch passes the worker traceback to the
    constructor; it is kept in ``worker_traceback``).
    """

    def __init__(self, message: str) -> None:
        self.worker_traceback: str | None = None
        if message.startswith("Caught DatasetError") and "\nOriginal Traceback" in message:
            found = [m for line in message.splitlines() if (m := _WORKER_MESSAGE.fullmatch(line))]
            if found:
                self.worker_traceback, message = message, found[-1].group(1)
        super().__init__(message)


@dataclass
class ImageRecord:
    """One checked image with its annotations: all well-formed ones for evaluation, the trainable ones as targets."""

    id: int
    file_name: str
    width: int
    height: int
    ann_ids: np.ndarray  # (n,) int64, as in the file, crowd / zero-size / outside ones included
    bboxes: np.ndarray  # (n, 4) float64 COCO xywh as in the file
    category_ids: np.ndarray  # (n,) int64
    iscrowd: np.ndarray  # (n,) int64
    areas: np.ndarray  # (n,) float64, the file's or w * h
    boxes: np.ndarray  # (m, 4) float32 training boxes: non-crowd, clipped xyxy, positive size
    labels: np.ndarray  # (m,) int64 contiguous labels of `boxes`


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


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "es" if word.endswith("x") else "s")


def training_box(bbox: list[float], width: int, height: int) -> tuple[tuple[float, float, float, float] | None, str]:
    """COCO xywh -> xyxy clipped to the image (None when degenerate), and what happened: kept/clipped/zero/outside."""
    x, y, w, h = bbox
    if w == 0 or h == 0:
        return None, "zero"
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    if x2 <= x1 or y2 <= y1:
        return None, "outside"
    return (x1, y1, x2, y2), "kept" if (x1, y1, x2, y2) == (x, y, x + w, y + h) else "clipped"


def load_json(path: Path) -> dict:
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


class CocoFile:
    """A checked COCO file: `categories` (id -> name), `records` (ImageRecord in file order) and what was changed.

    `skipped` counts bad entries skipped with ``skip_bad``; `box_changes` counts the non-crowd boxes dropped from
    training ("zero", "outside") or clipped ("clipped").
    """

    def __init__(self, annotations_json: Path, images_dir: Path, skip_bad: bool) -> None:
        self.path, self.images_dir, self.skip_bad = annotations_json, images_dir, skip_bad
        self.skipped: Counter[str] = Counter()
        self.box_changes: Counter[str] = Counter()
        data = load_json(annotations_json)
        self.categories = self._parse_categories(data["categories"])
        if not self.categories:
            raise DatasetError(f"{annotations_json}: no valid categories")
        self.label_of = {c: i for i, c in enumerate(sorted(self.categories))}
        self._skipped_image_ids: set[int] = set()  # so that their annotations are reported as such
        images = self._parse_images(data["images"])
        self._check_image_files(images)
        anns: dict[int, list[tuple]] = {image_id: [] for image_id in images}
        self._parse_annotations(data["annotations"], images, anns)
        self.records = [self._record(images[i][1], anns[i]) for i in images]

    def box_summary(self) -> str:
        """'dropped 2 zero-size boxes, clipped 14 boxes to their image' (empty when every box was inside)."""
        c = self.box_changes
        parts = [f"dropped {_plural(c['zero'], 'zero-size box')}" if c["zero"] else "",
                 f"dropped {_plural(c['outside'], 'box')} entirely outside their image" if c["outside"] else "",
                 f"clipped {_plural(c['clipped'], 'box')} to their image" if c["clipped"] else ""]
        return ", ".join(p for p in parts if p)

    def _bad(self, kind: str, where: str, problem: str) -> None:
        """Raise for a bad entry, or with skip_bad log and count it."""
        message = f"{self.path}: {where}: {problem}"
        if not self.skip_bad:
            raise DatasetError(message)
        log.warning("skipping bad entry: %s", message)
        self.skipped[kind] += 1

    def _parse_categories(self, entries: list) -> dict[int, str]:
        categories: dict[int, str] = {}
        for i, entry in enumerate(entries):
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
                self._bad("categories", f"categories[{i}]", problem)
                continue
            categories[entry["id"]] = entry["name"]
        return categories

    @staticmethod
    def _image_problem(entry: Any, images: dict[int, tuple[str, dict]]) -> str | None:
        if not isinstance(entry, dict):
            return "entry is not an object"
        if problem := _missing(entry, ("id", "file_name", "width", "height")):
            return problem
        if not _is_int(entry["id"]):
            return f"id must be an integer, got {entry['id']!r}"
        if entry["id"] in images:
            return f"duplicate image id {entry['id']}"
        if not isinstance(entry["file_name"], str) or not entry["file_name"]:
            return f"file_name must be a non-empty string, got {entry['file_name']!r}"
        for key in ("width", "height"):
            if not _is_int(entry[key]) or entry[key] <= 0:
                return f"{key} must be a positive integer, got {entry[key]!r}"
        return None

    def _skip_image(self, where: str, entry: Any, problem: str) -> None:
        self._bad("images", where, problem)
        if isinstance(entry, dict) and _is_int(entry.get("id")):
            self._skipped_image_ids.add(entry["id"])

    def _parse_images(self, entries: list) -> dict[int, tuple[str, dict]]:
        """Well-formed image entries by id, each with its name for messages (`where`)."""
        images: dict[int, tuple[str, dict]] = {}
        for i, entry in enumerate(entries):
            where = _where("images", i, entry)
            if problem := self._image_problem(entry, images):
                if isinstance(entry, dict) and _is_int(entry.get("id")) and entry["id"] in images:  # first one stays
                    self._bad("images", where, problem)
                else:
                    self._skip_image(where, entry, problem)
                continue
            images[entry["id"]] = (where, entry)
        return images

    def _check_image_files(self, images: dict[int, tuple[str, dict]]) -> None:
        """Read every image header (in parallel): the file exists, opens, has a supported mode and the entry's size."""
        ids = list(images)
        paths = [self.images_dir / images[i][1]["file_name"] for i in ids]
        with closing(read_headers(paths, desc=f"checking images of {self.path.name}")) as headers:
            for image_id, path, header in zip(ids, paths, headers):
                where, entry = images[image_id]
                if isinstance(header, ImageError):
                    problem = str(header)
                elif header[:2] != (entry["width"], entry["height"]):
                    problem = f"{path}: image is {header[0]}x{header[1]}, not {entry['width']}x{entry['height']}"
                else:
                    continue
                self._skip_image(where, entry, problem)
                del images[image_id]

    def _annotation_problem(self, entry: Any, images: dict, seen: set[int]) -> str | None:
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
        if not _is_int(entry["image_id"]) or entry["image_id"] not in images:
            return f"unknown image id {entry['image_id']!r}"
        if not _is_int(entry["category_id"]) or entry["category_id"] not in self.label_of:
            return f"unknown category id {entry['category_id']!r}"
        if entry.get("iscrowd", 0) not in (0, 1):
            return f"iscrowd must be 0 or 1, got {entry['iscrowd']!r}"
        if "area" in entry and (not _is_number(entry["area"]) or entry["area"] < 0):
            return f"area must be a non-negative number, got {entry['area']!r}"
        bbox = entry["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            return f"bbox must be [x, y, width, height] numbers, got {bbox!r}"
        if bbox[2] < 0 or bbox[3] < 0:
            return f"bbox {bbox} has a negative width or height"
        return None

    def _parse_annotations(self, entries: list, images: dict, anns: dict[int, list[tuple]]) -> None:
        seen: set[int] = set()
        for i, entry in enumerate(entries):
            if problem := self._annotation_problem(entry, images, seen):
                self._bad("annotations", _where("annotations", i, entry), problem)
                continue
            seen.add(entry["id"])
            bbox = [float(v) for v in entry["bbox"]]
            crowd = int(entry.get("iscrowd", 0))
            area = float(entry.get("area", bbox[2] * bbox[3]))
            anns[entry["image_id"]].append((entry["id"], bbox, entry["category_id"], crowd, area))

    def _record(self, entry: dict, anns: list[tuple]) -> ImageRecord:
        """Freeze one image's annotations into arrays, deriving the training boxes (and counting what changed)."""
        boxes, labels = [], []
        for _, bbox, category_id, crowd, _ in anns:
            if crowd:
                continue
            box, change = training_box(bbox, entry["width"], entry["height"])
            if change != "kept":
                self.box_changes[change] += 1
            if box is not None:
                boxes.append(box)
                labels.append(self.label_of[category_id])
        columns = list(zip(*anns)) if anns else [(), (), (), (), ()]
        return ImageRecord(
            id=entry["id"], file_name=entry["file_name"], width=entry["width"], height=entry["height"],
            ann_ids=np.array(columns[0], dtype=np.int64), bboxes=np.array(columns[1], dtype=np.float64).reshape(-1, 4),
            category_ids=np.array(columns[2], dtype=np.int64), iscrowd=np.array(columns[3], dtype=np.int64),
            areas=np.array(columns[4], dtype=np.float64),
            boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4), labels=np.array(labels, dtype=np.int64),
        )
