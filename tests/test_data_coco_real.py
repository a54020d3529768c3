"""COCO as shipped: box rules of the official code, every PIL image mode to RGB, up-front checks, decode failures."""

import json
import logging
import math
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ddetr.data import CocoDetection, DatasetError, collate, open_rgb, to_rgb
from ddetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ddetr.engine.config import DataConfig
from ddetr.engine.data import build_datasets
from ddetr.evaluation.coco_eval import evaluate_coco

CATS = [{"id": 3, "name": "a"}, {"id": 9, "name": "b"}]


def write(root: Path, images: list[dict], annotations: list[dict]) -> tuple[Path, Path]:
    """COCO json + gray PNGs of the entries' sizes under root (root/images, root/annotations.json)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for im in images:
        Image.new("RGB", (im["width"], im["height"]), (90, 90, 90)).save(root / "images" / im["file_name"])
    ann = root / "annotations.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATS}))
    return root / "images", ann


def img(i: int, w: int = 40, h: int = 30) -> dict:
    return {"id": i, "file_name": f"{i}.png", "width": w, "height": h}


def ann(i: int, image_id: int, bbox: list, cat: int = 3, crowd: int = 0) -> dict:
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": crowd,
            "area": float(bbox[2] * bbox[3])}


def pixels(image: torch.Tensor) -> np.ndarray:
    """Normalised model input back to 0..255 uint8 (H, W, 3)."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return torch.round((image * std + mean) * 255).permute(1, 2, 0).to(torch.uint8).numpy()


def xyxy(target: dict) -> torch.Tensor:
    h, w = target["size"].tolist()
    cx, cy, bw, bh = (target["boxes"] * torch.tensor([w, h, w, h])).unbind(-1)
    return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1)


# ---------------------------------------------------------------- box rules

ANNS = [
    ann(1, 1, [1, 2, 3, 4]),  # inside: kept as is
    ann(2, 1, [5, 5, 10, 0]),  # zero height (COCO train2017 has two): dropped
    ann(3, 1, [5, 5, 0, 3], cat=9),  # zero width: dropped
    ann(4, 1, [-5, 25, 10, 10], cat=9),  # partly outside left and bottom: clipped to [0, 25, 5, 30]
    ann(5, 1, [45, 5, 10, 10]),  # entirely right of the 40-pixel image: dropped
    ann(6, 1, [-20, -20, 10, 10]),  # entirely above-left: dropped
    ann(7, 1, [40, 5, 3, 3]),  # starts on the right edge: nothing left after clipping, dropped
    ann(8, 1, [30, -4, 50, 50], crowd=1),  # crowd: not a target, not counted, kept for evaluation
    ann(9, 2, [3, 3, 0, 7]),  # image 2's only box is degenerate: the image stays, without targets
]


def test_boxes_dropped_clipped_counted_and_summarised(tmp_path, caplog):
    images = [img(1), img(2), img(3)]  # image 3 has no annotations at all
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(*write(tmp_path, images, ANNS))
    assert ds.image_ids == [1, 2, 3] and ds.skipped == {}
    assert ds.box_changes == {"zero": 3, "outside": 3, "clipped": 1}
    summary = (f"{tmp_path / 'annotations.json'}: dropped 3 zero-size boxes, dropped 3 boxes entirely outside their "
               "image, clipped 1 box to their image")
    assert [r.getMessage() for r in caplog.records] == [summary]
    _, t = ds[0]
    assert t["labels"].tolist() == [0, 1]  # category 3 -> label 0, 9 -> 1
    torch.testing.assert_close(xyxy(t), torch.tensor([[1.0, 2, 4, 6], [0, 25, 5, 30]]))
    for index in (1, 2):
        image, t = ds[index]
        assert image.shape == (3, 30, 40) and t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)


