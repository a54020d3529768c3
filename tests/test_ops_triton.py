"""The Triton backend of the op, run without a GPU.

Kernels execute in Triton's interpreter (``TRITON_INTERPRET=1``, which Triton reads when ``@triton.jit`` runs, so
in a fresh subprocess) on CPU tensors and are compared with the grid_sample reference computed here in float64.
The real GPU code path is checked by compiling both kernels for sm_90 with Triton's bundled ptxas. Run the suite
without TRITON_INTERPRET set (this process must see compiled, CPU-unavailable kernels).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import OpInputs, make_op_inputs

import ddetr.ops
from ddetr.ops import ms_deform_attn_reference, triton_kernel

triton = pytest.importorskip("triton")

# Runs in the interpreter subprocess: every case forward (and backward), plus torch.library.opcheck.
WORKER = """
import sys, torch
import ddetr.ops
cases = torch.load(sys.argv[1])
results = {}
for name, case in cases.items():
    value, loc, attn = (case[k].clone().requires_grad_(case["backward"]) for k in ("value", "loc", "attn"))
    if case["permute_value"]:  # a non-contiguous view with the same values
        value = value.detach().permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3).requires_grad_(True)
    out = ddetr.ops.ms_deform_attn(value, case["shapes"], None, loc, attn, backend="triton")
    grads = torch.autograd.grad(out, (value, loc, attn), case["grad"]) if case["backward"] else None
    results[name] = {"out": out.detach(), "grads": grads}
case = cases["opcheck"]
flat = [x for hw in case["shapes"] for x in hw]
args = (case["value"].requires_grad_(), flat, case["loc"].requires_grad_(), case["attn"].requires_grad_())
try:
    torch.library.opcheck(torch.ops.ddetr.ms_deform_attn_triton.default, args)
    results["opcheck"] = "ok"
except Exception as exc:
    results["opcheck"] = repr(exc)
torch.save(results, sys.argv[2])
"""

SHAPES = ((5, 6), (3, 2))


def _case(inputs: OpInputs, backward: bool, permute_value: bool = False) -> dict:
    gen = torch.Generator().manual_seed(1)
    n, _, m, d = inputs.value.shape
    grad = torch.randn(n, inputs.sampling_locations.shape[1], m * d, generator=gen).to(inputs.value.dtype)
    return {"value": inputs.value, "loc": inputs.sampling_locations, "attn": inputs.attention_weights,
            "shapes": inputs.shapes, "grad": grad, "backward": backward, "permute_value": permute_value}


def _cases() -> dict[str, dict]:
    """Tiny inputs: batch 2, two levels, locations partly outside the maps; odd D and edge-case coordinates."""
    f32 = torch.float32
    return {
        "fp32": _case(make_op_inputs(n=2, lq=7, m=2, d=4, shapes=SHAPES, p=2, dtype=f32), backward=True),
        "fp32_odd_d": _case(make_op_inputs(n=1, lq=5, m=3, d=5, shapes=((4, 3), (2, 2), (1, 1)), p=3,
                                           dtype=f32, seed=2), backward=True, permute_value=True),
        "fp32_special": _case(make_op_inputs(n=2, lq=7, m=2, d=8, shapes=SHAPES, p=2, dtype=f32, seed=3,
                                             special=True), backward=False),
        "bf16": _case(make_op_inputs(n=2, lq=7, m=2, d=8, shapes=SHAPES, p=2, dtype=torch.bfloat16, seed=4),
                      backward=True),
        "fp16": _case(make_op_inputs(n=2, lq=7, m=2, d=4, shapes=SHAPES, p=2, dtype=torch.float16, seed=5),
                      backward=True),
        "fp64": _case(make_op_inputs(n=2, lq=7, m=2, d=4, shapes=SHAPES, p=2, seed=6), backward=True),
        # opcheck runs the op a dozen times: one image and three queries are enough for its consistency checks
        "opcheck": _case(make_op_inputs(n=1, lq=3, m=2, d=4, shapes=SHAPES, p=2, dtype=f32, seed=7), backward=False),
    }


def _reference(case: dict) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Output and input gradients of the grid_sample reference in float64 on the same (rounded) inputs."""
    value, loc, attn = (case[k].double().requires_grad_(True) for k in ("value", "loc", "attn"))
    out = ms_deform_attn_reference(value, case["shapes"], loc, attn)
    return out.detach(), torch.autograd.grad(out, (value, loc, attn), case["grad"].double())


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """(cases, results of the Triton backend on them in the interpreter subprocess)."""
    folder = tmp_path_factory.mktemp("triton")
    cases = _cases()
    torch.save(cases, folder / "cases.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", WORKER, str(folder / "cases.pt"), str(folder / "out.pt")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cases, torch.load(folder / "out.pt")


@pytest.mark.parametrize("name", ["fp32", "fp32_odd_d", "fp32_special"])
def test_forward_fp32_matches_reference(interpreted, name):
    cases, results = interpreted
    out = results[name]["out"]
    ref, _ = _reference(cases[name])
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out.double() - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["fp32", "fp32_odd_d"])
def test_grads_fp32_match_reference(interpreted, name):
    cases, results = interpreted
    _, ref_grads = _reference(cases[name])
    for got, ref, what in zip(results[name]["grads"], ref_grads, ("value", "loc", "attn")):
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert _rel_err(got, ref) <= 1e-4, what


