"""The official fundamentalvision/Deformable-DETR checkpoint layout: renames both ways and variant inference.

Official keys equal ours except the backbone prefix (``backbone.0.body.*`` vs ``backbone.body.*``) and the head
aliases: with box refinement ``transformer.decoder.bbox_embed.i`` is the same module as ``bbox_embed.i`` (and with
two-stage ``transformer.decoder.class_embed.i`` as ``class_embed.i``), so the state dict lists both.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import torch

from ddetr.models.config import ModelConfig

Tensors = dict[str, torch.Tensor]

OFFICIAL_BACKBONE = "backbone.0.body."
OURS_BACKBONE = "backbone.body."
_ALIAS = re.compile(r"^transformer\.decoder\.((?:class|bbox)_embed\.\d+\..+)$")

# COCO 2017 category id -> name; label index = category id in the official/HF 91-class heads ("N/A" for gaps).
COCO_NAMES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple", 54: "sandwich",
    55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut", 61: "cake", 62: "chair",
    63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet", 72: "tv", 73: "laptop",
    74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster",
    81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}


def coco_class_names(num_classes: int = 91) -> list[str]:
    """Names for a head indexed by COCO category id ("N/A" where COCO has no category)."""
    return [COCO_NAMES.get(i, "N/A") for i in range(num_classes)]


def is_official(state: Tensors) -> bool:
    return any(k.startswith(OFFICIAL_BACKBONE) for k in state)


def official_to_ours(state: Tensors) -> Tensors:
    """Rename official keys to ours, merging the decoder head aliases after checking they equal the heads."""
    out: Tensors = {}
    aliases: Tensors = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        alias = _ALIAS.match(key)
        if alias:
            aliases[alias.group(1)] = value
        elif key.startswith(OFFICIAL_BACKBONE):
            out[OURS_BACKBONE + key[len(OFFICIAL_BACKBONE):]] = value
        else:
            out[key] = value
    for key, value in aliases.items():
        if key not in out:
            out[key] = value
        elif not torch.equal(out[key], value):
            raise ValueError(f"official checkpoint: transformer.decoder.{key} differs from {key}; they must be "
                             "the same module")
    return out


def ours_to_official(state: Tensors, cfg: ModelConfig) -> Tensors:
    """Our state dict -> official keys, adding the decoder head aliases that the official model registers."""
    if cfg.dense_attention:
        raise ValueError("the dense-attention DETR baseline has no official Deformable DETR equivalent")
    out: Tensors = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith(OURS_BACKBONE):
            out[OFFICIAL_BACKBONE + key[len(OURS_BACKBONE):]] = value
            continue
        out[key] = value
        if key.startswith("bbox_embed.") and cfg.with_box_refine or key.startswith("class_embed.") and cfg.two_stage:
            out["transformer.decoder." + key] = value
    return out


def _count(state: Tensors, prefix: str) -> int:
    """Number of consecutive indices i with keys starting ``prefix + f"{i}."``."""
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _backbone(state: Tensors) -> str:
    """ResNet depth from the block counts of layer3 and whether blocks have a third conv (bottleneck)."""
    bottleneck = f"{OURS_BACKBONE}layer1.0.conv3.weight" in state
    blocks = _count(state, f"{OURS_BACKBONE}layer3.")
    names = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50", (True, 23): "resnet101"}
    if (bottleneck, blocks) not in names:
        raise ValueError(f"checkpoint backbone is not a ResNet-18/34/50/101 (layer3 has {blocks} blocks, "
                         f"bottleneck={bottleneck})")
    return names[bottleneck, blocks]


def infer_config(state: Tensors, refine: bool | None = None, dilation: bool = False, nheads: int = 8,
                 num_queries: int | None = None) -> ModelConfig:
    """ModelConfig of a checkpoint in our key names, from tensor shapes and which keys exist.

    ``refine`` None means "refinement if the per-layer heads differ". The keys cannot show DC5 dilation, the head
    count, or (two-stage) the number of proposals: those come from ``dilation`` (official default False),
    ``nheads`` (default 8) and ``num_queries`` (default 300).
    """
    need = ["transformer.level_embed", "class_embed.0.weight", "transformer.encoder.layers.0.linear1.weight"]
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"not a Deformable DETR state dict (missing {', '.join(missing)})")
    levels, hidden = state["transformer.level_embed"].shape
    two_stage = "transformer.enc_output.weight" in state
    if two_stage:
        queries = num_queries or 300
    else:
        queries = state["query_embed.weight"].shape[0]
        if num_queries is not None and num_queries != queries:
            raise ValueError(f"num_queries={num_queries} given but the checkpoint has {queries} queries")
    dec_layers = _count(state, "transformer.decoder.layers.")
    if refine is None:
        refine = any(not torch.equal(state[f"{name}.{i}.{p}"], state[f"{name}.0.{p}"])
                     for name, p in (("class_embed", "weight"), ("bbox_embed", "layers.0.weight"))
                     for i in range(1, dec_layers) if f"{name}.{i}.{p}" in state)

    def points(part: str) -> int:
        n = state[f"transformer.{part}.layers.0.{'self_attn' if part == 'encoder' else 'cross_attn'}"
                  ".attention_weights.weight"].shape[0]
        if n % (nheads * levels):
            raise ValueError(f"attention_weights has {n} rows, not a multiple of nheads*levels = {nheads * levels}")
        return n // (nheads * levels)

    return ModelConfig(
        num_classes=state["class_embed.0.weight"].shape[0], backbone=_backbone(state), dilation=dilation,
        num_feature_levels=levels, hidden_dim=hidden, nheads=nheads,
        enc_layers=_count(state, "transformer.encoder.layers."), dec_layers=dec_layers,
        dim_feedforward=state["transformer.encoder.layers.0.linear1.weight"].shape[0], num_queries=queries,
        enc_n_points=points("encoder"), dec_n_points=points("decoder"), with_box_refine=refine, two_stage=two_stage)


# The official main.py's argparse fields that shape the network -> our ModelConfig fields.
_ARGS = {"dilation": "dilation", "with_box_refine": "with_box_refine", "two_stage": "two_stage",
         "num_feature_levels": "num_feature_levels", "nheads": "nheads", "num_queries": "num_queries",
         "dec_n_points": "dec_n_points", "enc_n_points": "enc_n_points", "hidden_dim": "hidden_dim",
         "dim_feedforward": "dim_feedforward", "enc_layers": "enc_layers", "dec_layers": "dec_layers",
         "backbone": "backbone"}


def read_config(state: Tensors, refine: bool, args: Any, source: str, dilation: bool | None = None,
                nheads: int | None = None, num_queries: int | None = None) -> ModelConfig:
    """ModelConfig of an official checkpoint from its ``args`` (the run's argparse Namespace) and its keys.

    Where ``args`` and the keys both tell a field they must agree, and so must any hint given; without ``args`` a
    single-scale checkpoint cannot tell DC5 from plain C5, so ``dilation`` must then be given. ``state`` is in our
    key names; ``refine`` says whether the official file had the decoder's box-head aliases (refinement).
    """
    given = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    told = {ours: given[theirs] for theirs, ours in _ARGS.items() if theirs in given}
    source_of = dict.fromkeys(told, "args")
    for field, hint in (("dilation", dilation), ("nheads", nheads), ("num_queries", num_queries)):
        if hint is not None and field in told and told[field] != hint:
            raise ValueError(f"{source}: {field}={hint!r} given, but the checkpoint's args say {told[field]!r}")
        if hint is not None:
            told[field], source_of[field] = hint, "given"
    keys_cfg = infer_config(state, refine, bool(told.get("dilation", False)), int(told.get("nheads", 8)),
                            told.get("num_queries") if "transformer.enc_output.weight" in state else None)
    checked = [f for f in told if f not in ("dilation", "nheads") and not (f == "num_queries" and keys_cfg.two_stage)]
    disagree = [f"{f}: {source_of[f]} {told[f]!r} vs weights {getattr(keys_cfg, f)!r}" for f in checked
                if told[f] != getattr(keys_cfg, f)]
    if disagree:
        raise ValueError(f"{source}: the variant disagrees with the checkpoint's weights ({'; '.join(disagree)})")
    if "dilation" not in told and keys_cfg.num_feature_levels == 1:
        raise ValueError(f"{source}: a single-scale official checkpoint without args cannot tell DC5 from plain C5; "
                         "say which with dilation=True/False (CLI: --dilation / --no-dilation)")
    return keys_cfg


def config_to_args(cfg: ModelConfig) -> argparse.Namespace:
    """The official main.py's args for this variant (what its configs/*.sh set), as official checkpoints carry."""
    return argparse.Namespace(**{theirs: getattr(cfg, ours) for theirs, ours in _ARGS.items()},
                              num_classes=cfg.num_classes, position_embedding="sine", masks=False, aux_loss=True)
