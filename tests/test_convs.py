"""The convolutions that train faster on CPU (`ddetr.models.convs`): tap-by-tap weight gradients (`ddetr.ops.conv`)
against PyTorch's own convolution backward, the TapwiseConv2d layers of the ResNets and the extra input projection,
and the subsampled strided shortcuts, against torchvision's layers."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ddetr.models import build, preset
from ddetr.models.backbone import Backbone
from ddetr.models.convs import SubsampledConv2d, TapwiseConv2d
from ddetr.ops import conv as conv_ops
from ddetr.ops.conv import conv_weight_grad, tapwise_conv2d

GEOMETRIES = [  # (kernel, stride, dilation)
    (3, 1, 1), (3, 2, 1), (3, 1, 2), (3, 3, 1), (5, 2, 2), (7, 2, 1), (1, 1, 1), (1, 2, 1)]


def _reference_weight_grad(g, x, w, stride, pad, dilation):
    return torch.ops.aten.convolution_backward(g, x, w, None, [stride] * 2, [pad] * 2, [dilation] * 2, False, [0, 0],
                                               1, [False, True, False])[1]


@pytest.mark.parametrize("k,stride,dilation", GEOMETRIES)
@pytest.mark.parametrize("n,h,w", [(1, 9, 12), (3, 8, 7), (2, 1, 5)])
def test_weight_grad_matches_pytorch(k, stride, dilation, n, h, w, monkeypatch) -> None:
    """Every geometry `conv_weight_grad` takes, odd and even sizes, batches, both layouts, whole and in chunks of
    pixels, in float64: PyTorch's convolution backward (a different algorithm) to rounding."""
    torch.manual_seed(k * 100 + stride * 10 + dilation + n)
    pad = dilation * (k - 1) // 2
    for layout, chunk in itertools.product((torch.contiguous_format, torch.channels_last), (4096, 7)):
        monkeypatch.setattr(conv_ops, "_CHUNK", chunk)
        x = torch.randn(n, 5, h, w, dtype=torch.float64).to(memory_format=layout)
        weight = torch.randn(6, 5, k, k, dtype=torch.float64).to(memory_format=layout)
        g = torch.randn_like(F.conv2d(x, weight, None, stride, pad, dilation))
        got = conv_weight_grad(g, x, k, stride, dilation)
        torch.testing.assert_close(got, _reference_weight_grad(g, x, weight, stride, pad, dilation), rtol=1e-12,
                                   atol=1e-12)
        assert got.is_contiguous(memory_format=layout)  # the layout the model's weights have


def test_weight_grad_fp32_at_a_resnet_shape() -> None:
    """float32, 128 channels, an 800x1333 C3-like map cut down: within fp32 accumulation error of PyTorch's."""
    torch.manual_seed(0)
    x = torch.randn(2, 128, 25, 42).to(memory_format=torch.channels_last)
    weight = torch.randn(64, 128, 3, 3).to(memory_format=torch.channels_last)
    for stride in (1, 2):
        g = torch.randn_like(F.conv2d(x, weight, None, stride, 1))
        ref = _reference_weight_grad(g, x, weight, stride, 1, 1)
        got = conv_weight_grad(g, x, 3, stride)
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("stride,dilation,bias", [(1, 1, False), (2, 1, True), (1, 2, True)])
def test_tapwise_conv2d_gradcheck(stride, dilation, bias) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True) if bias else None
    assert torch.autograd.gradcheck(lambda *a: tapwise_conv2d(*a, stride=stride, dilation=dilation), (x, weight, b))


def _pair(in_ch: int, out_ch: int, **kw) -> tuple[TapwiseConv2d, nn.Conv2d]:
    plain = nn.Conv2d(in_ch, out_ch, 3, **kw)
    tapwise = TapwiseConv2d(in_ch, out_ch, 3, **kw)
    tapwise.load_state_dict(plain.state_dict())
    return tapwise, plain


@pytest.mark.parametrize("kw", [dict(padding=1), dict(stride=2, padding=1, bias=False),
                                dict(padding=2, dilation=2, bias=False)])
