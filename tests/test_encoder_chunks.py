"""The encoder's inference path (everything after the sampling done a chunk of pixels at a time, issue #14) gives
the outputs of the layer as written, and is used only where nothing needs the whole-map activations."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb_
from test_model import randomise_box_heads, small

from ddetr.models import DeformableDETR
from ddetr.models.encoder import EncoderLayer


@pytest.fixture
def chunk_calls(monkeypatch):
    """A tiny chunk (chunk edges inside images and a short last chunk), and a count of chunked layer calls."""
    monkeypatch.setattr(EncoderLayer, "CHUNK", 37)
    calls = []
    inner = EncoderLayer._forward_in_chunks

    def counted(self, *args):
        calls.append(self)
        return inner(self, *args)

    monkeypatch.setattr(EncoderLayer, "_forward_in_chunks", counted)
    return calls


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(2, 3, 80, 112)
    masks = torch.zeros(2, 80, 112, dtype=torch.bool)
    masks[1, 56:, :] = True
    masks[1, :, 72:] = True
    return images, masks


@pytest.mark.parametrize("name", ["deformable-detr", "deformable-detr-refine", "deformable-detr-two-stage",
                                  "deformable-detr-single-scale"])
def test_chunked_encoder_matches_the_layer_as_written(name, chunk_calls, one_thread) -> None:
    torch.manual_seed(0)
    model = perturb_(DeformableDETR(small(name, enc_layers=2).model)).eval()
    randomise_box_heads(model)
    images, masks = padded_batch()
    with torch.enable_grad():  # autograd on: the whole-map path
        ref = model(images, masks)
    assert not chunk_calls
    with torch.no_grad():
        out = model(images, masks)
    assert len(chunk_calls) == 2
    for key in ("pred_logits", "pred_boxes"):
        assert (out[key] - ref[key]).abs().max() < 1e-5, key
    assert ref["pred_logits"].std() > 0.1 and ref["pred_boxes"].std() > 0.02  # not a vacuous comparison
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(images, masks)
    if model.cfg.two_stage:  # a discrete top-k: compare every pixel's proposal before the selection
        ref, low = ref["enc_outputs"], low["enc_outputs"]
    assert (low["pred_logits"].float() - ref["pred_logits"]).abs().max() < 0.1
    assert (low["pred_boxes"].float() - ref["pred_boxes"]).abs().max() < 0.04


def test_training_and_gradients_use_the_whole_map(chunk_calls) -> None:
    """Train mode (dropout), or eval with autograd (a saliency map), must keep the layer as written."""
    torch.manual_seed(0)
    model = DeformableDETR(small("deformable-detr", enc_layers=2).model)
    images, masks = padded_batch()
    model(images, masks)["pred_logits"].sum().backward()
    model.eval()
    images.requires_grad_(True)
    model(images, masks)["pred_logits"].sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not chunk_calls
    with torch.inference_mode():
        model(images.detach(), masks)
    assert len(chunk_calls) == 2
