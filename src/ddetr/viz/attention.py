"""Record and plot where deformable attention looks: sampling points and weights per head, level and layer.

This reproduces the paper's visualisations (Fig. 6): for one decoder query (a detection) or one encoder
pixel, every sampling point of every head and level is drawn over the image, coloured by level (or head),
sized and shaded by its attention weight, with the reference point (green cross) and the predicted box.

Geometry: sampling locations are normalised (x, y) over the padded input canvas the model saw. A point maps
to input pixels as (x * W_canvas, y * H_canvas), then to the original image by the resize factor
(original / resized).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from torch import nn

from ddetr.models.deform_attn import AttentionSample, recording
from ddetr.models.postprocess import PostProcess
from ddetr.viz.draw import to_pil

Size = tuple[int, int]  # (H, W)


@torch.no_grad()
def record_attention(model: nn.Module, images: torch.Tensor, masks: torch.Tensor | None = None,
                     ) -> tuple[dict[str, Any], dict[str, AttentionSample]]:
    """Run ``model(images, masks)`` once; return its outputs and each deformable attention call by name."""
    with recording(model) as records:
        outputs = model(images, masks)
    return outputs, records


def select_layers(records: Mapping[str, AttentionSample], part: str, layer: int | None = None,
                  ) -> dict[str, AttentionSample]:
    """The ``part`` ("encoder"/"decoder") layers in order, titled as "decoder layer 5"; or only ``layer``."""
    if part not in ("encoder", "decoder"):
        raise ValueError(f"part must be 'encoder' or 'decoder', got {part!r}")
    pattern = re.compile(rf"(^|\.){part}\.layers\.(\d+)\.")
    found = sorted((int(m.group(2)), name) for name in records if (m := pattern.search(name)))
    if not found:
        raise ValueError(f"no {part} attention among the recorded modules: {sorted(records)}")
    if layer is not None:
        if not -len(found) <= layer < len(found):
            raise ValueError(f"{part} layer {layer} out of range: the model has {len(found)} {part} layers")
        found = [found[layer]]
    return {f"{part} layer {i}": records[name] for i, name in found}


def top_detections(outputs: Mapping[str, Any], image_size: Size, n: int, batch_index: int = 0,
                   ) -> dict[str, torch.Tensor]:
    """The ``n`` best detections of one image, as `PostProcess` (top (query, class) pairs): ``scores``, ``labels``,
    ``boxes`` (xyxy pixels of an image of ``image_size`` (H, W)) and ``queries``, the query each came from."""
    b = slice(batch_index, batch_index + 1)
    size = torch.tensor([image_size], device=outputs["pred_logits"].device)
    scores, labels, boxes, queries = PostProcess(n).topk(outputs["pred_logits"][b], outputs["pred_boxes"][b], size)
    return {"queries": queries[0].cpu(), "scores": scores[0].cpu(), "labels": labels[0].cpu(), "boxes": boxes[0].cpu()}


def _scale(canvas_size: Size, valid_size: Size | None, image_size: Size) -> np.ndarray:
    """Factors (sx, sy) taking canvas-normalised (x, y) to original-image pixels."""
    ch, cw = canvas_size
    vh, vw = valid_size or canvas_size
    if not (0 < vh <= ch and 0 < vw <= cw):
        raise ValueError(f"valid_size {(vh, vw)} must be positive and fit in canvas_size {(ch, cw)}")
    ih, iw = image_size
    return np.array([cw * iw / vw, ch * ih / vh])


def _check_index(name: str, index: int, size: int) -> None:
    if not 0 <= index < size:
        raise ValueError(f"{name} {index} out of range [0, {size})")


def _as_layers(samples: AttentionSample | Mapping[str, AttentionSample]) -> dict[str, AttentionSample]:
    if isinstance(samples, AttentionSample):
        return {"": samples}
    if not samples:
        raise ValueError("no attention samples to plot")
    return dict(samples)


def _draw_query(ax: Any, sample: AttentionSample, batch_index: int, query: int, level: int,
                scale: np.ndarray, color_by: str) -> list[Line2D]:
    """Scatter one query's M*L*P points (one collection per level or head); return legend handles."""
    loc = sample.sampling_locations[batch_index, query].cpu().double().numpy() * scale  # (M, L, P, 2)
    weight = sample.attention_weights[batch_index, query].cpu().double().numpy()  # (M, L, P)
    rel = weight / max(weight.max(), 1e-12)
    groups = weight.shape[1] if color_by == "level" else weight.shape[0]
    palette = colormaps["tab10"]
    handles = []
    for g in range(groups):
        pts, r = (loc[:, g], rel[:, g]) if color_by == "level" else (loc[g], rel[g])
        pts, r = pts.reshape(-1, 2), r.reshape(-1)
        ax.scatter(pts[:, 0], pts[:, 1], s=8 + 160 * r, alpha=0.25 + 0.75 * r, color=palette(g % 10),
                   edgecolors="white", linewidths=0.4, zorder=3)
        handles.append(Line2D([], [], marker="o", linestyle="", color=palette(g % 10),
                              label=f"{color_by} {g}"))
    ref = sample.reference_points[batch_index, query, level].cpu().double().numpy()
    cx, cy = ref[:2] * scale
    if ref.shape[0] == 4:
        w, h = ref[2:] * scale
        ax.add_patch(Rectangle((cx - w / 2, cy - h / 2), w, h, fill=False, edgecolor="lime", linestyle="--",
                               linewidth=1.2, zorder=4))
    ax.plot([cx], [cy], marker="+", color="lime", markersize=16, markeredgewidth=3, zorder=5)
    handles.append(Line2D([], [], marker="+", linestyle="", color="lime", markersize=10, markeredgewidth=2,
                          label="reference"))
    return handles


