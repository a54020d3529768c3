"""`ddetr.ops.linear`: the inference paths' GEMMs through oneDNN give F.linear's results (with the ReLU or the
residual added), in the dtype F.linear would give under autocast, and step aside wherever they must not run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ddetr.ops.linear as L
from ddetr.ops.linear import linear

needs_onednn = pytest.mark.skipif(not L.onednn_linear_available(), reason="oneDNN linear op not in this build")


@pytest.fixture(autouse=True)
def onednn_wherever_it_runs(monkeypatch):
    """fp32 takes oneDNN only where it is the faster (AVX-512); these tests check it on any CPU that runs it."""
    monkeypatch.setattr(L, "onednn_linear_faster", L.onednn_linear_available)


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts the calls that reach oneDNN's op (both overloads)."""
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    class Counting:
        def __call__(self, *args):
            calls.append("unary")
            return real(*args)

        def binary(self, *args):
            calls.append("binary")
            return real.binary(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", Counting())
    return calls


def operands(dtype=torch.float32):
    torch.manual_seed(0)
    x = torch.randn(3, 50, 64, dtype=dtype)  # 3-D, as the attention's projections see it
    return x, torch.randn(96, 64, dtype=dtype) / 8, torch.randn(96, dtype=dtype), torch.randn(3, 50, 96, dtype=dtype)


@needs_onednn
def test_matches_f_linear_with_relu_and_residual_fp32(onednn_calls) -> None:
    x, w, b, r = operands()
    with torch.no_grad():
        ref = F.linear(x, w, b)
        assert (linear(x, w, b) - ref).abs().max() < 1e-5
        assert (linear(x, w, b, relu=True) - ref.relu()).abs().max() < 1e-5
        assert (linear(x, w, b, residual=r) - (ref + r)).abs().max() < 1e-5
        assert (linear(x, w, None) - F.linear(x, w)).abs().max() < 1e-5
        assert (linear(x[:, ::2], w, b) - F.linear(x[:, ::2], w, b)).abs().max() < 1e-5  # strided input
    assert onednn_calls == ["unary", "unary", "binary", "unary", "unary"]
    assert ref.relu().eq(0).any() and ref.gt(0).any()  # the ReLU had something to do


@needs_onednn
@pytest.mark.parametrize("cpu_has_bf16", [True, False])
def test_under_bf16_autocast_it_computes_in_bf16_like_f_linear(onednn_calls, monkeypatch, cpu_has_bf16) -> None:
    """bf16 goes to oneDNN where the CPU computes it (AVX-512 and newer); on AVX2-only CPUs oneDNN cannot build a
    bf16 primitive (a RuntimeError), so F.linear takes it there, with the same dtype and values."""
    if cpu_has_bf16 and not L.onednn_bf16_available():
        cpu_has_bf16 = False  # this CPU has no oneDNN bf16: both cases check the fallback
    monkeypatch.setattr(L, "onednn_bf16_available", lambda: cpu_has_bf16)
    x, w, b, r = operands()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.linear(x, w, b)
        out = linear(x, w, b)
        summed = linear(x, w, b, residual=r)
    assert out.dtype == ref.dtype == torch.bfloat16
    exact = F.linear(x, w, b)
    scale = exact.abs().max()
    assert (out.float() - exact).abs().max() < 0.02 * scale
    assert (summed.float() - (exact + r)).abs().max() < 0.02 * scale
    assert onednn_calls == (["unary", "binary"] if cpu_has_bf16 else [])


def test_falls_back_to_f_linear_with_autograd_other_dtypes_or_no_onednn(onednn_calls, monkeypatch) -> None:
    x, w, b, r = operands()
    w.requires_grad_(True)
    out = linear(x, w, b, residual=r)  # grad enabled: the autograd graph must be recorded
    out.sum().backward()
    assert w.grad is not None and (w.grad - x.sum((0, 1)).expand_as(w)).abs().max() < 1e-3
    x64, w64, b64, _ = operands(torch.float64)
    with torch.no_grad():
        out64 = linear(x64, w64, b64, relu=True)
    assert out64.dtype == torch.float64 and (out64 - F.linear(x64, w64, b64).relu()).abs().max() < 1e-12
    monkeypatch.setattr(L, "onednn_linear_faster", lambda: False)
    with torch.no_grad():
        plain = linear(x, w, b, relu=True)
    assert (plain - F.linear(x, w, b).relu()).abs().max() < 1e-6
    assert onednn_calls == []


def test_relu_and_residual_together_are_refused() -> None:
    x, w, b, r = operands()
    with pytest.raises(ValueError, match="exclusive"):
        linear(x, w, b, relu=True, residual=r)


@needs_onednn
def test_the_encoder_inference_path_runs_its_gemms_through_onednn(onednn_calls) -> None:
    from test_model import small

    from ddetr.models import DeformableDETR

    torch.manual_seed(0)
    model = DeformableDETR(small("deformable-detr", enc_layers=2).model).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 96))
    # per encoder layer: value, offsets and weights projections, then per chunk output_proj + residual, FFN in, out
    assert onednn_calls.count("unary") >= 2 * 4 and onednn_calls.count("binary") >= 2 * 2


