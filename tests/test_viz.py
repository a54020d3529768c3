"""Inspection: detection drawing, attention recording (checked by hand) and the attention figures / CLI."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from PIL import Image
from torch import nn

from ddetr.models import DeformableDETR, DetectorConfig, ModelConfig
from ddetr.models.postprocess import PostProcess
from ddetr.viz.attention import (
    plot_pixel_attention,
    plot_query_attention,
    record_attention,
    recording,
    select_layers,
    top_detections,
)
from ddetr.viz.draw import class_color, draw_detections

CFG = ModelConfig(num_classes=3, backbone="resnet18", frozen_batchnorm=False, hidden_dim=64, nheads=4,
                  num_feature_levels=4, enc_layers=2, dec_layers=2, dim_feedforward=64, dropout=0.0,
                  num_queries=7, enc_n_points=2, dec_n_points=3, with_box_refine=True)
INPUT_HW = (64, 96)  # what the model sees
IMAGE_HW = (128, 192)  # the "original" image: twice the input size


# ---- draw_detections ---------------------------------------------------------------------------------------
def _changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    return (before != after).any(-1)


def test_draw_detections_colours_exactly_the_box_edges():
    blank = torch.full((3, 100, 120), 100, dtype=torch.uint8)  # grey: neither black nor white text matches it
    x0, y0, x1, y1, lw = 30, 40, 70, 80, 3
    det = {"boxes": torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32), "scores": torch.tensor([0.9]),
           "labels": torch.tensor([1])}
    out = np.asarray(draw_detections(blank, det, ["a", "b", "c"], line_width=lw))
    assert out.shape == (100, 120, 3)
    changed = _changed(blank.permute(1, 2, 0).numpy(), out)
    yy, xx = np.mgrid[:100, :120]
    inside = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
    interior = (xx >= x0 + lw) & (xx < x1 - lw) & (yy >= y0 + lw) & (yy < y1 - lw)
    edge = inside & ~interior
    assert (out[edge] == class_color(1)).all()  # every edge pixel, and only the class colour
    assert not changed[interior].any()
    outside = changed & ~inside
    rows, cols = np.nonzero(outside)
    assert len(rows) > 0, "no label drawn"
    # the label: a filled block right above the box, starting at its left edge, holding "b 0.90" as text
    assert rows.max() == y0 - 1 and rows.min() > y0 - 30 and cols.min() == x0
    assert changed[rows.min():y0, x0:cols.max() + 1].all()  # a solid block, no holes through to the image
    block = out[rows.min():y0, x0:cols.max() + 1]
    colours = {tuple(c) for c in block.reshape(-1, 3)}
    assert tuple(class_color(1)) in colours and len(colours) > 2  # background + text (+ antialiasing)
    # the same with a PIL input, which is not modified
    pil = Image.fromarray(blank.permute(1, 2, 0).numpy())
    assert (np.asarray(draw_detections(pil, det, ["a", "b", "c"], line_width=lw)) == out).all()
    assert (np.asarray(pil) == 100).all()


def test_draw_detections_label_inside_at_top_and_threshold():
    blank = np.full((60, 80, 3), 255, np.uint8)
    det = {"boxes": [[5.0, 0.0, 60.0, 50.0], [30.0, 25.0, 45.0, 40.0]], "scores": [0.8, 0.2],
           "labels": [0, 2], "names": ["cat", "dog"]}
    out = np.asarray(draw_detections(blank, det, threshold=0.5, line_width=2))
    changed = _changed(blank, out)
    rows, cols = np.nonzero(changed)
    assert rows.min() == 0 and cols.min() == 5 and rows.max() == 49 and cols.max() == 59  # all within box 0
    assert (out[5:49, 60 - 2] == class_color(0)).all()  # right edge, below the label
    assert changed[:5, 7:20].any()  # box 0's label, inside the box at its top
    assert not changed[20:47, 8:56].any()  # box 1 (score 0.2 <= threshold) is not drawn


@pytest.mark.parametrize(("det", "message"), [
    ({"boxes": [[0, 0, 5, 5]], "scores": [0.5]}, "no 'labels'"),
    ({"boxes": [[0, 0, 5, 5]], "scores": [0.5, 0.4], "labels": [0]}, "must match"),
    ({"boxes": [[0, 0, 5]], "scores": [0.5], "labels": [0]}, "shape"),
    ({"boxes": [[5, 0, 0, 5]], "scores": [0.5], "labels": [0]}, "not xyxy"),
    ({"boxes": [[0, 0, 5, 5]], "scores": [0.5], "labels": [3]}, "outside class_names"),
])
def test_draw_detections_bad_input(det, message):
    with pytest.raises(ValueError, match=message):
        draw_detections(np.zeros((10, 10, 3), np.uint8), det, ["a", "b", "c"])


# ---- recording ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recorded():
    """A tiny random model (non-trivial offsets and weights) run once with recording; the decoder inputs."""
    torch.manual_seed(0)
    model = DeformableDETR(CFG).eval()
    for _, m in model.attention_modules():
        nn.init.normal_(m.sampling_offsets.weight, std=0.05)
        nn.init.normal_(m.attention_weights.weight, std=0.3)
    queries = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, i=i: queries.__setitem__(i, args[0].clone()))
               for i, m in enumerate(layer.cross_attn for layer in model.transformer.decoder.layers)]
    images = torch.randn(1, 3, *INPUT_HW)
    outputs, records = record_attention(model, images)
    for h in handles:
        h.remove()
    return model, outputs, records, queries


def _level_shapes(h: int, w: int, levels: int) -> list[tuple[int, int]]:
    shapes = []
    for _ in range(levels):
        h, w = math.ceil(h / (8 if not shapes else 2)), math.ceil(w / (8 if not shapes else 2))
        shapes.append((h, w))
    return shapes


def test_record_attention_shapes_and_recording_off(recorded):
    model, outputs, records, _ = recorded
    names = [n for n, _ in model.attention_modules()]
    assert sorted(records) == sorted(names) and len(names) == CFG.enc_layers + CFG.dec_layers
    shapes = _level_shapes(*INPUT_HW, CFG.num_feature_levels)
    tokens = sum(h * w for h, w in shapes)
    m, lv = CFG.nheads, CFG.num_feature_levels
    for name, rec in records.items():
        lq, p = (tokens, CFG.enc_n_points) if ".encoder." in name else (CFG.num_queries, CFG.dec_n_points)
        assert rec.sampling_locations.shape == (1, lq, m, lv, p, 2), name
        assert rec.attention_weights.shape == (1, lq, m, lv, p), name
        assert rec.reference_points.shape[:3] == (1, lq, lv), name
        assert rec.spatial_shapes == shapes
        torch.testing.assert_close(rec.attention_weights.sum((-1, -2)), torch.ones(1, lq, m))
    assert outputs["pred_logits"].shape == (1, CFG.num_queries, CFG.num_classes)
    assert all(mod.recorder is None for _, mod in model.attention_modules())
    before = dict(records)
    with torch.no_grad():
        model(torch.randn(1, 3, *INPUT_HW))  # outside the block: nothing recorded
    assert records.keys() == before.keys() and all(records[k] is before[k] for k in before)


def test_recording_restores_state_on_exception(recorded):
    model = recorded[0]
    first = model.attention_modules()[0][1]
    first.recorder = outer = {}.__setitem__  # an enclosing recorder stays in place
    with pytest.raises(RuntimeError, match="boom"), recording(model):
        assert all(mod.recorder is not None and mod.recorder is not outer for _, mod in model.attention_modules())
        raise RuntimeError("boom")
    assert first.recorder is outer and all(mod.recorder is None for _, mod in model.attention_modules()[1:])
    first.recorder = None
    with pytest.raises(ValueError, match="no deformable attention"), recording(nn.Linear(2, 2)):
        pass


def test_recorded_decoder_locations_match_hand_computation(recorded):
    """Recompute references, sampling locations and weights of every query from the modules' own weights."""
    model, outputs, records, queries = recorded
    d, m, lv, p = CFG.hidden_dim, CFG.nheads, CFG.num_feature_levels, CFG.dec_n_points
    shapes = _level_shapes(*INPUT_HW, lv)
    with torch.no_grad():
        refs = [model.transformer.reference_points(model.query_embed.weight[:, :d]).sigmoid(),  # layer 0: 2-d
                outputs["aux_outputs"][0]["pred_boxes"][0]]  # layer 1 (refinement): layer 0's box, 4-d
    for layer, ref in enumerate(refs):
        rec = records[f"transformer.decoder.layers.{layer}.cross_attn"]
        attn = model.transformer.decoder.layers[layer].cross_attn
        off, att = attn.sampling_offsets, attn.attention_weights
        params = (off.weight, off.bias, att.weight, att.bias)
        w_off, b_off, w_att, b_att = (t.detach().double() for t in params)
        for q in range(CFG.num_queries):
            query = queries[layer][0, q].double()
            torch.testing.assert_close(rec.reference_points[0, q], ref[q][None].expand(lv, -1))
            for h in range(m):
                logits = [query @ w_att[(h * lv + l) * p + k] + b_att[(h * lv + l) * p + k]
                          for l in range(lv) for k in range(p)]
                total = sum(math.exp(x) for x in logits)
                for l, (hl, wl) in enumerate(shapes):
                    for k in range(p):
                        i = ((h * lv + l) * p + k) * 2
                        ox, oy = (query @ w_off[i + c] + b_off[i + c] for c in (0, 1))
                        if layer == 0:
                            x, y = ref[q, 0] + ox / wl, ref[q, 1] + oy / hl
                        else:
                            cx, cy, bw, bh = ref[q]
                            x, y = cx + ox / p * bw * 0.5, cy + oy / p * bh * 0.5
                        got = rec.sampling_locations[0, q, h, l, k]
                        assert got.tolist() == pytest.approx([float(x), float(y)], abs=1e-5)
                        weight = math.exp(logits[l * p + k]) / total
                        assert rec.attention_weights[0, q, h, l, k].item() == pytest.approx(weight, abs=1e-6)


