"""COCO dataset loading/validation, the augmentation recipe (box/pixel consistency) and batching."""

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_convert

from ddetr.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CocoDetection,
    DatasetError,
    collate,
    resized_size,
    train_transforms,
    val_transforms,
)
from ddetr.data.transforms import RandomSizeCrop, ToModelFormat, make_target_boxes


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Image-sized elementwise ops are much faster single-threaded on this shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- helpers

def write_dataset(root: Path, images: list[dict], annotations: list[dict], categories: list[dict],
                  sizes: dict[str, tuple[int, int]] | None = None) -> tuple[Path, Path]:
    """Write a COCO json plus gray PNGs for every image entry (sizes: file_name -> (w, h) override)."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for im in images:
        if isinstance(im, dict) and "file_name" in im:
            w, h = (sizes or {}).get(im["file_name"], (im.get("width", 8), im.get("height", 8)))
            Image.new("RGB", (w, h), (90, 90, 90)).save(img_dir / im["file_name"])
    ann = root / "annotations.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return img_dir, ann


def image(i: int, w: int = 40, h: int = 30) -> dict:
    return {"id": i, "file_name": f"{i}.png", "width": w, "height": h}


def annotation(i: int, image_id: int, cat: int, bbox: list, **extra) -> dict:
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, **extra}


CATS = [{"id": 40, "name": "c40"}, {"id": 7, "name": "c7"}, {"id": 2, "name": "c2"}]


def absolute_boxes(target: dict) -> torch.Tensor:
    """Normalised cxcywh target boxes back to absolute xyxy in the transformed image."""
    h, w = target["size"].tolist()
    return box_convert(target["boxes"] * torch.tensor([w, h, w, h]), "cxcywh", "xyxy")


def denormalise(image: torch.Tensor) -> torch.Tensor:
    """Normalised float image back to 0..255 (H, W, 3)."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((image * std + mean) * 255).permute(1, 2, 0)


# ---------------------------------------------------------------- resize / crop / flip maths

@pytest.mark.parametrize(("hw", "size", "max_size", "expected"), [
    ((480, 640), 800, 1333, (800, 1066)),  # 640 * 800 / 480 = 1066.67, truncated
    ((640, 480), 800, 1333, (1066, 800)),
    ((100, 1000), 800, 1333, (133, 1330)),  # capped: round(1333 * 100 / 1000) = 133, then 133 * 10
    ((500, 500), 608, 1333, (608, 608)),
    ((800, 1200), 800, 1333, (800, 1200)),  # already the right size
    ((300, 400), 600, None, (600, 800)),
])
def test_resized_size_hand_values(hw, size, max_size, expected):
    assert resized_size(*hw, size, max_size) == expected


def test_val_transform_resizes_image_and_boxes_by_hand():
    img = Image.new("RGB", (640, 480))
    boxes = torch.tensor([[64.0, 48.0, 320.0, 240.0]])
    out, target = val_transforms(800, 1333)(img, {"boxes": make_target_boxes(boxes, 480, 640),
                                                  "labels": torch.tensor([3])})
    assert out.shape == (3, 800, 1066) and target["size"].tolist() == [800, 1066]
    sx, sy = 1066 / 640, 800 / 480
    expected = torch.tensor([[64 * sx, 48 * sy, 320 * sx, 240 * sy]])
    torch.testing.assert_close(absolute_boxes(target), expected, rtol=0, atol=1e-3)
    # normalised cxcywh w.r.t. the transformed size
    torch.testing.assert_close(target["boxes"], torch.tensor([[192 / 640, 144 / 480, 256 / 640, 192 / 480]]),
                               rtol=0, atol=1e-5)


def test_crop_boxes_by_hand_and_degenerate_dropped():
    boxes = make_target_boxes(torch.tensor([[0.0, 0, 30, 30], [50, 50, 70, 60], [100, 5, 120, 8]]), 100, 200)
    cropped = RandomSizeCrop(10, 100).transform(boxes, {"top": 5, "left": 10, "height": 50, "width": 60})
    expected = torch.tensor([[0.0, 0, 20, 25], [40, 45, 60, 50], [60, 0, 60, 3]])  # clamped to the 60x50 crop
    torch.testing.assert_close(cropped.as_subclass(torch.Tensor), expected)
    assert tuple(cropped.canvas_size) == (50, 60)
    _, target = ToModelFormat()(torch.zeros(3, 50, 60), {"boxes": cropped, "labels": torch.tensor([1, 2, 3])})
    assert target["labels"].tolist() == [1, 2] and target["dropped_boxes"] == 1
    torch.testing.assert_close(target["boxes"], torch.tensor([[10 / 60, 12.5 / 50, 20 / 60, 25 / 50],
                                                              [50 / 60, 47.5 / 50, 20 / 60, 5 / 50]]))


