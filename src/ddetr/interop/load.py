"""Read any supported checkpoint into a DeformableDETR and write ours, the official and the HF layouts.

Formats: our checkpoints (``.pth`` dict with ``"format": "ddetr"``, or ``.safetensors`` whose metadata holds the
config), official ``.pth`` files (``{"model": state_dict, ...}`` with ``backbone.0.body.*`` keys; optimizer and
scheduler state are ignored), and Hugging Face model folders (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``, v4 or v5 key names). Unpickling admits only tensors, plain containers and the
official files' argparse.Namespace: no code runs.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddetr.engine import checkpoint as ckpt_io
from ddetr.interop import hf, official
from ddetr.interop.meta import label_meta, read_sidecar, write_sidecar
from ddetr.models.config import DetectorConfig, ModelConfig
from ddetr.models.deformable_detr import DeformableDETR

Tensors = dict[str, torch.Tensor]
_HEAD = re.compile(r"^(class_embed|bbox_embed)\.(\d+)\.(.+)$")


def _torch_load(path: Path) -> Any:
    """torch.load with weights_only (`ddetr.engine.checkpoint.load_torch`: one-line errors, no unsafe advice);
    argparse.Namespace (official checkpoints store their args) is allowed; a dict that says it is ours is checked."""
    ckpt = ckpt_io.load_torch(path, allowed=(argparse.Namespace,))
    if isinstance(ckpt, dict):
        ckpt_io.check_ddetr_layout(ckpt, path)
    return ckpt


def _fill_tied_heads(state: Tensors, cfg: ModelConfig) -> list[str]:
    """HF omits per-layer heads tied to index 0: copy index 0 into every absent index; returns what was filled."""
    filled = []
    num_pred = cfg.dec_layers + int(cfg.two_stage)
    for key in [k for k in state if _HEAD.match(k) and _HEAD.match(k).group(2) == "0"]:
        name, _, rest = _HEAD.match(key).groups()
        for i in range(1, num_pred):
            target = f"{name}.{i}.{rest}"
            if target not in state:
                state[target] = state[key]
                filled.append(target)
    return filled


def _check_hint(cfg: ModelConfig, field: str, value: Any, source: str) -> None:
    if value is not None and getattr(cfg, field) != value:
        raise ValueError(f"{source}: {field}={value!r} given, but the checkpoint says {getattr(cfg, field)!r}")


def read_checkpoint(path: str | Path, dilation: bool | None = None, nheads: int | None = None,
                    num_queries: int | None = None) -> tuple[Tensors, DetectorConfig, dict[str, Any]]:
    """(state dict in our key names, DetectorConfig, meta) of any supported checkpoint, without building a model.

    ``dilation``, ``nheads`` and ``num_queries`` are hints, checked against what the checkpoint says; official files
    need them only when they carry no ``args`` (see `official.config_from_args`). ``meta`` has ``format``,
    ``tied_heads`` (indices HF omitted) and the label/size keys of `ddetr.interop.meta.label_meta`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if path.is_dir() or path.suffix == ".safetensors" and not _is_ddetr_safetensors(path):
        return _read_hf(path if path.is_dir() else path.parent, dilation, nheads, num_queries)
    if path.suffix == ".safetensors":
        state, cfg, meta = _read_ddetr_safetensors(path)
    else:
        ckpt = _torch_load(path)
        if not isinstance(ckpt, dict):
            raise ValueError(f"{path}: expected a checkpoint dictionary, got {type(ckpt).__name__}")
        if ckpt.get("format") != ckpt_io.FORMAT:
            return _read_official(ckpt, path, dilation, nheads, num_queries)
        state, cfg, meta = _read_ddetr(ckpt, path)
    _check_hints(cfg.model, str(path), dilation=dilation, nheads=nheads, num_queries=num_queries)
    return state, cfg, meta


def _check_hints(cfg: ModelConfig, source: str, **hints: Any) -> None:
    for field, value in hints.items():
        _check_hint(cfg, field, value, source)


