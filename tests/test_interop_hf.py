"""Parity with Hugging Face transformers' DeformableDetrForObjectDetection for all five paper variants.

Each case builds HF's model with random (perturbed) weights, saves it with ``save_pretrained``, loads it with
ddetr and compares outputs; then checks the official layout built from the same weights by the spec's rename
rules (written out here independently of ddetr), and the round trip ddetr -> HF -> ddetr.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil

import pytest
import torch
from conftest import perturb_
from safetensors.torch import load_file, save_file
from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, DeformableDetrImageProcessor

from ddetr.interop import load_model, save_hf, save_official
from ddetr.models import DeformableDETR, preset
from ddetr.models.postprocess import PostProcess

TOL = 1e-4
NUM_LABELS, QUERIES, DEC_LAYERS = 7, 12, 3
VARIANTS = {
    "single-scale": dict(num_feature_levels=1),
    "single-scale-dc5": dict(num_feature_levels=1, dilation=True, backbone="resnet50"),
    "multi-scale": dict(),
    "refine": dict(with_box_refine=True),
    "refine-two-stage": dict(with_box_refine=True, two_stage=True),
}


def hf_config(backbone: str = "resnet18", num_feature_levels: int = 4, dilation: bool = False,
              **kwargs) -> DeformableDetrConfig:
    """A small HF config: timm ResNet built without downloads, d_model 64, 3 and 2 sampling points."""
    timm = {"model_type": "timm_backbone", "backbone": backbone, "num_channels": 3, "features_only": True,
            "use_pretrained_backbone": False, "out_indices": [2, 3, 4] if num_feature_levels > 1 else [4]}
    if dilation:
        timm["output_stride"] = 16
    return DeformableDetrConfig(
        backbone_config=timm, dilation=dilation, num_feature_levels=num_feature_levels, d_model=64,
        encoder_layers=2, decoder_layers=DEC_LAYERS, encoder_ffn_dim=96, decoder_ffn_dim=96,
        encoder_n_points=3, decoder_n_points=2, num_queries=QUERIES, two_stage_num_proposals=QUERIES,
        num_labels=NUM_LABELS, id2label={i: f"class{i}" for i in range(NUM_LABELS)}, **kwargs)


def images_and_masks() -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of two: a 96x128 image and a 64x96 one zero-padded to 96x128 (mask True on padding)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 96, 128, generator=gen)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 64:] = True
    mask[1, :, 96:] = True
    x[1][:, mask[1]] = 0
    return x, mask


def outputs_ours(model: DeformableDETR, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = model(x, mask)
    return out["pred_logits"], out["pred_boxes"]


def outputs_hf(model: DeformableDetrForObjectDetection, x: torch.Tensor, mask: torch.Tensor | None):
    with torch.no_grad():
        out = model(pixel_values=x, pixel_mask=None if mask is None else (~mask).long())
    return out.logits, out.pred_boxes


def assert_close(ours: tuple[torch.Tensor, ...], theirs: tuple[torch.Tensor, ...]) -> None:
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= TOL


@pytest.fixture(scope="module", params=list(VARIANTS))
def case(request, tmp_path_factory):
    """(variant name, HF model in eval mode, folder written by its save_pretrained)."""
    torch.manual_seed(0)
    hf = DeformableDetrForObjectDetection(hf_config(**VARIANTS[request.param])).eval()
    perturb_(hf, seed=len(request.param))
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, folder


def test_hf_checkpoint_matches_transformers(case):
    name, hf, folder = case
    model, cfg, meta = load_model(folder)
    m, expected = cfg.model, VARIANTS[name]
    assert (m.num_feature_levels, m.dilation, m.with_box_refine, m.two_stage, m.backbone) == (
        expected.get("num_feature_levels", 4), expected.get("dilation", False), expected.get("with_box_refine", False),
        expected.get("two_stage", False), expected.get("backbone", "resnet18"))
    assert (m.num_classes, m.num_queries, m.enc_n_points, m.dec_n_points, m.dec_layers) == (NUM_LABELS, QUERIES,
                                                                                               3, 2, DEC_LAYERS)
    assert meta["format"] == "hf" and meta["class_names"] == [f"class{i}" for i in range(NUM_LABELS)]
    assert_parity(model, hf)
    x, mask = images_and_masks()
    ours = outputs_ours(model, x, mask)
    # The comparison is not vacuous: queries and the two images give clearly different predictions.
    assert ours[0].std(dim=1).min() > 1e-2
    assert (ours[0][0] - ours[0][1]).abs().max() > 1e-2


def hf_to_official_reference(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official layout from HF's in-memory (v5) state dict, by inverting peers.md §1.8 rule by rule."""
    out, qkv = {}, {}
    for key, value in hf_state.items():
        if key.endswith("num_batches_tracked"):
            continue
        key = key.replace("model.backbone.model.", "backbone.0.body.")
        if key.startswith("model."):
            key = key[len("model."):]
            if not key.startswith(("input_proj", "query_position_embeddings")):
                key = "transformer." + key
        key = key.replace("query_position_embeddings", "query_embed")
        key = key.replace("mlp.fc1", "linear1").replace("mlp.fc2", "linear2")
        key = key.replace("self_attn.o_proj", "self_attn.out_proj")
        if ".encoder.layers." in key:
            key = key.replace("self_attn_layer_norm", "norm1").replace("final_layer_norm", "norm2")
        if ".decoder.layers." in key:
            key = key.replace("encoder_attn_layer_norm", "norm1").replace("self_attn_layer_norm", "norm2")
            key = key.replace("final_layer_norm", "norm3").replace("encoder_attn.", "cross_attn.")
            m = re.match(r"(.*self_attn)\.([qkv])_proj\.(weight|bias)$", key)
            if m:
                qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
                continue
        out[key] = value.clone()
    for (prefix, kind), parts in qkv.items():
        out[f"{prefix}.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def test_official_checkpoint_matches_transformers(case, tmp_path):
    name, hf, _ = case
    official = hf_to_official_reference(hf.state_dict())
    path = tmp_path / "checkpoint.pth"
    v = VARIANTS[name]
    # The official main.py's argparse Namespace, as its released checkpoints carry it: the only place that tells
    # DC5 from plain single-scale and the two-stage proposal count.
    args = argparse.Namespace(lr=2e-4, backbone=v.get("backbone", "resnet18"), dilation=v.get("dilation", False),
                              position_embedding="sine", num_feature_levels=v.get("num_feature_levels", 4),
                              enc_layers=2, dec_layers=DEC_LAYERS, dim_feedforward=96, hidden_dim=64, dropout=0.1,
                              nheads=8, num_queries=QUERIES, dec_n_points=2, enc_n_points=3,
                              with_box_refine=v.get("with_box_refine", False), two_stage=v.get("two_stage", False))
    torch.save({"model": official, "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4}]},
                "lr_scheduler": {"step_size": 40}, "epoch": 49, "args": args}, path)
    model, cfg, meta = load_model(path)  # no hints: everything comes from the args and the keys
    assert meta["format"] == "official" and cfg.model.with_box_refine == v.get("with_box_refine", False)
    assert cfg.model.dilation == v.get("dilation", False) and cfg.model.num_queries == QUERIES
    assert_parity(model, hf)
    if v.get("num_feature_levels") == 1:  # without args a single-scale file cannot tell DC5: loading asks
        torch.save({"model": official}, tmp_path / "no_args.pth")
        with pytest.raises(ValueError, match="dilation=True/False"):
            load_model(tmp_path / "no_args.pth")
        with pytest.raises(ValueError, match="dilation"):  # a hint that contradicts the args is named
            load_model(path, dilation=not v.get("dilation", False))
    # ddetr's own official writer produces exactly these keys and tensors.
    save_official(model, cfg, tmp_path / "ours.pth")
    with torch.serialization.safe_globals([argparse.Namespace]):
        ours = torch.load(tmp_path / "ours.pth", weights_only=True)
    written = ours["model"]
    assert all(getattr(ours["args"], k) == getattr(args, k) for k in ("dilation", "with_box_refine", "two_stage"))
    assert sorted(written) == sorted(official)
    assert all(torch.equal(written[k], official[k]) for k in official)
    args.with_box_refine = not args.with_box_refine
    torch.save({"model": official, "args": args}, tmp_path / "wrong_args.pth")
    with pytest.raises(ValueError, match="with_box_refine: args"):
        load_model(tmp_path / "wrong_args.pth")


def test_round_trip_ddetr_hf_ddetr(case, tmp_path):
    _, hf, folder = case
    model, cfg, meta = load_model(folder)
    save_hf(model, cfg, tmp_path / "hf", meta)
    again, info = DeformableDetrForObjectDetection.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info
    assert_parity(model, again.eval())
    back, cfg2, meta2 = load_model(tmp_path / "hf")
    assert cfg2.model == cfg.model and meta2["class_names"] == meta["class_names"]
    state, state2 = model.state_dict(), back.state_dict()
    assert state.keys() == state2.keys() and all(torch.equal(state[k], state2[k]) for k in state)


@pytest.mark.parametrize("variant", ["deformable-detr-refine", "deformable-detr-two-stage"])
def test_trained_here_with_distinct_heads_loads_in_transformers(variant, tmp_path):
    """A ddetr model whose per-layer class heads all differ (as after training) keeps them in transformers."""
    cfg = preset(variant, backbone="resnet18", hidden_dim=64, enc_layers=2, dec_layers=2, dim_feedforward=96,
                 num_queries=10, num_classes=4)
    model = DeformableDETR(cfg.model).eval()
    perturb_(model, seed=3)
    assert not torch.equal(model.class_embed[0].weight, model.class_embed[1].weight)
    save_hf(model, cfg, tmp_path)
    hf, info = DeformableDetrForObjectDetection.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert_parity(model, hf.eval())


@pytest.mark.parametrize("variant", ["multi-scale", "refine-two-stage"])
def test_post_processing_matches_transformers(variant):
    hf = DeformableDetrForObjectDetection(hf_config(**VARIANTS[variant])).eval()
    perturb_(hf, seed=5)
    x, mask = images_and_masks()
    with torch.no_grad():
        out = hf(pixel_values=x, pixel_mask=(~mask).long())
    sizes = torch.tensor([[480, 640], [320, 480]])
    theirs = DeformableDetrImageProcessor().post_process_object_detection(out, threshold=0.3, target_sizes=sizes,
                                                                          top_k=20)
    ours = PostProcess(20)({"pred_logits": out.logits, "pred_boxes": out.pred_boxes}, sizes, threshold=0.3)
    assert sum(len(d["scores"]) for d in ours) > 0
    for a, b in zip(ours, theirs):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["scores"], b["scores"])
        torch.testing.assert_close(a["boxes"], b["boxes"])