def test_tapwise_layer_trains_like_conv2d_and_infers_as_it(kw) -> None:
    """Under autograd on CPU the tap-by-tap path runs (its node in the graph) with PyTorch's outputs and gradients;
    without autograd, with a frozen weight, under autocast or in half precision it is nn.Conv2d itself."""
    torch.manual_seed(0)
    tapwise, plain = _pair(16, 8, **kw)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 16, 11, 14).to(memory_format=layout).requires_grad_()
        out, ref = tapwise(x), plain(x)
        assert type(out.grad_fn).__name__ == "_TapwiseConv2dBackward"
        assert torch.equal(out, ref)  # the forward is F.conv2d's
        g = torch.randn_like(ref)
        params = [p for p in (tapwise.weight, tapwise.bias) if p is not None]
        ref_params = [p for p in (plain.weight, plain.bias) if p is not None]
        got = torch.autograd.grad(out, [x, *params], g)
        expected = torch.autograd.grad(ref, [x, *ref_params], g)
        assert torch.equal(got[0], expected[0])  # the input gradient is PyTorch's own
        for a, b in zip(got[1:], expected[1:]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
        with torch.no_grad():
            assert torch.equal(tapwise(x), plain(x))
    x = torch.randn(1, 16, 9, 9, requires_grad=True)
    unbatched = tapwise(x[0])  # nn.Conv2d takes (C, H, W) too
    g = torch.randn_like(unbatched)
    assert _count_nodes(unbatched, "_TapwiseConv2dBackward") == 0 and torch.equal(unbatched, plain(x[0]))
    assert torch.equal(torch.autograd.grad(unbatched, x, g)[0], torch.autograd.grad(plain(x[0]), x, g)[0])
    with warnings.catch_warnings():  # torch.jit.trace is deprecated, still a recorder users (and ONNX) run
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(tapwise, x)  # a graph being recorded gets the plain convolution, not a Python op
    assert "PythonOp" not in str(traced.graph) and "aten::_convolution" in str(traced.graph)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(tapwise(x).grad_fn).__name__ == "ConvolutionBackward0"
    assert type(tapwise.bfloat16()(x.bfloat16()).grad_fn).__name__ == "ConvolutionBackward0"
    tapwise.float().weight.requires_grad_(False)
    assert type(tapwise(x).grad_fn).__name__ == "ConvolutionBackward0"  # only the input gradient: PyTorch's


def test_tapwise_layer_refuses_what_it_cannot_compute() -> None:
    for kw in (dict(padding=0), dict(padding=1, groups=2), dict(stride=(1, 2), padding=1)):
        with pytest.raises(ValueError, match="TapwiseConv2d"):
            TapwiseConv2d(16, 16, 3, **kw)
    with pytest.raises(ValueError, match="TapwiseConv2d"):
        TapwiseConv2d(3, 16, 3, padding=1)  # the 3-channel stem: skinny GEMMs, kept on oneDNN


@pytest.mark.parametrize("name,dilation", [("resnet18", False), ("resnet50", False), ("resnet50", True)])
def test_resnets_train_their_3x3s_tap_by_tap(name, dilation) -> None:
    """Every 3x3 of layers 1-4 (strided, dilated) and nothing else; whole backbone gradients as torchvision's (in
    float64: training-mode BatchNorm over a few pixels amplifies fp32 rounding through 50 layers)."""
    torch.manual_seed(0)
    bb = Backbone(name, 3, dilation=dilation, frozen_batchnorm=False)
    swapped = {n for n, m in bb.body.named_modules() if isinstance(m, TapwiseConv2d)}
    blocks = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3)}[name]
    convs = ("conv1", "conv2") if name == "resnet18" else ("conv2",)
    assert swapped == {f"layer{i + 1}.{b}.{c}" for i, n in enumerate(blocks) for b, c in itertools.product(range(n),
                                                                                                         convs)}
    kwargs = {"replace_stride_with_dilation": [False, False, True]} if dilation else {}
    reference = getattr(torchvision.models, name)(**kwargs)
    del reference.fc, reference.avgpool
    reference.load_state_dict(bb.body.state_dict())
    bb.double().train(), reference.double().train()
    images, mask = torch.randn(2, 3, 64, 96, dtype=torch.float64), torch.zeros(2, 64, 96, dtype=torch.bool)
    feats = [f for f, _ in bb(images, mask)]
    ref_feats = [f for f, _ in _resnet_features(reference, images)]
    loss = sum((f * f).mean() for f in feats)
    assert _count_nodes(loss, "_TapwiseConv2dBackward") == len(swapped)  # in float64 too
    ref_loss = sum((f * f).mean() for f in ref_feats)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    grads = torch.autograd.grad(loss, list(bb.body.parameters()))
    ref_grads = torch.autograd.grad(ref_loss, list(reference.parameters()))
    for (n, _), a, b in zip(bb.body.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9 * b.abs().max().item(), msg=n)


