"""Hugging Face ``DeformableDetrForObjectDetection`` layout: config.json <-> ModelConfig, state-dict renames both ways.

Key names (transformers v4, which v5's ``save_pretrained`` still writes and its loader renames on the fly):
``model.backbone.conv_encoder.model.*`` (timm ResNet), ``model.input_proj.*``, ``model.level_embed``,
``model.query_position_embeddings``, ``model.encoder.layers.i.{self_attn.*, self_attn_layer_norm, fc1, fc2,
final_layer_norm}``, ``model.decoder.layers.i.{self_attn.{q,k,v,out}_proj, self_attn_layer_norm, encoder_attn.*,
encoder_attn_layer_norm, fc1, fc2, final_layer_norm}``, ``class_embed.i``, ``bbox_embed.i`` and their aliases
``model.decoder.{class,bbox}_embed.i``. v5 in-memory names: ``model.backbone.model.*``, ``self_attn.o_proj``,
``mlp.fc1``/``mlp.fc2``. The decoder's norms swap meaning: HF ``self_attn_layer_norm`` is our (official) ``norm2``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ddetr.models.config import ModelConfig

Tensors = dict[str, torch.Tensor]

# Top-level HF (v5) prefixes -> ours.
_TOP = {
    "model.backbone.model": "backbone.body",
    "model.input_proj": "input_proj",
    "model.level_embed": "transformer.level_embed",
    "model.query_position_embeddings": "query_embed",
    "model.reference_points": "transformer.reference_points",
    "model.enc_output": "transformer.enc_output",
    "model.enc_output_norm": "transformer.enc_output_norm",
    "model.pos_trans": "transformer.pos_trans",
    "model.pos_trans_norm": "transformer.pos_trans_norm",
    "model.decoder.class_embed": "class_embed",
    "model.decoder.bbox_embed": "bbox_embed",
    "class_embed": "class_embed",
    "bbox_embed": "bbox_embed",
}
# Inside one encoder / decoder layer, HF (v5) module names -> ours (official). Unlisted names are the same.
_ENC = {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2", "mlp.fc1": "linear1", "mlp.fc2": "linear2",
        "self_attn": "self_attn"}
_DEC = {"self_attn_layer_norm": "norm2", "encoder_attn_layer_norm": "norm1", "final_layer_norm": "norm3",
        "encoder_attn": "cross_attn", "mlp.fc1": "linear1", "mlp.fc2": "linear2",
        "self_attn.o_proj": "self_attn.out_proj"}
_LAYER = re.compile(r"^model\.(encoder|decoder)\.layers\.(\d+)\.(.+)$")
_QKV = re.compile(r"^(transformer\.decoder\.layers\.\d+\.self_attn)\.([qkv])_proj\.(weight|bias)$")


def _swap_prefix(name: str, table: dict[str, str]) -> str | None:
    """Replace the longest table key that is a dotted prefix of ``name``; None when none matches."""
    for old in sorted(table, key=len, reverse=True):
        if name == old or name.startswith(old + "."):
            return table[old] + name[len(old):]
    return None


def v4_to_v5(key: str) -> str:
    """Apply transformers v5's load-time renames to a v4 key (v5 keys pass through unchanged)."""
    key = key.replace("backbone.conv_encoder.", "backbone.")
    key = key.replace("self_attn.out_proj.", "self_attn.o_proj.")
    return re.sub(r"(layers\.\d+)\.(fc[12])\.", r"\1.mlp.\2.", key)


def v5_to_v4(key: str) -> str:
    """Inverse of `v4_to_v5`: the names ``save_pretrained`` writes and the hub checkpoints use."""
    key = key.replace("model.backbone.model.", "model.backbone.conv_encoder.model.")
    key = key.replace("self_attn.o_proj.", "self_attn.out_proj.")
    return re.sub(r"(layers\.\d+)\.mlp\.(fc[12])\.", r"\1.\2.", key)


