"""Start a model from pretrained weights with another class set: everything loads except the class heads."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ddetr.interop.load import load_state_strict, read_checkpoint
from ddetr.models.deformable_detr import DeformableDETR

log = logging.getLogger(__name__)

PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)  # focal-loss prior: every class starts at probability 0.01
# ModelConfig fields that do not change the weights' layout (checked neither way).
_LAYOUT_FREE = {"num_classes", "dropout", "frozen_batchnorm", "train_backbone", "pretrained_backbone",
                "attention_backend"}


@dataclass
class FinetuneReport:
    """What `load_pretrained` did; ``str(report)`` is the one-paragraph log line."""

    source: str
    source_format: str
    loaded: list[str] = field(default_factory=list)  # keys copied from the checkpoint
    reinitialised: list[str] = field(default_factory=list)  # class-head keys given a fresh init
    matched: dict[str, int] = field(default_factory=dict)  # new class name -> checkpoint class index
    unmatched: list[str] = field(default_factory=list)  # new class names with no checkpoint counterpart

    def __str__(self) -> str:
        text = f"loaded {len(self.loaded)} tensors from {self.source} ({self.source_format})"
        if not self.reinitialised:
            return text + "; all weights including the class heads"
        heads = sorted({k.rsplit(".", 1)[0] for k in self.reinitialised})
        text += f"; re-initialised the class heads ({', '.join(heads)}) with prior bias {PRIOR_BIAS:.3f}"
        if self.matched:
            text += f"; rows copied for {len(self.matched)} classes matched by name ({', '.join(self.matched)})"
        if self.unmatched:
            text += f"; no pretrained row for {', '.join(self.unmatched)}"
        return text


def _norm(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


def load_pretrained(model: DeformableDETR, path: str | Path, class_names: list[str] | None = None,
                    match_names: bool = False) -> FinetuneReport:
    """Load ``path`` (any format `ddetr.interop.load_model` reads) into ``model`` for fine-tuning.

    The architecture must match (refused by name otherwise). When the class counts match, everything loads.
    Otherwise the class heads are re-initialised (default Linear weights, prior bias -log(99)) and, with
    ``match_names``, rows of classes whose names (case-insensitive) appear in the checkpoint's class names
    (HF ``id2label``, our checkpoints' names, or COCO's for official 91-class heads) are copied over.
    """
    cfg = model.cfg
    if class_names is not None and len(class_names) != cfg.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {cfg.num_classes} classes")
    state, ck_cfg, meta = read_checkpoint(path, dilation=cfg.dilation, nheads=cfg.nheads,
                                          num_queries=cfg.num_queries if cfg.two_stage else None)
    ours, theirs = dataclasses.asdict(cfg), dataclasses.asdict(ck_cfg.model)
    diff = [f"{k}: model {ours[k]!r} vs checkpoint {theirs[k]!r}" for k in ours
            if k not in _LAYOUT_FREE and ours[k] != theirs[k]]
    if diff:
        raise ValueError(f"{path}: architecture differs from the model ({'; '.join(diff)})")
    report = FinetuneReport(str(path), meta["format"])
    if ck_cfg.model.num_classes == cfg.num_classes:
        load_state_strict(model, state, str(path))
        report.loaded = sorted(state)
        log.info("%s", report)
        return report

    head_keys = [k for k in model.state_dict() if k.startswith("class_embed.")]
    old_heads = {k: state.pop(k) for k in list(state) if k.startswith("class_embed.")}
    for key in head_keys:  # placeholders, overwritten below, so the strict check covers every other key
        state[key] = model.state_dict()[key]
    load_state_strict(model, state, str(path))
    report.loaded = sorted(k for k in state if k not in head_keys)
    report.reinitialised = head_keys
    source_names = meta["class_names"]
    if source_names == [str(i) for i in meta["category_ids"]]:  # names defaulted to the ids: the file has none
        source_names = None
    rows: dict[int, int] = {}
    if match_names:
        if class_names is None or source_names is None:
            raise ValueError("match_names needs the new class_names and a checkpoint that names its classes")
        index = {_norm(n): i for i, n in enumerate(source_names) if n != "N/A"}
        for i, name in enumerate(class_names):
            if _norm(name) in index:
                rows[i] = index[_norm(name)]
                report.matched[name] = index[_norm(name)]
            else:
                report.unmatched.append(name)
    with torch.no_grad():
        for i, head in enumerate(model.class_embed):
            head: nn.Linear
            head.reset_parameters()
            nn.init.constant_(head.bias, PRIOR_BIAS)
            for new, old in rows.items():
                head.weight[new] = old_heads[f"class_embed.{i}.weight"][old]
                head.bias[new] = old_heads[f"class_embed.{i}.bias"][old]
    log.info("%s", report)
    return report
