"""What a model's outputs mean, stored with every model: label index -> category id and name, and inference size.

Every reader returns the same ``meta`` keys: ``class_names`` and ``category_ids`` (one entry per model label, always
filled), ``val_size`` and ``max_size`` (the shorter/longer side the model is run at). Official and Hugging Face
COCO heads have one logit per COCO category id (label index = category id, 91 logits, names "N/A" in the gaps);
any head without stored ids follows that same convention.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ddetr.engine.config import DataConfig
from ddetr.interop.official import coco_class_names

META_KEYS = ("class_names", "category_ids", "val_size", "max_size")


def label_meta(num_classes: int, class_names: Sequence[str] | None = None, category_ids: Sequence[int] | None = None,
               val_size: int | None = None, max_size: int | None = None, source: str = "checkpoint",
               ) -> dict[str, Any]:
    """The four meta keys, checked: ids default to the label index, names to COCO's (91 classes) or the id, sizes
    to `DataConfig`'s (the official val resize)."""
    ids = list(range(num_classes)) if category_ids is None else [int(i) for i in category_ids]
    if len(ids) != num_classes or len(set(ids)) != len(ids):
        raise ValueError(f"{source}: category ids {ids[:8]}... must be {num_classes} distinct integers, one per "
                         "class logit")
    if class_names is None:
        coco = coco_class_names(num_classes) if ids == list(range(num_classes)) and num_classes == 91 else None
        class_names = coco or [str(i) for i in ids]
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"{source}: {len(names)} class names for {num_classes} class logits")
    return {"class_names": names, "category_ids": ids, "val_size": int(val_size or DataConfig.val_size),
            "max_size": int(max_size or DataConfig.max_size)}


def sidecar_path(checkpoint: str | Path) -> Path:
    """Where the metadata of an official-layout ``X.pth`` is kept: ``X.json`` next to it (its format has no room)."""
    return Path(checkpoint).with_suffix(".json")


def write_sidecar(checkpoint: str | Path, meta: dict[str, Any]) -> Path:
    path = sidecar_path(checkpoint)
    path.write_text(json.dumps({"format": "ddetr-meta", **{k: meta[k] for k in META_KEYS}}, indent=1) + "\n")
    return path


def read_sidecar(checkpoint: str | Path) -> dict[str, Any]:
    """The metadata written by `write_sidecar`, or {} when there is none."""
    path = sidecar_path(checkpoint)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable metadata next to the checkpoint ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != "ddetr-meta":
        return {}  # some other JSON file of the same name: not ours
    return {k: data.get(k) for k in META_KEYS}
