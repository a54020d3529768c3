"""The fused CPU training dropout (issue #14): nn.Dropout's distribution and gradient, repeatable under
torch.manual_seed for any thread count, and plain nn.Dropout wherever it does not apply."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ddetr.models import DeformableDETR, preset
from ddetr.ops.dropout import Dropout, dropout, dropout_cpu


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_scale_and_gradient(p: float) -> None:
    torch.manual_seed(0)
    x = (torch.rand(400, 1001) + 0.5).requires_grad_(True)  # no zeros: a zero output means dropped; odd length
    y = dropout(x, p, True)
    kept = y != 0
    n = kept.numel()
    rate = kept.float().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)  # 5 sigma of a Binomial(n, 1 - p) fraction
    torch.testing.assert_close(y[kept], x[kept] * (1 / (1 - p)), rtol=1e-6, atol=0)
    grad = torch.randn_like(x)
    y.backward(grad)
    torch.testing.assert_close(x.grad, torch.where(kept, grad / (1 - p), 0.0), rtol=1e-6, atol=0)
    rows = kept.float().mean(1)  # no structure: every row keeps about 1 - p of its elements
    assert (rows - (1 - p)).abs().max() < 6 * math.sqrt(p * (1 - p) / x.shape[1])


def test_gradcheck_float64() -> None:
    x = torch.randn(7, 13, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dropout_cpu(t, 0.3, 1234)[0], (x,))


def test_repeatable_under_manual_seed_for_any_thread_count() -> None:
    x = torch.randn(300, 517)
    threads = torch.get_num_threads()
    try:
        torch.manual_seed(5)
        a = dropout(x, 0.2, True)
        b = dropout(x, 0.2, True)
        torch.set_num_threads(1)
        torch.manual_seed(5)
        c = dropout(x, 0.2, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, c) and not torch.equal(a, b)  # same seed, same mask; the next call draws a new one


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_and_layouts(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = (torch.rand(64, 96) + 0.5).to(dtype).t()  # non-contiguous
    y = dropout(x, 0.25, True)
    assert y.dtype == dtype and y.shape == x.shape
    kept = y != 0
    torch.testing.assert_close(y[kept].double(), (x[kept].double() / 0.75).to(dtype).double())


def test_plain_dropout_where_it_does_not_apply() -> None:
    x = torch.randn(8, 16)
    assert torch.equal(dropout(x, 0.5, False), x)  # eval
    assert torch.equal(dropout(x, 0.0, True), x)
    assert torch.equal(Dropout(1.0)(x), torch.zeros_like(x))  # p = 1 drops everything, as nn.Dropout does
    y = x.clone()
    out = Dropout(0.5, inplace=True)(y)
    assert out is y and ((y == 0) | (y == 2 * x)).all()  # inplace is honoured, not ignored
    module = Dropout(0.3)
    assert isinstance(module, nn.Dropout) and repr(module) == repr(nn.Dropout(0.3))
    module.eval()
    assert torch.equal(module(x), x)


def test_model_uses_it_and_keeps_its_state_dict() -> None:
    model = DeformableDETR(preset("demo", pretrained_backbone="none").model)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(isinstance(m, Dropout) for m in drops)
    assert not any("dropout" in key for key in model.state_dict())


def test_backward_allocates_no_gradient_for_the_mask() -> None:
    """The mask output is not differentiable: its gradient is not materialised as a full-size zero tensor (it was,
    once per call, in every training step), and the gradient is still right."""
    from torch.profiler import profile

    x = torch.randn(64, 1024, requires_grad=True)
    y = dropout(x, 0.1, training=True)
    ones = torch.ones_like(y)
    with profile() as prof:
        (grad,) = torch.autograd.grad(y, x, ones)
    names = {e.name for e in prof.events()}
    assert not names & {"aten::zeros", "aten::zero_", "aten::fill_"}, names
    torch.testing.assert_close(grad, (y != 0).float() / 0.9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_relu_fused_is_dropout_of_relu(dtype: torch.dtype) -> None:
    """relu=True: the same values as dropout(relu(x)) with the same draws, bit for bit; the mask also drops x <= 0,
    so the gradient is the ReLU's and the dropout's; NaN passes as through torch.relu."""
    torch.manual_seed(0)
    x = torch.randn(37, 1001).to(dtype)  # odd length: the last element has its own code path
    x[0, :5] = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf")])
    fused, mask = dropout_cpu(x, 0.3, 77, True)
    plain, plain_mask = dropout_cpu(torch.relu(x), 0.3, 77)
    assert torch.equal(fused.isnan(), plain.isnan()) and fused[0, 2].isnan() == plain_mask[0, 2]
    assert torch.equal(torch.nan_to_num(fused), torch.nan_to_num(plain))
    assert torch.equal(mask, plain_mask & (x > 0))
    xg = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    grad = torch.randn(x.shape).to(dtype)
    (g_fused,) = torch.autograd.grad(dropout_cpu(xg, 0.3, 77, True)[0], xg, grad)
    (g_ref,) = torch.autograd.grad(dropout_cpu(torch.relu(xr), 0.3, 77)[0], xr, grad)
    assert torch.equal(g_fused, g_ref)


def test_relu_fused_gradcheck_float64() -> None:
    x = torch.randn(7, 13, dtype=torch.float64)
    x = (x + 0.2 * x.sign()).requires_grad_(True)  # away from the ReLU's kink
    assert torch.autograd.gradcheck(lambda t: dropout_cpu(t, 0.3, 1234, True)[0], (x,))


def test_ffn_applies_its_relu_in_the_dropout_pass() -> None:
    """The FFN's ReLU -> dropout is the fused op in CPU training (no ReLU node left to keep its output), equal to
    applying them one after the other with the same draws; in eval it is the plain ReLU."""
    from ddetr.models.encoder import EncoderLayer

    torch.manual_seed(0)
    layer = EncoderLayer(lambda: nn.Identity(), 32, 64, dropout=0.2).train()
    x = torch.randn(2, 9, 32, requires_grad=True)
    torch.manual_seed(3)
    out = layer.ffn(x)
    names, todo, seen = set(), [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            names.add(type(node).__name__)
            todo += [f for f, _ in node.next_functions]
    assert not {n for n in names if "Relu" in n or "Threshold" in n}, names
    torch.manual_seed(3)
    h = dropout(torch.relu(layer.linear1(x)), 0.2, True)
    assert torch.equal(out, x + dropout(layer.linear2(h), 0.2, True))
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer.ffn(x), x + layer.linear2(torch.relu(layer.linear1(x))))