def assert_parity(model: DeformableDETR, hf: DeformableDetrForObjectDetection) -> None:
    """Ours vs HF on the padded batch of two (and the first image alone).

    Two-stage: ddetr never ranks padded pixels among the proposals while HF (like the official code) may, so
    whenever HF's top-k reaches into the padding the padded image differs by design. There the padded image is
    compared alone at its valid size and the batch only on its unpadded image — both exact for both models.
    """
    x, mask = images_and_masks()
    assert_close(outputs_ours(model, x[:1], None), outputs_hf(hf, x[:1], None))
    if not model.cfg.two_stage:
        assert_close(outputs_ours(model, x, mask), outputs_hf(hf, x, mask))
        return
    assert_close([t[:1] for t in outputs_ours(model, x, mask)], [t[:1] for t in outputs_hf(hf, x, mask)])
    alone = x[1:, :, :64, :96]
    assert_close(outputs_ours(model, alone, None), outputs_hf(hf, alone, None))


def to_v4(key: str) -> str:
    """transformers v5 in-memory names -> v4 names (the inverse of v5's conversion_mapping renames)."""
    key = key.replace("model.backbone.model.", "model.backbone.conv_encoder.model.")
    key = key.replace("self_attn.o_proj.", "self_attn.out_proj.")
    return re.sub(r"layers\.(\d+)\.mlp\.(fc[12])\.", r"layers.\1.\2.", key)


