"""Fine-tuning from pretrained weights with another class set: what loads, what is re-initialised, name matching."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from conftest import perturb_

from ddetr.interop import save_ddetr, save_hf, save_official
from ddetr.interop.finetune import load_pretrained
from ddetr.interop.meta import label_meta
from ddetr.models import DeformableDETR, preset

SMALL = dict(backbone="resnet18", hidden_dim=64, enc_layers=1, dec_layers=2, dim_feedforward=96, num_queries=8)
PRIOR = -math.log(99)


def model(variant: str = "deformable-detr-refine", num_classes: int = 6, seed: int = 0, **overrides) -> DeformableDETR:
    torch.manual_seed(seed)
    cfg = preset(variant, **{**SMALL, "num_classes": num_classes, **overrides})
    return perturb_(DeformableDETR(cfg.model), seed, std=0.1)  # copies are recognisable


def pretrained(tmp_path, names: list[str], variant: str = "deformable-detr-refine") -> tuple[DeformableDETR, str]:
    src = model(variant, num_classes=len(names), seed=1)
    path = tmp_path / "pretrained.pth"
    save_ddetr(src, src.cfg, path, class_names=names)
    return src, str(path)


def test_other_class_count_loads_all_but_class_heads(tmp_path, caplog):
    src, path = pretrained(tmp_path, ["cat", "dog", "car", "bus", "tree", "sky"])
    dst = model(num_classes=3, seed=2)
    with caplog.at_level(logging.INFO, logger="ddetr.interop.finetune"):
        report = load_pretrained(dst, path)
    theirs, ours = src.state_dict(), dst.state_dict()
    heads = sorted(k for k in ours if k.startswith("class_embed."))
    assert sorted(report.reinitialised) == heads and heads
    assert sorted(report.loaded) == sorted(k for k in ours if k not in heads)
    assert all(torch.equal(ours[k], theirs[k]) for k in report.loaded)
    for head in dst.class_embed:
        assert head.weight.shape == (3, 64)
        torch.testing.assert_close(head.bias, torch.full((3,), PRIOR))
        assert head.weight.abs().max() <= 1 / math.sqrt(64) + 1e-6  # fresh nn.Linear init range
    assert "re-initialised the class heads" in caplog.text and "class_embed.0" in str(report)


def test_same_classes_load_everything(tmp_path):
    src, path = pretrained(tmp_path, ["a", "b", "c"])
    dst = model(num_classes=3, seed=2)
    report = load_pretrained(dst, path)
    assert not report.reinitialised and "all weights including the class heads" in str(report)
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in dst.state_dict().items())


@pytest.mark.parametrize("variant", ["deformable-detr", "deformable-detr-two-stage"])
def test_matching_names_copy_their_rows(variant, tmp_path):
    src, path = pretrained(tmp_path, ["N/A", "Cat", "dog", "traffic_light", "bus"], variant)
    dst = model(variant, num_classes=3, seed=2)
    report = load_pretrained(dst, path, class_names=["traffic light", "zebra", "cat"], match_names=True)
    assert report.matched == {"traffic light": 3, "cat": 1} and report.unmatched == ["zebra"]
    for new_head, old_head in zip(dst.class_embed, src.class_embed):
        torch.testing.assert_close(new_head.weight[[0, 2]], old_head.weight[[3, 1]], rtol=0, atol=0)
        torch.testing.assert_close(new_head.bias[[0, 2]], old_head.bias[[3, 1]], rtol=0, atol=0)
        assert new_head.bias[1].item() == pytest.approx(PRIOR)
    assert "zebra" in str(report)


def test_official_coco_checkpoint_matches_coco_names(tmp_path):
    src = model("deformable-detr-single-scale", num_classes=91, seed=1)
    save_official(src, src.cfg, tmp_path / "official.pth")
    dst = model("deformable-detr-single-scale", num_classes=2, seed=2)
    report = load_pretrained(dst, tmp_path / "official.pth", class_names=["person", "car"], match_names=True)
    assert report.source_format == "official" and report.matched == {"person": 1, "car": 3}
    assert torch.equal(dst.class_embed[0].weight, src.class_embed[0].weight[[1, 3]])


def test_hf_checkpoint_names_from_id2label(tmp_path):
    src = model(num_classes=4, seed=1)
    save_hf(src, src.cfg, tmp_path / "hf", label_meta(4, ["N/A", "person", "bicycle", "car"]))
    dst = model(num_classes=1, seed=2)
    report = load_pretrained(dst, tmp_path / "hf", class_names=["bicycle"], match_names=True)
    assert report.source_format == "hf" and report.matched == {"bicycle": 2}
    assert torch.equal(dst.class_embed[1].bias, src.class_embed[1].bias[[2]])


def test_architecture_mismatch_and_bad_requests_are_refused(tmp_path):
    _, path = pretrained(tmp_path, ["a", "b"])
    with pytest.raises(ValueError, match="num_feature_levels: model 1 vs checkpoint 4"):
        load_pretrained(model("deformable-detr-single-scale", num_classes=2, with_box_refine=True), path)
    unnamed = model(num_classes=2, seed=1)
    save_ddetr(unnamed, unnamed.cfg, tmp_path / "unnamed.pth")
    with pytest.raises(ValueError, match="match_names needs"):
        load_pretrained(model(num_classes=3), tmp_path / "unnamed.pth", class_names=["x", "y", "z"],
                        match_names=True)
    with pytest.raises(ValueError, match="3 class names for a model with 4 classes"):
        load_pretrained(model(num_classes=4), path, class_names=["x", "y", "z"])


def test_training_from_a_checkpoint_needs_no_imagenet_file(tmp_path, monkeypatch):
    """--pretrained brings every weight, the backbone's included: an offline machine without torchvision's ImageNet
    file can fine-tune a paper preset (whose pretrained_backbone is "imagenet")."""
    from ddetr.data.synthetic import generate
    from ddetr.engine.config import TrainConfig
    from ddetr.engine.trainer import Trainer
    from ddetr.models.backbone import Backbone

    def offline(self, weights):
        raise AssertionError(f"ImageNet backbone weights requested ({weights})")

    monkeypatch.setattr(Backbone, "load_pretrained", offline)
    generate(tmp_path / "d", num_train=2, num_val=0, image_size=32, min_objects=1, max_objects=1)
    _, path = pretrained(tmp_path, ["a", "b"])
    cfg = TrainConfig(detector=preset("deformable-detr-refine", **{**SMALL, "num_classes": 2}),
                      output_dir=str(tmp_path / "run"))
    cfg.data.train = str(tmp_path / "d" / "train")
    assert cfg.detector.model.pretrained_backbone == "imagenet"
    trainer = Trainer(cfg, pretrained=path)
    assert trainer.model.backbone.body.conv1.weight.shape[0] == 64
    with pytest.raises(AssertionError, match="ImageNet backbone weights requested"):
        Trainer(cfg, overwrite=True)  # a fresh run does ask for them