def test_select_layers_and_top_detections(recorded):
    _, outputs, records, _ = recorded
    dec = select_layers(records, "decoder")
    assert list(dec) == ["decoder layer 0", "decoder layer 1"]
    assert dec["decoder layer 1"] is records["transformer.decoder.layers.1.cross_attn"]
    assert list(select_layers(records, "encoder", -1)) == ["encoder layer 1"]
    with pytest.raises(ValueError, match="out of range"):
        select_layers(records, "decoder", 2)
    top = top_detections(outputs, IMAGE_HW, 4)
    full = PostProcess(4)(outputs, torch.tensor([IMAGE_HW]))[0]  # the same detections as the post-processor
    assert all(torch.equal(top[key], full[key]) for key in ("scores", "labels", "boxes"))
    # each detection's query: its score is that query's score for the label, its box that query's box in pixels
    logits, boxes = outputs["pred_logits"][0], outputs["pred_boxes"][0]
    h, w = IMAGE_HW
    for q, label, score, box in zip(top["queries"].tolist(), top["labels"].tolist(), top["scores"], top["boxes"]):
        assert score.item() == pytest.approx(logits[q, label].sigmoid().item(), abs=1e-7)
        cx, cy, bw, bh = boxes[q].tolist()
        expected = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
        assert box.tolist() == pytest.approx(expected, rel=1e-5)


