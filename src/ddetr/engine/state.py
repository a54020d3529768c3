"""A run's progress as one saved-and-restored definition (`TrainState`), and the time-budget policy (`TimeBudget`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from ddetr.engine import distributed as dist

log = logging.getLogger("ddetr.train")
LOSS_KEYS = ("loss", "loss_ce", "loss_bbox", "loss_giou")


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint under ``train_state`` and restored field for field."""

    epoch: int = 0  # epochs whose training is done
    step_in_epoch: int = 0  # batches done in the current epoch
    global_step: int = 0  # optimiser steps
    best_ap: float = -1.0
    elapsed: float = 0.0  # seconds of training and evaluation so far
    lr_dropped_by_time: bool = False
    epoch_trained: bool = False  # the epoch's training is done; its evaluation and log line are not yet
    loss_sums: dict[str, float] = field(default_factory=dict)  # this epoch's summed losses (mean over ranks)
    loss_count: int = 0  # batches in loss_sums
    history: list[dict[str, Any]] = field(default_factory=list)  # one JSON-ready entry per epoch (metrics.jsonl)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> TrainState:
        """From ``train_state``, or from the separate keys of checkpoints written before it existed."""
        saved = ckpt.get("train_state")
        if saved is None:  # version-1 layout: the same fields at the top level, history as JSON text
            saved = {f.name: ckpt[f.name] for f in dataclasses.fields(cls) if f.name in ckpt}
            saved["history"] = json.loads(saved.get("history") or "[]")
        unknown = set(saved) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown training state field(s): {', '.join(sorted(unknown))}")
        return cls(**saved)

    def add_losses(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.loss_sums[key] = self.loss_sums.get(key, 0.0) + value
        self.loss_count += 1

    def epoch_losses(self) -> dict[str, float]:
        return {k: v / self.loss_count for k, v in self.loss_sums.items()} if self.loss_count else {}


def json_safe(value: Any) -> Any:
    """NaN and infinities become null (JSON has no such numbers); containers are converted throughout."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_line(entry: dict[str, Any]) -> str:
    """One line of metrics.jsonl: valid JSON whatever the numbers."""
    return json.dumps(json_safe(entry)) + "\n"


class TimeBudget:
    """The time-budget rule: the lr drops (x0.1) once after ``lr_drop_fraction`` of it, training stops when it is
    spent. Rank 0's clock decides for every rank, so DDP replicas drop and stop at the same step."""

    def __init__(self, seconds: float | None, lr_drop_fraction: float, elapsed: float) -> None:
        self.seconds, self.lr_drop_fraction = seconds, lr_drop_fraction
        self.start = time.monotonic() - elapsed

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def _agreed_elapsed(self) -> float:
        now = self.elapsed()
        return float(dist.all_gather_objects(now)[0]) if dist.is_dist() else now

    def spent(self) -> bool:
        """Whether training should stop now (never without a budget)."""
        return self.seconds is not None and self._agreed_elapsed() >= self.seconds

    def check_step(self, state: TrainState, optimizer) -> bool:
        """After a step: drop the lr if its time came (once per run); True when the budget is spent."""
        if self.seconds is None:
            return False
        elapsed = self._agreed_elapsed()
        if not state.lr_dropped_by_time and elapsed >= self.lr_drop_fraction * self.seconds:
            for group in optimizer.param_groups:
                group["lr"] *= 0.1
            state.lr_dropped_by_time = True
            log.info("time budget: lr dropped x0.1 at %.0fs", elapsed)
        return elapsed >= self.seconds
