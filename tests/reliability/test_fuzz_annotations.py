"""Property-based fuzzing of annotation files: whatever the JSON holds (structures, types, values), `CocoDetection`
loads it or raises one `DatasetError` whose message is one line naming the file; nothing else escapes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from ddetr.data.coco import CocoDetection, DatasetError

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=6))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                            max_size=3), max_leaves=6)


@st.composite
def damaged(draw, fields: dict) -> dict:
    """An entry of plausible values; a quarter of the time one field is then removed or replaced by anything."""
    entry = {key: draw(strategy) for key, strategy in fields.items()}
    if draw(st.booleans()) and draw(st.booleans()):
        key = draw(st.sampled_from([*fields, "extra"]))
        if draw(st.booleans()):
            entry.pop(key, None)
        else:
            entry[key] = draw(VALUES)
    return entry


@st.composite
def document(draw) -> object:
    """Mostly a COCO file of damaged entries (some ids or files wrong on purpose); a fifth of the time anything."""
    if draw(st.integers(0, 4)) == 0:
        return draw(VALUES)
    files = st.sampled_from([("a.png", 32, 32), ("b.png", 24, 32), ("a.png", 32, 32), ("text.png", 32, 32),
                             ("missing.png", 8, 8), ("b.png", 32, 32)])
    images = []
    for i in range(draw(st.integers(0, 3))):
        name, width, height = draw(files)
        images.append(draw(damaged({"id": st.just(i), "file_name": st.just(name), "width": st.just(width),
                                    "height": st.just(height)})))
    box = st.lists(st.one_of(st.floats(-40, 80), st.integers(-5, 40)), min_size=4, max_size=4)
    annotations = [draw(damaged({"id": st.just(i), "image_id": st.integers(0, 3), "category_id": st.integers(1, 3),
                                 "iscrowd": st.sampled_from([0, 0, 1]), "area": st.floats(0, 900), "bbox": box}))
                   for i in range(draw(st.integers(0, 5)))]
    categories = [draw(damaged({"id": st.just(i + 1), "name": st.text(max_size=5)}))
                  for i in range(draw(st.integers(1, 3)))]
    return draw(damaged({"images": st.just(images), "annotations": st.just(annotations),
                         "categories": st.just(categories)}))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """images/: a.png (32x32), b.png (24x32, so some size claims are wrong) and text.png (not an image)."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "images").mkdir()
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(np.full((32, 24, 3), 60, np.uint8)).save(root / "images" / "b.png")
    (root / "images" / "text.png").write_text("not an image")
    return root


@settings(max_examples=100, deadline=5000, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=document(), skip_bad=st.booleans(), allow_empty=st.booleans())
def test_any_annotation_file_loads_or_fails_in_one_line(folder, document, skip_bad, allow_empty):
    path = folder / "annotations.json"
    path.write_text(json.dumps(document))  # NaN/Infinity as Python's json writes them: read back the same way
    try:
        dataset = CocoDetection(folder / "images", path, skip_bad=skip_bad, allow_empty=allow_empty)
    except DatasetError as exc:
        message = str(exc)
        assert message and "\n" not in message and str(path) in message, message
        event("refused")
        return
    event(f"loaded {len(dataset)} images")
    for index in range(len(dataset)):  # what loaded is usable: finite boxes inside the image, known labels
        boxes, labels = dataset.target_boxes(index)
        record = dataset.to_coco_dict()["images"][index]
        assert all(math.isfinite(v) for v in boxes.flatten().tolist())
        assert bool(((boxes[:, 0] >= 0) & (boxes[:, 2] <= record["width"]) & (boxes[:, 0] < boxes[:, 2])).all())
        assert all(0 <= int(label) < dataset.num_classes for label in labels)
