"""Options and helpers shared by several commands (kept light: no torch import at module level)."""

from __future__ import annotations

import argparse


def add_checkpoint_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--checkpoint", required=required,
                   help="ddetr checkpoint, official .pth or Hugging Face model folder")
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def keep_freed_memory_on_cpu(device: str) -> None:
    """CPU runs reuse freed memory between steps instead of page-faulting it afresh (see ddetr.engine.malloc)."""
    from ddetr.engine.malloc import keep_freed_memory
    from ddetr.engine.trainer import pick_device

    if pick_device(device).type == "cpu":
        keep_freed_memory()
