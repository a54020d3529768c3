"""Inference-ready models (BatchNorm folded, channels_last) and bf16 inference: same detections as the model as
trained, the model passed to a Detector untouched, a folded model refusing to train (issue #14)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import perturb_
from test_model import randomise_box_heads, small
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from ddetr.inference import Detector
from ddetr.interop import load_model
from ddetr.interop.load import save_ddetr, save_hf
from ddetr.interop.meta import label_meta
from ddetr.models import build
from ddetr.models.inference_ready import fold_batchnorm, prepare_for_inference


def norms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d))]


@pytest.mark.parametrize("name", ["demo", "deformable-detr", "deformable-detr-single-scale-dc5",
                                  "deformable-detr-two-stage"])
def test_prepared_model_gives_the_same_outputs(name, one_thread):
    """Frozen (ResNet-50, DC5) and trainable (demo's ResNet-18) BatchNorm with non-trivial statistics, on a
    padded batch: logits and boxes of every decoder layer (and two-stage proposals) agree to float rounding."""
    torch.manual_seed(0)
    model, _, _ = build(small(name))
    perturb_(model)
    randomise_box_heads(model)
    model.eval()
    images = torch.randn(2, 3, 96, 128)
    masks = torch.zeros(2, 96, 128, dtype=torch.bool)
    masks[1, :, 100:] = True
    with torch.no_grad():
        expected = model(images, masks)
        ready = prepare_for_inference(copy.deepcopy(model))
        got = ready(images, masks)
    assert norms(model.backbone) and not norms(ready.backbone)  # every norm folded away
    assert ready.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    pairs = [(expected, got)] + list(zip(expected["aux_outputs"], got["aux_outputs"]))
    if "enc_outputs" in expected:
        pairs.append((expected["enc_outputs"], got["enc_outputs"]))
    for a, b in pairs:
        torch.testing.assert_close(b["pred_logits"], a["pred_logits"], atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(b["pred_boxes"], a["pred_boxes"], atol=2e-5, rtol=1e-4)


def test_fold_batchnorm_matches_conv_then_norm():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True)
    norm = nn.BatchNorm2d(6).eval()
    perturb_(norm, std=0.5)
    x = torch.randn(2, 4, 9, 7)
    expected = norm(conv(x))
    fold_batchnorm(conv, norm)
    torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)


def test_prepared_model_refuses_to_train():
    model, _, _ = build(small("demo"))
    prepare_for_inference(model)
    model.eval()  # eval stays allowed
    with pytest.raises(RuntimeError, match="prepared for inference"):
        model.train()


def test_detector_leaves_the_callers_model_trainable(one_thread):
    model, _, _ = build(small("demo"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    detector = Detector(model, label_meta(model.cfg.num_classes), size=64, max_size=96)
    detector(torch.rand(3, 70, 90))
    model.train()  # still a trainable model with its BatchNorm
    assert norms(model.backbone) and all(p.requires_grad for p in model.transformer.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert detector.model is not model and detector.model.inference_only


def test_bf16_detector_close_to_fp32(one_thread):
    """bf16 autocast moves scores and boxes by little; the output dtypes stay fp32."""
    torch.manual_seed(0)
    model, _, _ = build(small("demo"))
    perturb_(model)
    randomise_box_heads(model)
    meta = label_meta(model.cfg.num_classes)
    image = torch.rand(3, 80, 110)
    fp32 = Detector(model, meta, top_k=5, size=80, max_size=120)(image)
    bf16 = Detector(model, meta, top_k=5, size=80, max_size=120, amp="bf16")(image)
    assert bf16["boxes"].dtype == torch.float32 and bf16["scores"].dtype == torch.float32
    assert (bf16["scores"] - fp32["scores"]).abs().max() < 0.03
    assert (bf16["boxes"] - fp32["boxes"]).abs().max() < 0.05 * 110  # pixels of a 110-px-wide image


def test_fp16_inference_on_cpu_is_refused_in_one_line():
    model, _, _ = build(small("demo"))
    with pytest.raises(ValueError, match="--amp fp16 on cpu"):
        Detector(model, label_meta(model.cfg.num_classes), amp="fp16")


def test_channels_last_model_saves_and_loads_in_every_format(tmp_path):
    """Training runs the ResNet in channels_last: safetensors (ours and HF) need row-major copies of its weights."""
    model, _, _ = build(small("demo"))
    perturb_(model)
    model.use_channels_last()
    assert not model.backbone.body.conv1.weight.is_contiguous()
    n = model.cfg.num_classes
    save_ddetr(model, model.cfg, tmp_path / "m.safetensors", [f"c{i}" for i in range(n)], list(range(n)), 64, 96)
    save_hf(model, model.cfg, tmp_path / "hf", label_meta(n))
    for path in (tmp_path / "m.safetensors", tmp_path / "hf"):
        loaded, _, _ = load_model(path)
        for key, value in model.state_dict().items():
            if key.endswith("num_batches_tracked"):  # HF's layout has no BatchNorm step counters
                continue
            assert torch.equal(loaded.state_dict()[key], value), (path, key)
