"""The run-folder rules: a folder holding a run is continued (``--resume``) or cleared (``--overwrite``), never
silently overwritten; a resumed run keeps its saved config, except the length of training."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from ddetr.engine import checkpoint as ckpt_io
from ddetr.engine.config import TrainConfig

MARKERS = ("last.pth", "metrics.jsonl")  # a folder with either holds a run
RUN_FILES = ("last.pth", "best.pth", "metrics.jsonl", "curves.png", "config.yaml")
RUN_FOLDERS = ("tensorboard",)
RESUMABLE = ("epochs", "time_budget")  # what a resumed run may change: how long it trains


def held_run(folder: str | Path) -> list[str]:
    """The files that show ``folder`` holds a run (empty when it does not)."""
    return [name for name in MARKERS if (Path(folder) / name).exists()]


def same_file(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def check_folder(folder: str | Path, resume: str | Path | None, overwrite: bool) -> bool:
    """Refuse to start a run over another one unless it is resumed from there or ``overwrite`` is set; True when
    the folder's old run must be cleared (`clear_run`) before the new one writes anything."""
    folder = Path(folder)
    found = held_run(folder)
    if resume is not None and same_file(Path(resume).parent, folder):
        return False
    if found and not overwrite:
        raise ValueError(f"{folder}: already holds a run ({', '.join(found)}); continue it with --resume "
                         f"{folder / 'last.pth'}, or start over with --overwrite (deletes it) or another --output")
    return overwrite


def clear_run(folder: str | Path) -> None:
    """Delete the files a run writes (checkpoints, logs, curves, config, TensorBoard events); nothing else."""
    folder = Path(folder)
    for name in RUN_FILES:
        (folder / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(folder / name, ignore_errors=True)
    if folder.is_dir():
        ckpt_io.remove_temp_files(folder)


def read_training_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint that can be resumed (``last.pth``), or one line saying why this file cannot."""
    ckpt = ckpt_io.load(path, mmap=mmap)
    if ckpt.get("format") != ckpt_io.FORMAT:
        raise ValueError(f"{path}: not a ddetr training checkpoint (use --pretrained to start from its weights)")
    if "optimizer" not in ckpt or not isinstance(ckpt.get("train_config"), dict):
        raise ValueError(f"{path}: holds weights only, no optimiser state (best.pth is such a file): resume from "
                         "last.pth, or start a new run from these weights with --pretrained")
    return ckpt


def saved_config(ckpt: dict[str, Any], path: str | Path) -> TrainConfig:
    """The TrainConfig a training checkpoint was written with."""
    try:
        return TrainConfig.from_dict(ckpt["train_config"])
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: damaged training config ({exc})") from None


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optim.lr": 2e-4, ...}`` of a (nested) dataclass, tuples as lists."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = list(value) if isinstance(value, tuple) else value
    return out


def config_diff(saved: TrainConfig, given: TrainConfig, ignore: tuple[str, ...] = RESUMABLE + ("output_dir",),
                ) -> list[str]:
    """``"field: saved X, given Y"`` for every field that differs (except ``ignore``)."""
    a, b = flatten(saved), flatten(given)
    return [f"{key}: saved {a.get(key)!r}, given {b.get(key)!r}" for key in sorted(set(a) | set(b))
            if key not in ignore and a.get(key) != b.get(key)]