def test_crop_params_stay_in_range_and_clip_to_image():
    crop = RandomSizeCrop(20, 50)
    torch.manual_seed(0)
    seen_h = set()
    for _ in range(200):
        p = crop.make_params([torch.zeros(3, 40, 100)])
        assert 20 <= p["height"] <= 40 and 20 <= p["width"] <= 50  # height clipped to the 40-pixel image
        assert 0 <= p["top"] <= 40 - p["height"] and 0 <= p["left"] <= 100 - p["width"]
        seen_h.add(p["height"])
    assert seen_h == set(range(20, 41))
    p = crop.make_params([torch.zeros(3, 12, 15)])  # image smaller than the minimum crop: take it whole
    assert (p["height"], p["width"], p["top"], p["left"]) == (12, 15, 0, 0)


def test_flip_moves_boxes_and_pixels_by_hand():
    # Resizes and crop set to identity so that only the horizontal flip is random.
    torch.manual_seed(1)
    img = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    boxes = torch.tensor([[5.0, 10, 25, 30], [40, 2, 59, 39]])
    flipped = torch.tensor([[35.0, 10, 55, 30], [1, 2, 20, 39]])  # x -> 60 - x
    t = train_transforms(scales=(40,), max_size=1000, crop_scales=(40,), crop_size=(100, 100), crop=True)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    outcomes = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out, target = t(img, {"boxes": make_target_boxes(boxes, 40, 60), "labels": torch.tensor([0, 1])})
        pixels = torch.round((out * std + mean) * 255).to(torch.uint8)
        is_flipped = torch.equal(pixels, img.flip(-1))
        assert is_flipped or torch.equal(pixels, img)
        torch.testing.assert_close(absolute_boxes(target), flipped if is_flipped else boxes, rtol=0, atol=1e-4)
        outcomes.add(is_flipped)
    assert outcomes == {True, False}


def test_crop_branch_can_be_switched_off():
    img = torch.zeros(3, 40, 60, dtype=torch.uint8)
    target = {"boxes": make_target_boxes(torch.tensor([[5.0, 10, 25, 30]]), 40, 60), "labels": torch.tensor([0])}
    for crop, expected_sizes in ((False, {(40, 60)}), (True, None)):
        t = train_transforms(scales=(40,), max_size=1000, crop_scales=(40,), crop_size=(10, 20), crop=crop)
        sizes = set()
        for seed in range(20):
            torch.manual_seed(seed)
            sizes.add(tuple(t(img, target)[0].shape[1:]))
        if expected_sizes:
            assert sizes == expected_sizes
        else:  # crops of 10..20 px resized back to a 40-pixel shorter side
            assert (40, 60) in sizes and len(sizes) > 3


# ---------------------------------------------------------------- boxes stay on their pixels

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 255, 255), (0, 255, 255)]
RECTS = [(10, 10, 50, 40), (70, 15, 150, 35), (20, 60, 45, 110), (60, 55, 100, 100), (115, 50, 150, 112),
         (130, 2, 140, 11)]


@pytest.fixture(scope="module")
def rect_dataset(tmp_path_factory):
    """A 160x120 black PNG with solid rectangles of distinct colours; category ids 2, 4, 8, ... (label = index)."""
    root = tmp_path_factory.mktemp("rects")
    pixels = np.zeros((120, 160, 3), dtype=np.uint8)
    anns = []
    for k, ((x1, y1, x2, y2), colour) in enumerate(zip(RECTS, COLOURS)):
        pixels[y1:y2, x1:x2] = colour
        anns.append(annotation(k + 1, 1, 2 ** (k + 1), [x1, y1, x2 - x1, y2 - y1]))
    (root / "images").mkdir()
    Image.fromarray(pixels).save(root / "images" / "1.png")
    cats = [{"id": 2 ** (k + 1), "name": f"colour{k}"} for k in range(len(COLOURS))]
    (root / "a.json").write_text(json.dumps({"images": [image(1, 160, 120)], "annotations": anns,
                                             "categories": cats}))
    return root


