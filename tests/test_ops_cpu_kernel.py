"""The fused C++/OpenMP CPU kernel (backend "cpu") against the grid_sample reference, plus its op plumbing.

test_ops.py runs the generic backend checks on it with small D; here: channel counts that reach the vector
paths (16 fp32 / 8 fp64 lanes, plus tails), half-precision loads, determinism across thread counts, dispatch,
torch.library registration (opcheck, compile, export), the fallback when the extension cannot be built, and the
build cache (a cached library loads without ninja or a compiler, whatever PATH says).
"""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import OpInputs, make_op_inputs

from ddetr.ops import cpu_kernel, ms_deform_attn, ms_deform_attn_reference

msda = importlib.import_module("ddetr.ops.ms_deform_attn")  # the module (the package exports the function)

# (n, lq, m, d, shapes, p). D covers the scalar tail, one, two and four vectors (the forward takes a 32-byte
# vector CPU's 32-channel heads in one pass of 4; the backward unrolls heads of exactly 2 or 4 vectors: 16 and 32
# channels with AVX2), and mixes of those (44 = 4 + 1 AVX2 vectors + a tail). Cases with
# Lq * L * P >= 4 S (the 2nd and 4th) make the kernel copy value head-major; the others read it in place.
CASES = [
    (1, 7, 2, 3, ((4, 5), (2, 3)), 2),
    (3, 7, 1, 33, ((3, 4), (2, 2), (1, 3)), 4),
    (1, 6, 3, 32, ((5, 3),), 1),
    (2, 8, 2, 48, ((3, 4), (2, 3), (2, 2), (1, 1)), 3),
    (1, 9, 4, 17, ((6, 7), (3, 4)), 4),
    (1, 5, 2, 44, ((4, 3), (2, 2)), 2),
    (2, 6, 2, 16, ((3, 5), (2, 2)), 2),
]


def cpu(inputs: OpInputs) -> torch.Tensor:
    return ms_deform_attn(*inputs.args(), backend="cpu")


def reference(inputs: OpInputs) -> torch.Tensor:
    return ms_deform_attn_reference(inputs.value, inputs.shapes, inputs.sampling_locations, inputs.attention_weights)


def grads(fn, inputs: OpInputs, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    leaves = inputs.leaves()
    return torch.autograd.grad(fn(leaves), (leaves.value, leaves.sampling_locations, leaves.attention_weights),
                               grad_out)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_backend_is_built_and_available():
    assert cpu_kernel.available(torch.empty(0))
    assert not cpu_kernel.available(torch.empty(0, device="meta"))
    assert "cpu" in msda.available_backends(torch.empty(0))


def test_channel_vectors_are_one_register_wide():
    """64 bytes with AVX-512, 32 without: 64-byte vectors on an AVX2 CPU are register pairs, and the forward's
    accumulators spilled to the stack (measured 5.5x slower at the encoder shape)."""
    assert cpu_kernel.available(torch.empty(0))
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert torch.ops.ddetr_msda_cpu.vector_bytes() == (64 if "avx512f" in flags else 32)
    else:
        assert torch.ops.ddetr_msda_cpu.vector_bytes() == 32


def test_compiler_flags_suit_the_architecture():
    """x86-only options (-mprefer-vector-width) are given to x86 compilers only: ARM and POWER compilers reject them,
    and then nothing would be built (the reference path, ~30x slower, would run with a warning)."""
    for machine in ("x86_64", "AMD64"):
        assert cpu_kernel._arch_flags(machine) == ["-march=native", "-mprefer-vector-width=512"]
    for machine in ("aarch64", "arm64", "ppc64le"):
        assert cpu_kernel._arch_flags(machine) == ["-mcpu=native"]
    assert set(cpu_kernel._arch_flags(platform.machine())) <= set(cpu_kernel._CFLAGS)  # this build used them


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_matches_reference(case):
    """fp64 to 1e-10 and fp32 to 1e-5, with points outside, on borders and exactly on pixel centres."""
    inputs = make_op_inputs(*case, special=True, seed=11)
    torch.testing.assert_close(cpu(inputs), reference(inputs), atol=1e-10, rtol=0)
    inputs32 = inputs.to(dtype=torch.float32)
    out32 = cpu(inputs32)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), reference(inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES[:3], ids=str)