def _count_nodes(out: torch.Tensor, name: str) -> int:
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(f for f, _ in node.next_functions)
    return sum(type(node).__name__ == name for node in seen)


def test_extra_input_level_is_tapwise() -> None:
    """The 4-level model's 3x3 stride-2 projection of C5 trains tap by tap too; its init is unchanged."""
    cfg = preset("deformable-detr")
    cfg.model.pretrained_backbone = "none"
    cfg.model.backbone = "resnet18"
    model = build(cfg)[0]
    assert isinstance(model.input_proj[3][0], TapwiseConv2d)
    assert not any(isinstance(m[0], TapwiseConv2d) for m in model.input_proj[:3])


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_strided_shortcuts_subsample_under_autograd_with_the_same_numbers(name) -> None:
    """The ResNets' strided 1x1 shortcuts (not DC5's stride-1 one) subsample then convolve under autograd on CPU,
    and are the plain strided convolution otherwise: outputs and gradients equal torchvision's layer, names and
    state dict unchanged."""
    torch.manual_seed(0)
    bb = Backbone(name, 3)
    after_ours = torch.rand(3)
    torch.manual_seed(0)
    getattr(torchvision.models, name)(norm_layer=torchvision.ops.FrozenBatchNorm2d)
    assert torch.equal(after_ours, torch.rand(3))  # the swap draws no random numbers: seeded inits stay as they were
    shortcuts = {n for n, m in bb.body.named_modules() if isinstance(m, SubsampledConv2d)}
    assert shortcuts == {f"layer{i}.0.downsample.0" for i in (2, 3, 4)}
    assert "layer4.0.downsample.0" not in {n for n, m in Backbone("resnet50", 3, dilation=True).body.named_modules()
                                           if isinstance(m, SubsampledConv2d)}
    reference = getattr(torchvision.models, name)(norm_layer=torchvision.ops.FrozenBatchNorm2d)
    del reference.fc, reference.avgpool
    assert list(reference.state_dict()) == list(bb.body.state_dict())
    reference.load_state_dict(bb.body.state_dict())
    for layout in (torch.contiguous_format, torch.channels_last):
        conv, plain = bb.body.layer3[0].downsample[0], reference.layer3[0].downsample[0]
        x = torch.randn(2, conv.in_channels, 13, 10).to(memory_format=layout).requires_grad_()
        out, ref = conv(x), plain(x)
        # under autograd the convolution's input is the subsampled slice, not x itself
        assert [type(f).__name__ for f, _ in out.grad_fn.next_functions if f is not None][0] == "SliceBackward0"
        assert out.shape == ref.shape == (2, conv.out_channels, 7, 5)  # ceil(13 / 2), ceil(10 / 2)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        g = torch.randn_like(ref)
        expected = torch.autograd.grad(ref, (x, plain.weight), g)
        for got, exp in zip(torch.autograd.grad(out, (x, conv.weight), g), expected):
            torch.testing.assert_close(got, exp, atol=1e-4, rtol=1e-4)
        with torch.no_grad():  # inference: the strided convolution itself, bit for bit
            assert torch.equal(conv(x), plain(x))
    images, mask = torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool)
    with torch.no_grad():
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(bb(images, mask), _resnet_features(reference, images)))


def _resnet_features(body: nn.Module, images: torch.Tensor) -> list[tuple[torch.Tensor, None]]:
    x = body.maxpool(body.relu(body.bn1(body.conv1(images))))
    outs = []
    for layer in (body.layer1, body.layer2, body.layer3, body.layer4):
        x = layer(x)
        outs.append((x, None))
    return outs[1:]