def _read_hf(folder: Path, dilation: bool | None, nheads: int | None, num_queries: int | None,
             ) -> tuple[Tensors, DetectorConfig, dict[str, Any]]:
    config, raw = hf.read_hf_dir(folder)
    model_cfg, names = hf.hf_config_to_ours(config)
    state, unknown = hf.hf_to_ours(raw)
    if unknown:
        raise ValueError(f"{folder}: unexpected keys for Deformable DETR: {_names(unknown)}")
    _check_hints(model_cfg, str(folder), dilation=dilation, nheads=nheads, num_queries=num_queries)
    size, max_size = hf.inference_size(folder, config)
    meta = {"format": "hf", "tied_heads": _fill_tied_heads(state, model_cfg),
            **label_meta(model_cfg.num_classes, names, config.get("ddetr_category_ids"), size, max_size,
                         str(folder))}
    return state, DetectorConfig(model=model_cfg), meta


def _read_official(ckpt: dict[str, Any], path: Path, dilation: bool | None, nheads: int | None,
                   num_queries: int | None) -> tuple[Tensors, DetectorConfig, dict[str, Any]]:
    raw = ckpt.get("model", ckpt)
    if not isinstance(raw, dict) or not official.is_official(raw):
        raise ValueError(f"{path}: neither a ddetr checkpoint nor an official Deformable DETR one "
                         "(no 'format': 'ddetr' and no 'backbone.0.body.*' keys)")
    refine = any(k.startswith("transformer.decoder.bbox_embed.") for k in raw)
    state = official.official_to_ours(raw)
    model_cfg = official.read_config(state, refine, ckpt.get("args"), str(path), dilation=dilation, nheads=nheads,
                                     num_queries=num_queries)
    side = read_sidecar(path)
    meta = {"format": "official", "tied_heads": [],
            **label_meta(model_cfg.num_classes, side.get("class_names"), side.get("category_ids"),
                         side.get("val_size"), side.get("max_size"), str(path))}
    return state, DetectorConfig(model=model_cfg), meta


def _read_ddetr(ckpt: dict[str, Any], path: Path) -> tuple[Tensors, DetectorConfig, dict[str, Any]]:
    """A ddetr checkpoint dictionary already checked by `check_ddetr_layout` (format, version, config)."""
    cfg = DetectorConfig.from_dict(ckpt["config"])
    data = (ckpt.get("train_config") or {}).get("data") or {}
    size, max_size = ckpt.get("val_size") or data.get("val_size"), ckpt.get("max_size") or data.get("max_size")
    meta = {"format": "ddetr", "tied_heads": [],
            **label_meta(cfg.model.num_classes, ckpt.get("class_names"), ckpt.get("category_ids"), size, max_size,
                         str(path))}
    return dict(ckpt["model"]), cfg, meta


def _is_ddetr_safetensors(path: Path) -> bool:
    return ckpt_io.safetensors_metadata(path).get("format") == ckpt_io.FORMAT


def _read_ddetr_safetensors(path: Path) -> tuple[Tensors, DetectorConfig, dict[str, Any]]:
    info = ckpt_io.safetensors_metadata(path)
    try:
        ckpt = {"format": ckpt_io.FORMAT, "version": int(info.get("version", 0)), "config": json.loads(info["config"]),
                **{k: json.loads(info.get(k, "null")) for k in ("class_names", "category_ids", "val_size", "max_size")}}
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: damaged ddetr metadata in the safetensors header ({exc!r})") from None
    ckpt["model"] = ckpt_io.load_safetensors(path)
    ckpt_io.check_ddetr_layout(ckpt, path)
    return _read_ddetr(ckpt, path)


