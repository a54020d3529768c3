"""Benchmark the multi-scale deformable attention core: every available backend next to HF's grid_sample path.

Times forward and forward+backward (median and min after warm-up) and the peak extra memory of one call at
the encoder shape of an 800x1333 image (levels 100x167, 50x84, 25x42, 13x21; M=8, D=32, L=4, P=4;
Lq = S = 22,223) and the decoder shape (Lq = 300), and prints a markdown table with speed-ups over HF.
CPU memory is the peak RSS growth of one call in a fresh subprocess per (implementation, case), measured
once the inputs exist (Linux /proc high-water mark); CUDA memory is ``max_memory_allocated`` minus what
was allocated before the call.

    ddetr bench op                 # full table on CPU, 2 threads (or: python benchmarks/ms_deform_attn.py)
    ddetr bench op --quick         # smaller shapes, for a smoke test
    ddetr bench op --scaling       # time vs number of queries and points
    ddetr bench op --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

import ddetr.ops

ENCODER_SHAPES = [(100, 167), (50, 84), (25, 42), (13, 21)]
QUICK_SHAPES = [(25, 42), (13, 21), (7, 11), (4, 6)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Case:
    """One op call: levels, queries, batch, heads, channels per head, points per level."""

    name: str
    shapes: list[tuple[int, int]]
    lq: int
    batch: int
    points: int = 4
    heads: int = 8
    dim: int = 32


@dataclass
class Inputs:
    shapes: list[tuple[int, int]]  # static Python ints, as the module passes them (no device sync per call)
    value: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    sampling_locations: torch.Tensor
    attention_weights: torch.Tensor


def pixel_centres(shapes: list[tuple[int, int]]) -> torch.Tensor:
    """(S, 2) normalised (x, y) centres of every pixel, level after level, raster order within a level."""
    out = []
    for h, w in shapes:
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        out.append(torch.stack([xs, ys], -1).reshape(-1, 2))
    return torch.cat(out)


def make_inputs(case: Case, device: str, dtype: torch.dtype, locations: str, seed: int = 0) -> Inputs:
    """Random value and softmaxed weights; realistic locations are pixel-centre references + offsets of ~2 px.

    With Lq = S every pixel of every level is a query in raster order (the encoder); otherwise the references
    are a sorted random subset of those pixel centres. ``uniform`` draws locations from U(0, 1) instead
    (worst locality).
    """
    gen = torch.Generator().manual_seed(seed)
    n, lq, m, d, p, n_levels = case.batch, case.lq, case.heads, case.dim, case.points, len(case.shapes)
    s = sum(h * w for h, w in case.shapes)
    value = torch.randn(n, s, m, d, generator=gen)
    if locations == "uniform":
        loc = torch.rand(n, lq, m, n_levels, p, 2, generator=gen)
    else:
        centres = pixel_centres(case.shapes)
        pick = torch.arange(s) if lq == s else torch.randperm(s, generator=gen)[:lq].sort().values
        ref = centres[pick]  # (Lq, 2) as (x, y)
        wh = torch.tensor([[w, h] for h, w in case.shapes], dtype=torch.float32)
        offsets = 2.0 * torch.randn(n, lq, m, n_levels, p, 2, generator=gen)  # pixels of each level
        loc = ref[None, :, None, None, None, :] + offsets / wh[None, None, None, :, None, :]
    attn = torch.randn(n, lq, m, n_levels * p, generator=gen).softmax(-1).view(n, lq, m, n_levels, p)
    starts = [sum(h * w for h, w in case.shapes[:i]) for i in range(n_levels)]
    return Inputs(case.shapes, value.to(device, dtype), torch.tensor(case.shapes, device=device),
                  torch.tensor(starts, device=device), loc.to(device, dtype), attn.to(device, dtype))


def implementations(device: str, names: list[str] | None) -> dict[str, Callable[[Inputs], torch.Tensor]]:
    """Every ddetr backend that can run on ``device`` plus "hf" (transformers' grid_sample path)."""
    impls: dict[str, Callable[[Inputs], torch.Tensor]] = {}
    for name in ddetr.ops.available_backends(torch.empty(0, device=device)):
        impls[name] = lambda x, b=name: ddetr.ops.ms_deform_attn(
            x.value, x.shapes, x.level_start_index, x.sampling_locations, x.attention_weights, backend=b)
    from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention

    hf = MultiScaleDeformableAttention()
    impls["hf"] = lambda x: hf(x.value, x.spatial_shapes, x.shapes, x.level_start_index, x.sampling_locations,
                               x.attention_weights, 64)
    if names:
        unknown = set(names) - set(impls)
        if unknown:
            raise SystemExit(f"--impls: {sorted(unknown)} not available on {device}; "
                             f"choose from {sorted(impls)}")
        impls = {k: v for k, v in impls.items() if k in names}
    return impls


def with_grad(x: Inputs) -> Inputs:
    """Leaf copies of the float inputs that require grad."""
    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone().requires_grad_(True)
    return Inputs(x.shapes, leaf(x.value), x.spatial_shapes, x.level_start_index, leaf(x.sampling_locations),
                  leaf(x.attention_weights))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str, repeats: int, warmup: int) -> tuple[float, float]:
    """(median, min) ms per call after ``warmup`` calls. On CUDA each sample spans >= 1 ms of calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    inner = 1
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        inner = max(1, int(1.0 / max(start.elapsed_time(end), 1e-3)))
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / inner)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples), min(samples)


def forward_fn(impl: Callable[[Inputs], torch.Tensor], x: Inputs) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.no_grad():
            return impl(x)
    return run


def backward_fn(impl: Callable[[Inputs], torch.Tensor], x: Inputs,
                grad_out: torch.Tensor) -> Callable[[], None]:
    xg = with_grad(x)

    def run() -> None:
        for t in (xg.value, xg.sampling_locations, xg.attention_weights):
            t.grad = None
        impl(xg).backward(grad_out)
    return run


def measure_memory_here(impl: Callable[[Inputs], torch.Tensor], x: Inputs,
                        device: str) -> tuple[float, float]:
    """Peak extra MB of one forward and one forward+backward in this process (CUDA allocator statistics)."""
    n, _, m, d = x.value.shape
    grad_out = torch.randn(n, x.sampling_locations.shape[1], m * d, device=device, dtype=x.value.dtype)
    peaks = []
    for fn in (forward_fn(impl, x), backward_fn(impl, x, grad_out)):
        fn()  # warm-up: lazy initialisation is not the op's memory
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peaks.append((torch.cuda.max_memory_allocated() - base) / 2**20)
    return peaks[0], peaks[1]


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _extra_rss_mb(fn: Callable[[], object]) -> float:
    """Peak RSS growth during ``fn()``: reset the kernel's high-water mark (clear_refs), run, read VmHWM."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _proc_status_mb("VmRSS")
    fn()
    return _proc_status_mb("VmHWM") - base


