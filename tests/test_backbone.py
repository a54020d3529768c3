"""Backbones: ImageNet weights through torchvision's/timm's caches (offline: one-line stop), none / PATH, torchvision
ResNet sizes and strides, and timm features_only models inside the detector."""

from __future__ import annotations

import socket
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from ddetr.models import DeformableDETR, build, preset
from ddetr.models.backbone import Backbone
from ddetr.models.config import PRESETS, ModelConfig, set_field

SMALL = {"hidden_dim": 32, "nheads": 4, "enc_layers": 1, "dec_layers": 1, "dim_feedforward": 32, "num_queries": 5}
RESNET_CHANNELS = {"resnet18": [128, 256, 512], "resnet34": [128, 256, 512], "resnet50": [512, 1024, 2048],
                   "resnet101": [512, 1024, 2048]}  # C3-C5 widths of the ResNet paper's Table 1


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path) -> Path:
    """Every test runs as on an offline machine with an empty TORCH_HOME (returned): downloads and sockets fail."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))

    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError(f"offline test machine ({url})")

    def no_network(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    return home


def random_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """``model``'s state dict with every float tensor (BN statistics too) replaced by positive random values."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.rand(v.shape, generator=gen) + 0.5 if v.is_floating_point() else v.clone()
            for k, v in model.state_dict().items()}


