"""Options and helpers shared by several commands (kept light: no torch import at module level)."""

from __future__ import annotations

import argparse
import math
import re


def _number(text: str, kind: type, low: float, high: float | None, allowed: str) -> int | float:
    """``text`` as a finite int/float within [low, high]; argparse shows ``argument --X: expected ..., got ...``."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, 1, None, "an integer >= 1")


def non_negative_int(text: str) -> int:
    return _number(text, int, 0, None, "an integer >= 0")


def positive_float(text: str) -> float:
    value = _number(text, float, 0.0, None, "a number > 0")
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def probability(text: str) -> float:
    """A score threshold in [0, 1] (e.g. predict --threshold)."""
    return _number(text, float, 0.0, 1.0, "a number in [0, 1]")


def device_name(text: str) -> str:
    """auto, cpu, cuda or cuda:N (whether that device exists here is checked when it is used)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def add_checkpoint_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--checkpoint", required=required,
                   help="ddetr checkpoint, official .pth or Hugging Face model folder")
    p.add_argument("--device", type=device_name, default="cpu", help="auto, cpu, cuda or cuda:N")


def add_amp_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--amp", choices=["none", "bf16", "fp16", "auto"], default="none",
                   help="inference precision: none = fp32 (default, exact); bf16 = autocast, 1.6-2x faster on CPUs "
                        "with AVX512-BF16 or AMX and on GPUs (logits move by ~0.05, boxes by < 0.5%% of the image; "
                        "two-stage may pick other proposals); auto = bf16 where native; fp16 = GPUs only")


def keep_freed_memory_on_cpu(device: str) -> None:
    """CPU runs reuse freed memory between steps instead of page-faulting it afresh (see ddetr.engine.malloc)."""
    from ddetr.engine.device import resolve_device
    from ddetr.engine.malloc import keep_freed_memory
    from ddetr.engine.threads import configure_cpu_threads

    if resolve_device(device).type == "cpu":
        keep_freed_memory()
        configure_cpu_threads()  # at most one intra-op thread per usable CPU (affinity, container quota)


def add_variant_hints(p: argparse.ArgumentParser) -> None:
    """What an official checkpoint without its ``args`` cannot tell (checked against them when it has them)."""
    p.add_argument("--dilation", action=argparse.BooleanOptionalAction, default=None,
                   help="official single-scale checkpoints without args: DC5 (--dilation) or plain C5 (--no-dilation)")
    p.add_argument("--nheads", type=positive_int, default=None,
                   help="official checkpoints without args: attention heads (8)")
    p.add_argument("--num-queries", type=positive_int, default=None,
                   help="official two-stage checkpoints without args: number of proposals (300)")