def check_boxes_match_pixels(image: torch.Tensor, target: dict, margin: int = 2) -> None:
    """Inside each box (shrunk by margin) is its colour, just outside is not; every visible colour has its box."""
    rgb = denormalise(image)
    h, w = rgb.shape[:2]
    boxes = absolute_boxes(target)
    for box, label in zip(boxes.tolist(), target["labels"].tolist()):
        colour = torch.tensor(COLOURS[label], dtype=torch.float32)
        x1, y1, x2, y2 = box
        ix1, iy1, ix2, iy2 = math.ceil(x1) + margin, math.ceil(y1) + margin, int(x2) - margin, int(y2) - margin
        if ix2 <= ix1 or iy2 <= iy1:
            continue  # too small to have an interior after interpolation
        inside = rgb[iy1:iy2, ix1:ix2]
        assert (inside - colour).abs().max() < 8, f"box {box} label {label}: interior is not its colour"
        rows, cols = slice(iy1, iy2), slice(ix1, ix2)
        outside = []
        if x1 > margin + 1:
            outside.append(rgb[rows, int(x1) - margin - 1])
        if x2 < w - margin - 1:
            outside.append(rgb[rows, math.ceil(x2) + margin])
        if y1 > margin + 1:
            outside.append(rgb[int(y1) - margin - 1, cols])
        if y2 < h - margin - 1:
            outside.append(rgb[math.ceil(y2) + margin, cols])
        for strip in outside:
            assert ((strip - colour).abs().max(dim=-1).values > 60).all(), f"box {box}: colour leaks outside"
    ys, xs = torch.arange(h, dtype=torch.float32)[:, None], torch.arange(w, dtype=torch.float32)[None, :]
    for label, colour in enumerate(COLOURS):
        solid = ((rgb - torch.tensor(colour, dtype=torch.float32)).abs().max(dim=-1).values < 8).float()
        core = torch.nn.functional.max_pool2d(-solid[None, None], 3, 1, 1)[0, 0] == -1  # 3x3 erosion
        covered = torch.zeros(h, w, dtype=torch.bool)
        for x1, y1, x2, y2 in boxes[target["labels"] == label].tolist():  # pixel [x, x+1) within the box +- 1
            covered |= (xs >= x1 - 1) & (xs + 1 <= x2 + 1) & (ys >= y1 - 1) & (ys + 1 <= y2 + 1)
        assert not (core & ~covered).any(), f"visible colour {label} outside its boxes"


def test_train_and_val_transforms_keep_boxes_on_their_pixels(rect_dataset):
    train = train_transforms(scales=range(64, 129, 16), max_size=200, crop_scales=(96, 112), crop_size=(80, 96),
                             crop=True)
    ds = CocoDetection(rect_dataset / "images", rect_dataset / "a.json", train)
    assert ds.category_ids == [2, 4, 8, 16, 32, 64]
    sizes = set()
    for seed in range(40):
        torch.manual_seed(seed)
        img, target = ds[0]
        assert img.shape[1:] == tuple(target["size"].tolist())
        assert target["boxes"].shape[0] + target["dropped_boxes"] == len(RECTS)
        sizes.add(tuple(img.shape[1:]))
        check_boxes_match_pixels(img, target)
    assert len(sizes) > 5  # several scales and crops were exercised
    ds.transforms = val_transforms(96, 200)
    img, target = ds[0]
    assert img.shape[1:] == (96, 128) and target["orig_size"].tolist() == [120, 160]
    assert target["labels"].tolist() == list(range(len(RECTS))) and target["dropped_boxes"] == 0
    check_boxes_match_pixels(img, target)


# ---------------------------------------------------------------- dataset contents

def test_category_mapping_crowd_and_empty_images(tmp_path):
    images = [image(10), image(3), image(99)]
    anns = [annotation(1, 10, 40, [1, 2, 10, 5]), annotation(2, 10, 2, [0, 0, 40, 30]),
            annotation(3, 3, 7, [5, 5, 4, 4], iscrowd=1), annotation(4, 3, 40, [20, 10, 8, 6], iscrowd=0)]
    ds = CocoDetection(*write_dataset(tmp_path, images, anns, CATS))
    assert ds.category_ids == [2, 7, 40] and ds.class_names == ["c2", "c7", "c40"] and ds.num_classes == 3
    assert len(ds) == 3 and ds.image_ids == [10, 3, 99]
    _, t = ds[0]
    assert t["image_id"] == 10 and t["labels"].tolist() == [2, 0]
    torch.testing.assert_close(absolute_boxes(t), torch.tensor([[1.0, 2, 11, 7], [0, 0, 40, 30]]))
    _, t = ds[1]  # the crowd annotation is kept out of the target
    assert t["labels"].tolist() == [2]
    torch.testing.assert_close(absolute_boxes(t), torch.tensor([[20.0, 10, 28, 16]]))
    img, t = ds[2]  # no annotations: kept, with empty targets
    assert img.shape == (3, 30, 40) and t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)
    gt = ds.to_coco_dict()  # ... but crowd stays in the evaluation ground truth, with defaults filled in
    assert [(a["id"], a["iscrowd"]) for a in gt["annotations"]] == [(1, 0), (2, 0), (3, 1), (4, 0)]
    assert gt["annotations"][0]["area"] == 50.0