def hf_to_ours(state: Tensors) -> tuple[Tensors, list[str]]:
    """Rename an HF state dict (v4 or v5 names) to ours and fuse q/k/v; returns it and the keys it could not map.

    Head aliases (``model.decoder.*_embed``) are merged into ``class_embed``/``bbox_embed`` after checking that
    they hold the same values as their counterpart; ``num_batches_tracked`` buffers are dropped.
    """
    out: Tensors = {}
    unknown: list[str] = []
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        k5 = v4_to_v5(key)
        layer = _LAYER.match(k5)
        if layer:
            part, idx, rest = layer.groups()
            mapped = _swap_prefix(rest, _ENC if part == "encoder" else _DEC)
            new = None if mapped is None else f"transformer.{part}.layers.{idx}.{mapped}"
            if part == "decoder" and mapped is None and rest.startswith("self_attn."):
                new = f"transformer.decoder.layers.{idx}.{rest}"  # q/k/v_proj, fused below
        else:
            new = _swap_prefix(k5, _TOP)
        if new is None:
            unknown.append(key)
            continue
        fused = _QKV.match(new)
        if fused:
            prefix, which, kind = fused.groups()
            qkv.setdefault((prefix, kind), {})[which] = value
            continue
        if new in out:
            if not torch.equal(out[new], value):
                raise ValueError(f"HF checkpoint: {key} and its alias disagree (both map to {new})")
            continue
        out[new] = value
    for (prefix, kind), parts in qkv.items():
        missing = [f"{prefix}.{w}_proj.{kind}" for w in "qkv" if w not in parts]
        if missing:
            raise ValueError(f"HF checkpoint: incomplete self-attention projections, missing {missing}")
        out[f"{prefix}.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out, unknown


def ours_to_hf(state: Tensors, cfg: ModelConfig) -> Tensors:
    """Our state dict -> HF v4 names (every head index written out, refinement/two-stage aliases included)."""
    inv_top = {v: k for k, v in _TOP.items() if not k.startswith("model.decoder.")}
    inv = {"encoder": {v: k for k, v in _ENC.items()}, "decoder": {v: k for k, v in _DEC.items()}}
    out: Tensors = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        layer = re.match(r"^transformer\.(encoder|decoder)\.layers\.(\d+)\.(.+)$", key)
        if layer:
            part, idx, rest = layer.groups()
            base = f"model.{part}.layers.{idx}."
            if rest.startswith("self_attn.in_proj_") and part == "decoder":
                kind = rest.rsplit("_", 1)[1]
                for name, chunk in zip("qkv", value.chunk(3, 0)):
                    out[v5_to_v4(f"{base}self_attn.{name}_proj.{kind}")] = chunk.clone()
                continue
            mapped = _swap_prefix(rest, inv[part]) or rest
            out[v5_to_v4(base + mapped)] = value
            continue
        new = _swap_prefix(key, inv_top)
        if new is None:
            raise ValueError(f"cannot express {key} in the HF layout")
        out[v5_to_v4(new)] = value
        if key.startswith("bbox_embed.") and cfg.with_box_refine or key.startswith("class_embed.") and cfg.two_stage:
            out["model.decoder." + key] = value
    return {k: v.contiguous() for k, v in out.items()}


def backbone_name(config: dict[str, Any]) -> str:
    """The timm ResNet name in an HF config (v5 ``backbone_config`` or v4 ``backbone``), refusing other backbones."""
    sub = config.get("backbone_config") or {}
    model_type = sub.get("model_type", "timm_backbone")
    if model_type != "timm_backbone" or config.get("use_timm_backbone") is False:
        raise ValueError(f"HF config: only timm ResNet backbones are supported, got backbone_config type "
                         f"{model_type!r}")
    return sub.get("backbone") or config.get("backbone") or "resnet50"


def hf_config_to_ours(config: dict[str, Any]) -> tuple[ModelConfig, list[str] | None]:
    """An HF config.json dict -> (ModelConfig, class names from ``id2label`` or None)."""
    if config.get("model_type") != "deformable_detr":
        raise ValueError(f"HF config: model_type must be 'deformable_detr', got {config.get('model_type')!r}")
    get = config.get
    for field, expected in (("position_embedding_type", "sine"), ("activation_function", "relu")):
        if get(field, expected) != expected:
            raise ValueError(f"HF config: {field}={get(field)!r} is not supported (only {expected!r})")
    pairs = (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim"))
    for a, b in pairs:
        if get(a, 8 if "heads" in a else 1024) != get(b, 8 if "heads" in b else 1024):
            raise ValueError(f"HF config: {a}={get(a)} differs from {b}={get(b)}; ddetr uses one value for both")
    levels = get("num_feature_levels", 4)
    if levels == 2:
        raise ValueError("HF config: num_feature_levels=2 uses C3-C5 plus no extra level in HF but C4-C5 in ddetr")
    sub = get("backbone_config") or {}
    two_stage = bool(get("two_stage", False))
    id2label = {int(k): v for k, v in (get("id2label") or {}).items()}
    if sorted(id2label) != list(range(len(id2label))):
        raise ValueError(f"HF config: id2label keys must be 0..{len(id2label) - 1}, got {sorted(id2label)[:8]}")
    names = [id2label[i] for i in range(len(id2label))] if id2label else None
    num_classes = len(names) if names else get("num_labels", 91)
    cfg = ModelConfig(
        num_classes=num_classes, backbone=backbone_name(config),
        dilation=bool(get("dilation", False) or sub.get("output_stride") == 16),
        num_feature_levels=levels, hidden_dim=get("d_model", 256), nheads=get("encoder_attention_heads", 8),
        enc_layers=get("encoder_layers", 6), dec_layers=get("decoder_layers", 6),
        dim_feedforward=get("encoder_ffn_dim", 1024), dropout=float(get("dropout", 0.1)),
        num_queries=get("two_stage_num_proposals", 300) if two_stage else get("num_queries", 300),
        enc_n_points=get("encoder_n_points", 4), dec_n_points=get("decoder_n_points", 4),
        with_box_refine=bool(get("with_box_refine", False)), two_stage=two_stage)
    return cfg, names


def ours_to_hf_config(cfg: ModelConfig, id2label: dict[int, str] | None = None, aux_loss: bool = True,
                      ) -> dict[str, Any]:
    """ModelConfig -> an HF config.json dict that transformers 5.x builds the same network from."""
    if cfg.dense_attention:
        raise ValueError("the dense-attention DETR baseline has no Hugging Face Deformable DETR equivalent")
    if cfg.num_feature_levels == 2:
        raise ValueError("num_feature_levels=2 cannot be expressed in the HF layout (HF would use C3-C5)")
    if cfg.two_stage and not cfg.with_box_refine:
        raise ValueError("HF Deformable DETR requires with_box_refine when two_stage is set")
    id2label = id2label or {i: f"LABEL_{i}" for i in range(cfg.num_classes)}
    if sorted(id2label) != list(range(cfg.num_classes)):
        raise ValueError(f"id2label must name classes 0..{cfg.num_classes - 1}, got keys {sorted(id2label)[:5]}...")
    backbone: dict[str, Any] = {"model_type": "timm_backbone", "backbone": cfg.backbone, "num_channels": 3,
                                "features_only": True, "use_pretrained_backbone": False,
                                "out_indices": [2, 3, 4] if cfg.num_feature_levels > 1 else [4]}
    if cfg.dilation:
        backbone["output_stride"] = 16
    return {
        "architectures": ["DeformableDetrForObjectDetection"], "model_type": "deformable_detr",
        "backbone_config": backbone, "dilation": cfg.dilation, "num_feature_levels": cfg.num_feature_levels,
        "d_model": cfg.hidden_dim, "encoder_layers": cfg.enc_layers, "decoder_layers": cfg.dec_layers,
        "encoder_attention_heads": cfg.nheads, "decoder_attention_heads": cfg.nheads,
        "encoder_ffn_dim": cfg.dim_feedforward, "decoder_ffn_dim": cfg.dim_feedforward,
        "encoder_n_points": cfg.enc_n_points, "decoder_n_points": cfg.dec_n_points,
        "num_queries": cfg.num_queries, "two_stage_num_proposals": cfg.num_queries, "two_stage": cfg.two_stage,
        "with_box_refine": cfg.with_box_refine, "dropout": cfg.dropout, "auxiliary_loss": aux_loss,
        "position_embedding_type": "sine", "activation_function": "relu",
        "tie_word_embeddings": not cfg.with_box_refine,  # refined models have independent per-layer heads
        "id2label": {str(i): n for i, n in sorted(id2label.items())},
        "label2id": {n: i for i, n in sorted(id2label.items())},
    }


def read_hf_dir(path: str | Path) -> tuple[dict[str, Any], Tensors]:
    """(config.json dict, raw state dict) of an HF folder: model.safetensors (or shards) or pytorch_model.bin, read
    safely (`ddetr.engine.checkpoint`); anything unreadable is one ValueError naming the file."""
    from ddetr.engine.checkpoint import load_safetensors, load_torch

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path}: not a Hugging Face model folder (no config.json)")
    config = _read_json(config_file)
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        state = load_safetensors(path / "model.safetensors")
    elif index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: no 'weight_map' of tensor names to shard files")
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_safetensors(path / shard))
    elif (path / "pytorch_model.bin").is_file():
        state = load_torch(path / "pytorch_model.bin")
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise ValueError(f"{path / 'pytorch_model.bin'}: not a state dict of tensors")
    else:
        raise ValueError(f"{path}: no model.safetensors or pytorch_model.bin next to config.json")
    return config, state


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def preprocessor_config(meta: dict[str, Any]) -> dict[str, Any]:
    """preprocessor_config.json for transformers' DeformableDetrImageProcessor: resize as ddetr runs the model."""
    return {"image_processor_type": "DeformableDetrImageProcessor", "format": "coco_detection",
            "do_resize": True, "size": {"shortest_edge": meta["val_size"], "longest_edge": meta["max_size"]},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "do_pad": True}


def inference_size(folder: Path, config: dict[str, Any]) -> tuple[int | None, int | None]:
    """(shorter, longer) side: ddetr's keys in config.json, else preprocessor_config.json's size, else unknown."""
    if config.get("ddetr_val_size"):
        return config["ddetr_val_size"], config.get("ddetr_max_size")
    pre = folder / "preprocessor_config.json"
    try:
        size = json.loads(pre.read_text()).get("size") or {} if pre.is_file() else {}
    except (OSError, json.JSONDecodeError, AttributeError):
        size = {}
    if not isinstance(size, dict):
        return None, None
    return size.get("shortest_edge"), size.get("longest_edge")
