"""Official-layout checkpoints (fundamentalvision/Deformable-DETR), our own checkpoint files, and `ddetr convert`."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from conftest import perturb_

from ddetr.cli.convert import add_args as add_convert_args
from ddetr.cli.convert import run as run_convert
from ddetr.interop import load_model, read_checkpoint, save_ddetr, save_official
from ddetr.models import DeformableDETR, preset

SMALL = dict(backbone="resnet18", hidden_dim=64, enc_layers=2, dec_layers=3, dim_feedforward=96, num_queries=12,
             num_classes=91, enc_n_points=3, dec_n_points=2)
VARIANTS = {
    "deformable-detr-single-scale": {},
    "deformable-detr-single-scale-dc5": dict(backbone="resnet50"),
    "deformable-detr": {},
    "deformable-detr-refine": {},
    "deformable-detr-two-stage": {},
}


def small_model(variant: str, seed: int = 0, **overrides) -> tuple[DeformableDETR, object]:
    """A small model of a preset with every float tensor moved off its init (so heads and biases matter)."""
    cfg = preset(variant, **{**SMALL, **VARIANTS.get(variant, {}), **overrides})
    torch.manual_seed(seed)
    return perturb_(DeformableDETR(cfg.model).eval(), seed), cfg


def official_state(model: DeformableDETR) -> dict[str, torch.Tensor]:
    """The official model's state dict, written from its module structure: ``backbone.0.body``, and with box
    refinement (two-stage) the decoder's ``bbox_embed`` (``class_embed``) registered a second time."""
    out = {}
    for key, value in model.state_dict().items():
        out[key.replace("backbone.body.", "backbone.0.body.")] = value.clone()
        head = key.split(".")[0]
        if (head == "bbox_embed" and model.cfg.with_box_refine) or (head == "class_embed" and model.cfg.two_stage):
            out["transformer.decoder." + key] = value.clone()
    return out


def save_like_official(state: dict[str, torch.Tensor], path) -> None:
    """What the official main.py writes: model, optimizer, scheduler, epoch and (here variant-less) args."""
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 2e-4}]}
    torch.save({"model": state, "optimizer": optimizer, "lr_scheduler": {"step_size": 40, "last_epoch": 3},
                "epoch": 49, "args": argparse.Namespace(lr=2e-4)}, path)  # args without variant fields


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 96, 128, generator=gen)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 70:] = True
    return x, mask


def same_outputs(a: DeformableDETR, b: DeformableDETR) -> None:
    x, mask = batch()
    with torch.no_grad():
        oa, ob = a(x, mask), b(x, mask)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(oa[key], ob[key], rtol=0, atol=1e-6)
    assert oa["pred_logits"].std(dim=1).min() > 1e-2  # not a constant prediction


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_official_checkpoint_loads_with_inferred_variant(variant, tmp_path):
    model, cfg = small_model(variant)
    save_like_official(official_state(model), tmp_path / "ckpt.pth")
    dilation = cfg.model.dilation
    # No args in the file: a single-scale one must be told about DC5 (True or False); multi-scale ones need nothing.
    loaded, cfg2, meta = load_model(tmp_path / "ckpt.pth",
                                    dilation=dilation if cfg.model.num_feature_levels == 1 else None,
                                    num_queries=SMALL["num_queries"] if cfg.model.two_stage else None)
    assert cfg2.model == cfg.model  # levels, backbone depth, refine, two-stage, classes, points, layers
    assert meta["format"] == "official" and meta["class_names"][:2] == ["N/A", "person"]
    assert meta["class_names"][90] == "toothbrush" and meta["category_ids"] == list(range(91))
    same_outputs(model, loaded)


def test_official_writer_layout(tmp_path):
    model, cfg = small_model("deformable-detr-two-stage")
    save_official(model, cfg, tmp_path / "out.pth")
    with torch.serialization.safe_globals([argparse.Namespace]):
        written = torch.load(tmp_path / "out.pth", weights_only=True)
    state = written["model"]
    assert written["args"].two_stage and written["args"].with_box_refine and not written["args"].dilation
    assert state.keys() == official_state(model).keys()
    assert not any(k.startswith("backbone.body.") for k in state)
    assert state["transformer.decoder.layers.0.self_attn.in_proj_weight"].shape == (3 * 64, 64)  # fused q/k/v
    assert torch.equal(state["transformer.decoder.class_embed.3.weight"], state["class_embed.3.weight"])


