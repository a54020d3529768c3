"""The built-in synthetic dataset: determinism, valid COCO annotations, boxes tight on the drawn shapes."""

import argparse
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from ddetr.cli.data import add_args as add_synth_args
from ddetr.cli.data import run as run_synth
from ddetr.data import CocoDetection
from ddetr.data.synthetic import CLASSES, generate
from ddetr.evaluation import evaluate_coco, to_coco_results


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A small PNG (lossless) synthetic dataset."""
    out = tmp_path_factory.mktemp("synth")
    generate(out, num_train=24, num_val=6, image_size=96, seed=3, image_format="png")
    return out


def files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        generate(tmp_path / name, num_train=5, num_val=2, image_size=64, seed=seed)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert len(a) == 5 + 2 + 2 and a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)


def test_annotations_valid_for_pycocotools_and_our_loader(synth):
    for split, n in (("train", 24), ("val", 6)):
        coco = COCO(str(synth / split / "annotations.json"))
        assert len(coco.getImgIds()) == n
        assert sorted(coco.getCatIds()) == [1, 3, 5, 7, 9, 11]  # non-contiguous on purpose
        per_image = Counter(a["image_id"] for a in coco.dataset["annotations"])
        assert all(2 <= per_image[i] <= 8 for i in coco.getImgIds())
        for ann in coco.dataset["annotations"]:
            x, y, w, h = ann["bbox"]
            assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 96 and y + h <= 96
            assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0
        ds = CocoDetection(synth / split / "images", synth / split / "annotations.json")
        assert ds.class_names == [name for _, name, _ in CLASSES] and len(ds) == n
        assert sum(len(ds[i][1]["labels"]) for i in range(n)) == len(coco.dataset["annotations"])


def test_targets_round_trip_to_perfect_coco_ap(synth):
    # Dataset targets (normalised cxcywh) -> absolute xyxy -> COCO results: must reproduce the ground truth.
    ds = CocoDetection(synth / "val" / "images", synth / "val" / "annotations.json")
    detections = []
    for i in range(len(ds)):
        _, t = ds[i]
        h, w = t["orig_size"].tolist()
        cx, cy, bw, bh = (t["boxes"] * torch.tensor([w, h, w, h])).unbind(-1)
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1)
        detections.append({"boxes": boxes, "scores": torch.ones(len(boxes)), "labels": t["labels"]})
    results = to_coco_results(detections, ds.image_ids, ds.category_ids)
    metrics = evaluate_coco(ds.to_coco_dict(), results)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP75"] == pytest.approx(1.0)
    wrong = to_coco_results(detections, ds.image_ids, ds.category_ids[::-1])  # a broken label mapping
    assert evaluate_coco(ds.to_coco_dict(), wrong)["AP"] < 0.5


def test_boxes_are_tight_on_pixels_of_the_class_colour(synth):
    data = json.loads((synth / "train" / "annotations.json").read_text())
    colours = {cid: np.array(colour) for cid, _, colour in CLASSES}
    names = {img["id"]: img["file_name"] for img in data["images"]}
    areas = []
    for ann in data["annotations"]:
        pixels = np.asarray(Image.open(synth / "train" / "images" / names[ann["image_id"]]), dtype=np.int16)
        x, y, w, h = ann["bbox"]
        # colour jitter (20) + noise (14) stays within 40 per channel; clutter is never that saturated
        is_class = (np.abs(pixels - colours[ann["category_id"]]).max(axis=-1) <= 40)
        inside = is_class[y:y + h, x:x + w]
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        assert inside.sum() >= ann["area"]  # the object's visible pixels are all in its box
        areas.append(ann["area"])
    assert min(areas) < 16 ** 2 and max(areas) > 32 ** 2  # small and larger objects


def test_occlusion_and_touching_objects_occur(tmp_path):
    generate(tmp_path, num_train=40, num_val=0, image_size=128, seed=0, image_format="png")
    data = json.loads((tmp_path / "train" / "annotations.json").read_text())
    by_image: dict[int, list] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["bbox"])
    overlapping = 0
    for boxes in by_image.values():
        for i in range(len(boxes)):
            for j in range(i):
                (x1, y1, w1, h1), (x2, y2, w2, h2) = boxes[i], boxes[j]
                overlapping += min(x1 + w1, x2 + w2) >= max(x1, x2) and min(y1 + h1, y2 + h2) >= max(y1, y2)
    assert overlapping >= 10


def test_cli_hook(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_synth_args(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--num-train", "3", "--num-val", "1", "--image-size", "64",
                              "--seed", "2", "--min-objects", "1", "--max-objects", "2"])
    run_synth(args)
    assert len(list((tmp_path / "train" / "images").iterdir())) == 3
    assert len(list((tmp_path / "val" / "images").iterdir())) == 1
    counts = Counter(a["image_id"] for a in json.loads((tmp_path / "train" / "annotations.json").read_text())
                     ["annotations"])
    assert sorted(counts) == [1, 2, 3] and all(1 <= n <= 2 for n in counts.values())
    assert "3 images" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs", [{"image_size": 16}, {"min_objects": 5, "max_objects": 2}, {"num_train": -1}])
def test_bad_arguments_rejected(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate(tmp_path, **kwargs)