def test_evaluation_ground_truth_is_the_file_as_pycocotools_reads_it(tmp_path):
    img_dir, ann_file = write(tmp_path, [img(1), img(2)], ANNS)
    ds = CocoDetection(img_dir, ann_file)
    gt = ds.to_coco_dict()
    original = json.loads(ann_file.read_text())
    assert gt["annotations"] == original["annotations"] and gt["images"] == original["images"]
    detections = [{"image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 0.9},
                  {"image_id": 1, "category_id": 9, "bbox": [0, 25, 5, 5], "score": 0.8},
                  {"image_id": 1, "category_id": 3, "bbox": [30, 0, 10, 26], "score": 0.7},
                  {"image_id": 2, "category_id": 3, "bbox": [3, 3, 1, 7], "score": 0.6}]
    ours, theirs = evaluate_coco(gt, detections), evaluate_coco(ann_file, detections)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name] == theirs[name] or (math.isnan(ours[name]) and math.isnan(theirs[name])), name


@pytest.mark.parametrize(("bbox", "fragment"), [
    ([1, 2, -3, 4], "bbox [1, 2, -3, 4] has a negative width or height"),
    ([1, 2, 3, float("nan")], "bbox must be [x, y, width, height] numbers, got [1, 2, 3, nan]"),
    ([1, 2, 3, "4"], "bbox must be [x, y, width, height] numbers, got [1, 2, 3, '4']"),
    ("1 2 3 4", "bbox must be [x, y, width, height] numbers, got '1 2 3 4'"),
])
def test_malformed_boxes_are_still_errors(tmp_path, bbox, fragment):
    img_dir, ann_file = write(tmp_path, [img(1)], [ann(1, 1, [1, 1, 2, 2]), ann(2, 1, [1, 1, 2, 2])])
    data = json.loads(ann_file.read_text())
    data["annotations"][1]["bbox"] = bbox
    ann_file.write_text(json.dumps(data))  # NaN is written as JSON's NaN
    with pytest.raises(DatasetError) as err:
        CocoDetection(img_dir, ann_file)
    assert str(err.value) == f"{ann_file}: annotations[1] (id=2): {fragment}"
    ds = CocoDetection(img_dir, ann_file, skip_bad=True)
    assert ds.skipped == {"annotations": 1} and len(ds.to_coco_dict()["annotations"]) == 1


# ---------------------------------------------------------------- empty datasets

def test_empty_annotation_set_is_an_error_unless_allowed(tmp_path):
    img_dir, ann_file = write(tmp_path, [img(1), img(2)], [])
    with pytest.raises(DatasetError, match=r"annotations\.json: no annotations: 2 images but no boxes to train on"):
        CocoDetection(img_dir, ann_file)
    assert len(CocoDetection(img_dir, ann_file, allow_empty=True)) == 2
    ann_file.write_text(json.dumps({"images": [img(1)], "annotations": [ann(1, 1, [1, 1, 4, 4], crowd=1)],
                                    "categories": CATS}))
    with pytest.raises(DatasetError, match="no boxes to train on"):  # crowd boxes are not trained on
        CocoDetection(img_dir, ann_file)
    ann_file.write_text(json.dumps({"images": [], "annotations": [], "categories": CATS}))
    with pytest.raises(DatasetError, match=r"annotations\.json: no images; pass allow_empty=True"):
        CocoDetection(img_dir, ann_file)
    assert len(CocoDetection(img_dir, ann_file, allow_empty=True)) == 0


def test_build_datasets_allows_validation_without_boxes(tmp_path):
    write(tmp_path / "train", [img(1)], [])
    write(tmp_path / "val", [img(1)], [])
    with pytest.raises(DatasetError, match="no boxes to train on"):
        build_datasets(DataConfig(train=str(tmp_path / "train"), val=str(tmp_path / "val")))
    train, val = build_datasets(DataConfig(train=str(tmp_path / "train"), val=str(tmp_path / "val"), allow_empty=True))
    assert len(train) == 1 and len(val) == 1
    _, val = build_datasets(DataConfig(val=str(tmp_path / "val")))
    assert len(val) == 1 and val.to_coco_dict()["annotations"] == []


# ---------------------------------------------------------------- image modes

def gradient16() -> np.ndarray:
    """uint16 values covering 0..65535, including the rounding edges of v / 257."""
    edge = np.array([0, 128, 129, 257, 385, 386, 65278, 65406, 65407, 65535], dtype=np.uint16)
    ramp = np.linspace(0, 65535, 30 * 40 - edge.size).astype(np.uint16)
    return np.concatenate([edge, ramp]).reshape(30, 40)


