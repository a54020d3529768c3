"""Backbones (torchvision ResNet-18/34/50/101 or any timm ``features_only`` model) giving C3-C5 or C5 with their
padding masks, their pretrained weights (ImageNet through torchvision's/timm's own caches, or a local state dict),
and the sine position encoding of Deformable DETR."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from .convs import speed_up_training_convs

log = logging.getLogger(__name__)

RESNET_CHANNELS = {"resnet18": (128, 256, 512), "resnet34": (128, 256, 512),
                   "resnet50": (512, 1024, 2048), "resnet101": (512, 1024, 2048)}
TIMM_PREFIX = "timm:"
_WAYS_OUT = ("--set detector.model.pretrained_backbone=PATH ({} state dict), or "
             "--set detector.model.pretrained_backbone=none to train from scratch on purpose")


class Backbone(nn.Module):
    """A torchvision ResNet (classifier dropped) or a timm ``features_only`` model, randomly initialised; returns
    its last ``num_outputs`` of the C3, C4, C5 stages (strides 8/16/32) with masks. Weights: `load_pretrained`."""

    def __init__(self, name: str = "resnet50", num_outputs: int = 3, dilation: bool = False,
                 frozen_batchnorm: bool = True, train_backbone: bool = True) -> None:
        super().__init__()
        self.name, self.num_outputs = name, num_outputs
        self.is_timm, self.channels_last = name.startswith(TIMM_PREFIX), False
        if self.is_timm:
            if dilation:
                raise ValueError(f"backbone {name}: dilation (DC5) needs torchvision resnet50/101")
            try:
                self.body = create_timm(name, num_outputs, pretrained=False)
            except ValueError:
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. a model without features_only support
                raise ValueError(f"backbone {name}: timm cannot build it with features_only ({first_line(exc)})"
                                 ) from None
            info = self.body.feature_info
            self.num_channels, self.strides = list(info.channels()), list(info.reduction())
            self.channels_last = getattr(self.body, "output_fmt", "NCHW") == "NHWC"
            stage = info.info[-min(3, len(info.info))]["module"]  # first of the C3-C5 stages
            first_trained = (stage + ".", stage.replace(".", "_") + ".", "model." + stage + ".")
            if frozen_batchnorm:
                self.body = _timm().layers.freeze_batch_norm_2d(self.body)
        elif name in RESNET_CHANNELS:
            norm = FrozenBatchNorm2d if frozen_batchnorm else nn.BatchNorm2d
            kwargs = {"replace_stride_with_dilation": [False, False, True]} if dilation else {}
            body = getattr(torchvision.models, name)(weights=None, norm_layer=norm, **kwargs)
            del body.fc, body.avgpool
            speed_up_training_convs(body)
            self.body = body
            self.num_channels = list(RESNET_CHANNELS[name][3 - num_outputs:])
            self.strides = [8, 16, 32 if not dilation else 16][3 - num_outputs:]
            first_trained = ("layer2.",)
        else:
            raise ValueError(f"unknown backbone {name!r}; choose resnet18/34/50/101 or timm:NAME")
        # Parameters come in forward order: with frozen BatchNorm (a pretrained start) the stem and the stage
        # before C3 stay frozen, as in the official code; train_backbone=False freezes everything.
        names = [n for n, _ in self.body.named_parameters()]
        start = next((i for i, n in enumerate(names) if n.startswith(first_trained)), 0)
        for i, (_, p) in enumerate(self.body.named_parameters()):
            p.requires_grad_(train_backbone and (i >= start or not frozen_batchnorm))

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """images (B, 3, H, W), mask (B, H, W) True on padding -> [(feature (B, C, h, w), mask (B, h, w)), ...]."""
        if self.is_timm:
            feats = list(self.body(images))
            if self.channels_last:
                feats = [f.permute(0, 3, 1, 2) for f in feats]
            return [(f, resize_mask(mask, f.shape[-2:])) for f in feats]
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(images))))
        outs = []
        for i, name in enumerate(("layer1", "layer2", "layer3", "layer4")):
            x = getattr(b, name)(x)
            if i >= 4 - self.num_outputs:
                outs.append((x, resize_mask(mask, x.shape[-2:])))
        return outs

    def load_pretrained(self, weights: str | None) -> None:
        """Load ``"imagenet"`` (torchvision IMAGENET1K_V1 / timm's default tag, cached), a state-dict PATH, or
        nothing for ``"none"``/None; every backbone tensor must be covered (a classifier in the file is ignored)."""
        if weights is None or weights.lower() == "none":
            return
        imagenet = weights.lower() == "imagenet"
        if self.is_timm:
            state = self._timm_imagenet() if imagenet else _match_flattened(self.body, _read_timm_file(weights))
            what = f"a timm {self.name[len(TIMM_PREFIX):]} state dict"
        else:
            state = _torchvision_imagenet(self.name) if imagenet else _read_state(weights)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            what = f"a torchvision {self.name} state dict"
        load_exact(self.body, state, "ImageNet weights" if imagenet else weights, what)
        log.info("backbone %s: weights from %s", self.name, weights)

    def _timm_imagenet(self) -> dict[str, torch.Tensor]:
        """timm's default pretrained weights for this model, through timm's own cache (Hugging Face hub or URL)."""
        try:
            return create_timm(self.name, self.num_outputs, pretrained=True).state_dict()
        except Exception as exc:  # noqa: BLE001 - offline, missing file, no weights: one line with the cause
            cfg = getattr(self.body, "pretrained_cfg", None) or {}
            tag = cfg.get("architecture", "") + ("." + cfg["tag"] if cfg.get("tag") else "")
            raise ValueError(f"backbone weights timm {tag or self.name} (ImageNet) are not available: not in "
                             f"{_timm_cache(cfg)} and the download failed ({first_line(exc)}); fetch them once "
                             f"online into that cache, or " + _WAYS_OUT.format("a timm")) from None


def create_timm(name: str, num_outputs: int, pretrained: bool) -> nn.Module:
    """``timm.create_model(MODEL, features_only=True)`` for backbone ``timm:MODEL``, returning its last stages."""
    timm = _timm(name)
    model_name = name[len(TIMM_PREFIX):]
    if not timm.is_model(model_name):
        raise ValueError(f"backbone {name}: timm {timm.__version__} has no model {model_name!r} "
                         "(see timm.list_models())")
    return timm.create_model(model_name, pretrained=pretrained, features_only=True, out_indices=num_outputs)


def _timm(name: str = "timm:...") -> Any:
    try:
        import timm
    except ImportError:
        raise ValueError(f"backbone {name} needs the timm package: pip install ddetr[timm]") from None
    return timm


def _timm_cache(cfg: dict) -> str:
    """Where timm's download of these weights lives: the Hugging Face hub cache or torch.hub's checkpoints."""
    if cfg.get("hf_hub_id"):
        from huggingface_hub import constants
        return str(Path(constants.HF_HUB_CACHE) / ("models--" + cfg["hf_hub_id"].split("@")[0].replace("/", "--")))
    if cfg.get("url"):
        return str(Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg["url"]).path).name)
    return "any cache (timm lists no pretrained weights for it)"


def _torchvision_imagenet(name: str) -> dict[str, torch.Tensor]:
    """torchvision's IMAGENET1K_V1 weights of ``name`` from $TORCH_HOME/hub/checkpoints, downloaded once if absent."""
    weights = getattr(torchvision.models, name.replace("resnet", "ResNet") + "_Weights").IMAGENET1K_V1
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    existed = path.is_file()
    try:
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - offline or unreadable: one line with the cause and the ways out
        if existed:
            raise ValueError(f"{path}: cannot read the {name} ImageNet weights ({first_line(exc)}); "
                             "delete the file to download it again") from None
        raise ValueError(f"backbone weights {name} IMAGENET1K_V1 are not available: no file {path} and the "
                         f"download failed ({first_line(exc)}); place torchvision's file there, or "
                         + _WAYS_OUT.format("a torchvision")) from None


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained_backbone {path}: no such file (expected imagenet, none or the path "
                                "of a state dict)")
    return path


def _read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .pth (weights_only) or .safetensors file."""
    path = _existing(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report any unreadable file in one line
        raise ValueError(f"{path}: cannot read backbone weights ({first_line(exc)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict (a mapping of names to tensors)")
    return state


def _read_timm_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A timm state dict (.pth or .safetensors) read by timm's own loader (weights_only), which also unwraps timm
    training checkpoints ({'state_dict': ...}) and DataParallel ``module.`` prefixes."""
    path = _existing(path)
    try:
        return _timm().models.load_state_dict(str(path))
    except Exception as exc:  # noqa: BLE001 - report any unreadable file in one line
        raise ValueError(f"{path}: cannot read backbone weights ({first_line(exc)})") from None


def _match_flattened(body: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a whole-model timm state dict to the keys of its features_only wrapper, which flattens module paths
    (``stages.1.x`` becomes ``stages_1.x``) or prefixes ``model.``: keys are matched with dots as underscores."""
    flat = {k.replace(".", "_"): v for k, v in state.items()}
    out = {}
    for key in body.state_dict():
        for candidate in (key, key.removeprefix("model.")):
            value = flat.get(candidate.replace(".", "_"))
            if value is not None:
                out[key] = value
                break
    return out


def load_exact(body: nn.Module, state: dict[str, torch.Tensor], source: str, what: str) -> None:
    """Load ``state`` into ``body``, refusing in one line unless every tensor (but BN batch counters) is covered."""
    own = body.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{source}: not {what} (shape of {', '.join(wrong[:3])})")
    missing, unexpected = body.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{source}: not {what} (missing {missing[:5]}, unexpected {unexpected[:5]})")


def first_line(exc: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0][:120]}" if text else exc.__class__.__name__


def resize_mask(mask: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a (B, H, W) padding mask, as the official code does."""
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]


class PositionEmbeddingSine(nn.Module):
    """2-D sine/cosine encoding over non-padded pixels; y and x each get ``num_pos_feats`` channels.

    Deformable DETR normalises (cumsum - 0.5) / (last + eps) * 2*pi (the -0.5 offset differs from DETR).
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi) -> None:
        super().__init__()
        self.num_pos_feats, self.temperature, self.scale = num_pos_feats, temperature, scale

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask (B, H, W) True on padding -> (B, 2*num_pos_feats, H, W)."""
        not_mask = (~mask).float()
        y = not_mask.cumsum(1)
        x = not_mask.cumsum(2)
        eps = 1e-6
        y = (y - 0.5) / (y[:, -1:, :] + eps) * self.scale
        x = (x - 0.5) / (x[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = interleave_sin_cos(x[..., None] / dim_t)
        pos_y = interleave_sin_cos(y[..., None] / dim_t)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def interleave_sin_cos(t: torch.Tensor) -> torch.Tensor:
    """(..., F) -> (..., F): sin of even channels and cos of odd channels, interleaved."""
    return torch.stack((t[..., 0::2].sin(), t[..., 1::2].cos()), dim=-1).flatten(-2)