def resnet18_file(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    state = random_state(torchvision.models.resnet18(), seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def torchvision_cache_file(home: Path, name: str) -> Path:
    """Where torchvision's own API keeps IMAGENET1K_V1 of ``name`` (file name from torchvision's URL)."""
    weights = getattr(torchvision.models, f"ResNet{name[6:]}_Weights").IMAGENET1K_V1
    return home / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]


def assert_body_is(body: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every backbone tensor equals the file's; every file tensor but the classifier was used."""
    own = {k: v for k, v in body.state_dict().items() if not k.endswith("num_batches_tracked")}
    used = {k for k in state if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert set(own) == used
    for key, value in own.items():
        assert torch.equal(value, state[key]), key


def test_paper_presets_start_from_imagenet_demos_from_scratch() -> None:
    assert ModelConfig().pretrained_backbone == "imagenet"
    weights = {name: p.model.pretrained_backbone for name, p in PRESETS.items()}
    assert weights["demo"] == "none" and weights["deformable-detr-single-scale-dc5"] == "imagenet"
    assert weights == {name: "none" if name.startswith("demo") else "imagenet" for name in PRESETS}


def test_imagenet_loads_from_torchvision_cache(offline) -> None:
    """A file under torchvision's name in $TORCH_HOME/hub/checkpoints is what the trainer's build() loads."""
    state = resnet18_file(torchvision_cache_file(offline, "resnet18"))
    cfg = preset("deformable-detr", backbone="resnet18", **SMALL)
    model, _, _ = build(cfg)
    assert_body_is(model.backbone.body, state)
    bare = DeformableDETR(cfg.model)  # the architecture alone never loads weights
    assert not torch.equal(bare.backbone.body.conv1.weight, state["conv1.weight"])


def test_imagenet_missing_offline_stops_in_one_line(offline) -> None:
    cfg = preset("deformable-detr", backbone="resnet18", **SMALL)
    with pytest.raises(ValueError) as err:
        build(cfg)
    text = str(err.value)
    assert "\n" not in text
    assert str(torchvision_cache_file(offline, "resnet18")) in text
    assert "pretrained_backbone=none" in text and "pretrained_backbone=PATH" in text
    build(cfg, backbone_weights=False)  # resuming / fine-tuning needs no ImageNet file


@pytest.mark.parametrize("weights", ["none", None])
def test_none_trains_from_scratch_without_looking(offline, weights) -> None:
    state = resnet18_file(torchvision_cache_file(offline, "resnet18"))
    model, _, _ = build(preset("deformable-detr", backbone="resnet18", pretrained_backbone=weights, **SMALL))
    assert not torch.equal(model.backbone.body.conv1.weight, state["conv1.weight"])


def test_path_loads_exactly_and_bad_paths_stop(tmp_path) -> None:
    state = resnet18_file(tmp_path / "r18.pth", seed=3)
    model, _, _ = build(preset("deformable-detr", backbone="resnet18", pretrained_backbone=str(tmp_path / "r18.pth"),
                               **SMALL))
    assert_body_is(model.backbone.body, state)

    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build(preset("deformable-detr", backbone="resnet18", pretrained_backbone=str(missing), **SMALL))
    short = {k: v for k, v in state.items() if k != "layer4.1.conv2.weight"}
    reshaped = {**state, "conv1.weight": torch.zeros(64, 3, 3, 3)}
    for bad, why in ((short, "layer4.1.conv2.weight"), (reshaped, r"conv1.weight \(64, 3, 3, 3\)")):
        torch.save(bad, tmp_path / "bad.pth")
        with pytest.raises(ValueError, match=f"not a torchvision resnet18 state dict .*{why}") as err:
            build(preset("deformable-detr", backbone="resnet18", pretrained_backbone=str(tmp_path / "bad.pth"),
                         **SMALL))
        assert "\n" not in str(err.value)


def test_config_validates_backbone_and_weights() -> None:
    for bad in ({"pretrained_backbone": 3}, {"pretrained_backbone": " "}, {"backbone": "timm:"},
                {"backbone": "vgg16"}, {"backbone": "timm:resnet50", "dilation": True},
                {"backbone": "resnet34", "dilation": True}):
        with pytest.raises(ValueError):
            ModelConfig(**bad)
    cfg = ModelConfig(backbone="timm:convnext_atto")
    for text, expected in (("none", "none"), ("null", None), ("/w/r50.pth", "/w/r50.pth")):
        set_field(cfg, "pretrained_backbone", text)
        assert cfg.pretrained_backbone == expected


@pytest.mark.parametrize("name", list(RESNET_CHANNELS))
def test_resnet_sizes_match_torchvision(name) -> None:
    """Parameters = torchvision's model minus fc (frozen BN keeps them as buffers); C3-C5 widths and strides."""
    with torch.device("meta"):
        reference = getattr(torchvision.models, name)()
        trained_bn = Backbone(name, 3, frozen_batchnorm=False)
        frozen = Backbone(name, 3, dilation=name in ("resnet50", "resnet101"))
        feats = frozen(torch.zeros(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool))
    ref_params = sum(p.numel() for n, p in reference.named_parameters() if not n.startswith("fc."))
    ref_tensors = sum(t.numel() for n, t in reference.state_dict().items()
                      if not n.startswith("fc.") and not n.endswith("num_batches_tracked"))
    assert sum(p.numel() for p in trained_bn.parameters()) == ref_params
    assert sum(t.numel() for t in frozen.state_dict().values()) == ref_tensors
    strides = [8, 16, 16] if name in ("resnet50", "resnet101") else [8, 16, 32]  # DC5 for the bottleneck ones
    assert frozen.num_channels == RESNET_CHANNELS[name] and frozen.strides == strides
    assert [tuple(f.shape) for f, _ in feats] == [(1, c, 64 // s, 96 // s) for c, s in zip(RESNET_CHANNELS[name],
                                                                                          strides)]


def test_resnet_freezing_follows_the_official_recipe() -> None:
    def trainable(**kw) -> set[str]:
        return {n.split(".")[0] for n, p in Backbone("resnet18", **kw).body.named_parameters() if p.requires_grad}

    assert trainable() == {"layer2", "layer3", "layer4"}
    assert trainable(frozen_batchnorm=False) == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}
    assert trainable(train_backbone=False) == set()


# ---- timm ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "test_mambaout"])  # mambaout: NHWC features
def test_timm_backbone_runs_in_detector(name) -> None:
    timm = pytest.importorskip("timm")
    info = timm.create_model(name, features_only=True, out_indices=(-3, -2, -1)).feature_info
    torch.manual_seed(0)
    model = DeformableDETR(ModelConfig(backbone=f"timm:{name}", pretrained_backbone="none", **SMALL)).eval()
    assert model.backbone.num_channels == info.channels() and model.backbone.strides == info.reduction()
    images, masks = torch.randn(2, 3, 64, 96), torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[1, :, 64:] = True  # image 1 is 64 wide, padded to 96
    feats = model.backbone(images, masks)
    for (feat, mask), c, s in zip(feats, info.channels(), info.reduction()):
        assert feat.shape == (2, c, 64 // s, 96 // s)
        assert torch.equal(mask[1], (torch.arange(96 // s) >= 64 // s).expand(64 // s, -1)) and not mask[0].any()
    with torch.no_grad():
        out = model(images, masks)
    assert out["pred_boxes"].shape == (2, 5, 4) and torch.isfinite(out["pred_logits"]).all()


@pytest.mark.parametrize("name", ["convnext_atto", "test_efficientnet"])
def test_timm_weights_file_loads_exactly(tmp_path, name) -> None:
    """A whole-model timm state dict (classifier included) fills every tensor of the features_only backbone."""
    timm = pytest.importorskip("timm")
    state = random_state(timm.create_model(name), 1)
    torch.save(state, tmp_path / "w.pth")
    model, _, _ = build(preset("deformable-detr", backbone=f"timm:{name}", pretrained_backbone=str(tmp_path / "w.pth"),
                               **SMALL))
    body = model.backbone.body.state_dict()
    if name == "convnext_atto":  # the features wrapper flattens module paths
        assert torch.equal(body["stages_1.blocks.0.conv_dw.weight"], state["stages.1.blocks.0.conv_dw.weight"])
    by_flat_name = {k.replace(".", "_"): k for k in state}
    for key, value in body.items():
        assert torch.equal(value, state[by_flat_name[key.replace(".", "_")]]), key
    unused = set(state) - {by_flat_name[k.replace(".", "_")] for k in body}
    head = ("head.", "conv_head.", "bn2.", "classifier.")  # convnext's / efficientnet's classifier end
    assert all(k.startswith(head) or k.endswith("num_batches_tracked") for k in unused), unused


def test_timm_frozen_batchnorm_and_trainable_stages() -> None:
    timm = pytest.importorskip("timm")
    cfg = ModelConfig(backbone="timm:test_efficientnet", pretrained_backbone="none", **SMALL)
    model = DeformableDETR(cfg)
    body = model.backbone.body
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in body.modules())
    assert any(isinstance(m, timm.layers.FrozenBatchNormAct2d) for m in body.modules())
    trained = {n.split(".")[0] + "." + n.split(".")[1] for n, p in body.named_parameters() if p.requires_grad}
    assert trained == {"blocks.2", "blocks.3", "blocks.4"}  # C3-C5; stem and the stride-2/4 blocks frozen
    DeformableDETR(cfg).load_state_dict(model.state_dict())  # frozen state dicts stay loadable, strictly
    frozen_all = Backbone("timm:test_efficientnet", train_backbone=False)
    assert not any(p.requires_grad for p in frozen_all.parameters())
    trains_bn = Backbone("timm:test_efficientnet", frozen_batchnorm=False)
    assert all(p.requires_grad for p in trains_bn.parameters())


def test_timm_imagenet_offline_stops_in_one_line(tmp_path, monkeypatch) -> None:
    pytest.importorskip("timm")
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: patch the live values too
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ValueError) as err:
        build(preset("deformable-detr", backbone="timm:resnet18", **SMALL))
    text = str(err.value)
    assert "\n" not in text and str(tmp_path / "hf" / "hub") in text
    assert "pretrained_backbone=none" in text and "pretrained_backbone=PATH" in text


def test_timm_user_errors_are_one_line(monkeypatch) -> None:
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match="has no model 'no_such_net'"):
        Backbone("timm:no_such_net")
    with pytest.raises(ValueError, match="DC5"):
        Backbone("timm:resnet18", dilation=True)
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(ValueError, match=r"pip install ddetr\[timm\]"):
        Backbone("timm:resnet18")


def test_timm_feature_sizes_follow_ceil_division() -> None:
    """Odd image sizes: every level's mask matches its feature map (what the encoder flattens together)."""
    pytest.importorskip("timm")
    backbone = Backbone("timm:convnext_atto", 3)
    feats = backbone(torch.randn(1, 3, 70, 90), torch.zeros(1, 70, 90, dtype=torch.bool))
    assert [tuple(m.shape) for _, m in feats] == [(1, *f.shape[-2:]) for f, _ in feats]
    assert [tuple(f.shape[-2:]) for f, _ in feats] == [(8, 11), (4, 5), (2, 2)]  # 4x4/4 stem, then 2x2/2 each
