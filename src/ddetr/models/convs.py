"""Convolutions that train faster on a CPU with the same parameters and sums: strided 1x1 shortcuts subsample first,
3x3 convolutions take their weight gradient tap by tap (`ddetr.ops.conv`). `speed_up_training_convs` swaps a
torchvision ResNet's layers for them; inference, export and GPUs run the plain convolution."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.conv import tapwise_conv2d
from ..ops.ms_deform_attn import capturing


def _cpu_autograd(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Eager CPU training (a graph being recorded gets the plain convolution)."""
    return (x.device.type == "cpu" and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
            and not capturing())


class SubsampledConv2d(nn.Conv2d):
    """A ResNet's strided 1x1 shortcut convolution that, under autograd on a CPU, takes every stride-th pixel and
    then convolves with stride 1: the same sums. oneDNN's strided 1x1 backward is slow: ResNet-50's C4 shortcut
    at 800x1333 took 680 ms forward + backward in channels_last, 170 ms subsampled first (AVX2 EPYC). Without
    autograd (inference, export: there the strided forward is as fast) and on GPUs (not measured) it is the plain
    strided convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _cpu_autograd(x, self.weight):
            sy, sx = self.stride
            return F.conv2d(x[:, :, ::sy, ::sx], self.weight, self.bias)
        return super().forward(x)


class TapwiseConv2d(nn.Conv2d):
    """A 3x3 (DC5: dilation 2) convolution whose weight gradient, when training in fp32/fp64 on a CPU without
    autocast, is one GEMM per kernel tap (`tapwise_conv2d`: 1.4-3.9x faster than oneDNN's at ResNet-50's
    800x1333 shapes in channels_last on an AVX2 EPYC, stride 2 the most). Its forward and input gradient stay
    oneDNN's; elsewhere it is the plain convolution."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                         device, dtype)
        if not _tapwise_geometry(self):
            raise ValueError(f"TapwiseConv2d: no tap-by-tap weight gradient for {self}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (_cpu_autograd(x, self.weight) and self.weight.requires_grad and not torch.is_autocast_enabled("cpu")
                and x.dtype in (torch.float32, torch.float64) and x.dim() == 4):
            return tapwise_conv2d(x, self.weight, self.bias, self.stride[0], self.dilation[0])
        return super().forward(x)


def _swap(conv: nn.Conv2d, cls: type[nn.Conv2d]) -> nn.Conv2d:
    """The same convolution as `cls`, sharing conv's parameters; no init, so the random stream stays the same."""
    new = nn.utils.skip_init(cls, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                             conv.dilation, conv.groups, bias=conv.bias is not None)
    new.weight, new.bias = conv.weight, conv.bias
    return new


def _tapwise_geometry(conv: nn.Conv2d) -> bool:
    """A square odd kernel over 16+ input channels, equal strides and dilations, padding dilation * (k - 1) / 2,
    one group: what `tapwise_conv2d` computes (a stem over 3 channels is far slower tap by tap: skinny GEMMs)."""
    if conv.groups != 1 or conv.in_channels < 16 or conv.padding_mode != "zeros":
        return False
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    return kh == kw > 1 and kh % 2 == 1 and sh == sw and dh == dw and conv.padding == (dh * (kh - 1) // 2,) * 2


def speed_up_training_convs(body: nn.Module) -> None:
    """Make a torchvision ResNet's strided 1x1 shortcuts SubsampledConv2d and its 3x3 convolutions TapwiseConv2d, in
    place (same parameters, names and state dict)."""
    for parent in list(body.modules()):
        for name, conv in parent.named_children():
            if type(conv) is not nn.Conv2d:
                continue
            if (name == "0" and conv.kernel_size == (1, 1) and conv.padding == (0, 0) and conv.dilation == (1, 1)
                    and conv.groups == 1 and conv.stride != (1, 1) and isinstance(parent, nn.Sequential)):
                setattr(parent, name, _swap(conv, SubsampledConv2d))
            elif _tapwise_geometry(conv):
                setattr(parent, name, _swap(conv, TapwiseConv2d))
