"""Built-in synthetic COCO-format dataset: coloured shapes on cluttered, noisy backgrounds, for demos and tests."""

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# (COCO category id, name, RGB colour). Ids are deliberately non-contiguous to exercise the label mapping.
CLASSES = (
    (1, "circle", (220, 45, 45)),
    (3, "square", (40, 185, 60)),
    (5, "triangle", (45, 85, 230)),
    (7, "plus", (240, 205, 30)),
    (9, "ring", (205, 50, 215)),
    (11, "star", (30, 205, 215)),
)
MIN_VISIBLE = 0.5  # an occluded object keeps at least this fraction of its pixels
MIN_PIXELS = 12  # smallest visible object, in pixels


def _rotated(points: list[tuple[float, float]], cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    """Rotate shape-local points by `angle` radians and move them to (cx, cy)."""
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, cx: float, cy: float, r: float, angle: float, fill) -> None:
    """Draw one shape of circumradius `r`; called identically on the picture and on the instance mask."""
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif name == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, round(0.35 * r)))
    elif name in ("square", "triangle"):
        draw.regular_polygon((cx, cy, r), 4 if name == "square" else 3, rotation=math.degrees(angle), fill=fill)
    elif name == "plus":
        a = 0.32 * r
        quarter = [(a, r), (a, a), (r, a)]  # one arm's outline; the other three are this rotated by 90 degrees
        arm = [(x * sx - y * sy, x * sy + y * sx) for sx, sy in ((1, 0), (0, -1), (-1, 0), (0, 1)) for x, y in quarter]
        draw.polygon(_rotated(arm, cx, cy, angle), fill=fill)
    elif name == "star":
        pts = [
            ((r if k % 2 == 0 else 0.45 * r) * math.sin(k * math.pi / 5),
             -(r if k % 2 == 0 else 0.45 * r) * math.cos(k * math.pi / 5))
            for k in range(10)
        ]
        draw.polygon(_rotated(pts, cx, cy, angle), fill=fill)
    else:
        raise ValueError(f"unknown shape {name!r}")