# ---- figures -----------------------------------------------------------------------------------------------
def _points(ax) -> np.ndarray:
    return np.concatenate([c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)])


def _sizes(ax) -> np.ndarray:
    return np.concatenate([c.get_sizes() for c in ax.collections if isinstance(c, PathCollection)])


def _cross(ax) -> tuple[float, float]:
    (line,) = [ln for ln in ax.lines if isinstance(ln, Line2D) and ln.get_marker() == "+"]
    return float(line.get_xdata()[0]), float(line.get_ydata()[0])


def test_plot_query_attention(recorded):
    _, _, records, _ = recorded
    image = np.zeros((*IMAGE_HW, 3), np.uint8)
    m, lv, p = CFG.nheads, CFG.num_feature_levels, CFG.dec_n_points
    sx, sy = INPUT_HW[1] * 2, INPUT_HW[0] * 2  # canvas-normalised -> original pixels (image is 2x the input)
    box = (20.0, 30.0, 90.0, 100.0)
    fig = plot_query_attention(image, select_layers(records, "decoder"), 5, INPUT_HW, box=box, title="q5")
    assert len(fig.axes) == CFG.dec_layers
    for layer, ax in enumerate(fig.axes):
        rec = records[f"transformer.decoder.layers.{layer}.cross_attn"]
        assert len([c for c in ax.collections if isinstance(c, PathCollection)]) == lv  # one colour per level
        loc = rec.sampling_locations[0, 5].double().numpy() * [sx, sy]
        weight = rec.attention_weights[0, 5].numpy()
        got = _points(ax)
        assert got.shape == (m * lv * p, 2)
        # colour groups are levels: level l's points come l-th, heads then points inside
        np.testing.assert_allclose(got, loc.transpose(1, 0, 2, 3).reshape(-1, 2), rtol=1e-5)
        w = weight.transpose(1, 0, 2).reshape(-1)
        sizes = _sizes(ax)
        assert (np.sign(np.subtract.outer(sizes, sizes)) == np.sign(np.subtract.outer(w, w))).all()
        assert _cross(ax) == pytest.approx((rec.reference_points[0, 5, 0, 0].item() * sx,
                                            rec.reference_points[0, 5, 0, 1].item() * sy), rel=1e-5)
        red = (1.0, 0.0, 0.0)
        boxes = [r for r in ax.patches if isinstance(r, Rectangle) and r.get_edgecolor()[:3] == red]
        assert len(boxes) == 1 and boxes[0].get_xy() == (20.0, 30.0) and boxes[0].get_width() == 70.0
    fig = plot_query_attention(image, records["transformer.decoder.layers.1.cross_attn"], 0, INPUT_HW,
                               color_by="head")
    assert len(fig.axes) == 1 and len(fig.axes[0].collections) == m
    assert _points(fig.axes[0]).shape == (m * lv * p, 2)
    # a padded batch: the image was resized to 32x48 and padded to the 64x96 canvas
    rec = records["transformer.decoder.layers.1.cross_attn"]
    fig = plot_query_attention(image, rec, 0, INPUT_HW, valid_size=(32, 48))
    loc = rec.sampling_locations[0, 0].double().numpy() * [96 * 192 / 48, 64 * 128 / 32]
    np.testing.assert_allclose(_points(fig.axes[0]), loc.transpose(1, 0, 2, 3).reshape(-1, 2), rtol=1e-5)
    with pytest.raises(ValueError, match="valid_size"):
        plot_query_attention(image, rec, 0, INPUT_HW, valid_size=(65, 96))
    with pytest.raises(ValueError, match="query_index"):
        plot_query_attention(image, select_layers(records, "decoder"), CFG.num_queries, INPUT_HW)
    with pytest.raises(ValueError, match="color_by"):
        plot_query_attention(image, select_layers(records, "decoder"), 0, INPUT_HW, color_by="points")