@pytest.fixture(scope="module")
def refine_model(tmp_path_factory):
    hf = DeformableDetrForObjectDetection(hf_config(with_box_refine=True)).eval()
    perturb_(hf, seed=7)
    folder = tmp_path_factory.mktemp("refine-names")
    hf.save_pretrained(folder)
    return hf, folder


def test_v5_names_in_pytorch_model_bin(refine_model, tmp_path):
    hf, folder = refine_model
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    state = hf.state_dict()  # v5 names, every alias present
    assert any(".mlp.fc1." in k for k in state) and any("backbone.model." in k for k in state)
    torch.save({k: v.clone() for k, v in state.items()}, tmp_path / "pytorch_model.bin")
    model, _, _ = load_model(tmp_path)
    assert_parity(model, hf)


def test_v4_names_without_tied_duplicates(refine_model, tmp_path):
    hf, folder = refine_model
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    state = {to_v4(k): v.clone() for k, v in hf.state_dict().items()}
    # Drop what a tied checkpoint omits: class heads 1.. (tied to 0) and the top-level box heads (aliases).
    state = {k: v for k, v in state.items() if not re.match(r"class_embed\.[1-9]|bbox_embed\.", k)}
    assert "model.decoder.layers.0.fc1.weight" in state and "class_embed.1.weight" not in state
    save_file(state, tmp_path / "model.safetensors")
    model, _, meta = load_model(tmp_path / "model.safetensors")
    assert "class_embed.1.weight" in meta["tied_heads"]
    assert_parity(model, hf)


def _write(folder, config: dict, state: dict) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, folder / "model.safetensors")


def test_mismatches_are_refused_by_name(refine_model, tmp_path):
    _, folder = refine_model
    config = json.loads((folder / "config.json").read_text())
    state = load_file(folder / "model.safetensors")
    _write(tmp_path / "layers", {**config, "encoder_layers": 3}, state)
    with pytest.raises(ValueError, match=r"missing keys: transformer\.encoder\.layers\.2\."):
        load_model(tmp_path / "layers")
    _write(tmp_path / "extra", config, {**state, "model.decoder.layers.0.surprise.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="surprise"):
        load_model(tmp_path / "extra")
    labels = {str(i): f"c{i}" for i in range(NUM_LABELS + 1)}
    _write(tmp_path / "classes", {**config, "id2label": labels}, state)
    with pytest.raises(ValueError, match=r"shape mismatches: class_embed\.0\.bias"):
        load_model(tmp_path / "classes")
    _write(tmp_path / "backbone", {**config, "backbone_config": {"model_type": "resnet"}}, state)
    with pytest.raises(ValueError, match="only timm ResNet backbones"):
        load_model(tmp_path / "backbone")
    with pytest.raises(ValueError, match=f"has {NUM_LABELS} classes, not 91"):
        load_model(folder, num_classes=91)
    with pytest.raises(ValueError, match="dilation=True given"):
        load_model(folder, dilation=True)