def _figure(image: Any, layers: dict[str, AttentionSample], batch_index: int, queries: list[int],
            level: int, scale: np.ndarray, color_by: str, box: Any, title: str | None) -> Figure:
    """One axes per layer: the image, the query's sampling points, its reference point, optionally a box."""
    if color_by not in ("level", "head"):
        raise ValueError(f"color_by must be 'level' or 'head', got {color_by!r}")
    pil = to_pil(image)
    cols = min(len(layers), 3)
    rows = math.ceil(len(layers) / cols)
    width = 6.0 if cols == 1 else 4.5  # inches per panel
    fig = Figure(figsize=(width * cols, width * pil.height / pil.width * rows + 0.9), layout="constrained")
    handles: list[Line2D] = []
    for i, ((name, sample), query) in enumerate(zip(layers.items(), queries)):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(np.asarray(pil))
        handles = _draw_query(ax, sample, batch_index, query, level, scale, color_by)
        if box is not None:
            x0, y0, x1, y1 = (float(v) for v in box)
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red", linewidth=2,
                                   zorder=4))
        ax.set_xlim(-0.5, pil.width - 0.5)
        ax.set_ylim(pil.height - 0.5, -0.5)
        ax.set_axis_off()
        if name:
            ax.set_title(name, fontsize=10)
    if box is not None:
        handles.append(Line2D([], [], color="red", linewidth=2, label="predicted box"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 3 * cols), fontsize=8,
               title="marker size and opacity = attention weight", title_fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_query_attention(image: Any, samples: AttentionSample | Mapping[str, AttentionSample],
                         query_index: int, canvas_size: Size, valid_size: Size | None = None, box: Any = None,
                         batch_index: int = 0, color_by: str = "level", title: str | None = None) -> Figure:
    """Decoder cross-attention of one query: one axes per layer in ``samples`` (e.g. from `select_layers`).

    ``image`` is the original image (PIL or 3xHxW); ``canvas_size`` (H, W) is the padded batch the model
    saw and ``valid_size`` this image's resized region in it (default: the whole canvas); ``box`` is an xyxy
    box in original-image pixels (the detection), drawn in red.
    """
    layers = _as_layers(samples)
    pil = to_pil(image)
    scale = _scale(canvas_size, valid_size, (pil.height, pil.width))
    for sample in layers.values():
        n, lq = sample.attention_weights.shape[:2]
        _check_index("batch_index", batch_index, n)
        _check_index("query_index", query_index, lq)
    return _figure(pil, layers, batch_index, [query_index] * len(layers), 0, scale, color_by, box, title)


def pixel_query(spatial_shapes: list[tuple[int, int]], level: int, x: float, y: float) -> int:
    """Flattened encoder query index of the level-``level`` cell holding canvas-normalised point (x, y)."""
    _check_index("level", level, len(spatial_shapes))
    h, w = spatial_shapes[level]
    col = min(int(x * w), w - 1)
    row = min(int(y * h), h - 1)
    return sum(hh * ww for hh, ww in spatial_shapes[:level]) + row * w + col


def plot_pixel_attention(image: Any, samples: AttentionSample | Mapping[str, AttentionSample],
                         pixel: tuple[float, float], canvas_size: Size, valid_size: Size | None = None,
                         level: int = 0, batch_index: int = 0, color_by: str = "level",
                         title: str | None = None) -> Figure:
    """Encoder self-attention of the level-``level`` feature cell under ``pixel`` (x, y in image pixels)."""
    layers = _as_layers(samples)
    pil = to_pil(image)
    x, y = pixel
    if not (0 <= x < pil.width and 0 <= y < pil.height):
        raise ValueError(f"pixel {(x, y)} lies outside the {pil.width}x{pil.height} image")
    scale = _scale(canvas_size, valid_size, (pil.height, pil.width))
    queries = []
    for sample in layers.values():
        _check_index("batch_index", batch_index, sample.attention_weights.shape[0])
        queries.append(pixel_query(sample.spatial_shapes, level, x / scale[0], y / scale[1]))
    return _figure(pil, layers, batch_index, queries, level, scale, color_by, None, title)