@pytest.mark.parametrize(("name", "dtype", "tol"), [("bf16", torch.bfloat16, 2e-2), ("fp16", torch.float16, 3e-3)])
def test_half_precision_close_to_reference(interpreted, name, dtype, tol):
    """Half inputs accumulate in fp32: only the output/gradient rounding to the storage dtype remains."""
    cases, results = interpreted
    ref, ref_grads = _reference(cases[name])
    out = results[name]["out"]
    assert out.dtype == dtype
    assert _rel_err(out, ref) <= tol
    for got, ref_grad, what in zip(results[name]["grads"], ref_grads, ("value", "loc", "attn")):
        assert got.dtype == dtype, what
        assert _rel_err(got, ref_grad) <= tol, what


def test_fp64_falls_back_to_reference(interpreted):
    cases, results = interpreted
    ref, ref_grads = _reference(cases["fp64"])
    assert results["fp64"]["out"].dtype == torch.float64
    torch.testing.assert_close(results["fp64"]["out"], ref, rtol=1e-12, atol=1e-12)
    for got, ref_grad in zip(results["fp64"]["grads"], ref_grads):
        torch.testing.assert_close(got, ref_grad, rtol=1e-12, atol=1e-12)


def test_custom_op_passes_opcheck(interpreted):
    """Schema, fake (meta) implementation and autograd registration of the forward op are consistent."""
    _, results = interpreted
    assert results["opcheck"] == "ok"


def test_not_used_for_cpu_tensors():
    """Without the interpreter, CPU tensors never reach Triton: not in auto dispatch, explicit use is an error."""
    inputs = make_op_inputs(dtype=torch.float32)
    assert "triton" in ddetr.ops.available_backends()
    assert "triton" not in ddetr.ops.available_backends(inputs.value)
    with pytest.raises(ValueError, match="triton"):
        ddetr.ops.ms_deform_attn(*inputs.args(), backend="triton")


@pytest.mark.parametrize(("kernel", "dtype", "d"), [("fwd", "fp32", 32), ("bwd", "bf16", 24)])
def test_kernels_compile_for_sm90_without_spills(kernel, dtype, d, tmp_path):
    """The non-interpreted path: ptxas accepts both kernels and uses no stack (no register spills)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    levels, points = 4, 4
    value = torch.empty(2, 100, 8, d, device="meta")
    loc = torch.empty(2, 30, 8, levels, points, 2, device="meta")
    _, _, consts = triton_kernel._launch_args(value, [5, 5] * levels, loc)
    num_warps = consts.pop("num_warps")
    fn = triton_kernel._fwd_kernel if kernel == "fwd" else triton_kernel._bwd_kernel
    pointers = [a for a in fn.arg_names if a.endswith("_ptr")]
    signature = {a: "*fp32" if a == "grad_value_ptr" else f"*{dtype}" for a in pointers}
    signature.update(shapes=("i32",) * (2 * levels), starts=("i32",) * levels, S="i32", Lq="i32",
                     **dict.fromkeys(consts, "constexpr"))
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(pointers))}
    compiled = triton.compile(ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps})
    cubin = compiled.asm["cubin"]
    assert len(cubin) > 0
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    path = tmp_path / f"{kernel}.cubin"
    path.write_bytes(cubin)
    usage = subprocess.run([cuobjdump, "-res-usage", str(path)], capture_output=True, text=True).stdout
    assert re.search(r"REG:\d+ STACK:0\b", usage), usage
