"""Linear layers through oneDNN on x86 CPUs, with the ReLU or the residual add fused in at inference.

On x86 CPUs PyTorch's fp32 ``addmm`` and ``mm`` go to MKL's sgemm, which on the AMD EPYC hosts this project is
measured on reaches ~145 GFLOP/s on two cores where oneDNN's matmul reaches ~180-200 (README, speed: the encoder's
FFN in chunks 206 -> 161 ms per layer). Those hosts have AVX-512; on an AVX2-only
EPYC MKL's sgemm is the faster (1.05-1.06x, whole steps), so fp32 goes to oneDNN only with AVX-512
(`onednn_linear_faster`). `linear` uses oneDNN without autograd (bias, ReLU and residual fused); `Linear` (an
``nn.Linear``) also in fp32 training, where oneDNN computes the output and the input gradient and MKL the weight
gradient (faster there). bf16 autocast already reaches oneDNN through PyTorch; GPUs, tracing, export and compilation
get ``F.linear``.
"""

from __future__ import annotations

import platform
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddetr.ops.ms_deform_attn import capturing


@cache
def onednn_linear_available() -> bool:
    """oneDNN's fused linear op is in this PyTorch build and the CPU is x86 (the only kind it was measured on)."""
    return (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@cache
def onednn_bf16_available() -> bool:
    """oneDNN computes bf16 on this CPU (AVX-512 or newer); on AVX2-only CPUs it cannot build a bf16 primitive."""
    return onednn_linear_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@cache
def onednn_linear_faster() -> bool:
    """oneDNN's fp32 GEMMs beat MKL's sgemm here: with AVX-512 (800x1333 training step 1.07-1.13x, encoder chunks
    1.28x); on an AVX2-only AMD EPYC (Zen 3) MKL's are the faster (training step 1.06x, inference 1.05x; README)."""
    return onednn_linear_available() and torch.backends.cpu.get_cpu_capability() == "AVX512"


def _onednn_dtype(dtype: torch.dtype) -> bool:
    return (dtype == torch.float32 and onednn_linear_faster()) or (dtype == torch.bfloat16 and onednn_bf16_available())


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype ``F.linear`` would compute ``x`` in here: the CPU autocast dtype when autocast is on."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, *, relu: bool = False,
           residual: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias``, then ``+ residual`` or ReLU (not both), in ``compute_dtype(x)`` as ``F.linear``
    under autocast would; oneDNN on CPU without autograd in fp32 where it is the faster and in bf16 where it
    computes it, ``F.linear`` otherwise."""
    if relu and residual is not None:
        raise ValueError("linear: relu and residual are exclusive")
    dtype = compute_dtype(x)
    fused = x.device.type == "cpu" and _onednn_dtype(dtype) and not torch.is_grad_enabled() and not capturing()
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


def _onednn_fp32_training(x: Tensor, weight: Tensor) -> bool:
    """Autograd on, fp32 on a CPU without autocast whose oneDNN is the faster, no graph being recorded: the case
    `_OneDNNLinear` serves."""
    return (torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and onednn_linear_faster() and not capturing())


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b by oneDNN; backward: dx = dy W by oneDNN, dW = dy^T x by ``mm`` (MKL: oneDNN on the transposed
    operands took 0.97-2.2x its time at the encoder's sizes, 1.8-2.6x with contiguous copies), db = sum dy."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """x (T, in), contiguous -> (T, out)."""
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight.contiguous(), bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.mkldnn._linear_pointwise(grad, weight.t().contiguous(), None, "none", [], "")
        if ctx.needs_input_grad[1]:
            grad_w = grad.t().mm(x)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, names and init) whose fp32 CPU training runs through oneDNN on AVX-512 CPUs
    (1.2-1.6x MKL's sgemm on the output and the input gradient at the encoder's sizes there; README, speed)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() >= 2 and _onednn_fp32_training(x, self.weight):
            # 2-D inside the Function, shaped outside (a view, like F.linear's 3-D outputs: fill it out of place)
            rows = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]).contiguous(), self.weight, self.bias)
            return rows.view(*x.shape[:-1], rows.shape[-1])
        return F.linear(x, self.weight, self.bias)