@pytest.mark.parametrize("onednn_faster", [True, False], ids=["avx512", "avx2"])
def test_linear_module_trains_through_onednn_with_f_linears_gradients(monkeypatch, onednn_faster) -> None:
    """`Linear` in fp32 CPU training: oneDNN output and input gradient, MKL weight gradient where oneDNN is the
    faster (AVX-512), F.linear elsewhere; the same values and gradients as nn.Linear, the output may be filled in
    place (the attention zeroes padding in it)."""
    monkeypatch.setattr(L, "onednn_linear_faster", lambda: onednn_faster and L.onednn_linear_available())
    calls = []
    real = L._OneDNNLinear.apply
    monkeypatch.setattr(L._OneDNNLinear, "apply", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    ours = L.Linear(64, 96)
    plain = torch.nn.Linear(64, 96)
    plain.load_state_dict(ours.state_dict())
    assert isinstance(ours, torch.nn.Linear) and list(ours.state_dict()) == ["weight", "bias"]
    x = torch.randn(3, 50, 64)
    mask = torch.rand(3, 50, 1) < 0.3
    outs, grads = [], []
    for module in (ours, plain):
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        y.masked_fill_(mask, 0.0)
        (y * torch.linspace(-1, 1, 96)).square().sum().backward()
        outs.append(y.detach())
        grads.append((xi.grad, module.weight.grad, module.bias.grad))
    expected = int(onednn_faster and L.onednn_linear_available())
    assert len(calls) == expected
    assert (outs[0] - outs[1]).abs().max() < 1e-5
    for a, b in zip(*grads):
        assert (a - b).abs().max() < 1e-4 * b.abs().max(), "gradient differs"
    assert ours(torch.randn(64)).shape == (96,)  # 1-D input: F.linear
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours(x).dtype == torch.bfloat16  # autocast: F.linear, cast by autocast
    assert len(calls) == expected


@pytest.mark.parametrize(("capability", "expected"), [("AVX512", True), ("AVX2", False), ("DEFAULT", False)])
def test_fp32_takes_onednn_only_where_it_is_the_faster(monkeypatch, capability, expected) -> None:
    """Measured: oneDNN's fp32 GEMMs beat MKL's with AVX-512 and lose to them on AVX2-only CPUs, in inference
    and training alike; bf16 is oneDNN's wherever it computes it."""
    monkeypatch.undo()  # the real policy, not this module's fixture
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(L, "onednn_linear_available", lambda: True)
    L.onednn_linear_faster.cache_clear()
    try:
        assert L.onednn_linear_faster() is expected
        assert L._onednn_dtype(torch.float32) is expected
    finally:
        L.onednn_linear_faster.cache_clear()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace's deprecation notice
def test_steps_aside_while_a_graph_is_recorded(onednn_calls) -> None:
    """Tracing (and ONNX export, torch.compile) records F.linear, which every exporter knows, not oneDNN's op."""
    x, w, b, r = operands()
    with torch.no_grad():
        traced = torch.jit.trace(lambda t: linear(t, w, b, residual=r), (x,), check_trace=False)
    assert onednn_calls == []
    assert (traced(x) - (F.linear(x, w, b) + r)).abs().max() < 1e-5
