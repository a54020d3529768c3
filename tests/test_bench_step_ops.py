"""`ddetr bench step-ops`: operator times per kind for ours and HF; FLOPs counted right; tap-wise GEMMs are
convolution work."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from ddetr.bench import step_ops
from ddetr.models.convs import TapwiseConv2d


def test_flops_of_products_and_convolutions():
    a, b = torch.randn(5, 3), torch.randn(3, 7)
    with step_ops.OpTimer() as timer:
        torch.mm(a, b)
        torch.addmm(torch.zeros(7), a, b)
        torch.bmm(torch.randn(2, 5, 3), torch.randn(2, 3, 7))
        x = torch.randn(2, 4, 9, 11, requires_grad=True)
        w = torch.randn(6, 4, 3, 3, requires_grad=True)
        y = F.conv2d(x, w, stride=2, padding=1)
        y.sum().backward()
    assert timer.flops["mm"] == timer.flops["addmm"] == 2 * 5 * 3 * 7
    assert timer.flops["bmm"] == 2 * 2 * 5 * 3 * 7
    per_output = 4 * 3 * 3
    assert timer.flops["convolution"] == 2 * y.numel() * per_output
    assert timer.flops["convolution_backward"] == 2 * 2 * y.numel() * per_output  # input and weight gradients
    x2, w2, r = torch.randn(5, 3), torch.randn(7, 3), torch.randn(5, 7)
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):  # oneDNN's linear, both overloads (inference fuses a residual)
        with step_ops.OpTimer() as onednn:
            torch.ops.mkldnn._linear_pointwise(x2, w2, None, "none", [], "")
            torch.ops.mkldnn._linear_pointwise.binary(x2, r, w2, None, "add")
        assert onednn.flops["_linear_pointwise"] == 2 * (2 * 5 * 3 * 7)
    assert step_ops.kind("convolution_backward") == "convolutions" and step_ops.kind("mm") == "dense products"
    assert step_ops.kind("grid_sampler_2d") == step_ops.kind("ms_deform_attn_cpu") == "attention sampling"


def test_tapwise_weight_gradient_gemms_count_as_convolutions():
    conv = TapwiseConv2d(16, 16, 3, padding=1)
    x = torch.randn(1, 16, 8, 8, requires_grad=True)
    with step_ops.OpTimer() as timer:
        conv(x).sum().backward()
    tapwise = [n for n in timer.seconds if n.endswith("(tap-wise convolution weight gradient)")]
    assert tapwise and all(step_ops.kind(n) == "convolutions" for n in tapwise)
    assert sum(timer.flops[n] for n in tapwise) >= 2 * 16 * 16 * 9 * 64  # padding included
    assert timer.calls["convolution_backward"] == 1  # the input gradient only
    assert timer.flops["convolution_backward"] == 2 * (16 * 8 * 8) * (16 * 9)


def test_step_ops_reports_both_implementations(capsys, one_thread):
    pytest.importorskip("transformers")
    assert step_ops.main(["--size", "64", "96", "--repeats", "1", "--threads", "1", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "default allocator" in out
    for impl in ("ours", "HF"):
        section = out[out.index(f"### {impl}: step"):]
        rows = {k: re.search(rf"\| {k} \| (\d+\.\d\d) \| (\d+)% \|", section) for k in step_ops.KINDS}
        assert all(rows.values()), section
        assert 97 <= sum(int(m.group(2)) for m in rows.values()) <= 103
        listed = section.split(f"| operator ({impl})")[1].split("###")[0]
        assert len(re.findall(r"^\| \S+.* \| \d+ \| \d+\.\d{3} \|", listed, re.M)) == 3  # --top 3
    hf = out[out.index("### HF: step"):]
    assert "grid_sampler_2d" in hf and "ms_deform_attn" not in hf