def test_box_partly_outside_is_clipped(tmp_path):
    anns = [annotation(1, 1, 2, [-0.8, 20.5, 10, 10.4]),  # sticks out 0.8 px left and 0.9 px at the bottom
            annotation(2, 1, 2, [25, -12, 30, 20])]  # far out right and top: clipped too, as the official code
    ds = CocoDetection(*write_dataset(tmp_path, [image(1)], anns, CATS))
    _, t = ds[0]
    torch.testing.assert_close(absolute_boxes(t), torch.tensor([[0.0, 20.5, 9.2, 30], [25, 0, 40, 8]]))
    assert ds.box_changes == {"clipped": 2}


GOOD_IMAGES = [image(1), image(2)]
GOOD_ANNS = [annotation(1, 1, 2, [1, 1, 5, 5]), annotation(2, 2, 7, [2, 2, 5, 5])]
BAD_CASES = {
    # name: (images, annotations, categories, message fragment, kind counted with skip_bad)
    "missing image key": (GOOD_IMAGES + [{"id": 3, "file_name": "3.png", "width": 40}], GOOD_ANNS, CATS,
                          "images[2] (id=3): missing key(s) 'height'", "images"),
    "missing image file": (GOOD_IMAGES + [image(3) | {"file_name": "nope.png"}], GOOD_ANNS, CATS,
                           "nope.png: image file not found", "images"),
    "duplicate image id": (GOOD_IMAGES + [image(1) | {"file_name": "x.png"}], GOOD_ANNS, CATS,
                           "images[2] (id=1): duplicate image id 1", "images"),
    "bbox not 4 numbers": (GOOD_IMAGES, GOOD_ANNS + [annotation(3, 1, 2, [30, 5, 11.5])], CATS,
                           "annotations[2] (id=3): bbox must be [x, y, width, height] numbers, got [30, 5, 11.5]",
                           "annotations"),
    "negative width": (GOOD_IMAGES, GOOD_ANNS + [annotation(3, 1, 2, [3, 5, -1, 5])], CATS,
                       "annotations[2] (id=3): bbox [3, 5, -1, 5] has a negative width or height", "annotations"),
    "duplicate annotation id": (GOOD_IMAGES, GOOD_ANNS + [annotation(2, 1, 2, [3, 5, 2, 5])], CATS,
                                "annotations[2] (id=2): duplicate annotation id 2", "annotations"),
    "unknown category": (GOOD_IMAGES, GOOD_ANNS + [annotation(3, 1, 5, [3, 5, 2, 5])], CATS,
                         "annotations[2] (id=3): unknown category id 5", "annotations"),
    "unknown image": (GOOD_IMAGES, GOOD_ANNS + [annotation(3, 8, 2, [3, 5, 2, 5])], CATS,
                      "annotations[2] (id=3): unknown image id 8", "annotations"),
    "missing annotation key": (GOOD_IMAGES, GOOD_ANNS + [{"id": 3, "image_id": 1, "category_id": 2}], CATS,
                               "annotations[2] (id=3): missing key(s) 'bbox'", "annotations"),
    "bad category": (GOOD_IMAGES, GOOD_ANNS, CATS + [{"id": "x", "name": "y"}],
                     "categories[3]: id must be an integer", "categories"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_entries_raise_one_line_errors_or_are_skipped_and_counted(tmp_path, case, caplog):
    images, anns, cats, fragment, kind = BAD_CASES[case]
    img_dir, ann_file = write_dataset(tmp_path, [i for i in images if i["file_name"] != "nope.png"], anns, cats)
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    with pytest.raises(DatasetError) as err:
        CocoDetection(img_dir, ann_file)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{ann_file}: ") and fragment in message
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(img_dir, ann_file, skip_bad=True)
    assert ds.skipped == {kind: 1} and f"skipped 1 {kind}" in ds.skip_summary()
    assert any(fragment in r.getMessage() for r in caplog.records)
    assert ds.image_ids == [1, 2] and [len(ds[i][1]["labels"]) for i in range(2)] == [1, 1]


def test_annotations_of_a_skipped_image_are_counted_too(tmp_path, caplog):
    images = GOOD_IMAGES + [image(3) | {"width": 0}]
    anns = GOOD_ANNS + [annotation(3, 3, 2, [1, 1, 2, 2]), annotation(4, 3, 7, [1, 1, 2, 2])]
    img_dir, ann_file = write_dataset(tmp_path, images, anns, CATS, sizes={"3.png": (40, 30)})
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(img_dir, ann_file, skip_bad=True)
    assert ds.skipped == {"images": 1, "annotations": 2} and ds.image_ids == [1, 2]
    assert ds.skip_summary() == "skipped 2 annotations, 1 images"
    assert sum("belongs to skipped image id 3" in r.getMessage() for r in caplog.records) == 2


def test_malformed_json_and_missing_top_level_key(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{"images": [], "annotations": [}')
    with pytest.raises(DatasetError, match=r"a\.json: invalid JSON at line 1 column 32 \(char 31\)"):
        CocoDetection(tmp_path, path, skip_bad=True)  # a broken file cannot be skipped
    path.write_text('{"images": [], "annotations": []}')
    with pytest.raises(DatasetError, match=r"a\.json: missing top-level key 'categories'"):
        CocoDetection(tmp_path, path)


@pytest.mark.parametrize("problem", ["corrupt", "wrong size", "huge claimed size"])
def test_bad_image_files_are_caught_up_front(tmp_path, problem, caplog):
    img_dir, ann_file = write_dataset(tmp_path, GOOD_IMAGES, GOOD_ANNS, CATS)
    path = img_dir / "1.png"
    if problem == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        fragment = f"images[0] (id=1): {path}: cannot read image: "
    elif problem == "wrong size":
        Image.new("RGB", (41, 30)).save(path)
        fragment = f"images[0] (id=1): {path}: image is 41x30, not 40x30"
    else:  # the entry claims a size the file does not have (this used to fail only inside training)
        data = json.loads(ann_file.read_text())
        data["images"][0] |= {"width": 100000, "height": 80000}
        ann_file.write_text(json.dumps(data))
        fragment = f"images[0] (id=1): {path}: image is 40x30, not 100000x80000"
    with pytest.raises(DatasetError) as err:
        CocoDetection(img_dir, ann_file)  # before any __getitem__
    assert str(err.value).startswith(f"{ann_file}: ") and fragment in str(err.value)
    assert "\n" not in str(err.value)
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(img_dir, ann_file, skip_bad=True)
    assert ds.image_ids == [2] and ds.skipped == {"images": 1, "annotations": 1}
    assert ds.skip_summary() == "skipped 1 annotations, 1 images"
    assert any(fragment in r.getMessage() for r in caplog.records)
    assert ds[0][1]["image_id"] == 2


# ---------------------------------------------------------------- batching

def test_dataloader_with_collate(rect_dataset):
    ds = CocoDetection(rect_dataset / "images", rect_dataset / "a.json", val_transforms(64, 100))
    loader = torch.utils.data.DataLoader(torch.utils.data.ConcatDataset([ds, ds]), batch_size=2, collate_fn=collate)
    images, masks, targets = next(iter(loader))
    assert images.shape == (2, 3, 64, 85) and not masks.any()
    assert [t["image_id"] for t in targets] == [1, 1] and targets[0]["boxes"].shape == (len(RECTS), 4)

@pytest.mark.parametrize("divisibility", [1, 32])
def test_collate_pads_bottom_right_with_mask(divisibility):
    torch.manual_seed(0)
    batch = [(torch.randn(3, 20, 35), {"id": 0}), (torch.randn(3, 33, 18), {"id": 1})]
    images, masks, targets = collate(batch, size_divisibility=divisibility)
    height, width = (33, 35) if divisibility == 1 else (64, 64)
    assert images.shape == (2, 3, height, width) and masks.shape == (2, height, width) and masks.dtype == torch.bool
    assert [t["id"] for t in targets] == [0, 1]
    for i, (im, _) in enumerate(batch):
        for y in range(height):
            for x in range(width):
                inside = y < im.shape[1] and x < im.shape[2]
                assert masks[i, y, x].item() == (not inside)
                if not inside:
                    assert images[i, :, y, x].abs().sum() == 0
        torch.testing.assert_close(images[i, :, : im.shape[1], : im.shape[2]], im, rtol=0, atol=0)
