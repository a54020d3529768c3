"""Dropout whose CPU training path is one fused pass (``csrc/dropout_cpu.cpp``) instead of PyTorch's bernoulli_
mask and multiply: the masks were the largest elementwise cost of a CPU training step (README, speed).

Same distribution (each element kept with probability 1 - p, to within 2^-33, and scaled by 1 / (1 - p)); the
random numbers come from a per-call seed drawn from torch's default generator, so ``torch.manual_seed`` makes runs
repeatable, but they differ from ``nn.Dropout``'s. Everywhere else (eval, GPU, tracing, in place, p = 1, no
extension) it is ``nn.Dropout`` (of ``torch.relu(x)`` when asked to apply the ReLU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddetr.ops.cpu_kernel import extension_loaded
from ddetr.ops.ms_deform_attn import capturing


@torch.library.custom_op("ddetr::dropout_cpu", mutates_args=(), device_types="cpu")
def dropout_cpu(x: Tensor, p: float, seed: int, relu: bool = False) -> tuple[Tensor, Tensor]:
    """(x with dropped elements zeroed and the rest scaled by 1 / (1 - p), the bool mask of what passed).
    ``relu``: dropout(relu(x)) in the same pass; the mask then also drops x <= 0 (the ReLU's gradient)."""
    return torch.ops.ddetr_msda_cpu.dropout_forward(x, p, seed, relu)


@dropout_cpu.register_fake
def _(x: Tensor, p: float, seed: int, relu: bool = False) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape, dtype=torch.bool)


@torch.library.custom_op("ddetr::dropout_cpu_backward", mutates_args=(), device_types="cpu")
def dropout_cpu_backward(grad: Tensor, mask: Tensor, p: float) -> Tensor:
    return torch.ops.ddetr_msda_cpu.dropout_backward(grad, mask, p)


@dropout_cpu_backward.register_fake
def _(grad: Tensor, mask: Tensor, p: float) -> Tensor:
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    ctx.p = inputs[1]
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # else autograd fills a full-size zero "gradient" of the mask for each call


def _backward(ctx, grad: Tensor | None, _grad_mask: Tensor | None) -> tuple[Tensor | None, None, None, None]:
    (mask,) = ctx.saved_tensors
    return (dropout_cpu_backward(grad, mask, ctx.p) if grad is not None else None), None, None, None


dropout_cpu.register_autograd(_backward, setup_context=_setup_context)


def dropout(x: Tensor, p: float, training: bool, inplace: bool = False, relu: bool = False) -> Tensor:
    """``F.dropout(x, p, training, inplace)``, through the fused kernel for CPU training (not in place; p < 1).
    ``relu``: of ``torch.relu(x)``, the ReLU fused into that pass (the FFN's ReLU -> dropout)."""
    if (not training or inplace or not 0.0 < p < 1.0 or x.device.type != "cpu" or capturing()
            or not extension_loaded()):
        return F.dropout(torch.relu(x) if relu else x, p, training, inplace)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    return dropout_cpu(x, p, seed, relu)[0]


class Dropout(nn.Dropout):
    """`nn.Dropout` (same name in state dicts and reprs: it has no state) with the fused CPU training path;
    ``relu=True`` applies a ReLU first (fused there)."""

    def forward(self, x: Tensor, relu: bool = False) -> Tensor:
        return dropout(x, self.p, self.training, self.inplace, relu)