def _muted_colour(rng: np.random.Generator, around: float | None = None) -> tuple[int, int, int]:
    """A low-saturation colour, so clutter never looks like one of the saturated object colours."""
    base = rng.uniform(50, 200) if around is None else np.clip(around + rng.uniform(-45, 45), 20, 235)
    return tuple(int(v) for v in np.clip(base + rng.uniform(-22, 22, 3), 0, 255))


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Colour gradient plus random blobs and stripes."""
    c0, c1 = np.array(_muted_colour(rng), np.float32), np.array(_muted_colour(rng), np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    coords = np.arange(size, dtype=np.float32) / max(size - 1, 1)
    t = (coords[None, :] * math.cos(angle) + coords[:, None] * math.sin(angle)) / 2 + 0.5
    pixels = c0 + (c1 - c0) * t[..., None]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    mean = float(pixels.mean())
    for _ in range(rng.integers(3, 9)):
        x, y = rng.uniform(-0.1, 1.1, 2) * size
        rx, ry = rng.uniform(0.03, 0.25, 2) * size
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=_muted_colour(rng, mean))
    for _ in range(rng.integers(0, 4)):
        x0, y0, x1, y1 = rng.uniform(0, 1, 4) * size
        draw.line([x0, y0, x1, y1], fill=_muted_colour(rng, mean), width=int(rng.integers(1, 5)))
    return image


def _place(rng: np.random.Generator, size: int, objects: list[dict]) -> tuple[float, float, float]:
    """Random centre and radius; sometimes right next to an existing object so that the two touch."""
    r = math.exp(rng.uniform(math.log(max(4.0, 0.025 * size)), math.log(0.3 * size)))
    if objects and rng.uniform() < 0.3:
        other = objects[int(rng.integers(len(objects)))]
        direction = rng.uniform(0, 2 * math.pi)
        dist = (r + other["r"]) * rng.uniform(0.8, 1.0)
        cx, cy = other["cx"] + dist * math.cos(direction), other["cy"] + dist * math.sin(direction)
    else:
        cx, cy = rng.uniform(0, size, 2)
    low, high = 0.3 * r, size - 0.3 * r  # keep most of the shape inside the image
    return float(np.clip(cx, low, high)), float(np.clip(cy, low, high)), r


def render_image(rng: np.random.Generator, size: int, num_objects: int) -> tuple[Image.Image, list[dict]]:
    """One image and its objects: dicts with category_id, bbox (xywh, visible pixels) and area (pixel count)."""
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    instances = np.zeros((size, size), dtype=np.uint8)  # 0 = background, k = k-th placed object
    objects: list[dict] = []
    for _ in range(num_objects * 10):  # bounded number of attempts
        if len(objects) == num_objects:
            break
        cls = int(rng.integers(len(CLASSES)))
        cx, cy, r = _place(rng, size, objects)
        angle = rng.uniform(0, 2 * math.pi)
        canvas = Image.new("L", (size, size), 0)
        _draw_shape(ImageDraw.Draw(canvas), CLASSES[cls][1], cx, cy, r, angle, 1)
        mask = np.asarray(canvas, dtype=bool)
        area = int(mask.sum())
        if area < MIN_PIXELS:
            continue
        covered = np.bincount(instances[mask], minlength=len(objects) + 1)[1:]
        if any(o["visible"] - c < MIN_VISIBLE * o["full"] for o, c in zip(objects, covered)):
            continue
        for o, c in zip(objects, covered):
            o["visible"] -= int(c)
        jitter = rng.integers(-20, 21, 3)
        colour = tuple(int(v) for v in np.clip(np.array(CLASSES[cls][2]) + jitter, 0, 255))
        _draw_shape(draw, CLASSES[cls][1], cx, cy, r, angle, colour)
        instances[mask] = len(objects) + 1
        objects.append({"cls": cls, "cx": cx, "cy": cy, "r": r, "full": area, "visible": area})
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-14, 15, (size, size, 3), dtype=np.int16)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    annotations = []
    for k, o in enumerate(objects, start=1):
        rows = np.flatnonzero((instances == k).any(axis=1))
        cols = np.flatnonzero((instances == k).any(axis=0))
        bbox = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
        annotations.append({"category_id": CLASSES[o["cls"]][0], "bbox": bbox, "area": o["visible"]})
    return image, annotations


def _write_split(
    out: Path, split: int, num_images: int, size: int, seed: int, objects: tuple[int, int], image_format: str
) -> int:
    """Write images/ and annotations.json of one split; returns the number of boxes."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, split, i])
        image, objs = render_image(rng, size, int(rng.integers(objects[0], objects[1] + 1)))
        file_name = f"{i:06d}.{image_format}"
        if image_format == "png":
            image.save(out / "images" / file_name, compress_level=1)
        else:
            image.save(out / "images" / file_name, quality=92)
        images.append({"id": i + 1, "file_name": file_name, "width": size, "height": size})
        for obj in objs:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "iscrowd": 0, **obj})
    categories = [{"id": cid, "name": name, "supercategory": "shape"} for cid, name, _ in CLASSES]
    coco = {
        "info": {"description": "ddetr synthetic shapes", "version": "1"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    (out / "annotations.json").write_text(json.dumps(coco))
    return len(annotations)


def generate(
    out_dir: str | Path,
    num_train: int = 1000,
    num_val: int = 200,
    image_size: int = 256,
    seed: int = 0,
    min_objects: int = 2,
    max_objects: int = 8,
    image_format: str = "jpg",
) -> dict[str, int]:
    """Write out_dir/{train,val}/{annotations.json,images/}; the same arguments give byte-identical files.

    Returns the number of boxes written per split.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f"image counts must be >= 0, got num_train={num_train}, num_val={num_val}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    if not 0 <= min_objects <= max_objects <= 255:
        raise ValueError(f"need 0 <= min_objects <= max_objects <= 255, got {min_objects}, {max_objects}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    out = Path(out_dir)
    counts = {}
    for split, (name, n) in enumerate((("train", num_train), ("val", num_val))):
        counts[name] = _write_split(out / name, split, n, image_size, seed, (min_objects, max_objects), image_format)
    return counts