def memory_probe(spec: dict) -> None:
    """Subprocess entry: print {"fwd": MB, "fwd_bwd": MB}, the peak RSS growth of one call on ready inputs."""
    torch.set_num_threads(spec["threads"])
    case, dtype = Case(**spec["case"]), DTYPES[spec["dtype"]]
    case.shapes = [(h, w) for h, w in case.shapes]  # JSON turned the pairs into lists
    impl = implementations("cpu", [spec["impl"]])[spec["impl"]]
    tiny = Case("tiny", [(4, 5), (2, 3)], 6, 1, case.points, case.heads, case.dim)
    warm = make_inputs(tiny, "cpu", dtype, spec["locations"])
    # One tiny call first: loading libraries, JIT and thread pools is not the op's memory.
    backward_fn(impl, warm, torch.randn(1, 6, case.heads * case.dim, dtype=dtype))()
    x = make_inputs(case, "cpu", dtype, spec["locations"])
    grad_out = torch.randn(case.batch, case.lq, case.heads * case.dim, dtype=dtype)
    fwd, bwd = forward_fn(impl, x), backward_fn(impl, x, grad_out)  # allocates the leaf copies now
    print(json.dumps({"fwd": _extra_rss_mb(fwd), "fwd_bwd": _extra_rss_mb(bwd)}))


def measure_memory_subprocess(impl: str, case: Case, args: argparse.Namespace) -> tuple[float, float]:
    spec = {"impl": impl, "case": asdict(case), "dtype": args.dtype, "locations": args.locations,
            "threads": args.threads}
    # A fixed mmap threshold makes glibc return freed large blocks to the OS, so RSS tracks live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-m", "ddetr.bench.op", "--memory-probe", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "probe failed")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["fwd"], result["fwd_bwd"]


