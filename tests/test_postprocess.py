"""PostProcess against a hand computation and against HF DeformableDetrImageProcessor.post_process_object_detection."""

import inspect
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ddetr.models.postprocess import PostProcess


def _outputs(batch=2, queries=7, classes=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, queries, classes, generator=gen) * 3
    centres = torch.rand(batch, queries, 2, generator=gen)
    sizes = torch.rand(batch, queries, 2, generator=gen) * 0.5
    boxes = torch.cat([centres, sizes], dim=-1)
    return {"pred_logits": logits, "pred_boxes": boxes}


def _by_hand(outputs, sizes, top_k):
    """Sort every (query, class) pair by sigmoid score with plain Python and scale its box to pixels."""
    results = []
    for logits, boxes, (h, w) in zip(outputs["pred_logits"], outputs["pred_boxes"], sizes.tolist()):
        num_queries, num_classes = logits.shape
        pairs = [(torch.sigmoid(logits[q, c]).item(), q, c) for q in range(num_queries) for c in range(num_classes)]
        pairs.sort(key=lambda t: -t[0])
        scores, labels, xyxy = [], [], []
        for score, q, c in pairs[:top_k]:
            cx, cy, bw, bh = boxes[q].tolist()
            scores.append(score)
            labels.append(c)
            xyxy.append([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
        results.append({"scores": torch.tensor(scores), "labels": torch.tensor(labels), "boxes": torch.tensor(xyxy)})
    return results


def _assert_same(ours, ref):
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a["scores"], b["scores"].to(a["scores"].dtype))
        assert torch.equal(a["labels"], b["labels"].to(a["labels"].dtype))
        torch.testing.assert_close(a["boxes"], b["boxes"].to(a["boxes"].dtype), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("top_k", [1, 10, 100])
def test_matches_hand_computation(top_k):
    outputs = _outputs()
    sizes = torch.tensor([[480, 640], [300, 200]])
    results = PostProcess(top_k=top_k)(outputs, sizes)
    _assert_same(results, _by_hand(outputs, sizes, top_k))
    assert len(results[0]["scores"]) == min(top_k, 7 * 5)  # k = min(top_k, Q * C)


def test_threshold_drops_low_scores():
    outputs = _outputs(seed=1)
    sizes = torch.tensor([[100, 100], [50, 80]])
    full = PostProcess(top_k=20)(outputs, sizes)
    kept = PostProcess(top_k=20)(outputs, sizes, threshold=0.6)
    for f, k in zip(full, kept):
        mask = f["scores"] > 0.6
        assert 0 < mask.sum() < len(mask)
        _assert_same([k], [{key: value[mask] for key, value in f.items()}])


def test_matches_hugging_face():
    from transformers import DeformableDetrImageProcessor

    processor = DeformableDetrImageProcessor()
    params = inspect.signature(processor.post_process_object_detection).parameters
    assert {"outputs", "threshold", "target_sizes", "top_k"} <= set(params)
    outputs = _outputs(batch=3, queries=12, classes=6, seed=2)
    sizes = torch.tensor([[480, 640], [333, 500], [800, 1216]])
    hf_outputs = SimpleNamespace(logits=outputs["pred_logits"], pred_boxes=outputs["pred_boxes"])
    for top_k, threshold in [(30, None), (100, None), (30, 0.5)]:
        hf = processor.post_process_object_detection(
            hf_outputs, threshold=-1.0 if threshold is None else threshold, target_sizes=sizes, top_k=top_k)
        _assert_same(PostProcess(top_k=top_k)(outputs, sizes, threshold=threshold), hf)


def test_topk_core_is_batched_and_traceable():
    """The tensor core traced (as the ONNX export does) at batch 2 gives the eager results at batch 3, which are the
    per-image API's; ``queries`` names the query whose score and box each detection carries."""
    post = PostProcess(top_k=10)

    class Core(nn.Module):
        def forward(self, logits, boxes, sizes):
            return post.topk(logits, boxes, sizes)

    small = _outputs(batch=2, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace: what torch.onnx.export(dynamo=False) uses
        traced = torch.jit.trace(Core(), (small["pred_logits"], small["pred_boxes"], torch.tensor([[10, 20]] * 2)))
    outputs = _outputs(batch=3, seed=4)
    sizes = torch.tensor([[480, 640], [300, 200], [50, 70]])
    scores, labels, boxes, queries = post.topk(outputs["pred_logits"], outputs["pred_boxes"], sizes)
    traced_out = traced(outputs["pred_logits"], outputs["pred_boxes"], sizes)
    assert all(torch.equal(got, want) for got, want in zip(traced_out, (scores, labels, boxes, queries)))
    assert scores.shape == labels.shape == queries.shape == (3, 10) and boxes.shape == (3, 10, 4)
    for i, image in enumerate(post(outputs, sizes)):
        assert torch.equal(image["scores"], scores[i]) and torch.equal(image["labels"], labels[i])
        assert torch.equal(image["boxes"], boxes[i])
        torch.testing.assert_close(scores[i], outputs["pred_logits"][i, queries[i], labels[i]].sigmoid())
        cx, cy, w, h = outputs["pred_boxes"][i, queries[i]].unbind(-1)
        img_h, img_w = sizes[i].tolist()
        expected = torch.stack([(cx - w / 2) * img_w, (cy - h / 2) * img_h, (cx + w / 2) * img_w,
                                (cy + h / 2) * img_h], -1)
        torch.testing.assert_close(boxes[i], expected)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="target_sizes must have shape"):
        PostProcess()(_outputs(batch=2), torch.tensor([[10, 10]]))
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        PostProcess(top_k=0)
