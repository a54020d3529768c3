"""PostProcess against a hand computation and against HF DeformableDetrImageProcessor.post_process_object_detection."""

import inspect
from types import SimpleNamespace

import pytest
import torch

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


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="target_sizes must have shape"):
        PostProcess()(_outputs(batch=2), torch.tensor([[10, 10]]))
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        PostProcess(top_k=0)