def test_plot_pixel_attention(recorded):
    _, _, records, _ = recorded
    image = np.zeros((*IMAGE_HW, 3), np.uint8)
    shapes = _level_shapes(*INPUT_HW, CFG.num_feature_levels)
    x, y, level = 100.0, 50.0, 1
    h, w = shapes[level]
    # pixel (100, 50) of the 192x128 image is (50, 25) of the 96x64 input; level 1 cells are 16 input pixels
    row, col = 25 // 16, 50 // 16
    query = shapes[0][0] * shapes[0][1] + row * w + col
    fig = plot_pixel_attention(image, select_layers(records, "encoder"), (x, y), INPUT_HW, level=level)
    assert len(fig.axes) == CFG.enc_layers
    for layer, ax in enumerate(fig.axes):
        rec = records[f"transformer.encoder.layers.{layer}.self_attn"]
        assert _cross(ax) == pytest.approx(((col + 0.5) / w * 192, (row + 0.5) / h * 128), rel=1e-5)
        loc = rec.sampling_locations[0, query].double().numpy() * [192, 128]
        np.testing.assert_allclose(_points(ax), loc.transpose(1, 0, 2, 3).reshape(-1, 2), rtol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        plot_pixel_attention(image, select_layers(records, "encoder"), (192.0, 5.0), INPUT_HW)
    with pytest.raises(ValueError, match="level"):
        plot_pixel_attention(image, select_layers(records, "encoder"), (5.0, 5.0), INPUT_HW, level=4)


# ---- CLI ---------------------------------------------------------------------------------------------------
def test_visualize_cli_writes_pngs(tmp_path: Path):
    """Needs `ddetr.interop.load_model` to read our own checkpoint format."""
    from ddetr.cli.visualize import add_args as add_visualize_args
    from ddetr.cli.visualize import run as run_visualize

    torch.manual_seed(1)
    model = DeformableDETR(CFG)
    ckpt = tmp_path / "tiny.pth"
    torch.save({"format": "ddetr", "version": 1, "config": DetectorConfig(model=CFG).to_dict(),
                "model": model.state_dict(), "class_names": ["circle", "square", "triangle"],
                "category_ids": [1, 2, 3]}, ckpt)
    image = Image.fromarray((np.random.default_rng(0).random((70, 100, 3)) * 255).astype(np.uint8))
    image.save(tmp_path / "scene.png")
    parser = argparse.ArgumentParser()
    add_visualize_args(parser)
    out = tmp_path / "viz"
    args = parser.parse_args(["--checkpoint", str(ckpt), str(tmp_path / "scene.png"), "--top", "2", "--layer",
                              "all", "--encoder-pixel", "30", "20", "--size", "64", "--out", str(out)])
    assert run_visualize(args) == 0
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 4 and "scene_detections.png" in files and "scene_encoder_x30_y20.png" in files
    assert sum(f.startswith("scene_det1_query") for f in files) == 1
    drawn = Image.open(out / "scene_detections.png")
    assert drawn.size == image.size and (np.asarray(drawn) != np.asarray(image)).any()
    for name in files:
        with Image.open(out / name) as png:
            assert png.format == "PNG" and min(png.size) > 50
