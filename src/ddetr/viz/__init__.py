"""Inspection: draw detections, and the sampling points and attention weights of deformable attention."""

from ddetr.models.deform_attn import AttentionSample
from ddetr.viz.attention import (
    plot_pixel_attention,
    plot_query_attention,
    record_attention,
    recording,
    select_layers,
    top_detections,
)
from ddetr.viz.draw import draw_detections

__all__ = ["AttentionSample", "draw_detections", "plot_pixel_attention", "plot_query_attention",
           "record_attention", "recording", "select_layers", "top_detections"]
