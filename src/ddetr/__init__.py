"""ddetr: Deformable DETR for PyTorch — train, evaluate, predict, convert, export and inspect."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Detector", "load_model", "__version__"]


def __getattr__(name: str) -> Any:
    """Import the heavier entry points on first use so `import ddetr` stays light."""
    if name == "Detector":
        from ddetr.inference import Detector

        return Detector
    if name == "load_model":
        from ddetr.interop import load_model

        return load_model
    raise AttributeError(f"module 'ddetr' has no attribute {name!r}")
