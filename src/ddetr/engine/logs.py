"""A run's logs, written from its saved history: metrics.jsonl (one valid JSON line per epoch) and curves.png."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ddetr.engine.checkpoint import write_text_atomic
from ddetr.engine.state import json_line

log = logging.getLogger("ddetr.train")


def write_metrics(history: list[dict[str, Any]], path: Path) -> None:
    """Rewrite metrics.jsonl from the history (NaN as null): a resumed run never logs an epoch twice."""
    write_text_atomic(path, "".join(json_line(entry) for entry in history))


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Training loss and validation AP/AP50 per epoch; a plot that cannot be written is a warning, not an error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return

    def number(value: Any) -> float:
        return float("nan") if value is None else float(value)

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot([h["epoch"] for h in history], [number(h.get("loss")) for h in history])
    ax[0].set(xlabel="epoch", ylabel="train loss", title="loss")
    for key in ("val_AP", "val_AP50"):
        pts = [(h["epoch"], number(h[key])) for h in history if key in h]
        if pts:
            ax[1].plot(*zip(*pts), marker="o", label=key[4:])
    ax[1].set(xlabel="epoch", ylabel="COCO AP", title="validation")
    if ax[1].lines:
        ax[1].legend()
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as exc:
        log.warning("%s not written: %s", path, exc)
    plt.close(fig)
