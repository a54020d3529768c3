"""Where one training step's time goes, per kind of operator, ours next to HF's on the same weights.

Each operator call of a step (forward, loss, backward) is timed on its own through a dispatch mode, which adds a
few microseconds a call and no memory; `torch.profiler` is not used because it page-faults every large output
(400-700k faults in a profiled 800x1333 step of ours against 0-11k unprofiled), which inflates exactly the big
GEMMs and convolutions this is meant to rate. Kinds: dense products (mm, addmm, bmm, oneDNN linears) and
convolutions with their rates in GFLOP/s, the attention's sampling (our fused operator, HF's grid_sample), and
the rest. Ours runs channels_last as `ddetr train` does.

    ddetr bench step-ops --keep-freed-memory                    # deformable-detr, 800x1333, batch 1
    ddetr bench step-ops --size 256 320 --presets deformable-detr-refine
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ddetr.bench.model import hf_twin, random_targets
from ddetr.cli.common import positive_int
from ddetr.engine.malloc import keep_freed_memory
from ddetr.models import build, preset

GEMMS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "_linear_pointwise", "_addmm_activation"}
SAMPLING = {"grid_sampler_2d", "grid_sampler_2d_backward"}
CONV_MODULE = os.path.join("ddetr", "ops", "conv.py")  # its GEMMs are convolution weight gradients
TAPWISE = " (tap-wise convolution weight gradient)"  # appended to the GEMMs called from CONV_MODULE
KINDS = ("dense products", "convolutions", "attention sampling", "everything else")


def _called_from(filename_end: str, depth: int = 6) -> bool:
    """Whether one of the few innermost Python frames runs in a file whose path ends so."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code.co_filename.endswith(filename_end):
            return True
        frame = frame.f_back
    return False


def kind(name: str) -> str:
    if name.endswith(TAPWISE):
        return KINDS[1]
    if name in GEMMS:
        return KINDS[0]
    if name.startswith(("convolution", "_convolution", "mkldnn_convolution")):
        return KINDS[1]
    if name in SAMPLING or name.startswith("ms_deform_attn"):
        return KINDS[2]
    return KINDS[3]


def flops(name: str, args: tuple, out: object, overload: str = "default") -> float:
    """Multiply-adds x 2 of a product or convolution call, from its operand shapes; 0 for anything else."""
    t = [a for a in args if isinstance(a, torch.Tensor)]
    name = name.removesuffix(TAPWISE)
    if name == "mm":
        return 2.0 * t[0].shape[0] * t[0].shape[1] * t[1].shape[1]
    if name in ("addmm", "addmm_", "_addmm_activation"):
        return 2.0 * t[1].shape[0] * t[1].shape[1] * t[2].shape[1]
    if name == "bmm":
        return 2.0 * t[0].shape[0] * t[0].shape[1] * t[0].shape[2] * t[1].shape[2]
    if name == "baddbmm":
        return 2.0 * t[1].shape[0] * t[1].shape[1] * t[1].shape[2] * t[2].shape[2]
    if name == "_linear_pointwise":  # x (..., k), w (n, k); the binary overload has the residual before w
        return 2.0 * t[0].numel() * t[2 if overload == "binary" else 1].shape[0]
    if name == "convolution" and isinstance(out, torch.Tensor):
        w = t[1]
        return 2.0 * out.numel() * (w.numel() // w.shape[0])
    if name == "convolution_backward":  # grad_out, input, weight, ...; output_mask says which gradients
        grad_out, w, mask = t[0], t[2], args[-1]
        return 2.0 * grad_out.numel() * (w.numel() // w.shape[0]) * (int(mask[0]) + int(mask[1]))
    return 0.0


class OpTimer(TorchDispatchMode):
    """Wall time, calls and FLOPs per operator name while active."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)
        self.flops: dict[str, float] = collections.defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        name = func.overloadpacket.__name__
        if name in GEMMS and _called_from(CONV_MODULE):
            name += TAPWISE
        self.seconds[name] += elapsed
        self.calls[name] += 1
        self.flops[name] += flops(name, args, out, func._overloadname)
        return out


def time_step(step: Callable[[], None], repeats: int) -> tuple[float, OpTimer]:
    """Fastest untimed step of ``repeats`` (after a warm-up), then one step with every operator timed."""
    step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    timer = OpTimer()
    with timer:
        step()
    return best, timer


def report(impl: str, wall: float, timer: OpTimer, top: int) -> None:
    total = sum(timer.seconds.values())
    print(f"\n### {impl}: step {wall:.2f} s untimed; operators {total:.2f} s when each is timed\n")
    print("| kind | s | share | GFLOP/s |")
    print("|---|---|---|---|")
    for k in KINDS:
        names = [n for n in timer.seconds if kind(n) == k]
        s = sum(timer.seconds[n] for n in names)
        f = sum(timer.flops[n] for n in names)
        rate = f"{f / s / 1e9:.0f}" if f and s else "—"
        print(f"| {k} | {s:.2f} | {s / total:.0%} | {rate} |")
    print(f"\n| operator ({impl}) | kind | calls | s | GFLOP/s |")
    print("|---|---|---|---|---|")
    for name in sorted(timer.seconds, key=lambda n: -timer.seconds[n])[:top]:
        s, f = timer.seconds[name], timer.flops[name]
        rate = f"{f / s / 1e9:.0f}" if f and s else "—"
        print(f"| {name} | {kind(name)} | {timer.calls[name]} | {s:.3f} | {rate} |")


def step_ops_preset(name: str, batch: int, size: tuple[int, int], repeats: int, top: int) -> None:
    """Both implementations' steps for one preset, same weights; HF skipped for the dense baseline."""
    device = torch.device("cpu")
    torch.manual_seed(0)
    cfg = preset(name)
    model, criterion, _ = build(cfg, backbone_weights=False)
    hf = None if cfg.model.dense_attention else hf_twin(model, device)
    model.use_channels_last()
    model.train()
    images = torch.randn(batch, 3, *size)
    masks = torch.zeros(batch, *size, dtype=torch.bool)
    targets = random_targets(batch, cfg.model.num_classes, device)

    def ours() -> None:
        criterion(model(images, masks), targets)["loss"].backward()
        model.zero_grad(set_to_none=True)

    print(f"\n## {name}")
    report("ours", *time_step(ours, repeats), top)
    if hf is None:
        return
    hf.train()
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    pixel_mask = (~masks).long()

    def theirs() -> None:
        hf(pixel_values=images, pixel_mask=pixel_mask, labels=labels).loss.backward()
        hf.zero_grad(set_to_none=True)

    report("HF", *time_step(theirs, repeats), top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddetr bench step-ops", description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["deformable-detr"])
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--size", type=positive_int, nargs=2, default=[800, 1333], metavar=("H", "W"))
    parser.add_argument("--threads", type=positive_int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats", type=positive_int, default=2,
                        help="untimed steps after a warm-up; the fastest is shown")
    parser.add_argument("--top", type=positive_int, default=12, help="operators listed per implementation")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="keep freed memory in the heap for the whole process, as ddetr's CPU commands do")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    kept = args.keep_freed_memory and keep_freed_memory()
    print(f"torch {torch.__version__}, cpu, {torch.get_num_threads()} threads, image {args.size[0]}x{args.size[1]}, "
          f"batch {args.batch}, {'freed memory kept in the heap' if kept else 'default allocator'}")
    for name in args.presets:
        step_ops_preset(name, args.batch, tuple(args.size), args.repeats, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