def test_hints_the_keys_cannot_show(tmp_path):
    model, cfg = small_model("deformable-detr-two-stage")
    save_like_official(official_state(model), tmp_path / "ckpt.pth")
    _, default_cfg, _ = read_checkpoint(tmp_path / "ckpt.pth")
    assert default_cfg.model.num_queries == 300 and default_cfg.model.nheads == 8 and not default_cfg.model.dilation
    _, hinted, _ = read_checkpoint(tmp_path / "ckpt.pth", num_queries=12, nheads=4)
    assert (hinted.model.num_queries, hinted.model.nheads, hinted.model.enc_n_points) == (12, 4, 6)
    with pytest.raises(ValueError, match="not a multiple of nheads"):
        read_checkpoint(tmp_path / "ckpt.pth", nheads=5)
    plain, _ = small_model("deformable-detr")
    save_like_official(official_state(plain), tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="num_queries: given 50 vs weights 12"):
        read_checkpoint(tmp_path / "plain.pth", num_queries=50)


def test_inconsistent_official_heads_are_refused(tmp_path):
    model, _ = small_model("deformable-detr-refine")
    state = official_state(model)
    state["transformer.decoder.bbox_embed.1.layers.0.bias"] += 1
    save_like_official(state, tmp_path / "alias.pth")
    with pytest.raises(ValueError, match=r"transformer\.decoder\.bbox_embed\.1\.layers\.0\.bias differs"):
        load_model(tmp_path / "alias.pth")
    plain, _ = small_model("deformable-detr")
    state = official_state(plain)
    state["class_embed.2.bias"] = state["class_embed.2.bias"] + 1  # shared heads must be identical
    save_like_official(state, tmp_path / "shared.pth")
    with pytest.raises(ValueError, match=r"class_embed\.2\.bias differs from class_embed\.0\.bias"):
        load_model(tmp_path / "shared.pth")
    state = official_state(plain)
    del state["transformer.level_embed"]
    save_like_official(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="missing transformer.level_embed"):
        load_model(tmp_path / "partial.pth")


class NotATensor:
    """Pickling this needs code execution on load; the loader must refuse it."""

    def __reduce__(self):
        return (math.sqrt, (4.0,))


def test_unsafe_or_foreign_files_are_refused(tmp_path):
    model, _ = small_model("deformable-detr-single-scale")
    torch.save({"model": official_state(model), "extra": NotATensor()}, tmp_path / "unsafe.pth")
    with pytest.raises(ValueError, match="Python objects other than tensors.*not loaded"):
        load_model(tmp_path / "unsafe.pth")
    torch.save({"model": {"fc.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="neither a ddetr checkpoint nor an official"):
        load_model(tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pth")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_our_checkpoints_round_trip(suffix, tmp_path):
    model, cfg = small_model("deformable-detr-refine", num_classes=3)
    path = tmp_path / f"model{suffix}"
    save_ddetr(model, cfg, path, class_names=["a", "b", "c"], category_ids=[1, 5, 9])
    loaded, cfg2, meta = load_model(path)
    assert cfg2 == cfg and meta["class_names"] == ["a", "b", "c"] and meta["category_ids"] == [1, 5, 9]
    same_outputs(model, loaded)


def test_training_checkpoint_meta_and_version(tmp_path):
    model, cfg = small_model("deformable-detr", num_classes=3)
    ckpt = {"format": "ddetr", "version": 1, "config": cfg.to_dict(), "model": model.state_dict(),
            "class_names": None, "category_ids": None, "train_config": {"data": {"val_size": 512, "max_size": 800}},
            "optimizer": {"state": {}, "param_groups": []}, "epoch": 3}
    torch.save(ckpt, tmp_path / "train.pth")
    _, _, meta = load_model(tmp_path / "train.pth")
    assert (meta["val_size"], meta["max_size"]) == (512, 800)
    torch.save({**ckpt, "version": 7}, tmp_path / "future.pth")
    with pytest.raises(ValueError, match="version 7 is not supported"):
        load_model(tmp_path / "future.pth")


@pytest.mark.parametrize("to", ["ddetr", "official", "hf"])
def test_convert_cli(to, tmp_path, capsys):
    model, cfg = small_model("deformable-detr-refine", num_classes=91)
    save_like_official(official_state(model), tmp_path / "official.pth")
    dst = tmp_path / ("out" if to == "hf" else "out.pth")
    parser = argparse.ArgumentParser()
    add_convert_args(parser)
    run_convert(parser.parse_args([str(tmp_path / "official.pth"), str(dst), "--to", to]))
    assert "with_box_refine=True" in capsys.readouterr().out
    converted, cfg2, meta = load_model(dst)
    assert cfg2.model == cfg.model and meta["format"] == to
    assert meta["class_names"][17] == "cat"  # COCO names travel to our and HF checkpoints (official has none)
    same_outputs(model, converted)
