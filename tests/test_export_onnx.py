"""ONNX export: onnxruntime matches PyTorch at several batch and image sizes; post-processing in the graph; CLI."""

from __future__ import annotations

import argparse

import numpy as np
import onnx
import pytest
import torch
from conftest import perturb_

from ddetr.cli.export import add_args as add_export_args
from ddetr.cli.export import run as run_export
from ddetr.export import OnnxDetector, export_onnx
from ddetr.interop import save_ddetr
from ddetr.interop.meta import label_meta
from ddetr.models import DeformableDETR, preset
from ddetr.models.postprocess import PostProcess

SMALL = dict(backbone="resnet18", hidden_dim=64, enc_layers=2, dec_layers=2, dim_feedforward=96, num_queries=10,
             num_classes=5)


def small_model(variant: str) -> DeformableDETR:
    torch.manual_seed(0)
    return perturb_(DeformableDETR(preset(variant, **SMALL).model).eval())


def inputs(batch: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images; in a batch of two the second is padded (zeros, mask True) on its bottom and right."""
    x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(batch, h, w, dtype=torch.bool)
    if batch > 1:
        mask[1, h * 2 // 3:] = True
        mask[1, :, w * 3 // 4:] = True
        x[1][:, mask[1]] = 0
    return x, mask


@pytest.mark.parametrize("variant", ["deformable-detr", "deformable-detr-two-stage"])
def test_onnxruntime_matches_pytorch_at_other_sizes(variant, tmp_path):
    model = small_model(variant)
    path = export_onnx(model, tmp_path / "model.onnx", sample_size=(128, 160),
                       meta=label_meta(5, list("abcde"), [2, 4, 6, 8, 10], 320, 400))
    graph = onnx.load(str(path))
    assert "GridSample" in {n.op_type for n in graph.graph.node}
    assert graph.opset_import[0].version == 17
    det = OnnxDetector(path)
    assert det.meta == {"class_names": list("abcde"), "category_ids": [2, 4, 6, 8, 10], "val_size": 320,
                        "max_size": 400}
    assert det.config["two_stage"] == model.cfg.two_stage
    for batch, h, w in [(1, 96, 128), (2, 150, 110)]:  # neither the traced batch nor the traced size
        x, mask = inputs(batch, h, w)
        with torch.no_grad():
            ref = model(x, mask)
        got = det(x.numpy(), mask.numpy())
        assert isinstance(got["pred_logits"], np.ndarray)
        for key in ("pred_logits", "pred_boxes"):
            assert got[key].shape == tuple(ref[key].shape)
            assert np.abs(got[key] - ref[key].numpy()).max() <= 1e-4
    got = det(x)  # torch in, torch out; no mask means no padding
    with torch.no_grad():
        torch.testing.assert_close(got["pred_boxes"], model(x)["pred_boxes"], rtol=0, atol=1e-4)


def test_export_cli_with_postprocessing(tmp_path, capsys):
    model = small_model("deformable-detr-refine")
    save_ddetr(model, model.cfg, tmp_path / "ckpt.pth", class_names=list("vwxyz"))
    parser = argparse.ArgumentParser()
    add_export_args(parser)
    out = tmp_path / "model.onnx"
    run_export(parser.parse_args(["--checkpoint", str(tmp_path / "ckpt.pth"), "--out", str(out), "--postprocess",
                                  "--top-k", "7", "--size", "128", "160"]))
    diff = float(capsys.readouterr().out.rsplit("max abs diff", 1)[1])
    assert diff <= 1e-3  # boxes are in pixels here
    det = OnnxDetector(out)
    assert det.postprocess and det.meta["class_names"] == list("vwxyz")
    x, mask = inputs(2, 112, 144, seed=3)
    sizes = torch.tensor([[480, 640], [300, 400]])
    got = det(x, mask, sizes)
    with torch.no_grad():
        ref = PostProcess(7)(model(x, mask), sizes)
    for i, r in enumerate(ref):
        assert torch.equal(got["labels"][i], r["labels"])
        torch.testing.assert_close(got["scores"][i], r["scores"], rtol=0, atol=1e-5)
        torch.testing.assert_close(got["boxes"][i], r["boxes"], rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="pass target_sizes"):
        det(x, mask)


def test_static_export_and_bad_arguments(tmp_path):
    model = small_model("deformable-detr-single-scale").train()
    path = export_onnx(model, tmp_path / "static.onnx", dynamic=False, sample_size=(96, 96))
    # Export ran in eval mode with the reference attention; the model's own settings are restored.
    assert model.training and {m.backend for _, m in model.attention_modules()} == {"auto"}
    model.eval()
    det = OnnxDetector(path)
    x, mask = inputs(2, 96, 96)
    with torch.no_grad():
        ref = model(x, mask)["pred_logits"]
    assert np.abs(det(x.numpy(), mask.numpy())["pred_logits"] - ref.numpy()).max() <= 1e-4
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        det(*inputs(2, 64, 96))  # the size was fixed at export
    with pytest.raises(ValueError, match="opset 15 has no GridSample"):
        export_onnx(model, tmp_path / "old.onnx", opset=15)
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\)"):
        det(np.zeros((2, 96, 96), dtype=np.float32))
