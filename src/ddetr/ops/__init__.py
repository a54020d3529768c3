"""Multi-scale deformable attention operator with automatic backend dispatch."""

import ddetr.ops.cpu_kernel  # noqa: F401  (registers the "cpu" backend; built on first use)
import ddetr.ops.triton_kernel  # noqa: F401  (registers the "triton" backend; unavailable without Triton)
from ddetr.ops.ms_deform_attn import (
    as_shape_list,
    available_backends,
    ms_deform_attn,
    ms_deform_attn_reference,
    register_backend,
)

__all__ = ["as_shape_list", "available_backends", "ms_deform_attn", "ms_deform_attn_reference", "register_backend"]
