"""Multi-scale deformable attention operator with automatic backend dispatch."""

from ddetr.ops.ms_deform_attn import (
    as_shape_list,
    available_backends,
    ms_deform_attn,
    ms_deform_attn_reference,
    register_backend,
)

__all__ = ["as_shape_list", "available_backends", "ms_deform_attn", "ms_deform_attn_reference", "register_backend"]
