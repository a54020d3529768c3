"""Linear layers of the CPU inference paths through oneDNN, with the ReLU or the residual add fused in.

On x86 CPUs PyTorch's fp32 ``addmm`` goes to MKL's sgemm, which on the AMD EPYC hosts this project is measured on
reaches ~145 GFLOP/s on two cores where oneDNN's matmul reaches ~180-200 (README, speed: the encoder's FFN in
chunks 206 -> 161 ms per layer, bf16 104 -> 83 ms). oneDNN also applies the bias, ReLU and residual add while
the output is in registers. Used only where no autograd graph is recorded; everywhere else it is ``F.linear``.
"""

from __future__ import annotations

import platform
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor


@cache
def onednn_linear_available() -> bool:
    """oneDNN's fused linear op is in this PyTorch build and the CPU is x86 (the only kind it was measured on)."""
    return (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype ``F.linear`` would compute ``x`` in here: the CPU autocast dtype when autocast is on."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, *, relu: bool = False,
           residual: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias``, then ``+ residual`` or ReLU (not both), in ``compute_dtype(x)`` as ``F.linear``
    under autocast would; oneDNN on CPU in fp32 or bf16 without autograd, ``F.linear`` otherwise."""
    if relu and residual is not None:
        raise ValueError("linear: relu and residual are exclusive")
    dtype = compute_dtype(x)
    fused = (x.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and not torch.is_grad_enabled()
             and onednn_linear_available())
    if not fused:
        y = F.linear(x, weight, bias)
        if residual is not None:
            return y + residual
        return torch.relu(y) if relu else y
    x, weight = x.to(dtype).contiguous(), weight.to(dtype).contiguous()
    bias = bias.to(dtype) if bias is not None else None
    if residual is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual.to(dtype).contiguous(), weight, bias, "add")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")