def gray3(values: np.ndarray) -> np.ndarray:
    return np.repeat(values.astype(np.uint8)[:, :, None], 3, axis=2)


def make_file(kind: str, folder: Path) -> tuple[Path, np.ndarray]:
    """An image file of the given kind and its expected RGB, computed independently of the code under test."""
    rng = np.random.default_rng(0)
    path = folder / f"{kind}.{'jpg' if kind == 'cmyk' else 'tif' if kind in ('i16b', 'i32', 'float') else 'png'}"
    if kind == "png16":  # Pillow opens 16-bit grayscale PNG as I;16
        a = gradient16()
        Image.fromarray(a).save(path)
        return path, gray3(np.round(a / 257))
    if kind == "i16b":  # big-endian 16-bit TIFF
        a = gradient16()
        Image.frombytes("I;16B", (40, 30), a.astype(">u2").tobytes()).save(path)
        return path, gray3(np.round(a / 257))
    if kind == "i32":  # 32-bit integer TIFF (mode I): read as 16-bit values, clipped
        a = gradient16().astype(np.int32)
        a[0, :3] = [-5, 70000, 2**31 - 1]
        Image.fromarray(a).save(path)
        return path, gray3(np.round(np.clip(a, 0, 65535) / 257))
    if kind == "float":  # float TIFF with values in [0, 1]
        a = np.linspace(0, 1, 1200, dtype=np.float32).reshape(30, 40)
        Image.fromarray(a).save(path)
        return path, gray3(np.round(a.astype(np.float64) * 255))
    if kind == "palette":  # with a transparent index: colours as stored, alpha dropped
        idx = rng.integers(0, 4, (30, 40), dtype=np.uint8)
        palette = np.array([[255, 0, 0], [0, 128, 0], [10, 20, 30], [250, 250, 5]], dtype=np.uint8)
        p = Image.fromarray(idx, "P")
        p.putpalette(palette.flatten().tolist())
        p.save(path, transparency=bytes([255, 0, 255, 128]))
        return path, palette[idx]
    if kind == "gray":
        a = rng.integers(0, 256, (30, 40), dtype=np.uint8)
        Image.fromarray(a, "L").save(path)
        return path, gray3(a)
    if kind == "gray_alpha":
        a = rng.integers(0, 256, (30, 40, 2), dtype=np.uint8)
        Image.fromarray(a, "LA").save(path)
        return path, gray3(a[..., 0])
    if kind == "rgba":
        a = rng.integers(0, 256, (30, 40, 4), dtype=np.uint8)
        Image.fromarray(a, "RGBA").save(path)
        return path, a[..., :3]
    if kind == "bilevel":
        a = rng.integers(0, 2, (30, 40)).astype(bool)
        Image.fromarray(a).save(path)
        return path, gray3(a * 255)
    assert kind == "cmyk"  # JPEG is lossy: the reference starts from the decoded CMYK values
    Image.fromarray(rng.integers(0, 256, (30, 40, 4), dtype=np.uint8), "CMYK").save(path, quality=95)
    cmyk = np.asarray(Image.open(path)).astype(np.float64)
    return path, np.round((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255).astype(np.uint8)


KINDS = ["png16", "i16b", "i32", "float", "palette", "gray", "gray_alpha", "rgba", "bilevel", "cmyk"]


@pytest.mark.parametrize("kind", KINDS)
def test_open_rgb_matches_an_independent_reference(tmp_path, kind):
    path, expected = make_file(kind, tmp_path)
    image = open_rgb(path)
    assert image.mode == "RGB" and image.size == (40, 30)
    got = np.asarray(image).astype(int)
    assert np.abs(got - expected.astype(int)).max() <= (1 if kind == "cmyk" else 0)


def test_float_images_in_0_255_and_unsupported_modes():
    a = np.array([[0.0, 100.4, 254.6, 300.0, np.nan]], dtype=np.float32)
    assert np.asarray(to_rgb(Image.fromarray(a)))[0, :, 0].tolist() == [0, 100, 255, 255, 0]
    with pytest.raises(ValueError, match="unsupported image mode 'La'"):
        to_rgb(Image.new("La", (2, 2)))


def test_dataset_reads_16_bit_images_scaled_and_exif_not_applied(tmp_path):
    path, expected = make_file("png16", tmp_path)
    rotated = Image.new("RGB", (40, 30), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° to display": the stored pixels are what COCO boxes refer to
    rotated.save(tmp_path / "rot.jpg", exif=exif)
    images = [{"id": 1, "file_name": path.name, "width": 40, "height": 30},
              {"id": 2, "file_name": "rot.jpg", "width": 40, "height": 30}]
    (tmp_path / "a.json").write_text(json.dumps({"images": images, "annotations": [ann(1, 1, [1, 1, 5, 5])],
                                                 "categories": CATS}))
    ds = CocoDetection(tmp_path, tmp_path / "a.json")
    assert np.array_equal(pixels(ds[0][0]), expected)  # not white, as clipping at 255 made it
    assert ds[1][0].shape == (3, 30, 40)


# ---------------------------------------------------------------- up-front checks and decode failures

def test_first_bad_image_in_file_order_is_reported(tmp_path):
    images = [img(i) for i in range(1, 21)]
    img_dir, ann_file = write(tmp_path, images, [ann(1, 1, [1, 1, 4, 4])])
    for i in (13, 6):
        Image.new("RGB", (39, 30)).save(img_dir / f"{i}.png")
    with pytest.raises(DatasetError, match=r"images\[5\] \(id=6\): .*6\.png: image is 39x30, not 40x30$"):
        CocoDetection(img_dir, ann_file)
    ds = CocoDetection(img_dir, ann_file, skip_bad=True)
    assert ds.skipped == {"images": 2} and 6 not in ds.image_ids and 13 not in ds.image_ids and len(ds) == 18


@pytest.fixture
def truncated(tmp_path):
    """Three images; the second is a JPEG whose header is fine but whose data is cut off."""
    images = [img(1), {"id": 2, "file_name": "2.jpg", "width": 40, "height": 30}, img(3)]
    img_dir, ann_file = write(tmp_path, [images[0], images[2]], [])
    noise = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(img_dir / "2.jpg", quality=95)
    data = (img_dir / "2.jpg").read_bytes()
    (img_dir / "2.jpg").write_bytes(data[: len(data) // 2])
    ann_file.write_text(json.dumps({"images": images, "annotations": [ann(1, 1, [1, 1, 4, 4])],
                                    "categories": CATS}))
    return img_dir, ann_file


def test_truncated_image_raises_one_line_at_decode(truncated):
    img_dir, ann_file = truncated
    ds = CocoDetection(img_dir, ann_file)  # the header check passes
    with pytest.raises(DatasetError) as err:
        ds[1]
    message = str(err.value)
    assert message.startswith(f"{img_dir / '2.jpg'}: cannot decode image: image file is truncated")
    assert message.endswith("(image id 2)") and "\n" not in message
    loader = DataLoader(ds, batch_size=1, num_workers=1, collate_fn=collate)
    with pytest.raises(DatasetError) as err:  # re-raised by torch with the worker traceback: still one line
        list(loader)
    for worker in multiprocessing.active_children():  # else torch's shutdown waits 5 s for a worker after an error
        worker.terminate()
    assert str(err.value) == message and "Original Traceback" in err.value.worker_traceback


@pytest.mark.parametrize("workers", [0, 1])
def test_truncated_image_skipped_and_counted_across_workers(truncated, workers):
    ds = CocoDetection(*truncated, skip_bad=True)
    assert ds.skipped == {} and ds.skip_summary() == ""
    batches = list(DataLoader(ds, batch_size=1, num_workers=workers, collate_fn=collate))
    assert [b[2][0]["image_id"] for b in batches] == [1, 3, 3]  # the next image stands in for image 2
    for _ in range(2):  # a second pass (epoch) counts the same image once
        list(DataLoader(ds, batch_size=3, num_workers=workers, collate_fn=collate))
    assert ds.skipped == {"undecodable images": 1}
    assert ds.skip_summary() == "skipped 1 undecodable images"