def test_gradcheck(case):
    """Analytic fp64 gradients of value, locations and weights equal numerical ones."""
    inputs = make_op_inputs(*case, seed=12, loc_range=(-0.1, 1.1)).leaves()

    def fn(value, loc, attn):
        return cpu(OpInputs(value, inputs.spatial_shapes, inputs.level_start_index, loc, attn))

    assert torch.autograd.gradcheck(
        fn, (inputs.value, inputs.sampling_locations, inputs.attention_weights), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_grads_match_reference(case):
    """fp64 gradients to 1e-10; fp32 gradients within 1e-4 of the fp64 reference, relative to their max."""
    inputs = make_op_inputs(*case, seed=13)
    grad_out = torch.randn(inputs.value.shape[0], case[1], case[2] * case[3], dtype=torch.float64)
    expected = grads(reference, inputs, grad_out)
    for got, exp in zip(grads(cpu, inputs, grad_out), expected):
        torch.testing.assert_close(got, exp, atol=1e-10, rtol=0)
    for got, exp in zip(grads(cpu, inputs.to(dtype=torch.float32), grad_out.float()), expected):
        assert got.dtype == torch.float32
        assert (got.double() - exp).abs().max() <= 1e-4 * exp.abs().max()


def test_mixed_dtypes_compute_in_float64():
    """A float64 location tensor makes the whole computation float64; outputs/grads keep each input's dtype."""
    inputs = make_op_inputs(2, 5, 2, 20, ((4, 5), (2, 3)), 2, seed=14)
    mixed = OpInputs(inputs.value.float(), inputs.spatial_shapes, inputs.level_start_index,
                     inputs.sampling_locations, inputs.attention_weights.float())
    out = cpu(mixed)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(mixed.to(dtype=torch.float64)), atol=1e-6, rtol=0)
    got = grads(cpu, mixed, torch.ones(2, 5, 40))
    assert [g.dtype for g in got] == [torch.float32, torch.float64, torch.float32]


@pytest.mark.parametrize("lq", [4, 40], ids=["in-place", "head-major"])
def test_corners_off_the_map_never_read_value(lq):
    """Off-map corners read a zero row, not a clamped pixel: inf/NaN in value cannot leak into them (as in
    grid_sample's zero padding); samples on the map still see them."""
    inputs = make_op_inputs(1, lq, 2, 16, ((3, 4), (2, 2)), 2, seed=16)
    inputs.value[0, :, 0] = float("nan")  # head 0: every pixel
    inputs.value[0, 0, 1] = float("inf")  # head 1: the first pixel only
    inputs.sampling_locations[:, :, :, :, :, :] = -2.0  # every sample entirely off the map
    inputs.sampling_locations[0, 0, :, 0, 0, :] = 0.1  # ... except one, near pixel 0 of level 0
    out = cpu(inputs).view(1, lq, 2, 16)
    expected = reference(inputs).view(1, lq, 2, 16)
    assert torch.equal(out[:, 1:], torch.zeros_like(out[:, 1:]))
    assert out[0, 0, 0].isnan().all() and out[0, 0, 1].isinf().all()
    assert torch.equal(out[0, 0].isfinite(), expected[0, 0].isfinite())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("half_all", [True, False], ids=["all-half", "value-half"])
@pytest.mark.parametrize("lq", [8, 28], ids=["in-place", "head-major"])
@pytest.mark.parametrize("d", [32, 48])
def test_half_precision_matches_float32(dtype, half_all, lq, d):
    """Half inputs are read as stored and accumulated in fp32: results are fp32 ones (same rounded inputs)."""
    inputs = make_op_inputs(2, lq, 2, d, ((6, 7), (3, 4)), 4, seed=15, loc_range=(0.0, 1.0))
    inputs.attention_weights /= inputs.attention_weights.sum((-1, -2), keepdim=True)
    half = inputs.to(dtype=dtype)
    if not half_all:  # autocast style: value in half, locations and weights in fp32
        half.sampling_locations = inputs.sampling_locations.float()
        half.attention_weights = inputs.attention_weights.float()
    exact = half.to(dtype=torch.float32)  # the same rounded numbers in fp32
    out = cpu(half)
    assert out.dtype == dtype
    expected = cpu(exact)
    assert torch.equal(out, expected.to(dtype))  # the same fp32 sums, rounded to nearest even like torch
    torch.testing.assert_close(out.double(), reference(exact.to(dtype=torch.float64)),
                               atol=2e-2 if dtype == torch.bfloat16 else 3e-3, rtol=0)
    grad_out = torch.randn(2, lq, 2 * d).to(dtype)
    got = grads(cpu, half, grad_out)
    for g, t, e in zip(got, (half.value, half.sampling_locations, half.attention_weights),
                       grads(reference, exact, grad_out.float())):
        assert g.dtype == t.dtype
        assert rel_l2(g, e) <= 2e-3