def _names(keys: list[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state_strict(model: nn.Module, state: Tensors, source: str = "checkpoint") -> None:
    """Load every tensor or nothing: refuse missing, unexpected or mis-shaped keys, and shared modules whose
    copies in ``state`` differ (e.g. per-layer heads without box refinement), naming the keys."""
    own = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("num_batches_tracked")}
    given = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(set(own) - set(given)), sorted(set(given) - set(own))
    shapes = [f"{k} {tuple(given[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in given and given[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_names(shapes)}")
    if problems:
        raise ValueError(f"{source} does not match the model ({'; '.join(problems)})")
    first_key: dict[int, str] = {}
    for key, tensor in own.items():
        seen = first_key.setdefault(id(tensor), key)
        if seen != key and not torch.equal(given[seen], given[key]):
            raise ValueError(f"{source}: {key} differs from {seen}, but the model shares them (is box refinement "
                             "set correctly?)")
    result = model.load_state_dict(state, strict=False)
    leftover = [k for k in result.missing_keys + result.unexpected_keys if not k.endswith("num_batches_tracked")]
    if leftover:
        raise ValueError(f"{source}: could not load {_names(leftover)}")


def load_model(path: str | Path, num_classes: int | None = None, device: str | torch.device = "cpu",
               dilation: bool | None = None, nheads: int | None = None, num_queries: int | None = None,
               ) -> tuple[DeformableDETR, DetectorConfig, dict[str, Any]]:
    """(model in eval mode, config, meta) from our checkpoint, an official .pth or a Hugging Face folder.

    ``num_classes``, when given, must equal the checkpoint's (use `ddetr.interop.finetune.load_pretrained` to
    start a model with other classes from it); the hints are described in `read_checkpoint`.
    """
    state, cfg, meta = read_checkpoint(path, dilation, nheads, num_queries)
    if num_classes is not None and num_classes != cfg.model.num_classes:
        raise ValueError(f"{path}: has {cfg.model.num_classes} classes, not {num_classes} (fine-tune with "
                         "ddetr.interop.finetune.load_pretrained to change the class head)")
    model = DeformableDETR(cfg.model)
    load_state_strict(model, state, str(path))
    return model.to(device).eval(), cfg, meta


def _model_config(cfg: DetectorConfig | ModelConfig) -> ModelConfig:
    return cfg.model if isinstance(cfg, DetectorConfig) else cfg


def _standalone(state: Tensors) -> Tensors:
    """Row-major copies sharing no storage (tied heads, channels_last weights): what safetensors takes."""
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in state.items()}


def save_hf(model: DeformableDETR, cfg: DetectorConfig | ModelConfig, out_dir: str | Path,
            meta: dict[str, Any] | None = None) -> None:
    """Write config.json + model.safetensors that transformers' DeformableDetrForObjectDetection.from_pretrained
    loads with no missing or unexpected keys (v4 key names, as the hub checkpoints and v5's save_pretrained), and a
    preprocessor_config.json with the inference size. ``meta`` (`label_meta` keys) goes into ``id2label`` and
    ddetr's own keys of config.json."""
    from safetensors.torch import save_file

    mcfg = _model_config(cfg)
    meta = meta or label_meta(mcfg.num_classes)
    aux = cfg.loss.aux_loss if isinstance(cfg, DetectorConfig) else True
    config = hf.ours_to_hf_config(mcfg, dict(enumerate(meta["class_names"])), aux)
    config.update(ddetr_category_ids=meta["category_ids"], ddetr_val_size=meta["val_size"],
                  ddetr_max_size=meta["max_size"])
    state = hf.ours_to_hf({k: v.detach().cpu() for k, v in model.state_dict().items()}, mcfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(hf.preprocessor_config(meta), indent=2) + "\n")
    save_file(_standalone(state), out / "model.safetensors", metadata={"format": "pt"})


def save_official(model: DeformableDETR, cfg: DetectorConfig | ModelConfig, path: str | Path,
                  meta: dict[str, Any] | None = None) -> None:
    """Write ``{"model": state_dict, "args": Namespace}`` as the official main.py does (its args tell the variant),
    and the labels/size the official format cannot hold in ``X.json`` next to it."""
    mcfg = _model_config(cfg)
    state = official.ours_to_official({k: v.detach().cpu() for k, v in model.state_dict().items()}, mcfg)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "args": official.config_to_args(mcfg)}, path)
    write_sidecar(path, meta or label_meta(mcfg.num_classes))


def save_ddetr(model: DeformableDETR, cfg: DetectorConfig | ModelConfig, path: str | Path,
               class_names: list[str] | None = None, category_ids: list[int] | None = None,
               val_size: int | None = None, max_size: int | None = None) -> None:
    """Write our weights-only checkpoint: a torch dict (.pth) or safetensors with the config in its metadata."""
    cfg = cfg if isinstance(cfg, DetectorConfig) else DetectorConfig(model=cfg)
    meta = label_meta(cfg.model.num_classes, class_names, category_ids, val_size, max_size, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        # Shared per-layer heads are one tensor in memory; safetensors wants each stored separately.
        info = {"format": ckpt_io.FORMAT, "version": str(ckpt_io.VERSION), "config": json.dumps(cfg.to_dict()),
                **{k: json.dumps(v) for k, v in meta.items()}}
        save_file(_standalone(state), path, metadata=info)
        return
    torch.save({"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "config": cfg.to_dict(), "model": state,
                **meta}, path)
