"""`ddetr.ops.softmax`: the attention weights' softmax equals PyTorch's (values, dtypes, gradients) on the short rows
where it runs its own code, is PyTorch's op elsewhere, and is what a traced graph records."""

from __future__ import annotations

import pytest
import torch

import ddetr.ops.softmax as S
from ddetr.ops.softmax import softmax


@pytest.fixture
def own_calls(monkeypatch):
    """Records `_ShortSoftmax` calls, with rows below 16 taking it whatever this CPU's vector width."""
    monkeypatch.setattr(S, "short_rows", lambda: 16)
    calls = []
    real = S._ShortSoftmax.apply
    monkeypatch.setattr(S._ShortSoftmax, "apply", lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


@pytest.mark.parametrize("k", [1, 4, 12, 15])
def test_short_rows_equal_torch_values_and_gradients(k, own_calls):
    torch.manual_seed(k)
    x = (torch.randn(2, 37, 8, k) * 4).requires_grad_()
    grad = torch.randn(2, 37, 8, k)
    ours, ref = softmax(x), x.softmax(-1)
    assert own_calls, "the short path did not run"
    assert ours.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    g_ours, = torch.autograd.grad(ours, x, grad)
    g_ref, = torch.autograd.grad(ref, x, grad)
    x64 = x.detach().double().requires_grad_()
    g_64, = torch.autograd.grad(x64.softmax(-1), x64, grad.double())
    # y * (g - sum(g y)) cancels where g is near its mean: PyTorch's own fp32 result is off by up to ~1e-6 there
    torch_error = (g_ref.double() - g_64).abs().max().item()
    assert (g_ours.double() - g_64).abs().max().item() <= max(2 * torch_error, 1e-6)


def test_gradcheck_fp64(own_calls):
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(softmax, (x,))
    assert own_calls


def test_large_logits_do_not_overflow():
    x = torch.tensor([[1000.0, 999.0, -1000.0, 0.0]])
    torch.testing.assert_close(softmax(x), x.softmax(-1))
    assert torch.isfinite(softmax(x)).all()


def test_bf16_input_as_torch_gives_it(own_calls):
    """bf16 logits: to fp32 when asked (the inference path), else bf16 like PyTorch's (autocast training);
    gradients come back in the input's dtype."""
    torch.manual_seed(0)
    x = torch.randn(40, 8, 12).bfloat16().requires_grad_()
    as_fp32 = softmax(x, torch.float32)
    assert as_fp32.dtype == torch.float32
    torch.testing.assert_close(as_fp32, x.softmax(-1, dtype=torch.float32), rtol=0, atol=1e-6)
    as_bf16 = softmax(x)
    assert as_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(as_bf16.float(), x.float().softmax(-1), rtol=0, atol=4e-3)
    g, = torch.autograd.grad(as_bf16.float().square().sum(), x)
    g_ref, = torch.autograd.grad(x.softmax(-1).float().square().sum(), x)
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(g.float(), g_ref.float(), rtol=0.02, atol=2e-3)
    assert len(own_calls) == 2


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace's deprecation notice
def test_long_rows_and_tracing_use_torch(own_calls):
    x = torch.randn(10, 16)
    assert torch.equal(softmax(x), x.softmax(-1))
    traced = torch.jit.trace(softmax, torch.randn(4, 12), check_trace=False)
    assert "aten::softmax" in str(traced.graph)
    assert not own_calls


@pytest.mark.parametrize(("capability", "short"), [("AVX512", 16), ("AVX2", 8), ("DEFAULT", 0), ("SVE256", 0)])
def test_short_means_below_the_vector_width_measured(monkeypatch, capability, short):
    """PyTorch's kernel is vectorised from 16 values per row with AVX-512 and from 8 with AVX2 (measured: on AVX2
    rows of 12 are 1.4x faster in PyTorch's kernel, rows of 4 3x faster here); other CPUs always keep PyTorch's."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    S.short_rows.cache_clear()
    try:
        assert S.short_rows() == short
        calls = []
        real = S._ShortSoftmax.apply
        monkeypatch.setattr(S._ShortSoftmax, "apply", lambda *a: calls.append(a[0].shape[-1]) or real(*a))
        for k in (4, 8, 12):
            x = torch.randn(5, k)
            torch.testing.assert_close(softmax(x), x.softmax(-1))
        assert calls == [k for k in (4, 8, 12) if k < short]
    finally:
        S.short_rows.cache_clear()
