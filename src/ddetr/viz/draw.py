"""Draw detections on an image: one colour per class, labelled with the class name and score."""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ddetr.data.images import to_rgb
from ddetr.inference import to_uint8_tensor

Color = tuple[int, int, int]


def class_color(label: int) -> Color:
    """A bright colour per class id; golden-ratio hue steps keep neighbouring ids far apart in hue."""
    hue = (label * 0.618033988749895 + 0.1) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


def text_color(background: Color) -> Color:
    """Black text on light backgrounds, white on dark ones (ITU-R BT.601 luma)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def to_pil(image: Any) -> Image.Image:
    """PIL image (copied, as RGB), 3xHxW uint8/float tensor or HxWx3 array -> a new RGB PIL image."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    return Image.fromarray(to_uint8_tensor(image).permute(1, 2, 0).cpu().numpy())


def _as_list(values: Any, name: str) -> list:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().tolist()
    if isinstance(values, np.ndarray):
        return values.tolist()
    if isinstance(values, Sequence):
        return list(values)
    raise ValueError(f"draw_detections: detections[{name!r}] must be a tensor, array or list, "
                     f"got {type(values).__name__}")


def draw_detections(image: Any, detections: Mapping[str, Any], class_names: Sequence[str] | None = None,
                    threshold: float = 0.0, line_width: int | None = None) -> Image.Image:
    """Return a copy of ``image`` with each detection scoring above ``threshold`` drawn as a labelled box.

    ``detections`` holds ``boxes`` (K, 4) xyxy in pixels, ``scores`` (K,), ``labels`` (K,) and optionally
    ``names``. A box covering pixels [x0, x1) x [y0, y1) gets a ``line_width`` outline drawn inside those
    pixels; its label (name and score, on a filled box in the class colour) sits just above the box, or
    inside it at the top when there is no room above.
    """
    for key in ("boxes", "scores", "labels"):
        if key not in detections:
            raise ValueError(f"draw_detections: detections has no {key!r} (keys: {sorted(detections)})")
    boxes = _as_list(detections["boxes"], "boxes")
    scores = _as_list(detections["scores"], "scores")
    labels = [int(x) for x in _as_list(detections["labels"], "labels")]
    names = list(detections["names"]) if "names" in detections else None
    if any(len(b) != 4 for b in boxes):
        raise ValueError("draw_detections: boxes must have shape (K, 4) as xyxy")
    if not len(boxes) == len(scores) == len(labels) or (names is not None and len(names) != len(boxes)):
        raise ValueError(f"draw_detections: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels"
                         + (f", {len(names)} names" if names is not None else "") + " must match")
    if class_names is not None and any(not 0 <= lab < len(class_names) for lab in labels):
        raise ValueError(f"draw_detections: labels {sorted(set(labels))} outside class_names "
                         f"(0..{len(class_names) - 1})")

    out = to_pil(image)
    draw = ImageDraw.Draw(out)
    width = line_width or max(2, round(max(out.size) / 300))
    font = ImageFont.load_default(size=max(11, round(max(out.size) / 60)))
    order = sorted(range(len(boxes)), key=lambda i: scores[i])  # best last, so it is drawn on top
    for i in order:
        if scores[i] <= threshold:
            continue
        if boxes[i][2] < boxes[i][0] or boxes[i][3] < boxes[i][1]:
            raise ValueError(f"draw_detections: box {i} = {boxes[i]} is not xyxy (x1 < x0 or y1 < y0)")
        x0, y0, x1, y1 = (round(v) for v in boxes[i])
        x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)  # tiny boxes still show as a dot
        color = class_color(labels[i])
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=color, width=width)
        name = class_names[labels[i]] if class_names else names[i] if names else str(labels[i])
        text = f"{name} {scores[i]:.2f}"
        left, top, right, bottom = font.getbbox(text)
        tw, th = right - left + 4, bottom - top + 4
        ty = y0 - th if y0 - th >= 0 else y0
        draw.rectangle((x0, ty, x0 + tw - 1, ty + th - 1), fill=color)
        draw.text((x0 + 2 - left, ty + 2 - top), text, fill=text_color(color), font=font)
    return out