def fmt(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def cpu_ms_per_call(fn: Callable[[], object], repeats: int) -> float:
    """Median process CPU time (all threads, user + system) per call: work done, whatever the wall clock."""
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        samples.append((time.process_time() - t0) * 1e3)
    return statistics.median(samples)


def print_batch_scaling(results: dict[tuple[str, str, int], tuple[float, float, float, float]]) -> None:
    """Cost of each batch relative to batch 1, per case and implementation: wall (median, min) and CPU time."""
    lines = []
    for (case, name, batch), (fwd_med, fwd_min, bwd_med, cpu) in results.items():
        one = results.get((case, name, 1))
        if batch == 1 or one is None:
            continue
        lines.append(f"| {case} | {name} | {batch} | {fwd_med / one[0]:.2f}x | {fwd_min / one[1]:.2f}x | "
                     f"{bwd_med / one[2]:.2f}x | {cpu / one[3]:.2f}x |")
    if lines:
        print("\nBatch N relative to batch 1 (fwd CPU = process CPU time of one forward, all threads):\n")
        print("| case | impl | N | fwd median | fwd min | fwd+bwd median | fwd CPU |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(lines))


def benchmark_cases(cases: list[Case], args: argparse.Namespace) -> None:
    """Time (and measure memory of) every implementation on every case; print one markdown table."""
    dtype = DTYPES[args.dtype]
    impls = implementations(args.device, args.impls)
    scaling_results = {}
    print("| case | N | impl | fwd median ms | fwd min ms | fwd+bwd median ms | fwd+bwd min ms | "
          "fwd peak MB | fwd+bwd peak MB | fwd vs HF | fwd+bwd vs HF | max abs diff vs HF |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case in cases:
        x = make_inputs(case, args.device, dtype, args.locations)
        grad_out = torch.randn(case.batch, case.lq, case.heads * case.dim, device=args.device, dtype=dtype)
        rows, outputs = {}, {}
        for name, impl in impls.items():
            try:
                outputs[name] = forward_fn(impl, x)().float()
                fwd = time_call(forward_fn(impl, x), args.device, args.repeats, args.warmup)
                bwd = time_call(backward_fn(impl, x, grad_out), args.device, args.repeats, args.warmup)
                if args.no_memory:
                    mem = (None, None)
                elif args.device == "cuda":
                    mem = measure_memory_here(impl, x, args.device)
                else:
                    mem = measure_memory_subprocess(name, case, args)
                rows[name] = (fwd, bwd, mem)
                if args.device == "cpu":
                    cpu = cpu_ms_per_call(forward_fn(impl, x), args.repeats)
                    scaling_results[(case.name, name, case.batch)] = (fwd[0], fwd[1], bwd[0], cpu)
            except Exception as exc:  # report and keep going: one broken backend must not hide the others
                print(f"<!-- {case.name} N={case.batch} {name} failed: {type(exc).__name__}: {exc} -->")
        hf = rows.get("hf")
        for name, (fwd, bwd, mem) in rows.items():
            fwd_ratio = hf[0][0] / fwd[0] if hf else None
            bwd_ratio = hf[1][0] / bwd[0] if hf else None
            diff = f"{(outputs[name] - outputs['hf']).abs().max().item():.1e}" if "hf" in outputs else "n/a"
            print(f"| {case.name} | {case.batch} | {name} | {fwd[0]:.2f} | {fwd[1]:.2f} | {bwd[0]:.2f} | "
                  f"{bwd[1]:.2f} | {fmt(mem[0])} | {fmt(mem[1])} | {fmt(fwd_ratio, 2)}x | "
                  f"{fmt(bwd_ratio, 2)}x | {diff} |", flush=True)
    print_batch_scaling(scaling_results)


def scaling(args: argparse.Namespace) -> None:
    """Forward min time vs queries (P fixed) and points (Lq fixed): a linear op keeps ns/sample constant.

    The min, not the median, because it is the number least disturbed by other load on a shared machine.
    """
    dtype = DTYPES[args.dtype]
    impls = implementations(args.device, args.impls)
    shapes = QUICK_SHAPES if args.quick else ENCODER_SHAPES
    s = sum(h * w for h, w in shapes)
    batch = args.batch[0]
    sweeps = [("queries", Case(f"Lq={lq}", shapes, lq, batch)) for lq in (s // 16, s // 8, s // 4, s // 2, s)]
    sweeps += [("points", Case(f"P={p}", shapes, s // 4, batch, points=p)) for p in (1, 2, 4, 8, 16)]
    names = list(impls)
    columns = " | ".join(f"{n} fwd min ms | {n} ns/sample" for n in names)
    print(f"| sweep | case | samples N*Lq*M*L*P | {columns} |")
    print("|---|---|---|" + "---|---|" * len(names))
    for sweep, case in sweeps:
        x = make_inputs(case, args.device, dtype, args.locations)
        samples = case.batch * case.lq * case.heads * len(case.shapes) * case.points
        cells = []
        for impl in impls.values():
            ms = time_call(forward_fn(impl, x), args.device, args.repeats, args.warmup)[1]
            cells.append(f"{ms:.2f} | {ms * 1e6 / samples:.2f}")
        print(f"| {sweep} | {case.name} | {samples:,} | {' | '.join(cells)} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddetr bench op", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for CPU runs")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--locations", default="realistic", choices=["realistic", "uniform"])
    parser.add_argument("--impls", nargs="+", help="subset of backends and 'hf' (default: all available)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (>= 5)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="small shapes (levels 25x42..4x6, 100 queries)")
    parser.add_argument("--scaling", action="store_true", help="time vs number of queries and points instead")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(json.loads(args.memory_probe))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else ""
    print(f"torch {torch.__version__}, {args.device} {gpu or platform.processor() or platform.machine()}, "
          f"{args.threads} threads, {args.dtype}, {args.locations} locations, "
          f"{args.repeats} runs after {args.warmup} warm-up\n")
    if args.scaling:
        scaling(args)
        return 0
    shapes = QUICK_SHAPES if args.quick else ENCODER_SHAPES
    s = sum(h * w for h, w in shapes)
    cases = [Case("encoder", shapes, s, n) for n in args.batch]
    cases += [Case("decoder", shapes, 100 if args.quick else 300, n) for n in args.batch]
    benchmark_cases(cases, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