def test_deterministic_across_runs_and_thread_counts():
    """No atomics: forward and backward are bitwise identical run to run and for 1 or 2 threads."""
    # Big enough for the kernel to split it across threads (>= 2^22 multiply-adds per thread); crowded
    # points, so many samples share pixels.
    inputs = make_op_inputs(2, 1500, 4, 64, ((12, 10), (6, 5), (3, 3)), 4, dtype=torch.float32, seed=16,
                            loc_range=(0.3, 0.7))
    grad_out = torch.randn(2, 1500, 256)
    threads = torch.get_num_threads()
    results = []
    try:
        for n_threads in (1, 2, 2):
            torch.set_num_threads(n_threads)
            leaves = inputs.leaves()
            out = cpu(leaves)
            results.append((out, *torch.autograd.grad(out, (leaves.value, leaves.sampling_locations,
                                                            leaves.attention_weights), grad_out)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_auto_dispatch_picks_cpu_kernel(monkeypatch):
    """backend="auto" on CPU tensors runs the fused kernel (seen through a spy), not the reference."""
    available, fn = msda._BACKENDS["cpu"]
    calls = []

    def spy(*args):
        calls.append(args[1])
        return fn(*args)

    monkeypatch.setitem(msda._BACKENDS, "cpu", (available, spy))
    inputs = make_op_inputs(seed=17)
    out = ms_deform_attn(*inputs.args())  # backend="auto"
    assert calls == [inputs.shapes]
    torch.testing.assert_close(out, reference(inputs), atol=1e-10, rtol=0)


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    """Without a compiler: one warning, "cpu" unavailable, auto falls back to the reference."""

    def no_compiler() -> None:
        raise OSError("no C++ compiler found")

    monkeypatch.setattr(cpu_kernel, "_loaded", None)  # restored (True) afterwards
    monkeypatch.setattr(cpu_kernel, "_build_and_load", no_compiler)
    inputs = make_op_inputs(seed=18)
    with pytest.warns(RuntimeWarning, match="could not build the fused CPU ms_deform_attn kernel"):
        assert not cpu_kernel.available(inputs.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert "cpu" not in msda.available_backends(inputs.value)
        torch.testing.assert_close(ms_deform_attn(*inputs.args()), reference(inputs), atol=0, rtol=0)
    with pytest.raises(ValueError, match="backend 'cpu' cannot run"):
        ms_deform_attn(*inputs.args(), backend="cpu")


def test_cache_dir_follows_ddetr_cache(monkeypatch, tmp_path):
    """The build goes to $DDETR_CACHE/ext/<key> when the variable is set."""
    monkeypatch.setenv("DDETR_CACHE", str(tmp_path))
    path = cpu_kernel.build_dir()
    assert path.parent == tmp_path / "ext" and path.name.startswith("ms_deform_attn_cpu_")


TOOLS = ("ninja", "c++", "g++", "gcc", "cc", "clang++")
LOAD_IN_FRESH_PROCESS = """
import torch
from ddetr.ops import cpu_kernel
assert cpu_kernel.extension_loaded()
value = torch.ones(1, 4, 1, 2)
loc = torch.full((1, 3, 1, 1, 1, 2), 0.5)
out = torch.ops.ddetr.ms_deform_attn_cpu(value, [2, 2], loc, torch.ones(1, 3, 1, 1, 1))
assert torch.equal(out, torch.ones(1, 3, 2)), out
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="shell-script fakes of the build tools")
def test_cached_library_loads_without_ninja_or_compiler(tmp_path):
    """Another ninja/compiler first on PATH (a venv, a conda env) must not rebuild a cached kernel: a fresh
    process loads it without running any of them (each fake records its call and fails)."""
    assert cpu_kernel.extension_loaded() and cpu_kernel.library_path().is_file()
    fake_bin, calls = tmp_path / "bin", tmp_path / "calls.log"
    fake_bin.mkdir()
    for tool in TOOLS:
        (fake_bin / tool).write_text(f'#!/bin/sh\necho {tool} "$@" >> {calls}\nexit 1\n')
        (fake_bin / tool).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "CC")}
    env["PATH"] = f"{fake_bin}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    done = subprocess.run([sys.executable, "-c", LOAD_IN_FRESH_PROCESS], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not calls.exists(), calls.read_text()
    assert "building the fused CPU kernel" not in done.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_kernel_shares_torchs_openmp_runtime():
    """The kernel's libgomp is torch's (one runtime, one thread pool): torch.set_num_threads and OMP_WAIT_POLICY
    govern it too, and no second pool of threads competes with torch's for the cores."""
    assert cpu_kernel.extension_loaded()
    runtimes = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                if any(name in line for name in ("libgomp", "libiomp", "libomp"))}
    assert len(runtimes) == 1, runtimes


def test_changed_sources_rebuild_and_path_does_not(monkeypatch, tmp_path):
    """The cache key follows the sources (an edit builds afresh) but not PATH; a published library is loaded."""
    csrc = tmp_path / "csrc"
    shutil.copytree(Path(cpu_kernel._SOURCE).parent, csrc)
    monkeypatch.setattr(cpu_kernel, "_SOURCE", csrc / cpu_kernel._SOURCE.name)
    monkeypatch.setenv("DDETR_CACHE", str(tmp_path / "cache"))
    built, loaded = [], []

    def fake_build(path: Path) -> None:
        built.append(path)
        (path / "ddetr_msda_cpu.so").parent.mkdir(parents=True)
        (path / "ddetr_msda_cpu.so").write_bytes(b"")

    monkeypatch.setattr(cpu_kernel, "_build", fake_build)
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    first = cpu_kernel.build_dir()
    cpu_kernel._build_and_load()  # nothing cached: build
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert cpu_kernel.build_dir() == first
    cpu_kernel._build_and_load()  # cached: load only
    assert built == [first] and loaded == [str(first / "ddetr_msda_cpu.so")]
    cpu_kernel._SOURCE.write_text(cpu_kernel._SOURCE.read_text() + "// edited\n")
    assert cpu_kernel.build_dir() != first
    cpu_kernel._build_and_load()
    assert built == [first, cpu_kernel.build_dir()] and len(loaded) == 1


def test_op_rejects_inconsistent_shapes():
    """The raw custom op checks its inputs too (the public function raises ValueError before it)."""
    inputs = make_op_inputs(seed=19)  # levels (3, 4), (2, 3)
    with pytest.raises(RuntimeError, match="shapes cover 14 positions"):
        torch.ops.ddetr.ms_deform_attn_cpu(inputs.value, [3, 4, 1, 2], inputs.sampling_locations,
                                           inputs.attention_weights)


def test_opcheck():
    """Schema, fake (meta) implementations and autograd registration agree with the real kernels."""
    inputs = make_op_inputs(2, 3, 2, 18, ((3, 4), (2, 3)), 2, dtype=torch.float32, seed=20).leaves()
    flat = [s for hw in inputs.shapes for s in hw]
    args = (inputs.value, flat, inputs.sampling_locations, inputs.attention_weights)
    torch.library.opcheck(torch.ops.ddetr.ms_deform_attn_cpu.default, args)
    grad_out = torch.randn(2, 3, 36)
    torch.library.opcheck(torch.ops.ddetr.ms_deform_attn_cpu_backward.default,
                          (grad_out, *(a.detach() if isinstance(a, torch.Tensor) else a for a in args)))


def test_compile_and_export_see_one_node():
    """torch.compile(fullgraph=True) matches eager (with gradients); torch.export keeps the op as one node."""
    inputs = make_op_inputs(2, 5, 2, 20, ((3, 4), (2, 3)), 2, dtype=torch.float32, seed=21).leaves()
    shapes = inputs.shapes

    def fn(value, loc, attn):
        return ms_deform_attn(value, shapes, None, loc, attn).sin()

    args = (inputs.value, inputs.sampling_locations, inputs.attention_weights)
    out = torch.compile(fn, fullgraph=True)(*args)
    expected = fn(*args)
    torch.testing.assert_close(out, expected)
    for got, exp in zip(torch.autograd.grad(out.sum(), args), torch.autograd.grad(expected.sum(), args)):
        torch.testing.assert_close(got, exp)

    class Attn(torch.nn.Module):
        def forward(self, value, loc, attn):
            return fn(value, loc, attn)

    exported = torch.export.export(Attn(), tuple(a.detach() for a in args))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.ddetr.ms_deform_attn_cpu.default) == 1


def test_building_does_not_change_the_build_key(monkeypatch, tmp_path):
    """torch's load() appends its own flags to the lists it is given; the build key must not follow (it did: the
    process that built the kernel then looked for it under another key)."""
    import torch.utils.cpp_extension

    def fake_load(name, sources, extra_cflags, extra_ldflags, build_directory, **kwargs):
        extra_cflags.append("-DFAKE")
        extra_ldflags.append("-ltorch_fake")
        built = Path(build_directory) / f"{name}.so"
        built.write_bytes(b"not a library")
        return str(built)

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    monkeypatch.setenv("DDETR_CACHE", str(tmp_path))
    before = cpu_kernel.build_dir()
    cpu_kernel._build(before)
    assert (before / "ddetr_msda_cpu.so").is_file()
    assert cpu_kernel.build_dir() == before
