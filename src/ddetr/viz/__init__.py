"""Inspection: draw detections, and the sampling points and attention weights of deformable attention."""

from ddetr.viz.attention import (
    RecordedAttention,
    plot_pixel_attention,
    plot_query_attention,
    record_attention,
    recording,
    select_layers,
    top_detections,
)
from ddetr.viz.draw import draw_detections

__all__ = ["RecordedAttention", "draw_detections", "plot_pixel_attention", "plot_query_attention",
           "record_attention", "recording", "select_layers", "top_detections"]
